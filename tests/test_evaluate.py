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
from trainer.evaluation import ranking as metrics
from trainer.model import run_dir as rd
from trainer.training import fit as training

TINY_BASELINES = (("id_two_tower", {"epochs": 1, "embedding_dim": 8, "batch_size": 32}),)
KS = (3, 10)


def _add_new_users(dataset_dir: str) -> None:
    """Users the run never saw (texts not in the text cache). Eval-only: a cold
    one with no history, one with a single history item, and one example whose
    target is not in the catalog (not ranked). Train-only: old0, who has no
    eval example (segment quality falls back to their latest train example)."""
    path = os.path.join(dataset_dir, f"{features.TRAIN_PREFIX}-00009-of-00010{features.TFRECORD_SUFFIX}")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        w.write(mf.example("old0", "age 50, plays guitar in a band. recent: ", [], "m3", timestamp=1500).SerializeToString())
    rows = [
        mf.example("new0", "age 30, loves hiking and camping. recent: ", [], "o1", timestamp=2000),
        mf.example("new1", "age 41, cooks dinner every day. recent: Kettle", ["k6"], "k2", timestamp=2000),
        mf.example("new1", "age 41, cooks dinner every day. recent: Kettle", ["k6"], "zz-gone", timestamp=2001),
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
    dataset_dir = mf.write_dataset(str(root / "dataset"))
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
    rd.write_json(rd.path(run, rd.TRAIN_CONFIG), {"dataset_dir": dataset_dir, "beta": 0.5, "seed": 0})
    cache.save(rd.path(run, rd.TEXT_CACHE))
    _add_new_users(dataset_dir)  # after the cache: their texts must go through the encoder
    truth = _write_truth(str(root / "segments_truth.csv"))
    return run, dataset_dir, truth


@pytest.fixture(scope="module")
def evaluation(trained_run):
    run, _, truth = trained_run
    config = evaluate.EvaluateConfig(run_dir=run, ks=KS, baseline_params=TINY_BASELINES, truth_path=truth,
                                     compare_run_dir=run, batch_size=8)
    return config, evaluate.run_evaluation(config, progress=False)


ALL_MODELS = ("segrec", "popularity", "ease", "id_two_tower")


def test_every_model_is_ranked_and_reported(evaluation):
    config, ev = evaluation
    results = ev.results
    assert tuple(results["models"]) == ALL_MODELS
    for name in ALL_MODELS:
        s = results["models"][name]
        assert 0.0 <= s["recall@3"] <= s["recall@10"] <= 1.0
        # 30 users' held-out items + new0 + new1's known target; new1's "zz-gone" is not ranked.
        assert s["count"] == 32
    assert results["queries"] == {"ranked": 32, "unknown_target": 1, "eval_users_not_in_train": 2}
    out = os.path.join(config.run_dir, "evaluation")
    assert results["config"]["output_dir"] == out and results["config"]["beta"] == 0.5
    for name in (report.REPORT_JSON, report.REPORT_MD, report.RECALL_PNG, report.SIZES_PNG, report.HEATMAP_PNG,
                 report.EMBEDDINGS_PNG):
        assert os.path.join(out, name) in results["paths"] and os.path.getsize(os.path.join(out, name)) > 0
    md = open(os.path.join(out, report.REPORT_MD)).read()
    assert all(name in md for name in ALL_MODELS)
    assert json.load(open(os.path.join(out, report.REPORT_JSON))) == results
    summary = evaluate.format_summary(results)
    assert "recall@10" in summary and all(name in summary for name in ALL_MODELS)


def test_segrec_finds_the_planted_groups(evaluation):
    _, ev = evaluation
    models = ev.results["models"]
    # A user's held-out item is one of the 3 group items they have not bought;
    # of the 19 items left after excluding their 5, a random ranking puts it in
    # the top 3 with probability 3/19 ~ 0.16. Popularity knows no groups.
    assert models["segrec"]["recall@3"] > 0.5
    assert models["segrec"]["recall@3"] > models["popularity"]["recall@3"] + 0.2


def test_training_items_are_excluded_from_every_top_list(evaluation):
    _, ev = evaluation
    assert len(ev.exclude) == len(ev.targets) == 32
    for name, ranking in ev.rankings.items():
        for q, top in enumerate(ranking.top_items):
            banned = set(ev.exclude[q].tolist()) - {int(ev.targets[q])}
            assert not banned & set(top.tolist()), (name, q)
            # Nothing but the excluded items is taken out of the candidates.
            assert ranking.n_candidates[q] == len(ev.item_ids) - len(banned)
    # u0's query excludes u0's five training items; new0 (not in train, no history) excludes nothing.
    dataset_dir = ev.results["config"]["dataset_dir"]
    train, evals = da.load_split(dataset_dir, "train"), da.load_split(dataset_dir, "eval")
    idx = da.item_index(ev.item_ids)
    u0_items = {idx[i] for u, i in zip(train.user_ids, train.item_ids) if u == "u0"}
    query_user = list(evals.user_ids[ev.queries])
    assert set(ev.exclude[query_user.index("u0")].tolist()) == u0_items and len(u0_items) == 5
    assert ev.exclude[query_user.index("new0")].size == 0


def test_exclusion_sets_by_hand():
    # u has trained on a, b (b also in a history); the query's history holds c;
    # "x" is not in the catalog. Catalog order a, b, c, d -> exclude {0, 1, 2}.
    split = da.SplitArrays(np.array(["u"], object), np.array(["d"], object), np.array([5]), [["c", "x"]],
                           np.array(["t"], object))
    out = evaluate.exclusion_sets(split, [0], {"u": {"a", "b"}}, {"a": 0, "b": 1, "c": 2, "d": 3})
    assert [e.tolist() for e in out] == [[0, 1, 2]]
    # Ranked: scores favour a > b > c > d; with a, b, c excluded d is first.
    scores = np.array([[4.0, 3.0, 2.0, 1.0]])
    r = metrics.rank_targets(lambda s: scores[s], 1, np.array([3]), out, top_k=2)
    assert r.ranks.tolist() == [1.0] and r.top_items.tolist() == [[3, -1]]


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
