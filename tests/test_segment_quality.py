"""Tests of trainer.segments.quality on planted blobs."""

import math

import numpy as np
import pytest

import trainer  # noqa: F401
from trainer.segments import quality as sq


def _blobs(n_per=40, d=8, seed=0, spread=0.05):
    """3 tight blobs around orthogonal directions (cosine-separated)."""
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[:3] * 3.0
    truth = np.repeat(np.arange(3), n_per)
    x = centers[truth] + spread * rng.normal(size=(truth.size, d))
    return x, truth


def test_planted_blobs_recovered():
    x, truth = _blobs()
    # The learned labels are the truth renumbered: ARI/NMI ignore numbering.
    labels = (truth + 1) % 3
    q = sq.segment_quality(x, labels, truth=truth)
    assert q["adjusted_rand"] == pytest.approx(1.0)
    assert q["nmi"] == pytest.approx(1.0)
    assert q["silhouette"] > 0.5
    assert q["davies_bouldin"] < 0.5
    assert q["sizes"] == [40, 40, 40]
    assert q["n_segments"] == 3 and q["n_noise"] == 0
    assert q["largest_share"] == pytest.approx(1 / 3)


def test_random_labels_score_badly_and_sampling_is_seeded():
    x, truth = _blobs()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, truth.size)
    q = sq.segment_quality(x, labels, truth=truth, sample=50, seed=3)
    assert q["silhouette"] < 0.2 and abs(q["adjusted_rand"]) < 0.2
    assert sq.segment_quality(x, labels, sample=50, seed=3)["silhouette"] == q["silhouette"]


def test_collapsed_segmentation_is_nan_not_crash():
    x, _ = _blobs()
    q = sq.segment_quality(x, np.zeros(x.shape[0], int))
    assert math.isnan(q["silhouette"]) and math.isnan(q["davies_bouldin"])
    assert q["largest_share"] == 1.0 and q["sizes"] == [120]


def test_stability():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert sq.stability(a, np.array([2, 2, 0, 0, 1, 1])) == pytest.approx(1.0)
    assert sq.stability(a, np.array([0, 1, 0, 1, 0, 1])) < 0.1
    with pytest.raises(ValueError, match="differ in length"):
        sq.stability(a, a[:3])


def test_compare_methods_rows():
    x, truth = _blobs()
    rows = sq.compare_methods(x, truth, k=3, seed=0)
    assert [r["method"] for r in rows] == ["learned", "agglomerative_ward", "dbscan"]
    by = {r["method"]: r for r in rows}
    assert by["learned"]["ari_vs_learned"] == 1.0
    assert by["agglomerative_ward"]["ari_vs_learned"] == pytest.approx(1.0)
    assert by["agglomerative_ward"]["n_clusters"] == 3
    for r in rows:
        assert set(r) == {"method", "n_clusters", "silhouette", "ari_vs_learned", "noise_share", "params"}
        assert 0.0 <= r["noise_share"] <= 1.0
    assert by["dbscan"]["params"]["eps"] > 0


def test_compare_methods_handles_dbscan_noise_and_sampling():
    # Blobs plus far-flung outliers: DBSCAN marks some noise (-1); the row
    # must still have a finite silhouette over the clustered points.
    x, truth = _blobs(n_per=60)
    rng = np.random.default_rng(2)
    outliers = rng.normal(size=(15, x.shape[1]))
    x = np.vstack([x, outliers])
    labels = np.r_[truth, rng.integers(0, 3, 15)]
    rows = sq.compare_methods(x, labels, k=3, seed=0, max_points=150)
    db = rows[2]
    assert db["noise_share"] > 0
    assert db["n_clusters"] >= 1
    assert math.isnan(db["silhouette"]) or -1 <= db["silhouette"] <= 1


def test_knee_eps_separates_dense_from_sparse():
    x, _ = _blobs(spread=0.05)
    eps = sq.knee_eps(sq._l2_normalize(x), 5)
    # Within-blob neighbour distances are ~0.05/3 scale; between blobs sqrt(2).
    assert 0 < eps < 0.5
