"""Segment drift: how the learned segments moved between two time windows.

Plain numpy, no TensorFlow or Beam, so every figure is unit-testable on
hand-made vectors; `beam_pipelines/refresh.py` runs the same functions on the
embeddings it computes.

- Centroid update: mini-batch k-means (Sculley 2010, "Web-scale k-means
  clustering") on the unit sphere, starting from the current centroids with
  K fixed. Each centre keeps a count v_k; a point x assigned to centre k moves
  it by c_k <- (1 - 1/v_k) c_k + (1/v_k) x after v_k += 1. With assignments
  fixed for a mini-batch (Sculley caches them per batch), the sequential
  per-point updates of one batch sum to the closed form
      c_k <- (v_k c_k + sum_{x -> k} x) / (v_k + n_k),   v_k <- v_k + n_k,
  so a batch reduces to per-centre sums and counts: a commutative combine
  (what the Beam pipeline computes with CombineGlobally). Centres are put
  back on the sphere after every batch. The starting counts are the previous
  window's segment sizes times `prior_weight`: the old centroid counts as
  the mean of that many users, so a refresh follows the new window without
  forgetting the old one in a single step.
- Assignment: max cosine (= argmax of the segment head's softmax(u C^T / tau)).
- Drift: migration matrix, centroid shift, population stability index,
  new / vanished segments, and a verdict against `DriftThresholds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Mapping, Optional, Sequence

import numpy as np

PSI_EPSILON = 1e-4  # share floor: an empty segment would make PSI infinite


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_centroids(centroids: np.ndarray, embeddings: Optional[np.ndarray] = None) -> np.ndarray:
    centroids = np.asarray(centroids, np.float64)
    if centroids.ndim != 2 or centroids.shape[0] < 1:
        raise ValueError(f"centroids must be [K, d] with K >= 1; got shape {centroids.shape}")
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != centroids.shape[1]:
            raise ValueError(
                f"embeddings must be [U, {centroids.shape[1]}] to match centroids {centroids.shape}; "
                f"got shape {embeddings.shape}"
            )
    return centroids


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine.

    Args:
      embeddings: [U, d]; centroids: [K, d] (normalised here, so any norm works).
    Returns:
      (labels [U] int64, cosine to the chosen centroid [U]). Ties go to the
      lower segment id, as np.argmax (and tf.argmax) break them.
    """
    centroids = _check_centroids(centroids, embeddings)
    if len(embeddings) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    sims = unit(embeddings) @ unit(centroids).T
    labels = np.argmax(sims, axis=1).astype(np.int64)
    return labels, sims[np.arange(len(labels)), labels]


def batch_stats(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One mini-batch's sufficient statistics: (sums [K, d], counts [K]).

    Rows are normalised first (the model's embeddings already are; this
    keeps a stray norm from outweighing other users).
    """
    centroids = _check_centroids(centroids, embeddings)
    k, d = centroids.shape
    sums, counts = np.zeros((k, d)), np.zeros(k)
    if len(embeddings) == 0:
        return sums, counts
    labels, _ = assign(embeddings, centroids)
    np.add.at(sums, labels, unit(embeddings))
    counts += np.bincount(labels, minlength=k)
    return sums, counts


def apply_batch(centroids: np.ndarray, counts: np.ndarray, batch_sums: np.ndarray,
                batch_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sculley's per-centre update for one batch, then back onto the sphere.

    Args:
      centroids: [K, d] current (unit) centres; counts: [K] their v_k.
      batch_sums: [K, d] sum of the batch's points per assigned centre;
      batch_counts: [K] how many.
    Returns:
      (new unit centroids [K, d], new counts [K]). A centre that got no
      points keeps its place; one with v_k = 0 jumps to its batch mean.
    """
    centroids = _check_centroids(centroids)
    counts = np.asarray(counts, np.float64)
    batch_sums = np.asarray(batch_sums, np.float64)
    batch_counts = np.asarray(batch_counts, np.float64)
    if counts.shape != (centroids.shape[0],) or batch_counts.shape != counts.shape or batch_sums.shape != centroids.shape:
        raise ValueError(
            f"shapes disagree: centroids {centroids.shape}, counts {counts.shape}, "
            f"batch_sums {batch_sums.shape}, batch_counts {batch_counts.shape}"
        )
    if (counts < 0).any() or (batch_counts < 0).any():
        raise ValueError("counts must be >= 0")
    total = counts + batch_counts
    moved = batch_counts > 0
    new = centroids.copy()
    new[moved] = (counts[moved, None] * centroids[moved] + batch_sums[moved]) / total[moved, None]
    return unit(new), total


def stable_fraction(key: str, salt: str) -> float:
    """A deterministic number in [0, 1) per (key, salt): the same on every worker and run.

    Python's hash() is salted per process, so mini-batch membership uses md5.
    """
    digest = hashlib.md5(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_batch(user_id: str, iteration: int, batch_fraction: float, seed: int) -> bool:
    """Whether `user_id` is in mini-batch `iteration` (a seeded sample of `batch_fraction` of users)."""
    return batch_fraction >= 1.0 or stable_fraction(user_id, f"{seed}:{iteration}") < batch_fraction


@dataclasses.dataclass(frozen=True)
class KMeansSettings:
    """Mini-batch k-means settings of a refresh.

    iterations: mini-batches (each is one pass over a sample of the window).
    batch_fraction: share of the window's users in each mini-batch, chosen by
      a seeded hash of the user id (1.0: every batch is the whole window).
    prior_weight: starting count v_k = prior_weight x the previous window's
      size of segment k (0: the old centroid is forgotten at the first batch
      that reaches it). With the defaults (3 whole-window batches, weight 1)
      and a window as large as the previous one, a centroid ends about 3/4 of
      the way from the old centroid to its members' new mean.
    seed: seeds the batch sampling.
    """

    iterations: int = 3
    batch_fraction: float = 1.0
    prior_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"--kmeans-iterations must be >= 1, got {self.iterations}")
        if not 0.0 < self.batch_fraction <= 1.0:
            raise ValueError(f"--batch-fraction must be in (0, 1], got {self.batch_fraction}")
        if self.prior_weight < 0:
            raise ValueError(f"--prior-weight must be >= 0, got {self.prior_weight}")


def minibatch_kmeans(centroids: np.ndarray, embeddings: np.ndarray, user_ids: Sequence[str],
                     prior_counts: np.ndarray, settings: KMeansSettings = KMeansSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Mini-batch k-means from the current centroids (the in-memory twin of the Beam combine).

    Args:
      centroids: [K, d] current centroids (normalised here).
      embeddings: [U, d] user embeddings of the new window.
      user_ids: [U] ids (they pick the mini-batches, as in the pipeline).
      prior_counts: [K] previous segment sizes (scaled by settings.prior_weight).
    Returns:
      (new unit centroids [K, d], final counts v [K]).
    """
    embeddings = np.asarray(embeddings, np.float64)
    c = unit(_check_centroids(centroids, embeddings))
    if len(user_ids) != len(embeddings):
        raise ValueError(f"user_ids has {len(user_ids)} entries; embeddings has {len(embeddings)} rows")
    v = np.asarray(prior_counts, np.float64) * settings.prior_weight
    for it in range(settings.iterations):
        mask = np.array([in_batch(u, it, settings.batch_fraction, settings.seed) for u in user_ids], bool)
        sums, n = batch_stats(embeddings[mask] if len(mask) else embeddings, c)
        c, v = apply_batch(c, v, sums, n)
    return c, v


# --- drift measures -------------------------------------------------------------------------------
def migration_matrix(old: Mapping[str, int], new: Mapping[str, int], k: int) -> np.ndarray:
    """[K, K] counts: row = old segment, column = new segment, over users in both maps."""
    m = np.zeros((k, k), np.int64)
    for user, a in old.items():
        b = new.get(user)
        if b is None:
            continue
        if not (0 <= a < k and 0 <= b < k):
            raise ValueError(f"user {user!r}: segment ids ({a} -> {b}) outside 0..{k - 1}")
        m[a, b] += 1
    return m


def centroid_shift(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """[K] cosine distance 1 - cos(old_k, new_k) per segment, in [0, 2]."""
    old, new = _check_centroids(old), _check_centroids(new)
    if old.shape != new.shape:
        raise ValueError(f"old centroids {old.shape} and new {new.shape} differ in shape")
    return 1.0 - np.sum(unit(old) * unit(new), axis=1)


def shares(sizes: np.ndarray, epsilon: float = PSI_EPSILON) -> np.ndarray:
    """Sizes -> shares, floored at epsilon and renormalised (PSI needs no zeros)."""
    sizes = np.asarray(sizes, np.float64)
    total = sizes.sum()
    p = sizes / total if total > 0 else np.full(sizes.shape, 1.0 / max(sizes.size, 1))
    p = np.maximum(p, epsilon)
    return p / p.sum()


def psi(old_sizes: np.ndarray, new_sizes: np.ndarray, epsilon: float = PSI_EPSILON) -> tuple[np.ndarray, float]:
    """Population stability index per segment and in total.

    PSI_k = (q_k - p_k) ln(q_k / p_k) with p the old shares, q the new ones
    (both floored at `epsilon`). Every term is >= 0. Rule of thumb: < 0.1
    stable, 0.1-0.2 moderate, > 0.2 a significant shift.
    Returns ([K] per segment, total).
    """
    old_sizes, new_sizes = np.asarray(old_sizes), np.asarray(new_sizes)
    if old_sizes.shape != new_sizes.shape:
        raise ValueError(f"old sizes {old_sizes.shape} and new sizes {new_sizes.shape} differ in shape")
    p, q = shares(old_sizes, epsilon), shares(new_sizes, epsilon)
    per = (q - p) * np.log(q / p)
    return per, float(per.sum())


def appeared_vanished(old_sizes: np.ndarray, new_sizes: np.ndarray, min_size: int) -> tuple[list, list]:
    """(new segments: below min_size before and at/above it now, vanished: the reverse)."""
    old_sizes, new_sizes = np.asarray(old_sizes), np.asarray(new_sizes)
    new = [int(k) for k in np.flatnonzero((old_sizes < min_size) & (new_sizes >= min_size))]
    gone = [int(k) for k in np.flatnonzero((old_sizes >= min_size) & (new_sizes < min_size))]
    return new, gone


@dataclasses.dataclass(frozen=True)
class DriftThresholds:
    """When a refresh says "retraining advised" (any one suffices).

    psi: total PSI above it (0.2 is the usual "significant shift" line).
    moved_share: share of users present in both windows whose segment changed.
      Users near a boundary flip between windows even without drift, since
      their histories change; 0.3 sits above that noise on the synthetic data.
    centroid_shift: largest per-segment cosine distance between old and new
      centroid (0.1 ~ 26 degrees).
    new_or_vanished: a segment crossing the minimum size either way.
    """

    psi: float = 0.2
    moved_share: float = 0.3
    centroid_shift: float = 0.1
    new_or_vanished: bool = True

    def __post_init__(self):
        for name in ("psi", "moved_share", "centroid_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"drift threshold {name} must be >= 0, got {getattr(self, name)}")


def drift_report(
    old_centroids: np.ndarray,
    new_centroids: np.ndarray,
    old_labels: Mapping[str, int],
    new_labels: Mapping[str, int],
    *,
    min_segment_users: int = 20,
    thresholds: DriftThresholds = DriftThresholds(),
) -> dict:
    """Every drift figure of one refresh, as a JSON-able dict.

    Args:
      old_centroids / new_centroids: [K, d].
      old_labels: user -> segment in the previous window (old centroids);
      new_labels: user -> segment in the new window (new centroids).
    Returns:
      {"num_segments", "users_old", "users_new", "users_both", "users_moved",
      "moved_share", "migration" [K][K], "sizes_old" [K], "sizes_new" [K],
      "centroid_shift" [K], "max_centroid_shift", "psi" [K], "psi_total",
      "new_segments", "vanished_segments", "thresholds", "reasons" (list of
      str), "retrain_advised" (bool), "verdict" (one line)}.
    """
    k = _check_centroids(old_centroids).shape[0]
    sizes_old = np.bincount(np.fromiter(old_labels.values(), np.int64, len(old_labels)), minlength=k)[:k]
    sizes_new = np.bincount(np.fromiter(new_labels.values(), np.int64, len(new_labels)), minlength=k)[:k]
    mig = migration_matrix(old_labels, new_labels, k)
    return summarize_drift(old_centroids, new_centroids, mig, sizes_old, sizes_new,
                           min_segment_users=min_segment_users, thresholds=thresholds)


def summarize_drift(
    old_centroids: np.ndarray,
    new_centroids: np.ndarray,
    migration: np.ndarray,
    sizes_old: np.ndarray,
    sizes_new: np.ndarray,
    *,
    min_segment_users: int = 20,
    thresholds: DriftThresholds = DriftThresholds(),
) -> dict:
    """`drift_report` from counts alone (what a pipeline can combine without holding users).

    migration: [K, K] old -> new counts over users in both windows;
    sizes_old / sizes_new: [K] users per segment in each window (all users of
    that window, not only those in both).
    """
    mig = np.asarray(migration, np.int64)
    sizes_old, sizes_new = np.asarray(sizes_old, np.int64), np.asarray(sizes_new, np.int64)
    k = _check_centroids(old_centroids).shape[0]
    if mig.shape != (k, k) or sizes_old.shape != (k,) or sizes_new.shape != (k,):
        raise ValueError(f"migration {mig.shape} / sizes {sizes_old.shape}, {sizes_new.shape} do not match K={k}")
    both = int(mig.sum())
    moved = both - int(np.trace(mig))
    moved_share = moved / both if both else 0.0
    shift = centroid_shift(old_centroids, new_centroids)
    psi_per, psi_total = psi(sizes_old, sizes_new)
    appeared, vanished = appeared_vanished(sizes_old, sizes_new, min_segment_users)

    reasons = []
    if psi_total > thresholds.psi:
        reasons.append(f"PSI {psi_total:.3f} > {thresholds.psi:g}")
    if moved_share > thresholds.moved_share:
        reasons.append(f"{moved_share:.1%} of users changed segment > {thresholds.moved_share:.0%}")
    if shift.size and float(shift.max()) > thresholds.centroid_shift:
        reasons.append(f"segment {int(shift.argmax())} centroid moved {float(shift.max()):.3f} > {thresholds.centroid_shift:g}")
    if thresholds.new_or_vanished and (appeared or vanished):
        reasons.append(f"new segments {appeared}, vanished {vanished}")
    advised = bool(reasons)
    verdict = ("DRIFT: retraining advised (" + "; ".join(reasons) + ")") if advised else (
        f"no drift: PSI {psi_total:.3f}, {moved_share:.1%} moved, max centroid shift {float(shift.max()):.3f}")
    return {
        "num_segments": k,
        "users_old": int(sizes_old.sum()),
        "users_new": int(sizes_new.sum()),
        "users_both": both,
        "users_moved": moved,
        "moved_share": moved_share,
        "migration": mig.tolist(),
        "sizes_old": sizes_old.tolist(),
        "sizes_new": sizes_new.tolist(),
        "centroid_shift": [float(x) for x in shift],
        "max_centroid_shift": float(shift.max()) if shift.size else 0.0,
        "psi": [float(x) for x in psi_per],
        "psi_total": psi_total,
        "new_segments": appeared,
        "vanished_segments": vanished,
        "min_segment_users": int(min_segment_users),
        "thresholds": dataclasses.asdict(thresholds),
        "reasons": reasons,
        "retrain_advised": advised,
        "verdict": verdict,
    }


def top_moves(migration: Sequence[Sequence[int]], n: int = 5) -> list[tuple[int, int, int, float]]:
    """The largest off-diagonal flows: [(from, to, users, share of `from`'s users)], biggest first."""
    m = np.asarray(migration, np.int64)
    rows = m.sum(axis=1)
    flows = [(int(a), int(b), int(m[a, b]), float(m[a, b] / rows[a]) if rows[a] else math.nan)
             for a in range(m.shape[0]) for b in range(m.shape[1]) if a != b and m[a, b] > 0]
    flows.sort(key=lambda f: (-f[2], f[0], f[1]))
    return flows[:n]
