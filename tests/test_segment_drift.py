"""Tests of trainer.segments.drift: centroid updates, migration, PSI, verdicts on enough users (values by hand)."""

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
    # Unsmoothed (alpha -> 0): p = [.5, .5], q = [.25, .75]:
    # (.25-.5) ln(.25/.5) + (.75-.5) ln(.75/.5) = .25 ln 2 + .25 ln 1.5 = 0.173287 + 0.101366 = 0.274653
    per, total = sd.psi([50, 50], [25, 75], alpha=1e-12)
    np.testing.assert_allclose(per, [0.25 * math.log(2), 0.25 * math.log(1.5)])
    assert total == pytest.approx(0.274653, abs=1e-6)
    # Smoothed (alpha = 0.5, the default): p = [50.5, 50.5] / 101 = [.5, .5],
    # q = [25.5, 75.5] / 101 = [.252475, .747525]:
    # .247525 ln(.5/.252475) + .247525 ln(.747525/.5) = .247525 (.683296 + .402163) = 0.268677
    per, total = sd.psi([50, 50], [25, 75])
    np.testing.assert_allclose(per, [0.247525 * math.log(0.5 / 0.252475), 0.247525 * math.log(0.747525 / 0.5)],
                               rtol=1e-5)
    assert total == pytest.approx(0.268677, abs=1e-5)
    assert sd.psi([10, 20, 30], [20, 40, 60])[1] == pytest.approx(0.0, abs=2e-4)  # same shares, up to smoothing
    # An empty segment: p = [10.5, .5] / 11 = [.954545, .045455], q = [5.5, 5.5] / 11 = [.5, .5];
    # its term is (.5 - .045455) ln(.5 / .045455) = .454545 x 2.397895 = 1.089952: finite, and smaller
    # in a bigger window, where the empty segment is surer to be (nearly) empty.
    per, total = sd.psi([10, 0], [5, 5])
    assert per[1] == pytest.approx(0.454545 * math.log(0.5 / 0.045455), rel=1e-5)
    assert math.isfinite(total)
    # Smoothing pulls small windows towards "no change": the same shares from fewer users give a smaller PSI.
    assert sd.psi([6, 6], [3, 9])[1] < sd.psi([600, 600], [300, 900])[1]
    with pytest.raises(ValueError, match="alpha > 0"):
        sd.psi([1, 0], [0, 1], alpha=0.0)
    np.testing.assert_allclose(sd.shares([1, 3], 0.0), [0.25, 0.75])  # alpha 0: the raw shares
    np.testing.assert_allclose(sd.shares([1, 3], 1.0), [1 / 3, 2 / 3])  # Laplace: [2, 4] / 6


def test_psi_noise_is_what_sampling_alone_gives():
    # (K - 1)(1/n_old + 1/n_new): 3 segments, 60 users before and 47 now -> 2 (1/60 + 1/47) = 0.075887.
    assert sd.psi_noise(60, 47, 3) == pytest.approx(2 * (1 / 60 + 1 / 47))
    assert sd.psi_noise(0, 47, 3) is None
    # And it is: two samples of the same shares, many times over.
    rng = np.random.default_rng(0)
    pi = np.array([0.5, 0.3, 0.2])
    draws = [sd.psi(rng.multinomial(200, pi), rng.multinomial(200, pi))[1] for _ in range(2000)]
    assert np.mean(draws) == pytest.approx(sd.psi_noise(200, 200, 3), rel=0.15)  # 2 (2 / 200) = 0.02


def test_centroid_shift_and_segment_evidence():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 2.0], [0.0, 1.0]])
    np.testing.assert_allclose(sd.centroid_shift(a, b), [1.0, 0.0])
    # 60 users before, 65 now; segment 0 grows past 20 (25 x 60 / 65 = 23.1 >= 20 would have been there before
    # at its new share: new), segment 2 falls under it (25 x 65 / 60 = 27.1 expected now: vanished).
    assert sd.appeared_vanished([5, 30, 25], [25, 30, 10], 20) == ([0], [2])
    ev = sd.segment_evidence([5, 30, 25], [25, 30, 10], 20)
    assert [st for st, _ in ev] == [sd.NEW, sd.OK, sd.VANISHED]
    assert ev[2][1] == "25 users before, 10 now (< 20); 27.1 expected now at its old share"
    # 30 of 60 users before, 8 of 16 now: at its old share the current window holds 30 x 16 / 60 = 8 < 20,
    # so falling under 20 is what a small window does, not a vanished segment.
    ev = sd.segment_evidence([30, 30], [8, 8], 20)
    assert [st for st, _ in ev] == [sd.INSUFFICIENT, sd.INSUFFICIENT]
    assert "would hold only 8.0 at its old share (< 20): too few users to tell" in ev[0][1]
    assert sd.appeared_vanished([30, 30], [8, 8], 20) == ([], [])
    # The other way: 8 of 16 before, 30 of 60 now -> 30 x 16 / 60 = 8 expected before: not "new".
    assert [st for st, _ in sd.segment_evidence([8, 8], [30, 30], 20)] == [sd.INSUFFICIENT] * 2
    ev = sd.segment_evidence([300, 5], [300, 6], 20)  # small in both windows
    assert ev[1] == (sd.INSUFFICIENT, "fewer than 20 users in both windows (5 before, 6 now)")


def test_too_few_users_is_insufficient_data_not_drift():
    """The issue's demo run: 60 users before, 47 now, 16 in both, 6 of them moved."""
    c = np.eye(3, 4)
    mig = np.array([[5, 3, 0], [2, 4, 1], [0, 0, 1]])  # 16 users in both, trace 10: 6 moved = 37.5%
    old, new = np.array([25, 30, 5]), np.array([30, 12, 5])
    r = sd.summarize_drift(c, c, mig, old, new)
    # PSI with counts + .5: p = [25.5, 30.5, 5.5] / 61.5, q = [30.5, 12.5, 5.5] / 48.5;
    # terms .21424 ln(.62887/.41463) + -.23820 ln(.25773/.49593) + .02397 ln(.11340/.08943)
    #     = .08924 + .15591 + .00569 = 0.25084 > 0.2, but sampling alone gives 2 (1/60 + 1/47) = 0.0759.
    assert r["psi_total"] == pytest.approx(0.25084, abs=1e-4)
    assert r["psi_noise"] == pytest.approx(0.075887, abs=1e-6)
    assert r["verdict"] == sd.INSUFFICIENT_DATA and not r["retrain_advised"]
    assert r["reasons"] == ["60 users in the previous window < 200 (--min-window-users)",
                            "47 users in the current window < 200 (--min-window-users)"]
    assert r["verdict_text"].startswith("INSUFFICIENT DATA: no verdict (60 users in the previous window < 200")
    assert "16 users in both windows < 100 (--min-compared-users): moved share not judged" in r["insufficient"]
    assert not any(c_["judged"] or c_["exceeded"] for c_ in r["checks"].values())
    # The counts behind every figure are there.
    assert r["checks"]["moved_share"].items() >= {"users_moved": 6, "users_both": 16, "value": 0.375,
                                                  "min_users": 100}.items()
    assert r["checks"]["psi"]["users_old"] == 60 and r["checks"]["psi"]["users_new"] == 47
    assert r["segments"][1].items() >= {"users_old": 30, "users_new": 12, "status": sd.VANISHED}.items()
    assert r["segments"][2]["status"] == sd.INSUFFICIENT
    # With the minimums lowered to what was seen, the same figures advise retraining, with their counts.
    low = sd.summarize_drift(c, c, mig, old, new, minimums=sd.DriftMinimums(window_users=40, compared_users=10))
    assert low["verdict"] == sd.RETRAIN and low["retrain_advised"]
    assert low["reasons"] == ["PSI 0.251 > 0.2 (60 users before, 47 now)",
                              "6 of 16 users in both windows changed segment (37.5% > 30%)",
                              "segment 1 vanished (30 users before, 12 now)"]
    with pytest.raises(ValueError, match="--min-window-users must be >= 1"):
        sd.DriftMinimums(window_users=0)


def test_each_check_counts_only_on_enough_users():
    c = np.eye(3, 4)
    # Big windows (900 users each), but only 50 users in both: the moved share is not judged.
    few_both = np.diag([20, 20, 10])
    r = sd.summarize_drift(c, c, few_both, np.array([300, 300, 300]), np.array([310, 290, 300]))
    assert r["verdict"] == sd.INSUFFICIENT_DATA
    assert r["reasons"] == ["50 users in both windows < 100 (--min-compared-users): moved share not judged"]
    assert r["checks"]["psi"]["judged"] and not r["checks"]["moved_share"]["judged"]
    # ... yet a judged check over its threshold still advises retraining.
    r = sd.summarize_drift(c, c, few_both, np.array([300, 300, 300]), np.array([500, 100, 300]))
    assert r["verdict"] == sd.RETRAIN and r["reasons"][0].startswith("PSI ")
    assert any("moved share not judged" in x for x in r["insufficient"])
    # A segment under --min-segment-users in both windows neither decides nor blocks a verdict:
    # its centroid swung round (shift 2) but rests on 5 and 6 users.
    c2 = c.copy()
    c2[2] = -c[2]
    r = sd.summarize_drift(c, c2, np.diag([290, 290, 5]), np.array([300, 300, 5]), np.array([300, 300, 6]))
    assert r["verdict"] == sd.NO_DRIFT and r["centroid_shift"][2] == pytest.approx(2.0)
    assert r["checks"]["centroid_shift"]["segments_judged"] == [0, 1]
    assert r["insufficient"] == ["segment 2 under 20 users (--min-segment-users): figures not judged"]
    assert r["verdict_text"].startswith("no drift: PSI 0.000 (605 users before, 606 now), 0 of 585 users moved")


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
    r = sd.drift_report(c, c, old, new)
    assert r["migration"][0][1] == 40 and r["users_moved"] == 40 and r["users_both"] == 300
    assert r["sizes_old"] == [100, 100, 100] and r["sizes_new"] == [60, 140, 100]
    # PSI of counts + .5: p = 100.5 / 301.5 = 1/3 each, q = [60.5, 140.5, 100.5] / 301.5 = [.2007, .4660, 1/3]:
    # (.2007-.3333) ln(.2007/.3333) + (.4660-.3333) ln(.4660/.3333) = 0.0673 + 0.0445 = 0.1118
    assert r["psi_total"] == pytest.approx(0.1118, abs=1e-3)
    assert r["retrain_advised"] is False  # 13% moved, PSI 0.11: under the defaults
    strict = sd.drift_report(c, c, old, new, thresholds=sd.DriftThresholds(psi=0.1, moved_share=0.1))
    assert strict["retrain_advised"] and len(strict["reasons"]) == 2
    assert strict["verdict"] == sd.RETRAIN and strict["verdict_text"].startswith("DRIFT: retraining advised")
    assert strict["reasons"][1] == "40 of 300 users in both windows changed segment (13.3% > 10%)"
    # A collapsed segment is "vanished" and a big centroid move is flagged too.
    new2 = {u: (1 if s == 0 else s) for u, s in old.items()}
    c2 = c.copy()
    c2[2] = -c[2]
    r2 = sd.drift_report(c, c2, old, new2)
    assert r2["vanished_segments"] == [0] and r2["retrain_advised"]
    assert "segment 2 centroid moved 2.000 > 0.1 (100 users before, 100 now)" in r2["reasons"]
    quiet = sd.drift_report(c, c, old, dict(old))
    assert quiet["verdict"] == sd.NO_DRIFT and quiet["verdict_text"].startswith("no drift")
    with pytest.raises(ValueError, match="psi"):
        sd.DriftThresholds(psi=-1)
