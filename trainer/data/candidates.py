"""What a query is ranked against, and where its target lands.

Every ranking in segrec - train-time recall (early stopping, the best
checkpoint, the beta grid), `segrec evaluate` for the model and for every
baseline - ranks the full catalog minus what the repeat rule removes
(`trainer.data.examples.repeat_exclusion`), and computes the target's rank
with `target_ranks`. Both live here, below training and evaluation, so the
two can only agree. Pure numpy.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

from trainer.data import examples as ex

_TIES = ("pessimistic", "optimistic", "mean")


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The repeat rule applied to Q queries.

    exclude: Q int64 arrays, the catalog indices each query is ranked without
      (sorted; empty under "allow").
    repeat: [Q] bool, the query's target is an item the user already consumed.
    rule: the repeat rule ("exclude" or "allow").
    """

    exclude: list
    repeat: np.ndarray
    rule: str

    def __len__(self) -> int:
        return len(self.exclude)

    @property
    def main(self) -> np.ndarray:
        """[Q] bool, the queries of the main metrics: all of them under "allow",
        the non-repeat ones under "exclude" (a repeat target is reported apart)."""
        if self.rule == ex.REPEATS_ALLOW:
            return np.ones(len(self.exclude), bool)
        return ~self.repeat


def query_candidates(consumed: Sequence[Iterable[str]], targets: Sequence[str], item_index: Mapping[str, int],
                     rule: str) -> Candidates:
    """The repeat rule for each query, in catalog indices.

    consumed: per query, everything the user consumed before it (ids outside
    the catalog are ignored); targets: per query, the target item id.
    """
    if len(consumed) != len(targets):
        raise ValueError(f"{len(consumed)} consumed sets for {len(targets)} targets")
    exclude, repeat = [], np.zeros(len(targets), bool)
    for q, (items, target) in enumerate(zip(consumed, targets)):
        removed, repeat[q] = ex.repeat_exclusion(items, target, rule)
        exclude.append(np.array(sorted(item_index[i] for i in removed if i in item_index), np.int64))
    return Candidates(exclude, repeat, rule)


def candidate_mask(exclude: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """[Q, N] bool, True where the item is a candidate of the query."""
    mask = np.ones((len(exclude), n_items), bool)
    counts = np.fromiter((len(e) for e in exclude), np.int64, count=len(exclude))
    if counts.sum():
        mask[np.repeat(np.arange(len(exclude)), counts), np.concatenate([np.asarray(e, np.int64) for e in exclude])] = False
    return mask


def target_ranks(scores: np.ndarray, targets: np.ndarray, candidates: np.ndarray, ties: str = "pessimistic") -> np.ndarray:
    """1-based rank of each row's target among that row's candidate items.

    scores: [b, N] float, higher is better; targets: [b] item index;
    candidates: [b, N] bool (the target must be one). ties: "pessimistic"
    (1 + #higher + #other equal: a model that scores everything the same gets
    the worst rank), "optimistic" (1 + #higher) or "mean" (halfway).
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}; got {ties!r}")
    rows = np.arange(scores.shape[0])
    targets = np.asarray(targets, np.int64)
    if not candidates[rows, targets].all():
        raise ValueError("a target is not among its query's candidates")
    t_score = scores[rows, targets][:, None]
    higher = np.count_nonzero((scores > t_score) & candidates, axis=1)
    equal = np.count_nonzero((scores == t_score) & candidates, axis=1) - 1  # minus the target
    if ties == "pessimistic":
        return (1 + higher + equal).astype(np.float64)
    if ties == "optimistic":
        return (1 + higher).astype(np.float64)
    return 1 + higher + equal / 2.0
