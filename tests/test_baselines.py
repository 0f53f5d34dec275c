"""Tests of trainer.evaluation.baselines: popularity, EASE, ID two-tower."""

import numpy as np
import pytest

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before tensorflow)
from trainer.evaluation import baselines
from trainer.evaluation import ranking as metrics


def _planted(seed=0, n_groups=3, users_per_group=20, items_per_group=10, train_per_user=12):
    """Users of group g interact only with items of group g.

    Returns train (users, items), one held-out eval target per user, n_users, n_items.
    """
    rng = np.random.default_rng(seed)
    n_users, n_items = n_groups * users_per_group, n_groups * items_per_group
    tu, ti, eval_items = [], [], []
    for u in range(n_users):
        g = u // users_per_group
        own = np.arange(g * items_per_group, (g + 1) * items_per_group)
        picks = rng.choice(own, train_per_user + 1)
        tu += [u] * train_per_user
        ti += list(picks[:-1])
        eval_items.append(picks[-1])
    return np.array(tu), np.array(ti), np.array(eval_items), n_users, n_items


def test_popularity_ranks_by_count():
    # Counts: item 0 x1, item 1 x3, item 2 x2, item 3 x0 -> order 1, 2, 0, 3.
    users = np.array([0, 0, 1, 1, 2, 2])
    items = np.array([0, 1, 1, 1, 2, 2])
    pop = baselines.PopularityBaseline().fit(users, items, n_items=4)
    s = pop.score(np.array([0, 2]))
    assert s.shape == (2, 4)
    np.testing.assert_array_equal(s[0], [1, 3, 2, 0])
    np.testing.assert_array_equal(s[0], s[1])
    r = metrics.rank_targets(lambda q: pop.score(q), 4, [1, 2, 0, 3])
    np.testing.assert_array_equal(r.ranks, [1, 2, 3, 4])
    np.testing.assert_array_equal(r.top_items[0], [1, 2, 0, 3])


def test_ease_matches_direct_formula_and_recommends_cooccurring_item():
    # 4 users, 4 items. Items 0 and 1 always co-occur; item 2 with item 3 once.
    X = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [0, 0, 1, 1],
        ],
        np.float64,
    )
    users, items = np.nonzero(X)
    lam = 0.5
    ease = baselines.EASEBaseline(l2=lam).fit(users, items, n_items=4)
    G = X.T @ X + lam * np.eye(4)
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    np.testing.assert_allclose(ease.B_, B, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ease.score(np.arange(4)), X @ B, rtol=1e-5, atol=1e-6)
    # User 4 has only item 0: its best other item is the co-occurring item 1.
    ease2 = baselines.EASEBaseline(l2=lam).fit(np.r_[users, 4], np.r_[items, 0], n_items=4)
    s = ease2.score(np.array([4]))[0]
    s[0] = -np.inf
    assert int(np.argmax(s)) == 1
    # Duplicate interactions count once (binary X).
    ease3 = baselines.EASEBaseline(l2=lam).fit(np.r_[users, 0, 0], np.r_[items, 0, 0], n_items=4)
    np.testing.assert_allclose(ease3.B_, ease.B_)


def test_ease_restricts_large_catalogs():
    # Popularity: item 2 x3, item 0 x2, item 1 x1, item 3 x0; keep the top 2.
    users = np.array([0, 1, 2, 0, 1, 2])
    items = np.array([2, 2, 2, 0, 0, 1])
    ease = baselines.EASEBaseline(l2=1.0, max_items=2).fit(users, items, n_items=4)
    np.testing.assert_array_equal(ease.kept_items_, [0, 2])
    s = ease.score(np.array([0, 2]))
    assert s.shape == (2, 4)
    assert np.all(np.isneginf(s[:, [1, 3]])) and np.all(np.isfinite(s[:, [0, 2]]))


def test_configs_round_trip():
    for b in (
        baselines.PopularityBaseline(),
        baselines.EASEBaseline(l2=12.5, max_items=100),
        baselines.IdTwoTowerBaseline(embedding_dim=8, epochs=2, batch_size=32, learning_rate=0.2, seed=3),
    ):
        clone = type(b).from_config(b.get_config())
        assert clone.get_config() == b.get_config()
        assert baselines.make_baseline(b.name, **b.get_config()).get_config() == b.get_config()
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.make_baseline("nope")


def test_score_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="before fit"):
        baselines.EASEBaseline().score(np.array([0]))


def _recall_at(model, eval_items, k):
    n = len(eval_items)
    r = metrics.rank_targets(lambda q: model.score(q), n, eval_items, None)
    return metrics.summarize(r, ks=(k,))[f"recall@{k}"]


@pytest.mark.slow
def test_id_two_tower_beats_random_and_is_deterministic():
    tu, ti, ev, n_users, n_items = _planted()
    cfg = dict(embedding_dim=8, epochs=2, batch_size=16, learning_rate=0.5, seed=1)
    m1 = baselines.IdTwoTowerBaseline(**cfg).fit(tu, ti, n_items=n_items, n_users=n_users)
    assert m1.score(np.arange(4)).shape == (4, n_items)
    # Random recall@10 over 30 items is 10/30 = 0.33; the planted groups have
    # 10 items each, so a model that learned the groups gets close to 1.
    rec = _recall_at(m1, ev, 10)
    assert rec > 0.6, rec
    m2 = baselines.IdTwoTowerBaseline(**cfg).fit(tu, ti, n_items=n_items, n_users=n_users)
    np.testing.assert_array_equal(m1.score(np.arange(n_users)), m2.score(np.arange(n_users)))


def test_ease_and_popularity_on_planted_data():
    tu, ti, ev, n_users, n_items = _planted()
    ease = baselines.EASEBaseline(l2=1.0).fit(tu, ti, n_items=n_items, n_users=n_users)
    assert _recall_at(ease, ev, 10) > 0.9
    pop = baselines.PopularityBaseline().fit(tu, ti, n_items=n_items)
    assert _recall_at(pop, ev, 10) < _recall_at(ease, ev, 10)
