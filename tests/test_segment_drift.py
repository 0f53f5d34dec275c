"""Tests of trainer.segments.drift: centroid updates, migration, PSI, verdict (values by hand)."""

import math

import numpy as np
import pytest

from trainer.segments import drift as sd


def test_assign_by_max_cosine_ignores_norms():
    c = np.array([[1.0, 0.0], [0.0, 3.0]])  # norms do not matter
    x = np.array([[2.0, 0.1], [0.1, 0.2], [-1.0, -0.5], [1.0, 1.0]])
    labels, cos = sd.assign(x, c)
    # [-1,-.5]: cosines -0.89 and -0.45, the larger wins; [1,1] ties: the lower id, as tf.argmax.
    assert labels.tolist() == [0, 1, 1, 0]
    assert cos[0] == pytest.approx(2.0 / math.hypot(2.0, 0.1))
    assert cos[3] == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match=r"embeddings must be \[U, 2\]"):
        sd.assign(np.ones((3, 4)), c)


def test_apply_batch_by_hand():
    c = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Centre 0 (v=1) takes x=[0.8, 0.6]: (1*[1,0] + [0.8,0.6]) / 2 = [0.9, 0.3] -> unit [3, 1]/sqrt(10).
    # Centre 1 gets nothing and stays put.
    sums, n = sd.batch_stats(np.array([[0.8, 0.6]]), c)
    assert n.tolist() == [1, 0]
    new, v = sd.apply_batch(c, np.array([1.0, 1.0]), sums, n)
    np.testing.assert_allclose(new, [[3 / math.sqrt(10), 1 / math.sqrt(10)], [0.0, 1.0]])
    assert v.tolist() == [2.0, 1.0]
    # v = 0: the centre jumps to its batch mean.
    new0, _ = sd.apply_batch(c, np.zeros(2), sums, n)
    np.testing.assert_allclose(new0[0], [0.8, 0.6])
    with pytest.raises(ValueError, match="shapes disagree"):
        sd.apply_batch(c, np.ones(3), sums, n)


def test_batch_update_equals_sculleys_per_point_updates():
    rng = np.random.default_rng(0)
    c = sd.unit(rng.normal(size=(3, 5)))
    v0 = np.array([4.0, 0.0, 9.0])
    x = sd.unit(rng.normal(size=(40, 5)))
    labels, _ = sd.assign(x, c)
    # Sculley 2010, Algorithm 1 with the batch's assignments cached: v += 1, eta = 1/v.
    seq, v = c.copy(), v0.copy()
    for xi, k in zip(x, labels):
        v[k] += 1
        eta = 1.0 / v[k]
        seq[k] = (1 - eta) * seq[k] + eta * xi
    new, v_new = sd.apply_batch(c, v0, *sd.batch_stats(x, c))
    np.testing.assert_allclose(new, sd.unit(seq), atol=1e-12)
    np.testing.assert_allclose(v_new, v)


def test_minibatch_kmeans_follows_the_data_and_respects_the_prior():
    rng = np.random.default_rng(1)
    old = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = sd.unit(np.array([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))  # each segment tilts 45 degrees
    x = np.concatenate([target[0] + 0.01 * rng.normal(size=(50, 3)), target[1] + 0.01 * rng.normal(size=(50, 3))])
    ids = [f"u{i}" for i in range(100)]
    # No prior: one whole-window batch lands on the new means.
    c0, v = sd.minibatch_kmeans(old, x, ids, np.array([50, 50]), sd.KMeansSettings(iterations=1, prior_weight=0.0))
    assert np.all(1 - np.sum(c0 * target, axis=1) < 1e-3)
    assert v.tolist() == [50, 50]
    # Prior of equal weight, three whole-window batches (v = 50, 100, 150 before each):
    # c <- unit((v c + S) / (v + 50)) with S the sum of the segment's 50 points.
    c3, v3 = sd.minibatch_kmeans(old, x, ids, np.array([50, 50]), sd.KMeansSettings(iterations=3))
    s0, want = sd.unit(x[:50]).sum(axis=0), old[0]
    for v_k in (50, 100, 150):
        want = sd.unit(((v_k * want + s0) / (v_k + 50))[None])[0]
    np.testing.assert_allclose(c3[0], want, atol=1e-9)
    assert v3.tolist() == [200, 200]
    shift = sd.centroid_shift(old, c3)
    assert np.all((shift > 0.1) & (shift < 1 - math.cos(math.pi / 4)))  # moved, but less than all the way


def test_minibatch_sampling_is_seeded_and_sized():
    ids = [f"user{i}" for i in range(2000)]
    a = [sd.in_batch(u, 0, 0.25, seed=3) for u in ids]
    assert a == [sd.in_batch(u, 0, 0.25, seed=3) for u in ids]
    assert a != [sd.in_batch(u, 1, 0.25, seed=3) for u in ids]
    assert 0.22 < np.mean(a) < 0.28
    assert all(sd.in_batch(u, 5, 1.0, seed=0) for u in ids[:10])
    with pytest.raises(ValueError, match="batch-fraction"):
        sd.KMeansSettings(batch_fraction=0.0)


def test_migration_matrix_and_top_moves():
    old = {"a": 0, "b": 0, "c": 1, "d": 2, "gone": 1}
    new = {"a": 0, "b": 2, "c": 1, "d": 2, "fresh": 0}
    m = sd.migration_matrix(old, new, 3)
    assert m.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert sd.top_moves(m) == [(0, 2, 1, 0.5)]
    with pytest.raises(ValueError, match="outside 0..2"):
        sd.migration_matrix({"a": 3}, {"a": 0}, 3)


def test_psi_by_hand():
    # p = [.5, .5], q = [.25, .75]:
    # (.25-.5) ln(.25/.5) + (.75-.5) ln(.75/.5) = .25 ln 2 + .25 ln 1.5 = 0.173287 + 0.101366 = 0.274653
    per, total = sd.psi([50, 50], [25, 75])
    np.testing.assert_allclose(per, [0.25 * math.log(2), 0.25 * math.log(1.5)])
    assert total == pytest.approx(0.274653, abs=1e-6)
    assert sd.psi([10, 20, 30], [20, 40, 60])[1] == pytest.approx(0.0)  # same shares
    # An empty segment is floored at epsilon, not infinite.
    per, total = sd.psi([10, 0], [5, 5], epsilon=1e-4)
    p0 = 1e-4 / (1 + 1e-4)
    assert per[1] == pytest.approx((0.5 - p0) * math.log(0.5 / p0))
    assert math.isfinite(total)


def test_centroid_shift_and_new_vanished():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 2.0], [0.0, 1.0]])
    np.testing.assert_allclose(sd.centroid_shift(a, b), [1.0, 0.0])
    assert sd.appeared_vanished([5, 30, 25], [25, 30, 10], 20) == ([0], [2])


def _labels(rng, n, k):
    return {f"u{i}": int(rng.integers(0, k)) for i in range(n)}


def test_drift_report_flags_a_planted_move_and_not_noise():
    rng = np.random.default_rng(0)
    c = sd.unit(rng.normal(size=(3, 8)))
    old = {f"u{i}": i % 3 for i in range(300)}  # 100 per segment
    # Planted: 40% of segment 0 (40 users) move to segment 1.
    new = dict(old)
    for i in range(0, 300, 3)[:40]:
        new[f"u{i}"] = 1
    r = sd.drift_report(c, c, old, new, min_segment_users=20)
    assert r["migration"][0][1] == 40 and r["users_moved"] == 40 and r["users_both"] == 300
    assert r["sizes_old"] == [100, 100, 100] and r["sizes_new"] == [60, 140, 100]
    # PSI: (.2-.3333) ln(.2/.3333) + (.4667-.3333) ln(.4667/.3333) = 0.0681 + 0.0449 = 0.1130
    assert r["psi_total"] == pytest.approx(0.1130, abs=1e-3)
    assert r["retrain_advised"] is False  # 13% moved, PSI 0.11: under the defaults
    strict = sd.drift_report(c, c, old, new, thresholds=sd.DriftThresholds(psi=0.1, moved_share=0.1))
    assert strict["retrain_advised"] and len(strict["reasons"]) == 2
    assert strict["verdict"].startswith("DRIFT: retraining advised")
    # A collapsed segment is "vanished" and a big centroid move is flagged too.
    new2 = {u: (1 if s == 0 else s) for u, s in old.items()}
    c2 = c.copy()
    c2[2] = -c[2]
    r2 = sd.drift_report(c, c2, old, new2)
    assert r2["vanished_segments"] == [0] and r2["retrain_advised"]
    assert any("centroid moved 2.000" in x for x in r2["reasons"])
    quiet = sd.drift_report(c, c, old, dict(old))
    assert not quiet["retrain_advised"] and quiet["verdict"].startswith("no drift")
    with pytest.raises(ValueError, match="psi"):
        sd.DriftThresholds(psi=-1)
