"""Cold start: how users with little or no history are served.

Two scenarios over the test queries (the test target stays the target):
  * "new users": profile text only - the history is removed (and the user
    id, when the model hashes ids, replaced by an unseen one), nothing is
    excluded from the ranking (a new user has consumed nothing);
  * "sparse users": the history cut to its n most recent items (n in
    `sparse_history`), which are the only items excluded.
On MovieLens every user has at least 20 ratings, so these users are made by
truncating real ones: their targets are real next items.

Three rankers, the same queries and candidates for each:
  * segrec: the model's query for the truncated input (its text tower, the
    truncated history, the item prior);
  * popularity: training-period interaction counts;
  * popular-in-segment: the counts among the training users of the segment
    the model predicts for the truncated input (each training user labelled
    by the model as of their latest training-period query), falling back to
    popularity for a segment without interactions.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from trainer import features
from trainer.data import arrays as da
from trainer.evaluation import ranking as metrics
from trainer.model.batched_outputs import model_outputs

NEW_USERS = "new users (profile text only)"
SPARSE_USERS = "sparse users (last {n} items)"
RANKERS = ("segrec", "popularity", "popular_in_segment")


def _truncated(split: da.SplitArrays, keep: int, rows) -> da.SplitArrays:
    histories = list(split.histories)
    for r in rows:
        histories[r] = list(histories[r][:keep])
    user_ids = split.user_ids
    if keep == 0:
        user_ids = np.array([f"new-user-{i}" for i in range(len(split))], dtype=object)
    return dataclasses.replace(split, histories=histories, user_ids=user_ids)


def segment_popularity(user_of_pair: np.ndarray, item_of_pair: np.ndarray, user_segment: dict,
                       num_segments: int, n_items: int) -> np.ndarray:
    """[K, N] interaction counts of each segment's users (+ global counts * 1e-6 to break ties)."""
    counts = np.zeros((num_segments, n_items), np.float64)
    seg = np.array([user_segment.get(u, -1) for u in user_of_pair], np.int64)
    ok = seg >= 0
    np.add.at(counts, (seg[ok], item_of_pair[ok]), 1.0)
    overall = np.bincount(item_of_pair, minlength=n_items).astype(np.float64)
    return counts + 1e-6 * overall[None, :]


def cold_start(model, split: da.SplitArrays, rows: np.ndarray, targets: np.ndarray, item_index: dict,
               item_vecs: np.ndarray,
               popularity: np.ndarray, segment_counts: np.ndarray, beta: float, text_cache=None,
               sparse_history: Sequence[int] = (2,), batch_size: int = 512,
               ks: Sequence[int] = metrics.DEFAULT_KS) -> dict:
    """{scenario: {ranker: ranking.summarize() dict}} for the test queries
    `rows` of `split` with catalog-index `targets`.

    item_index: item id -> catalog index; item_vecs [N, query_dim]: the
    model's item vectors in catalog order;
    popularity [N]: training-period counts; segment_counts [K, N]
    (segment_popularity)."""
    index = item_index
    out = {}
    scenarios = [(0, NEW_USERS)] + [(int(n), SPARSE_USERS.format(n=int(n))) for n in sparse_history]
    for keep, name in scenarios:
        split_k = _truncated(split, keep, rows)
        outs = model_outputs(model, split_k, rows, beta, text_cache, batch_size)
        exclude = [[index[i] for i in split_k.histories[r] if i in index] for r in rows]
        seg = outs[features.SEGMENT_ID].astype(np.int64)
        scorers = {
            "segrec": metrics.vector_score_fn(outs[features.QUERY], item_vecs),
            "popularity": lambda s: np.broadcast_to(popularity, (len(s), popularity.size)),
            "popular_in_segment": lambda s, seg=seg: segment_counts[seg[s]],
        }
        out[name] = {
            ranker: metrics.summarize(
                metrics.rank_targets(fn, len(rows), targets, exclude, batch_size), ks)
            for ranker, fn in scorers.items()
        }
    return out
