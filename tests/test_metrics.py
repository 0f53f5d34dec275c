"""Tests of trainer.evaluation.ranking against hand-worked values."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

import trainer  # noqa: F401  (sets the environment before anything imports tensorflow)
from trainer.evaluation import ranking as metrics


def _table_fn(table):
    table = np.asarray(table, np.float32)
    return lambda q: table[q]


def _result_from_ranks(ranks, n_items=100):
    ranks = np.asarray(ranks, np.float64)
    top = np.full((len(ranks), 100), -1, np.int64)
    return metrics.RankingResult(ranks, top, n_items, np.full(len(ranks), n_items))


def test_summarize_hand_worked():
    # ranks [1, 3, 60]:
    #   recall@10 = 2/3 (ranks 1 and 3), recall@50 = 2/3, recall@100 = 3/3
    #   mrr = (1 + 1/3 + 1/60) / 3
    #   ndcg@10 = (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3 = 0.5
    s = metrics.summarize(_result_from_ranks([1, 3, 60]))
    assert s["recall@10"] == pytest.approx(2 / 3)
    assert s["recall@50"] == pytest.approx(2 / 3)
    assert s["recall@100"] == pytest.approx(1.0)
    assert s["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 60) / 3)
    assert s["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert s["count"] == 3


def test_rank_targets_hand_worked():
    # 2 queries, 5 items.
    # q0 scores [.9 .1 .5 .7 .3], target 2 (score .5): items 0 and 3 above -> rank 3.
    # q1 scores [.2 .8 .4 .6 .1], target 1 (score .8): best -> rank 1.
    scores = [[0.9, 0.1, 0.5, 0.7, 0.3], [0.2, 0.8, 0.4, 0.6, 0.1]]
    r = metrics.rank_targets(_table_fn(scores), 2, [2, 1], None)
    np.testing.assert_array_equal(r.ranks, [3, 1])
    np.testing.assert_array_equal(r.top_items[0], [0, 3, 2, 4, 1])
    np.testing.assert_array_equal(r.top_items[1], [1, 3, 2, 0, 4])
    assert r.n_items == 5
    np.testing.assert_array_equal(r.n_candidates, [5, 5])


def test_exclusion_and_target_never_excluded():
    scores = [[0.9, 0.1, 0.5, 0.7, 0.3], [0.2, 0.8, 0.4, 0.6, 0.1]]
    # q0 excludes items 0 and 3 (both above the target 2) -> rank 1.
    # q1 excludes its own target 1 (a re-watch) and item 3; the target stays
    # ranked -> rank 1, and item 3 is gone from the top items.
    r = metrics.rank_targets(_table_fn(scores), 2, [2, 1], [[0, 3], [1, 3]])
    np.testing.assert_array_equal(r.ranks, [1, 1])
    np.testing.assert_array_equal(r.top_items[0], [2, 4, 1, -1, -1])
    np.testing.assert_array_equal(r.top_items[1], [1, 2, 0, 4, -1])
    np.testing.assert_array_equal(r.n_candidates, [3, 4])
    # The same exclusion given as a sparse matrix.
    ex = sp.csr_matrix(([1, 1, 1, 1], ([0, 0, 1, 1], [0, 3, 1, 3])), shape=(2, 5))
    r2 = metrics.rank_targets(_table_fn(scores), 2, [2, 1], ex)
    np.testing.assert_array_equal(r2.ranks, r.ranks)
    np.testing.assert_array_equal(r2.top_items, r.top_items)


def test_ties_rules():
    # All 4 items score equal: pessimistic rank 4, optimistic 1, mean 2.5.
    fn = _table_fn(np.zeros((1, 4)))
    assert metrics.rank_targets(fn, 1, [2]).ranks[0] == 4
    assert metrics.rank_targets(fn, 1, [2], ties="optimistic").ranks[0] == 1
    assert metrics.rank_targets(fn, 1, [2], ties="mean").ranks[0] == 2.5
    # Excluded items do not take part in ties: 1 other candidate left -> rank 2.
    assert metrics.rank_targets(fn, 1, [2], [[0, 1]]).ranks[0] == 2


def test_batching_identical_to_one_batch():
    rng = np.random.default_rng(0)
    q, n = 37, 150
    scores = rng.normal(size=(q, n)).astype(np.float32)
    targets = rng.integers(0, n, q)
    exclude = [rng.choice(n, rng.integers(0, 20), replace=False) for _ in range(q)]
    one = metrics.rank_targets(_table_fn(scores), q, targets, exclude, batch_size=q)
    for bs in (1, 5, 16):
        many = metrics.rank_targets(_table_fn(scores), q, targets, exclude, batch_size=bs)
        np.testing.assert_array_equal(many.ranks, one.ranks)
        np.testing.assert_array_equal(many.top_items, one.top_items)
    assert one.top_items.shape == (q, 100)


def test_vector_score_fn_and_coverage():
    # Items on the axes; query q points at item q % 3 -> every target ranks 1.
    items = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = items[[0, 1, 2, 0]]
    r = metrics.rank_targets(metrics.vector_score_fn(queries, items), 4, [0, 1, 2, 0])
    np.testing.assert_array_equal(r.ranks, [1, 1, 1, 1])
    # top-10 (clipped to 3 items) covers the whole catalog.
    assert metrics.summarize(r)["coverage@10"] == pytest.approx(1.0)
    # Only the first query: its top 3 still hold all 3 items.
    assert metrics.summarize(r, mask=np.array([True, False, False, False]))["coverage@10"] == 1.0


def test_coverage_counts_distinct_top10_items():
    # 20 items; every query scores by item index ascending -> top 10 = items
    # 19..10 for every query -> coverage@10 = 10/20.
    fn = lambda q: np.tile(np.arange(20, dtype=np.float32), (len(q), 1))  # noqa: E731
    r = metrics.rank_targets(fn, 3, [19, 0, 10])
    np.testing.assert_array_equal(r.ranks, [1, 20, 10])
    assert metrics.summarize(r)["coverage@10"] == pytest.approx(0.5)


def test_breakdown_and_masks():
    r = _result_from_ranks([1, 3, 60, 200])
    hist = np.array([0, 5, 2, 9])
    groups = {"cold": metrics.cold_user_mask(hist), **metrics.segment_masks(np.array([0, 0, 1, 1]))}
    b = metrics.breakdown(r, groups)
    assert list(b) == ["cold", "segment 0", "segment 1"]
    # cold = queries 0 and 2 (ranks 1 and 60): recall@10 = 1/2.
    assert b["cold"]["recall@10"] == 0.5 and b["cold"]["count"] == 2
    # segment 1 = ranks 60 and 200: recall@100 = 1/2, mrr = (1/60 + 1/200) / 2.
    assert b["segment 1"]["recall@100"] == 0.5
    assert b["segment 1"]["mrr"] == pytest.approx((1 / 60 + 1 / 200) / 2)
    empty = metrics.summarize(r, mask=np.zeros(4, bool))
    assert empty["count"] == 0 and math.isnan(empty["recall@10"])


def test_recall_curve():
    ks, rec = metrics.recall_curve(_result_from_ranks([1, 3, 60]), ks=[1, 2, 3, 59, 60, 100])
    np.testing.assert_array_equal(ks, [1, 2, 3, 59, 60, 100])
    np.testing.assert_allclose(rec, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    ks, rec = metrics.recall_curve(_result_from_ranks([1, 3, 60]))
    assert ks.shape == (100,) and np.all(np.diff(rec) >= 0)


def test_bad_inputs_are_named():
    fn = _table_fn(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="targets"):
        metrics.rank_targets(fn, 2, [0, 7])
    with pytest.raises(ValueError, match="exclude"):
        metrics.rank_targets(fn, 2, [0, 1], [[9], []])
    with pytest.raises(ValueError, match="ties"):
        metrics.rank_targets(fn, 2, [0, 1], ties="random")


def test_train_time_selection_metrics_match_evaluate():
    """Training picks epochs and beta with fit.metric_from_ranks; evaluate reports ranking.summarize:
    on the same ranks they must give the same numbers, or the model is selected on something else."""
    from trainer.training import fit

    ranks = np.array([1, 3, 60, 10, 11, 2, 50, 51], np.float64)
    s = metrics.summarize(_result_from_ranks(ranks), ks=(10, 50))
    assert fit.metric_from_ranks(ranks, "ndcg@10") == pytest.approx(s["ndcg@10"])
    assert fit.metric_from_ranks(ranks, "recall@10") == pytest.approx(s["recall@10"]) == 4 / 8
    assert fit.metric_from_ranks(ranks, "recall@50") == pytest.approx(s["recall@50"]) == 6 / 8
    assert fit.metric_from_ranks(np.array([1.0, 3.0, 60.0]), "ndcg@10") == pytest.approx(0.5)  # hand-worked above
    assert fit.metric_from_ranks(np.zeros(0), "ndcg@10") == 0.0
    assert fit.parse_selection_metric("recall@7") == ("recall", 7)
    for bad in ("ndcg@5", "recall@0", "recall", "mrr", "ndcg@x"):
        with pytest.raises(ValueError, match="recall@K"):
            fit.parse_selection_metric(bad)
