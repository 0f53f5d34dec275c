"""How good are the learned user segments? Plain numpy + scikit-learn.

Three questions, one function each:

- `segment_quality`: are the segments compact and separated in embedding
  space (silhouette, Davies-Bouldin), balanced (sizes), and, on synthetic
  data with planted segments, do they recover the truth (ARI, NMI)?
- `stability`: do two runs (seeds, refreshes) assign users alike (ARI)?
- `compare_methods`: would an off-the-shelf clustering of the same
  embeddings (agglomerative Ward, DBSCAN) find the same or better structure?

The segrec user embeddings are L2-normalised and scored by dot product, so
silhouette uses cosine distance. Metrics that cannot be computed (one
cluster, fewer points than needed) are NaN rather than an exception: a
collapsed segmentation is a result to report, not a crash.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm
from sklearn.cluster import DBSCAN, AgglomerativeClustering
from sklearn.neighbors import NearestNeighbors

NOISE = -1  # DBSCAN's label for points in no cluster


def _check(embeddings, labels):
    embeddings = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [U, d]; got shape {embeddings.shape}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries; embeddings has {embeddings.shape[0]} rows")
    return embeddings, labels


def _sample_idx(n: int, sample: int | None, seed: int) -> np.ndarray:
    if sample is None or n <= sample:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


def _n_clusters(labels: np.ndarray) -> int:
    return int(np.unique(labels[labels != NOISE]).size)


def _silhouette(x: np.ndarray, labels: np.ndarray, metric: str = "cosine") -> float:
    n_labels = np.unique(labels).size
    if n_labels < 2 or n_labels > labels.shape[0] - 1:
        return float("nan")
    return float(skm.silhouette_score(x, labels, metric=metric))


def _davies_bouldin(x: np.ndarray, labels: np.ndarray) -> float:
    n_labels = np.unique(labels).size
    if n_labels < 2 or n_labels > labels.shape[0] - 1:
        return float("nan")
    return float(skm.davies_bouldin_score(x, labels))


def segment_quality(
    embeddings: np.ndarray,
    labels: np.ndarray,
    truth: np.ndarray | None = None,
    sample: int | None = 5000,
    seed: int = 0,
) -> dict:
    """Quality of one segmentation.

    Args:
      embeddings: [U, d] user embeddings.
      labels: [U] int segment per user (NOISE = -1 allowed: such users are
        left out of silhouette / Davies-Bouldin and counted in n_noise).
      truth: optional [U] planted segment per user (synthetic data).
      sample: silhouette is O(U^2); above `sample` users it is computed on a
        seeded random sample of that many users (None: always all users).
      seed: seed of that sample.

    Returns:
      {"n_users", "n_segments" (non-empty, noise excluded), "sizes" (list,
      users per segment id 0..max; empty segments show as 0), "largest_share",
      "n_noise", "silhouette" (cosine, in [-1, 1], higher is better),
      "davies_bouldin" (Euclidean, >= 0, lower is better), and with truth
      "adjusted_rand" and "nmi" (over all users, noise as its own group)}.
    """
    embeddings, labels = _check(embeddings, labels)
    labels = labels.astype(np.int64)
    clustered = labels != NOISE
    sizes = np.bincount(labels[clustered]) if clustered.any() else np.zeros(0, np.int64)
    out = {
        "n_users": int(labels.shape[0]),
        "n_segments": int(np.count_nonzero(sizes)),
        "sizes": [int(s) for s in sizes],
        "largest_share": float(sizes.max() / labels.shape[0]) if sizes.size else float("nan"),
        "n_noise": int(np.count_nonzero(~clustered)),
    }
    idx = np.flatnonzero(clustered)
    sub = idx[_sample_idx(idx.size, sample, seed)]
    out["silhouette"] = _silhouette(embeddings[sub], labels[sub])
    out["davies_bouldin"] = _davies_bouldin(embeddings[idx], labels[idx])
    if truth is not None:
        truth = np.asarray(truth).reshape(-1)
        if truth.shape != labels.shape:
            raise ValueError(f"truth has {truth.shape[0]} entries; labels has {labels.shape[0]}")
        out["adjusted_rand"] = float(skm.adjusted_rand_score(truth, labels))
        out["nmi"] = float(skm.normalized_mutual_info_score(truth, labels))
    return out


def stability(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index of two segmentations of the same users ([U] each).

    Invariant to renumbering segments; 1.0 = identical partitions, ~0 = chance.
    """
    labels_a = np.asarray(labels_a).reshape(-1)
    labels_b = np.asarray(labels_b).reshape(-1)
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"labels_a ({labels_a.shape[0]}) and labels_b ({labels_b.shape[0]}) differ in length")
    return float(skm.adjusted_rand_score(labels_a, labels_b))


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knee_eps(x: np.ndarray, min_samples: int) -> float:
    """DBSCAN eps by the k-distance heuristic (Ester et al. 1996).

    Sorts every point's distance to its `min_samples`-th nearest neighbour
    (itself counted, as DBSCAN counts it) and takes the knee of that curve:
    the point farthest from the chord joining its ends. Points left of the
    knee sit in dense regions; right of it the distances shoot up (noise).

    Args:
      x: [n, d] points.
    Returns:
      eps > 0.
    """
    k = min(min_samples, x.shape[0])
    dist, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    kd = np.sort(dist[:, -1])
    span = kd[-1] - kd[0]
    if span <= 0:
        return float(kd[-1]) if kd[-1] > 0 else 1e-6
    # Knee on the curve scaled to the unit square.
    xs = np.linspace(0.0, 1.0, kd.size)
    ys = (kd - kd[0]) / span
    knee = int(np.argmax(xs - ys))  # distance below the chord y = x (convex curve)
    eps = float(kd[knee])
    return eps if eps > 0 else float(kd[kd > 0][0])


def compare_methods(
    embeddings: np.ndarray,
    labels: np.ndarray,
    k: int,
    seed: int = 0,
    *,
    max_points: int = 5000,
    min_samples: int = 5,
    normalize: bool = True,
) -> list[dict]:
    """The learned segments beside two scikit-learn clusterings of the same embeddings.

    Methods: "learned" (the given labels), "agglomerative_ward" (k clusters)
    and "dbscan" (eps from `knee_eps`, `min_samples`; it picks its own number
    of clusters). Ward's memory is O(n^2), so above `max_points` users every
    method is scored on the same seeded sample of that many users.
    With `normalize`, rows are L2-normalised first, so Euclidean distance
    follows the cosine geometry the model scores with.

    DBSCAN noise (label -1): silhouette is computed on clustered points only
    and noise_share reports the rest; ARI vs learned uses all points, noise
    forming one extra group (so lots of noise lowers the ARI, as it should).

    Args:
      embeddings: [U, d] user embeddings.
      labels: [U] learned segment per user.
      k: number of clusters for Ward (usually the model's K).

    Returns:
      One dict per method: {"method", "n_clusters", "silhouette",
      "ari_vs_learned", "noise_share", "params"}.
    """
    embeddings, labels = _check(embeddings, labels)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    idx = _sample_idx(embeddings.shape[0], max_points, seed)
    x = embeddings[idx]
    learned = labels[idx]
    if normalize:
        x = _l2_normalize(x)
    n = x.shape[0]

    def row(method, lab, params):
        clustered = lab != NOISE
        return {
            "method": method,
            "n_clusters": _n_clusters(lab),
            "silhouette": _silhouette(x[clustered], lab[clustered]),
            "ari_vs_learned": float(skm.adjusted_rand_score(learned, lab)),
            "noise_share": float(1.0 - clustered.mean()) if n else float("nan"),
            "params": params,
        }

    rows = [row("learned", learned, {})]
    n_ward = min(k, n)
    ward = AgglomerativeClustering(n_clusters=n_ward, linkage="ward").fit_predict(x) if n >= 2 else np.zeros(n, int)
    rows.append(row("agglomerative_ward", ward, {"n_clusters": int(n_ward)}))
    eps = knee_eps(x, min_samples) if n >= 2 else 1e-6
    db = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x)
    rows.append(row("dbscan", db, {"eps": float(eps), "min_samples": int(min_samples)}))
    return rows
