"""Baseline hyper-parameters chosen on validation (trainer.evaluation.selection) and the
repeat rule's candidates (trainer.data.candidates), on hand-made toys."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data import candidates as cand
from trainer.evaluation import baselines, selection
from trainer.evaluation import ranking as metrics

X, P, Q, Z = 0, 1, 2, 3  # items


def _ease_toy():
    """Users 0..57; the query user 58 consumed X only. EASE with l2=1 scores Q above P for them (Q
    always comes with X), with l2=1000 P above Q (P co-occurs with X more often): the two values
    disagree about the query user's next item."""
    pairs, u = [], 0
    for partner, n in ((Q, 5), (P, 8)):
        for _ in range(n):
            pairs += [(u, X), (u, partner)]
            u += 1
    for _ in range(40):
        pairs += [(u, P), (u, Z)]
        u += 1
    for _ in range(5):
        pairs += [(u, X), (u, Z)]
        u += 1
    query_user = u
    pairs.append((query_user, X))
    users, items = (np.array(c, np.int64) for c in zip(*pairs))
    return selection.FitData(users, items, np.arange(users.size), n_users=query_user + 1, n_items=4), query_user


def _validate_on(user, target):
    """validate(model): recall@1 of one query (user, target), ranked without what the user consumed (X)."""
    def validate(model):
        r = metrics.rank_targets(lambda s: model.score(np.array([user])), 1, [target], [[X]])
        return metrics.summarize(r, ks=(1,))
    return validate


def test_ease_l2_is_the_validation_best_not_the_test_best():
    data, user = _ease_toy()
    s_small = baselines.EASEBaseline(l2=1.0).fit(data.users, data.items, 4, n_users=data.n_users).score([user])[0]
    s_large = baselines.EASEBaseline(l2=1000.0).fit(data.users, data.items, 4, n_users=data.n_users).score([user])[0]
    assert s_small[Q] > s_small[P] and s_large[P] > s_large[Q]  # the toy does separate the two values
    # Validation says the user's next item is Q (only l2=1 ranks it first); test would say P (l2=1000).
    chosen = selection.select("ease", {}, data, _validate_on(user, Q), "recall@1", grid=(1000.0, 1.0))
    assert chosen.record["chosen"] == 1.0 and chosen.config["l2"] == 1.0
    assert chosen.record["grid"] == [[1000.0, 0.0], [1.0, 1.0]] and chosen.record["split"] == "valid"
    test_choice = selection.select("ease", {}, data, _validate_on(user, P), "recall@1", grid=(1000.0, 1.0))
    assert test_choice.record["chosen"] == 1000.0  # what choosing on test would have given
    # Forced: no grid, the given value.
    forced = selection.select("ease", {"l2": 50.0}, data, _validate_on(user, Q), "recall@1")
    assert forced.record["forced"] and forced.config["l2"] == 50.0 and "grid" not in forced.record
    # Ties go to the first value of the grid.
    tied = selection.select("ease", {}, data, _validate_on(user, Z), "recall@1", grid=(1000.0, 1.0))
    assert [m for _, m in tied.record["grid"]] == [0.0, 0.0] and tied.record["chosen"] == 1000.0
    # The refit uses the chosen configuration.
    assert selection.refit(chosen, data).l2 == 1.0


def test_id_two_tower_epoch_snapshots_are_separate_fits():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 12, 200), rng.integers(0, 9, 200)
    config = dict(embedding_dim=4, batch_size=32, seed=3)
    grid = baselines.IdTwoTowerBaseline(**config).fit_grid("epochs", (3, 1), users, items, 9, n_users=12)
    assert sorted(grid) == [1, 3]
    for e, snap in grid.items():
        alone = baselines.IdTwoTowerBaseline(epochs=e, **config).fit(users, items, 9, n_users=12)
        np.testing.assert_allclose(snap.score(np.arange(12)), alone.score(np.arange(12)), rtol=1e-5, atol=1e-6)
        assert snap.epochs == e and len(snap.history_["loss"]) == e


class _SelfSelecting(baselines.PopularityBaseline):
    """A baseline whose fit takes timestamps and the validation pairs and picks its own 'epochs'."""

    name = "self_selecting"

    def __init__(self, max_epochs: int = 9):
        super().__init__()
        self.max_epochs = max_epochs

    def get_config(self):
        return {"max_epochs": self.max_epochs}

    def fit(self, train_user_idx, train_item_idx, n_items, n_users=None, *, timestamps=None,
            valid_user_idx=None, valid_item_idx=None):
        self.seen_ = {"timestamps": timestamps, "valid": (valid_user_idx, valid_item_idx)}
        self.selection_ = {"split": "validation", "metric": "ndcg@10", "best_epoch": 4, "best_value": 0.5}
        return super().fit(train_user_idx, train_item_idx, n_items, n_users)


def test_a_self_selecting_baseline_is_one_registration(monkeypatch):
    monkeypatch.setitem(selection.REGISTRY, _SelfSelecting.name, (_SelfSelecting, selection.Tuning(
        fit_kwargs=("timestamps", "validation"), chosen_config=lambda m: {"max_epochs": m.selection_["best_epoch"]})))
    data, user = _ease_toy()
    valid = (np.array([user]), np.array([Q]))
    chosen = selection.select(_SelfSelecting.name, {}, data, _validate_on(user, Q), "recall@1", valid_pairs=valid)
    assert chosen.config == {"max_epochs": 4} and chosen.record["self_selected"]["best_epoch"] == 4
    model = selection.refit(chosen, data)
    # Refitted with the chosen config and the timestamps, without validation pairs.
    assert model.max_epochs == 4 and model.seen_["timestamps"] is data.timestamps
    assert model.seen_["valid"] == (None, None)


def test_user_index_puts_fitted_users_first():
    index = selection.user_index(["b", "a", "b"], ["c", "a", "d"])
    assert index == {"a": 0, "b": 1, "c": 2, "d": 3}
    data = selection.fit_data(["a", "b", "b"], ["i1", "gone", "i0"], [1, 2, 3], {"i0": 0, "i1": 1}, index, 2)
    assert data.users.tolist() == [0, 1] and data.items.tolist() == [1, 0] and data.timestamps.tolist() == [1, 3]
    assert data.n_users == 2 and data.n_items == 2


def test_candidates_by_hand():
    # u consumed a, b (and "x", not in the catalog) before the query; catalog a, b, c, d.
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    c = cand.query_candidates([["b", "a", "x"], ["b", "a"]], ["d", "a"], index, "exclude")
    assert [e.tolist() for e in c.exclude] == [[0, 1], [0, 1]]
    assert c.repeat.tolist() == [False, True] and c.main.tolist() == [True, False]
    allow = cand.query_candidates([["b", "a"]], ["a"], index, "allow")
    assert allow.exclude[0].size == 0 and allow.repeat.tolist() == [True] and allow.main.tolist() == [True]
    # Scores favour a > b > c = d; without a and b, d ties c: rank 2 pessimistic, 1 optimistic.
    scores = np.array([[4.0, 3.0, 2.0, 2.0]])
    mask = cand.candidate_mask(c.exclude[:1], 4)
    assert mask.tolist() == [[False, False, True, True]]
    assert cand.target_ranks(scores, [3], mask).tolist() == [2.0]
    assert cand.target_ranks(scores, [3], mask, ties="optimistic").tolist() == [1.0]
    assert cand.target_ranks(scores, [3], np.ones((1, 4), bool)).tolist() == [4.0]
    with pytest.raises(ValueError, match="not among"):
        cand.target_ranks(scores, [0], mask)
    # rank_targets (evaluate) ranks the same.
    r = metrics.rank_targets(lambda s: scores[s], 1, [3], c.exclude[:1], top_k=2)
    assert r.ranks.tolist() == [2.0] and r.top_items.tolist() == [[2, 3]]
