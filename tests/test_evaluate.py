"""trainer.evaluation.evaluate on a tiny trained run (the planted three-group fixture)."""

from __future__ import annotations

import dataclasses
import json
import os

import model_fixtures as mf
import numpy as np
import pytest
import tensorflow as tf

import trainer  # noqa: F401
from trainer import features
from trainer.data import arrays as da
from trainer.data import tf_dataset as data
from trainer.evaluation import baselines, evaluate, report
from trainer.model import run_dir as rd
from trainer.training import fit as training

TINY_BASELINES = (("id_two_tower", {"epochs": 1, "embedding_dim": 8, "batch_size": 32}),)
TINY_EASE_GRID = (1.0, 100.0, 10000.0)
KS = (3, 10)


HEAVY_ITEM = "k7"


def _add_new_users(dataset_dir: str) -> None:
    """Users the run never saw (texts not in the text cache). Test-only: a cold
    one with no history, one with a single history item, and one example whose
    target is not in the catalog (not ranked). Train-only: old0, who has no
    test example (segment quality falls back to their latest train example).
    u0 gets a second test query whose target they already consumed (a repeat
    target). "heavy" consumed HEAVY_ITEM 40 times in the training period and
    has no example at all (as `--max-examples-per-user` would leave them):
    only the event log knows, and the baselines must see it."""
    path = os.path.join(dataset_dir, f"{features.TRAIN_PREFIX}-00009-of-00010{features.TFRECORD_SUFFIX}")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        w.write(mf.example("old0", "age 50, plays guitar in a band. recent: ", [], "m3", timestamp=1500).SerializeToString())
    u0_items = [e.item_id for _, e in da.load_events(dataset_dir).labelled("u0")]
    mf.write_events(dataset_dir, [("old0", ["m3"], [1500], ["train"]),
                                  ("heavy", [HEAVY_ITEM] * 40, list(range(100, 140)), ["train"] * 40)],
                    name="00009-of-00010")
    rows = [
        mf.example("new0", "age 30, loves hiking and camping. recent: ", [], "o1", timestamp=2000),
        mf.example("new1", "age 41, cooks dinner every day. recent: Kettle", ["k6"], "k2", timestamp=2000),
        mf.example("new1", "age 41, cooks dinner every day. recent: Kettle", ["k6"], "zz-gone", timestamp=2001),
        mf.example("u0", "age 33, loves hiking and camping. recent: ", [], u0_items[0], timestamp=2002),
    ]
    path = os.path.join(dataset_dir, f"{features.EVAL_PREFIX}-00009-of-00010{features.TFRECORD_SUFFIX}")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for ex in rows:
            w.write(ex.SerializeToString())


def _write_truth(path: str) -> str:
    groups = list(mf.GROUPS)
    lines = ["user_id,segment"] + [f"u{u},{groups.index(mf.user_group(u))}" for u in range(30)]
    lines += [f"new0,{groups.index('outdoor')}", f"new1,{groups.index('kitchen')}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run dir as `segrec train` leaves it: tiny model, 1 warm-up + 6 joint epochs (a few seconds)."""
    import keras

    from trainer.model.segrec_model import SegRecModel
    from trainer.model.text_encoder import TextCache

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("eval")
    dataset_dir = mf.write_dataset(str(root / "dataset"), valid=True)
    texts = mf.all_user_texts(dataset_dir)
    enc = mf.tiny_encoder(texts)
    cache = TextCache.build(enc, texts, progress=False)
    catalog = data.load_catalog(dataset_dir)
    model = SegRecModel.from_catalog(catalog, text_encoder=enc, **mf.TINY_MODEL)
    model.compile(keras.optimizers.Adam(0.02))
    train_ds = data.make_dataset(dataset_dir, "train", 16, shuffle=True, seed=1, text_cache=cache)
    training.fit(model, train_ds, epochs=6, warmup_epochs=1, init_batches=5, recall_k=None, verbose=0)
    run = str(root / "run")
    rd.save_model(run, model)
    rd.write_json(rd.path(run, rd.TRAIN_CONFIG), {"dataset_dir": dataset_dir, "beta": 0.5, "seed": 0, "recall_k": 3})
    cache.save(rd.path(run, rd.TEXT_CACHE))
    _add_new_users(dataset_dir)  # after the cache: their texts must go through the encoder
    truth = _write_truth(str(root / "segments_truth.csv"))
    return run, dataset_dir, truth


@pytest.fixture(scope="module")
def evaluation(trained_run):
    run, _, truth = trained_run
    config = evaluate.EvaluateConfig(run_dir=run, ks=KS, baselines=ALL_MODELS[1:], baseline_params=TINY_BASELINES,
                                     truth_path=truth,
                                     baseline_grids=(("ease", TINY_EASE_GRID),), compare_run_dir=run, batch_size=8)
    return config, evaluate.run_evaluation(config, progress=False)


ALL_MODELS = ("segrec", "popularity", "ease", "id_two_tower")


def test_every_model_is_ranked_and_reported(evaluation):
    config, ev = evaluation
    results = ev.results
    assert tuple(results["models"]) == ALL_MODELS
    for name in ALL_MODELS:
        s = results["models"][name]
        assert 0.0 <= s["recall@3"] <= s["recall@10"] <= 1.0
        # 30 users' held-out items + new0 + new1's known target; new1's "zz-gone" is not ranked, and u0's
        # repeat target is reported apart.
        assert s["count"] == 32
        assert results["repeat_targets"][name]["count"] == 1
    assert results["queries"] == {"ranked": 32, "repeat_targets": 1, "unknown_target": 1,
                                  "eval_users_not_in_train": 2, "repeats": "exclude"}
    out = os.path.join(config.run_dir, "evaluation")
    assert results["config"]["output_dir"] == out and results["config"]["beta"] == 0.5
    for name in (report.REPORT_JSON, report.REPORT_MD, report.RECALL_PNG, report.SIZES_PNG, report.HEATMAP_PNG,
                 report.EMBEDDINGS_PNG):
        assert os.path.join(out, name) in results["paths"] and os.path.getsize(os.path.join(out, name)) > 0
    md = open(os.path.join(out, report.REPORT_MD)).read()
    assert all(name in md for name in ALL_MODELS)
    assert "## Repeat targets" in md and "## Model selection" in md
    assert json.load(open(os.path.join(out, report.REPORT_JSON))) == results
    summary = evaluate.format_summary(results)
    assert "recall@10" in summary and all(name in summary for name in ALL_MODELS)
    assert "chosen on valid" in summary and "test scored once" in summary


def test_segrec_finds_the_planted_groups(evaluation):
    _, ev = evaluation
    models = ev.results["models"]
    # A user's held-out item is one of the 2 group items they have not consumed;
    # of the 18 items left after excluding their 6, a random ranking puts it in
    # the top 3 with probability ~ 0.17. Popularity knows no groups.
    assert models["segrec"]["recall@3"] > 0.5
    assert models["segrec"]["recall@3"] > models["popularity"]["recall@3"] + 0.2


def test_consumed_items_are_excluded_from_every_top_list(evaluation):
    _, ev = evaluation
    assert len(ev.exclude) == len(ev.targets) == 32
    for name, ranking in ev.rankings.items():
        for q, top in enumerate(ranking.top_items):
            banned = set(ev.exclude[q].tolist())
            assert int(ev.targets[q]) not in banned  # exclude rule: a consumed target is not a main query
            assert not banned & set(top.tolist()), (name, q)
            # Nothing but the excluded items is taken out of the candidates.
            assert ranking.n_candidates[q] == len(ev.item_ids) - len(banned)
    # u0's test query excludes everything u0 consumed before it: five training items and the validation item.
    dataset_dir = ev.results["config"]["dataset_dir"]
    evals = da.load_split(dataset_dir, "eval")
    log = da.load_events(dataset_dir)
    idx = da.item_index(ev.item_ids)
    u0_items = {idx[e.item_id] for _, e in log.labelled("u0")}
    assert [s for s, _ in log.labelled("u0")] == ["train"] * 5 + ["valid"] and len(u0_items) == 6
    query_user = list(evals.user_ids[ev.queries])
    assert set(ev.exclude[query_user.index("u0")].tolist()) == u0_items
    # new0 (no events, no history) excludes nothing; new1 (no events) its history item.
    assert ev.exclude[query_user.index("new0")].size == 0
    assert ev.exclude[query_user.index("new1")].tolist() == [idx["k6"]]


def test_repeat_targets_are_reported_apart_with_nothing_removed(evaluation):
    _, ev = evaluation
    dataset_dir = ev.results["config"]["dataset_dir"]
    evals = da.load_split(dataset_dir, "eval")
    assert ev.repeat_queries.size == 1 and evals.user_ids[ev.repeat_queries[0]] == "u0"
    assert ev.repeat_queries[0] not in set(ev.queries.tolist())
    for name, ranking in ev.repeat_rankings.items():
        assert ranking.num_queries == 1 and ranking.n_candidates[0] == len(ev.item_ids), name
        assert ev.results["repeat_targets"][name]["count"] == 1


def test_train_time_recall_ranks_exactly_like_evaluate(trained_run, evaluation, tmp_path):
    """One repeat rule, one rank function: train-time recall's ranks of the test queries are evaluate's,
    under "exclude" and under "allow" (where the repeat target is ranked too, with nothing removed)."""
    import shutil

    run_dir, dataset_dir, _ = trained_run
    config, ev = evaluation
    run = rd.load_run(run_dir)
    catalog = data.load_catalog(dataset_dir)
    queries = da.load_queries(dataset_dir, "eval", catalog.item_ids)
    assert queries.rule == "exclude" and queries.candidates.repeat.sum() == 1
    ranks = training.validation_ranks(run.model, queries, 0.5, run.text_cache, batch_size=config.batch_size)
    np.testing.assert_array_equal(ranks, ev.rankings["segrec"].ranks)
    k = 3
    assert training.recall_at_k(run.model, queries, k, 0.5, run.text_cache, config.batch_size) == \
        pytest.approx(ev.results["models"]["segrec"][f"recall@{k}"])

    allow_dir = str(tmp_path / "allow")
    shutil.copytree(dataset_dir, allow_dir)
    meta = json.load(open(os.path.join(allow_dir, features.METADATA_FILE)))
    with open(os.path.join(allow_dir, features.METADATA_FILE), "w") as f:
        json.dump({**meta, "repeats": "allow"}, f)
    allowed = evaluate.run_evaluation(dataclasses.replace(config, dataset_dir=allow_dir, output_dir=str(tmp_path / "e"),
                                                          baselines=(), baseline_params=(), baseline_grids=(),
                                                          compare_run_dir=None),
                                      progress=False)
    assert allowed.results["queries"]["ranked"] == 33 and allowed.results["queries"]["repeats"] == "allow"
    assert all(e.size == 0 for e in allowed.exclude)
    a_queries = da.load_queries(allow_dir, "eval", catalog.item_ids)
    a_ranks = training.validation_ranks(run.model, a_queries, 0.5, run.text_cache, batch_size=config.batch_size)
    np.testing.assert_array_equal(a_ranks, allowed.rankings["segrec"].ranks)
    # Ranked with nothing removed, a query's target can only fall (or stay): more candidates.
    main = list(allowed.queries)
    back = np.array([main.index(q) for q in ev.queries])
    assert np.all(allowed.rankings["segrec"].ranks[back] >= ev.rankings["segrec"].ranks)


def test_baselines_are_chosen_on_validation_and_fitted_on_every_training_interaction(evaluation):
    _, ev = evaluation
    sel = ev.results["model_selection"]
    assert sel["split"] == "valid" and sel["metric"] == "recall@3" and sel["repeats"] == "exclude"
    assert sel["models"]["segrec"]["split"] is None  # this run records no selection: said so, not invented
    ease = sel["models"]["ease"]
    grid = dict((v, m) for v, m in ease["grid"])
    assert [v for v, _ in ease["grid"]] == list(TINY_EASE_GRID) and not ease["forced"]
    assert grid[ease["chosen"]] == max(grid.values())
    assert next(v for v, m in ease["grid"] if m == max(grid.values())) == ease["chosen"]  # ties: the first
    assert ease["config"]["l2"] == ease["chosen"] and ease["refit_on"] == ["train", "valid"]
    tower = sel["models"]["id_two_tower"]
    assert tower["forced"] and tower["chosen"] == 1 and "grid" not in tower  # --id-two-tower-epochs 1
    assert sel["models"]["popularity"]["param"] is None
    # "heavy" has no example, only 40 training events of HEAVY_ITEM: popularity still puts it first.
    heavy = ev.item_ids.index(HEAVY_ITEM)
    pop = ev.rankings["popularity"]
    assert all(top[0] == heavy for q, top in enumerate(pop.top_items) if heavy not in ev.exclude[q])


@pytest.mark.slow
def test_sasrec_is_one_registration_away(evaluation, tmp_path):
    """SASRec (a baseline that picks its epochs on the validation pairs itself) through evaluate: chosen on
    validation, refitted on train + valid for the chosen epochs, scored on test with the others' queries."""
    config, ev = evaluation
    sas = evaluate.run_evaluation(dataclasses.replace(
        config, output_dir=str(tmp_path / "e"), baselines=("sasrec",), baseline_grids=(), compare_run_dir=None,
        baseline_params=(("sasrec", {"max_epochs": 3, "eval_every": 1, "patience": 2, "embedding_dim": 8,
                                     "max_len": 8, "batch_size": 32}),)), progress=False)
    rec = sas.results["model_selection"]["models"]["sasrec"]
    chosen = rec["self_selected"]
    assert chosen["split"] == "validation" and 1 <= chosen["best_epoch"] <= 3
    assert rec["config"]["max_epochs"] == chosen["best_epoch"] and rec["refit_on"] == ["train", "valid"]
    assert sas.results["models"]["sasrec"]["count"] == 32 and sas.results["repeat_targets"]["sasrec"]["count"] == 1
    np.testing.assert_array_equal(sas.rankings["segrec"].ranks, ev.rankings["segrec"].ranks)


def test_a_dataset_dir_without_validation_split_is_refused(trained_run, tmp_path):
    run_dir, _, _ = trained_run
    old = mf.write_dataset(str(tmp_path / "schema1"))  # train-* and eval-* only, as segrec preprocess wrote before
    with pytest.raises(FileNotFoundError, match="re-run `segrec preprocess`"):
        evaluate.run_evaluation(evaluate.EvaluateConfig(run_dir=run_dir, dataset_dir=old, baselines=()), progress=False)


def test_breakdown_per_segment_and_cold_users(evaluation):
    _, ev = evaluation
    breakdowns = ev.results["breakdowns"]
    assert tuple(breakdowns) == ALL_MODELS
    segments = np.unique(ev.segment_of_query)
    for name in ALL_MODELS:
        groups = breakdowns[name]
        seg_groups = [g for g in groups if g.startswith("segment ")]
        assert len(seg_groups) == segments.size
        assert sum(groups[g]["count"] for g in seg_groups) == 32
        # Cold: new0 (no history) and new1 (one item); everyone else has 5.
        assert groups["cold users (history <= 2)"]["count"] == 2
        assert groups["warm users (history > 2)"]["count"] == 30
    # The same query groups for every model.
    assert {g: s["count"] for g, s in breakdowns["ease"].items()} == \
        {g: s["count"] for g, s in breakdowns["segrec"].items()}


def test_segment_quality_truth_and_stability(evaluation):
    _, ev = evaluation
    r = ev.results
    q = r["segment_quality"]
    # 30 fixture users + new0, new1 (eval) + old0 (train only, not in the truth file).
    assert q["n_users"] == 33 and q["truth_users"] == 32
    # Text, history and targets all carry the group: the segments find it (0.91 here; chance ~0).
    assert q["adjusted_rand"] > 0.5 and 0.0 <= q["nmi"] <= 1.0
    assert [m["method"] for m in r["method_comparison"]] == ["learned", "agglomerative_ward", "dbscan"]
    # compare_run_dir = the same run: the same labels.
    assert r["stability"] == pytest.approx(1.0)
    assert sum(r["segment_sizes"]) == 33 and len(r["segment_labels"]) == 3
    shares = np.array(r["segment_category_matrix"])
    assert shares.shape == (3, len(r["category_names"]))
    # Every training item has its group category: a used segment's group shares sum to 1.
    group_cols = [r["category_names"].index(g) for g in mf.GROUPS]
    used = np.array(r["segment_sizes"]) > 0
    np.testing.assert_allclose(shares[used][:, group_cols].sum(axis=1), 1.0)


def test_baselines_for_users_not_seen_in_training():
    # EASE and the ID two-tower know nothing of a user index past the training
    # users: all-zero scores, ranked last by the pessimistic tie rule.
    b = baselines.make_baseline("ease", l2=1.0).fit([0, 0, 1], [0, 1, 2], n_items=3, n_users=2)
    assert b.score(np.array([2])).tolist() == [[0.0, 0.0, 0.0]]


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate.EvaluateConfig(run_dir="r", baselines=("nope",))
    with pytest.raises(ValueError, match="not among baselines"):
        evaluate.EvaluateConfig(run_dir="r", baselines=("ease",), baseline_params=(("id_two_tower", {}),))
    assert dataclasses.replace(evaluate.EvaluateConfig(run_dir="r"), ks=(5,)).ks == (5,)


def test_cold_start_compares_segrec_popularity_and_popular_in_segment(evaluation):
    from trainer.evaluation import cold_start

    config, ev = evaluation
    table = ev.results["cold_start"]
    assert set(table) == {cold_start.NEW_USERS, cold_start.SPARSE_USERS.format(n=config.cold_max_history),
                          cold_start.SPARSE_USERS.format(n=evaluate.SPARSE_HISTORY)}
    for scenario in table.values():
        assert set(scenario) == set(cold_start.RANKERS)
        for summary in scenario.values():
            assert summary["count"] == 32 and 0.0 <= summary["recall@3"] <= summary["recall@10"] <= 1.0
    # With one shared ranking for every user, popularity's new-user and sparse-user lists differ only by
    # the two excluded items: recall can only go up when they are removed.
    sparse = table[cold_start.SPARSE_USERS.format(n=config.cold_max_history)]
    assert sparse["popularity"]["recall@10"] >= table[cold_start.NEW_USERS]["popularity"]["recall@10"]
    md = open(os.path.join(config.run_dir, "evaluation", report.REPORT_MD)).read()
    assert "## Cold start" in md and "popular_in_segment" in md
    assert "cold start, new users" in evaluate.format_summary(ev.results)


def test_segment_popularity_counts_each_segments_users():
    import numpy as np

    from trainer.evaluation import cold_start

    users = np.array(["a", "a", "b", "c", "c", "c"])
    items = np.array([0, 1, 1, 2, 2, 1])
    counts = cold_start.segment_popularity(users, items, {"a": 0, "b": 1, "c": 1}, 2, 3)
    np.testing.assert_allclose(np.round(counts), [[1, 1, 0], [0, 2, 2]])
    # Equal counts within a segment are ordered by overall popularity (item 1: 3 events, item 0: 1).
    assert counts[0, 1] > counts[0, 0] and counts[1, 1] > counts[1, 2]
