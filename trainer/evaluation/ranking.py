"""Full-catalog ranking metrics for `segrec evaluate`, on plain numpy arrays.

Every model (the segrec two-tower, the baselines) is evaluated the same way:
it supplies a `score_fn` that scores a slice of queries against the whole
catalog, and `rank_targets` turns those scores into the 1-based rank of each
query's held-out target plus the top items per query. All metrics are then
computed from the ranks, so no model gets a different candidate set.

Index conventions: users and items are integers 0..n_users-1 / 0..n_items-1;
query q has a target item `targets[q]` and an exclude set `exclude[q]` (what
the repeat rule removes: `trainer.data.candidates.query_candidates`), which
is never ranked. The target's rank is `trainer.data.candidates.target_ranks`,
the very function train-time recall uses.

Rules (the same for every model, so numbers are comparable):

- Exclusion: excluded items are removed from the ranking (they neither
  outrank the target nor appear in the top items). The target itself is
  never excluded from its own query: under the "exclude" repeat rule a query
  whose target the user already consumed is not ranked in the main metrics
  at all (`segrec evaluate` reports it in its own row, ranked with nothing
  removed), so `rank_targets` only drops a target from its own exclude set
  for callers that pass such sets by hand.
- Ties: pessimistic by default. The target's rank is 1 + (#items scoring
  higher) + (#other items scoring equal), so a model that scores everything
  the same gets the worst rank, not the best. `ties="optimistic"` and
  `ties="mean"` are available for comparison with other papers.
- Items scoring -inf (excluded, or a model that cannot score them) are never
  listed in the top items; such slots hold -1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from trainer.data.candidates import target_ranks

ScoreFn = Callable[[np.ndarray], np.ndarray]

DEFAULT_KS = (10, 50, 100)
TOP_K = 100  # top items kept per query (coverage, inspection)
NDCG_K = 10
COVERAGE_K = 10
_TIES = ("pessimistic", "optimistic", "mean")


@dataclasses.dataclass(frozen=True)
class RankingResult:
    """Output of `rank_targets`.

    Attributes:
      ranks: [Q] float64, 1-based rank of each target among the non-excluded
        catalog (integral except with ties="mean").
      top_items: [Q, top_k] int64 item indices, best first; -1 where fewer
        than top_k items were rankable.
      n_items: catalog size N (the width of the score matrix).
      n_candidates: [Q] int64, number of rankable (non-excluded) items per
        query, target included; the worst possible rank.
    """

    ranks: np.ndarray
    top_items: np.ndarray
    n_items: int
    n_candidates: np.ndarray

    @property
    def num_queries(self) -> int:
        return int(self.ranks.shape[0])

    def subset(self, mask: np.ndarray) -> "RankingResult":
        """The result restricted to the queries where `mask` [Q] is true."""
        mask = _as_mask(mask, self.num_queries)
        return RankingResult(
            ranks=self.ranks[mask],
            top_items=self.top_items[mask],
            n_items=self.n_items,
            n_candidates=self.n_candidates[mask],
        )


def vector_score_fn(query_vecs: np.ndarray, item_vecs: np.ndarray) -> ScoreFn:
    """Dot-product scorer over precomputed embeddings.

    Args:
      query_vecs: [Q, d] query (user) embeddings, row q for query q.
      item_vecs: [N, d] item embeddings, row i for item i.

    Returns:
      score_fn(query_slice [b] int) -> [b, N] scores.
    """
    query_vecs = np.asarray(query_vecs)
    item_vecs = np.asarray(item_vecs)
    if query_vecs.ndim != 2 or item_vecs.ndim != 2 or query_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(
            f"query_vecs [Q, d] and item_vecs [N, d] must share d; got {query_vecs.shape} and {item_vecs.shape}"
        )
    item_t = np.ascontiguousarray(item_vecs.T)

    def score_fn(query_slice: np.ndarray) -> np.ndarray:
        return query_vecs[query_slice] @ item_t

    return score_fn


def _normalize_exclude(exclude, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Exclude sets as CSR (indptr [Q+1], indices [nnz]).

    Accepts None, a sequence of Q int arrays/lists, or a scipy.sparse matrix
    with Q rows (nonzero columns are excluded).
    """
    if exclude is None:
        return np.zeros(num_queries + 1, np.int64), np.zeros(0, np.int64)
    if hasattr(exclude, "tocsr"):  # scipy.sparse
        csr = exclude.tocsr()
        if csr.shape[0] != num_queries:
            raise ValueError(f"exclude has {csr.shape[0]} rows; expected one per query ({num_queries})")
        csr.eliminate_zeros()
        return csr.indptr.astype(np.int64), csr.indices.astype(np.int64)
    if len(exclude) != num_queries:
        raise ValueError(f"exclude has {len(exclude)} entries; expected one per query ({num_queries})")
    lengths = np.fromiter((len(e) for e in exclude), np.int64, count=num_queries)
    indptr = np.zeros(num_queries + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    parts = [np.asarray(e, np.int64).reshape(-1) for e in exclude if len(e)]
    indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return indptr, indices


def rank_targets(
    score_fn: ScoreFn,
    num_queries: int,
    targets: np.ndarray,
    exclude=None,
    batch_size: int = 1024,
    *,
    top_k: int = TOP_K,
    ties: str = "pessimistic",
) -> RankingResult:
    """Ranks each query's target in the full catalog, batch by batch.

    Memory is bounded by one [batch_size, N] score matrix (plus its boolean
    exclusion mask), whatever Q is.

    Args:
      score_fn: score_fn(query_slice [b] int64) -> [b, N] float scores, higher
        is better; N must be the same for every call.
      num_queries: Q.
      targets: [Q] int target item index per query.
      exclude: per-query items not to rank (the user's training items): None,
        a sequence of Q int arrays, or a scipy.sparse [Q, N] matrix. The
        target is never excluded from its own query (see module docstring).
      batch_size: queries scored per call of score_fn.
      top_k: top items kept per query (clipped to N).
      ties: "pessimistic" (default), "optimistic" or "mean".

    Returns:
      RankingResult with ranks [Q] and top_items [Q, top_k].
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}; got {ties!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    targets = np.asarray(targets, np.int64).reshape(-1)
    if targets.shape[0] != num_queries:
        raise ValueError(f"targets has {targets.shape[0]} entries; expected num_queries={num_queries}")
    indptr, indices = _normalize_exclude(exclude, num_queries)

    ranks = np.zeros(num_queries, np.float64)
    n_candidates = np.zeros(num_queries, np.int64)
    top_items = None
    n_items = None
    for start in range(0, num_queries, batch_size):
        stop = min(start + batch_size, num_queries)
        query_slice = np.arange(start, stop, dtype=np.int64)
        raw = np.asarray(score_fn(query_slice))
        b = stop - start
        if raw.ndim != 2 or raw.shape[0] != b:
            raise ValueError(f"score_fn returned shape {raw.shape} for {b} queries; expected [{b}, n_items]")
        if n_items is None:
            n_items = int(raw.shape[1])
            if np.any((targets < 0) | (targets >= n_items)):
                bad = int(np.flatnonzero((targets < 0) | (targets >= n_items))[0])
                raise ValueError(f"targets[{bad}]={targets[bad]} is outside the catalog [0, {n_items})")
            if indices.size and (indices.min() < 0 or indices.max() >= n_items):
                raise ValueError(f"exclude holds item indices outside the catalog [0, {n_items})")
            k = min(top_k, n_items)
            top_items = np.full((num_queries, k), -1, np.int64)
        elif raw.shape[1] != n_items:
            raise ValueError(f"score_fn returned {raw.shape[1]} items; earlier batches had {n_items}")
        # A private float copy: score_fn may return a cached or broadcast array.
        scores = np.array(raw, dtype=np.result_type(raw.dtype, np.float32))
        if np.isnan(scores).any():
            raise ValueError(f"score_fn returned NaN scores for queries {start}..{stop - 1}")

        rows_t = np.arange(b)
        tgt = targets[start:stop]
        excluded = np.zeros(scores.shape, bool)
        lo, hi = indptr[start], indptr[stop]
        counts = np.diff(indptr[start : stop + 1])
        excluded[np.repeat(rows_t, counts), indices[lo:hi]] = True
        excluded[rows_t, tgt] = False  # the target is never excluded
        scores[excluded] = -np.inf

        valid = ~excluded
        ranks[start:stop] = target_ranks(scores, tgt, valid, ties)
        n_candidates[start:stop] = np.count_nonzero(valid, axis=1)
        top_items[start:stop] = _top_items(scores, top_items.shape[1])

    if n_items is None:  # no queries
        return RankingResult(np.zeros(0), np.zeros((0, 0), np.int64), 0, np.zeros(0, np.int64))
    return RankingResult(ranks=ranks, top_items=top_items, n_items=n_items, n_candidates=n_candidates)


def _top_items(scores: np.ndarray, k: int) -> np.ndarray:
    """[b, N] scores -> [b, k] best item indices; equal scores by lower index."""
    n = scores.shape[1]
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    top[np.take_along_axis(part_scores, order, axis=1) == -np.inf] = -1
    return top


def _as_mask(mask, num_queries: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"mask must be a boolean array of shape [{num_queries}]; got dtype {mask.dtype}")
    if mask.shape != (num_queries,):
        raise ValueError(f"mask must have shape [{num_queries}]; got {mask.shape}")
    return mask


def summarize(result: RankingResult, ks: Sequence[int] = DEFAULT_KS, mask: np.ndarray | None = None) -> dict:
    """Headline metrics of a ranking (one target per query).

    Args:
      result: from `rank_targets`.
      ks: cut-offs of recall@K (= hit rate@K with one target per query).
      mask: optional [Q] bool, the queries to include (a segment, cold users).

    Returns:
      {"recall@K" for K in ks, "ndcg@10", "mrr", "coverage@10", "count"}.
      ndcg@10 = mean(1/log2(rank+1) if rank <= 10 else 0) (the ideal DCG of
      one relevant item is 1); mrr = mean(1/rank) over the full ranking (not
      truncated); coverage@10 = share of the catalog in any query's top 10.
      Metrics are NaN when no query is selected.
    """
    if mask is not None:
        result = result.subset(mask)
    ranks = result.ranks
    count = int(ranks.shape[0])
    out: dict = {}
    if count == 0:
        for k in ks:
            out[f"recall@{k}"] = float("nan")
        out.update({f"ndcg@{NDCG_K}": float("nan"), "mrr": float("nan"), f"coverage@{COVERAGE_K}": float("nan")})
        out["count"] = 0
        return out
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(ranks <= k))
    gains = np.where(ranks <= NDCG_K, 1.0 / np.log2(ranks + 1.0), 0.0)
    out[f"ndcg@{NDCG_K}"] = float(np.mean(gains))
    out["mrr"] = float(np.mean(1.0 / ranks))
    out[f"coverage@{COVERAGE_K}"] = coverage(result, COVERAGE_K)
    out["count"] = count
    return out


def coverage(result: RankingResult, k: int = COVERAGE_K) -> float:
    """Share of the catalog appearing in at least one query's top k."""
    if result.n_items == 0:
        return float("nan")
    if k > result.top_items.shape[1] and result.top_items.shape[1] < result.n_items:
        raise ValueError(f"coverage@{k} needs top_k >= {k}; rank_targets kept {result.top_items.shape[1]}")
    top = result.top_items[:, :k]
    seen = np.unique(top[top >= 0])
    return float(seen.size / result.n_items)


def breakdown(
    result: RankingResult, groups: Mapping[str, np.ndarray], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict]:
    """`summarize` per group of queries (segments, cold users...).

    Args:
      groups: name -> [Q] bool mask; groups may overlap.

    Returns:
      name -> summarize(...) dict, in the order of `groups`.
    """
    return {name: summarize(result, ks=ks, mask=mask) for name, mask in groups.items()}


def cold_user_mask(history_lengths: np.ndarray, max_history: int = 2) -> np.ndarray:
    """[Q] bool: queries whose user has at most `max_history` training items."""
    return np.asarray(history_lengths) <= max_history


def segment_masks(segment_of_query: np.ndarray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-segment [Q] masks from a [Q] int segment id per query.

    names[k] labels segment k (default "segment k"); empty segments are skipped.
    """
    segment_of_query = np.asarray(segment_of_query)
    out = {}
    for k in np.unique(segment_of_query):
        name = names[int(k)] if names is not None else f"segment {int(k)}"
        out[name] = segment_of_query == k
    return out


def recall_curve(result: RankingResult, ks: Sequence[int] = range(1, 101)) -> tuple[np.ndarray, np.ndarray]:
    """Recall@K for every K in ks, for plots.

    Returns:
      (ks [n] int64, recall [n] float64); recall is NaN with no queries.
    """
    ks = np.asarray(list(ks), np.int64)
    ranks = np.sort(result.ranks)
    if ranks.size == 0:
        return ks, np.full(ks.shape, np.nan)
    hits = np.searchsorted(ranks, ks, side="right")
    return ks, hits / ranks.size
