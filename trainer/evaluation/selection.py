"""Choosing every baseline's hyper-parameters on the validation split.

`segrec evaluate` treats each baseline the same way:

  1. fit on every training interaction (the event log's training period,
     not only the examples' targets: `--max-examples-per-user` thins the
     examples, never this);
  2. choose its hyper-parameters on the validation split: one model per value
     of its grid (`REGISTRY`), each ranked on the validation queries exactly as
     test is ranked (full catalog, the repeat rule), the best by the
     selection metric (the validation Recall@K that chose segrec's epoch and
     beta) - or, for a baseline that selects itself (its `fit` takes the
     validation pairs), what it chose;
  3. refit the chosen configuration on the training and validation periods
     (what a test query may see), then score test once.

Adding a baseline is one `REGISTRY` entry: its class and its `Tuning`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from trainer.evaluation import baselines as baselines_lib
from trainer.evaluation.sasrec import SASRecBaseline

_LOG = logging.getLogger("segrec.evaluate")

EASE_L2_GRID = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
ID_TWO_TOWER_EPOCHS_GRID = (1, 2, 3, 5, 10)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How one baseline's hyper-parameters are chosen on the validation split.

    param, grid: the hyper-parameter searched and its values (none: nothing
      to tune, or a baseline that selects itself).
    fit_kwargs: keyword arguments its `fit` takes beyond the pairs:
      "timestamps" (each pair's epoch seconds, for sequence models) and
      "validation" (`valid_user_idx=`, `valid_item_idx=`: the validation
      queries, on which the baseline selects itself, e.g. its epochs).
    chosen_config: for a self-selecting baseline, the fitted model -> the
      config overrides to refit with (e.g. {"max_epochs": best epoch}).
    """

    param: Optional[str] = None
    grid: tuple = ()
    fit_kwargs: tuple = ()
    chosen_config: Optional[Callable] = None


# Every baseline `segrec evaluate` can run: its class and how it is tuned. Adding a baseline is one line.
REGISTRY: dict = {
    "popularity": (baselines_lib.PopularityBaseline, Tuning()),
    "ease": (baselines_lib.EASEBaseline, Tuning("l2", EASE_L2_GRID)),
    "id_two_tower": (baselines_lib.IdTwoTowerBaseline, Tuning("epochs", ID_TWO_TOWER_EPOCHS_GRID)),
    # Picks its epochs on the validation pairs itself (its own metric, every `eval_every` epochs); refitted
    # on train + valid for that many epochs.
    "sasrec": (SASRecBaseline, Tuning(fit_kwargs=("timestamps", "validation"),
                                      chosen_config=lambda m: {"max_epochs": int(m.selection_["best_epoch"])})),
}


def make_baseline(name: str, **config):
    """A registered baseline by name (REGISTRY), built with `config`."""
    try:
        cls, _ = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(REGISTRY)}") from None
    return cls(**config)


def tuning_of(name: str) -> Tuning:
    return REGISTRY[name][1] if name in REGISTRY else Tuning()


@dataclasses.dataclass(frozen=True)
class FitData:
    """The (user, item) pairs of one fitting period, as indices.

    users, items, timestamps [P]; n_users: users 0..n_users-1 have pairs (a
    query user without any gets an index >= n_users and scores 0); n_items.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    n_users: int
    n_items: int

    def fit_args(self, tuning: Tuning, valid: Optional[tuple] = None) -> tuple:
        """(args, kwargs) of a baseline's fit() on these pairs."""
        kwargs = {"n_users": self.n_users}
        if "timestamps" in tuning.fit_kwargs:
            kwargs["timestamps"] = self.timestamps
        if "validation" in tuning.fit_kwargs and valid is not None:
            kwargs["valid_user_idx"], kwargs["valid_item_idx"] = valid
        return (self.users, self.items, self.n_items), kwargs


def user_index(fit_user_ids: Sequence[str], query_user_ids: Sequence[str]) -> dict:
    """user id -> index: users with fitting pairs first (sorted), then the
    query users without any (they score 0 in EASE and the ID two-tower)."""
    fit_users = sorted(set(fit_user_ids))
    index = {u: j for j, u in enumerate(fit_users)}
    for u in sorted(set(query_user_ids) - set(index)):
        index[u] = len(index)
    return index


def fit_data(user_ids, item_ids, timestamps, item_index: Mapping[str, int], users: Mapping[str, int],
             n_users: int) -> FitData:
    """FitData of pairs given as ids (items outside the catalog are dropped)."""
    keep = np.array([i in item_index for i in item_ids], bool)
    return FitData(
        users=np.array([users[u] for u in np.asarray(user_ids)[keep]], np.int64),
        items=np.array([item_index[i] for i in np.asarray(item_ids)[keep]], np.int64),
        timestamps=np.asarray(timestamps, np.int64)[keep],
        n_users=int(n_users), n_items=len(item_index))


@dataclasses.dataclass
class Selected:
    """A baseline's configuration as chosen on validation (report.json's record)."""

    name: str
    config: dict  # the full config the test model is refitted with
    record: dict  # {"split", "metric", "param", "grid": [[value, metric]], "chosen", "forced", ...}


def select(name: str, params: Mapping, data: FitData, validate: Callable, metric: str,
           valid_pairs: Optional[tuple] = None, grid: Optional[Sequence] = None) -> Selected:
    """Fits baseline `name` on `data` and chooses its configuration on validation.

    params: the user's fixed hyper-parameters (a tuned param given here is
    forced: no grid); validate(model) -> {metric: value} on the validation
    queries; metric: the key that chooses (higher is better; ties go to the
    earlier grid value); valid_pairs: (user idx [V], item idx [V]) for a
    self-selecting baseline; grid: overrides its Tuning's.
    """
    tuning = tuning_of(name)
    base = make_baseline(name, **params)
    args, kwargs = data.fit_args(tuning, valid_pairs)
    record = {"split": "valid", "metric": metric, "param": tuning.param}
    t = time.time()
    if tuning.param and tuning.param not in params:
        values = tuple(grid if grid is not None else tuning.grid)
        models = base.fit_grid(tuning.param, values, *args, **kwargs)
        scores = [(v, validate(models[v])) for v in values]
        chosen = max(scores, key=lambda vs: vs[1][metric])[0]  # max keeps the first of equal values
        config = {**base.get_config(), tuning.param: chosen}
        record.update(grid=[[v, s[metric]] for v, s in scores], chosen=chosen, forced=False,
                      validation=dict(scores)[chosen])
    else:
        model = base.fit(*args, **kwargs)
        config = base.get_config()
        if tuning.chosen_config is not None:
            config = {**config, **tuning.chosen_config(model)}
            record["self_selected"] = getattr(model, "selection_", None)
        if tuning.param:
            record.update(chosen=params[tuning.param], forced=True)
        record["validation"] = validate(model)
    record["config"] = config
    _LOG.info("baseline %s: %s on validation (%.1f s)", name,
              f"{tuning.param}={record.get('chosen')}" if tuning.param else "nothing to tune", time.time() - t)
    return Selected(name, config, record)


def refit(selected: Selected, data: FitData):
    """The chosen configuration fitted on `data` (the training and validation periods)."""
    args, kwargs = data.fit_args(tuning_of(selected.name))
    return make_baseline(selected.name, **selected.config).fit(*args, **kwargs)
