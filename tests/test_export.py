"""`segrec export`: signatures, save -> reload, exclusions, versions, warm-up,
the ScaNN recall check (tiny run dir, tiny encoder)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from serving.export import layout
from trainer import contracts
from trainer import features as F
from trainer.cli import main as cli
from trainer.segments import document as segments_doc

TINY_TRAIN = ["--encoder", "tiny", "--embedding-dim", "16", "--num-segments", "4", "--epochs", "1", "--warmup-epochs", "0",
              "--batch-size", "64", "--recall-k", "10", "--quiet", "--beta", "0.5"]
BETA = 0.5  # the run's --beta (forced: unforced, it is chosen on validation), so the exports' default beta
slow = pytest.mark.slow  # every test on the trained run dir (a ~30 s module fixture)


@pytest.fixture(scope="module")
def trained(tiny_generated, tmp_path_factory):
    ds = tmp_path_factory.mktemp("export_ds")
    assert cli.main(["preprocess", "--input-dir", str(tiny_generated), "--output-dir", str(ds)]) == 0
    run = tmp_path_factory.mktemp("export_run")
    assert cli.main(["train", "--dataset-dir", str(ds), "--output-dir", str(run)] + TINY_TRAIN) == 0
    return run


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """brute_force as version 1, then scann as version 2, into one base path."""
    from serving.export import exporter as ex

    base = tmp_path_factory.mktemp("models")
    bf = ex.export(ex.ExportConfig(run_dir=str(trained), base_path=str(base), index="brute_force"))
    sc = ex.export(ex.ExportConfig(run_dir=str(trained), base_path=str(base), index="scann"))
    return {"base": base, "brute_force": bf, "scann": sc}


@pytest.fixture(scope="module")
def reference(trained):
    """The in-memory model, its catalog embeddings and a batch of eval users."""
    from trainer.data import arrays as da
    from trainer.model import run_dir as rd

    run = rd.load_run(str(trained))
    split = da.load_split(run.dataset_dir, "eval")
    batch = split.batch_dict(range(min(8, len(split))))
    return run, run.model.item_embeddings().numpy(), batch


def _expected_top(run, embeddings, batch, k, beta):
    """Brute force over model.item_embeddings() with the history excluded."""
    out = run.model({F.USER_TEXT: batch[F.USER_TEXT], F.HISTORY_ITEM_IDS: batch[F.HISTORY_ITEM_IDS]},
                    training=False, beta=beta)
    scores = out[F.QUERY].numpy() @ embeddings.T
    ids = np.array(run.model.item_ids)
    tops = []
    for row, hist in zip(scores, batch[F.HISTORY_ITEM_IDS].numpy()):
        seen = {h.decode() for h in hist if h}
        order = [i for i in np.argsort(-row, kind="stable") if ids[i] not in seen]
        tops.append(list(ids[order[:k]]))
    return tops, out[F.SEGMENT_ID].numpy()


def _load(summary):

    return layout.load_exported(summary.version_dir)


def _request(batch, k, beta):
    """serving_default inputs; k and beta: one value for every row, or a list per row."""
    import tensorflow as tf

    rows = int(batch[F.USER_TEXT].shape[0])
    k = np.broadcast_to(np.asarray(k, np.int32), [rows])
    beta = np.broadcast_to(np.asarray(beta, np.float32), [rows])
    return {F.USER_TEXT: batch[F.USER_TEXT], F.HISTORY_ITEM_IDS: batch[F.HISTORY_ITEM_IDS],
            F.K: tf.constant(k), F.BETA: tf.constant(beta)}


def _ids(tensor):
    return [[x.decode() for x in row] for row in tensor.numpy()]


@slow
def test_versions_increment_and_files_sit_beside_the_model(exports, trained):

    assert (exports["brute_force"].version, exports["scann"].version) == (1, 2)
    assert layout.existing_versions(str(exports["base"])) == [1, 2]
    for kind in ("brute_force", "scann"):
        vdir = exports["base"] / "segrec" / str(exports[kind].version)
        assert (vdir / "saved_model.pb").exists() and (vdir / contracts.WARMUP_FILE).exists()
        assert json.loads((vdir / "segments.json").read_text()) == json.loads((trained / "segments.json").read_text())
        card = (vdir / "model_card.md").read_text()
        assert "Recall@10 vs brute force" in card and f"Kind: {kind}" in card
    assert exports["scann"].recall_at_10 == pytest.approx(1.0)  # 60 items: exact ScaNN scoring
    assert not [p for p in (exports["base"] / "segrec").iterdir() if p.name.startswith(".tmp")]


@slow
@pytest.mark.parametrize("kind", ["brute_force", "scann"])
def test_reloaded_export_matches_in_memory_brute_force(exports, reference, kind):
    run, embeddings, batch = reference
    got = _load(exports[kind]).signatures["serving_default"](**_request(batch, 5, BETA))
    want_ids, want_seg = _expected_top(run, embeddings, batch, 5, BETA)
    assert _ids(got[F.OUT_ITEM_IDS]) == want_ids
    np.testing.assert_array_equal(got[F.SEGMENT_ID].numpy(), want_seg)
    scores = got[F.OUT_SCORES].numpy()
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


@slow
def test_signature_keys_dtypes_and_shapes(exports):
    import tensorflow as tf

    sigs = _load(exports["brute_force"]).signatures
    assert set(sigs) == {"serving_default", "recommend_defaults", "serving_tf_example", "user_embedding",
                         "encode_text", "serving_text_vector",
                         "serving_exclude"}  # the last two: the text-vector cache's split
    inputs = sigs["serving_default"].structured_input_signature[1]
    assert {k: (v.dtype, v.shape.as_list()) for k, v in inputs.items()} == {
        F.USER_TEXT: (tf.string, [None]), F.HISTORY_ITEM_IDS: (tf.string, [None, None]),
        F.K: (tf.int32, [None]), F.BETA: (tf.float32, [None])}
    # serving_exclude: serving_default's inputs (unchanged above) + exclude_item_ids [B, E], same outputs.
    excl = sigs["serving_exclude"].structured_input_signature[1]
    assert {k: (v.dtype, v.shape.as_list()) for k, v in excl.items()} == {
        **{k: (v.dtype, v.shape.as_list()) for k, v in inputs.items()},
        F.EXCLUDE_ITEM_IDS: (tf.string, [None, None])}
    assert {k: v.dtype for k, v in sigs["serving_exclude"].structured_outputs.items()} == {
        k: v.dtype for k, v in sigs["serving_default"].structured_outputs.items()}
    assert set(sigs["recommend_defaults"].structured_input_signature[1]) == {F.USER_TEXT, F.HISTORY_ITEM_IDS}
    assert set(sigs["serving_tf_example"].structured_input_signature[1]) == {F.EXAMPLES}
    rec = sigs["serving_default"].structured_outputs
    assert {k: v.dtype for k, v in rec.items()} == {
        F.OUT_ITEM_IDS: tf.string, F.OUT_SCORES: tf.float32, F.SEGMENT_ID: tf.int32, F.SEGMENT_PROBS: tf.float32}
    assert rec[F.SEGMENT_PROBS].shape.as_list() == [None, 4]
    emb = sigs["user_embedding"].structured_outputs
    assert {k: v.dtype for k, v in emb.items()} == {F.EMBEDDING: tf.float32, F.SEGMENT_ID: tf.int32,
                                                     F.SEGMENT_PROBS: tf.float32}
    assert emb[F.EMBEDDING].shape.as_list() == [None, 16]


@slow
def test_seen_items_are_never_returned(exports, reference):
    import tensorflow as tf

    run, _, batch = reference
    n = len(run.model.item_ids)
    fn = _load(exports["scann"]).signatures["serving_default"]
    # k = whole catalog: every unseen item comes back once, seen ones never,
    # and the slots left over are padding ("" / -inf).
    got = fn(**_request(batch, n, 0.0))
    for ids, scores, hist in zip(_ids(got[F.OUT_ITEM_IDS]), got[F.OUT_SCORES].numpy(),
                                 batch[F.HISTORY_ITEM_IDS].numpy()):
        seen = {h.decode() for h in hist if h}
        real = [i for i in ids if i]
        assert len(ids) == n and not seen & set(real)
        assert sorted(real) == sorted(set(run.model.item_ids) - seen)
        assert np.all(np.isneginf(scores[len(real):]))
    # A cold user (no history) gets full results.
    cold = fn(**{F.USER_TEXT: tf.constant(["nothing known"]), F.HISTORY_ITEM_IDS: tf.constant([[""]]),
                 F.K: tf.constant([3]), F.BETA: tf.constant([0.5])})
    assert all(_ids(cold[F.OUT_ITEM_IDS])[0])


@slow
def test_bad_knobs_are_rejected_naming_the_input(exports, reference):
    import tensorflow as tf

    batch = reference[2]
    rows = int(batch[F.USER_TEXT].shape[0])
    fn = _load(exports["brute_force"]).signatures["serving_default"]
    for k in (0, 101):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"inputs\.k: k must be in \[1, 100\]"):
            fn(**_request(batch, [5] * (rows - 1) + [k], 0.5))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"inputs\.beta: beta must be finite"):
        fn(**_request(batch, 5, [0.5] * (rows - 1) + [float("nan")]))
    for name, value in ((F.K, tf.constant([5] * (rows + 1))), (F.BETA, tf.constant([0.5] * (rows - 1)))):
        bad = dict(_request(batch, 5, 0.5), **{name: value})
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"inputs\.{name}: needs one value per row"):
            fn(**bad)


@slow
def test_knobs_per_row_answer_as_each_row_alone(exports, reference):
    """One call with a different k and beta per row == each row called alone,
    its columns past its own k padded with "" / -inf."""
    _, _, batch = reference
    rows = int(batch[F.USER_TEXT].shape[0])
    ks = [1 + (3 * i) % 7 for i in range(rows)]
    betas = [(-0.5, 0.0, 0.5, 2.0)[i % 4] for i in range(rows)]
    for kind in ("brute_force", "scann"):
        fn = _load(exports[kind]).signatures["serving_default"]
        got = fn(**_request(batch, ks, betas))
        ids, scores = _ids(got[F.OUT_ITEM_IDS]), got[F.OUT_SCORES].numpy()
        assert scores.shape == (rows, max(ks))
        for i in range(rows):
            one = {key: value[i : i + 1] for key, value in batch.items()}
            alone = fn(**_request(one, ks[i], betas[i]))
            assert ids[i][: ks[i]] == _ids(alone[F.OUT_ITEM_IDS])[0], (kind, i)
            np.testing.assert_allclose(scores[i][: ks[i]], alone[F.OUT_SCORES].numpy()[0], atol=1e-5)
            assert all(x == "" for x in ids[i][ks[i] :]) and np.all(np.isneginf(scores[i][ks[i] :]))
            assert got[F.SEGMENT_ID].numpy()[i] == alone[F.SEGMENT_ID].numpy()[0]


@slow
def test_tf_example_signature_equals_serving_default(exports, reference):
    import tensorflow as tf

    _, _, batch = reference
    sigs = _load(exports["scann"]).signatures
    examples = []
    for text, hist in zip(batch[F.USER_TEXT].numpy(), batch[F.HISTORY_ITEM_IDS].numpy()):
        feats = {F.USER_TEXT: tf.train.Feature(bytes_list=tf.train.BytesList(value=[text])),
                 F.HISTORY_ITEM_IDS: tf.train.Feature(bytes_list=tf.train.BytesList(value=[h for h in hist if h]))}
        examples.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    via_example = sigs["serving_tf_example"](examples=tf.constant(examples))
    direct = sigs["serving_default"](**_request(batch, 10, BETA))  # the export's default k and beta
    defaults = sigs["recommend_defaults"](**{F.USER_TEXT: batch[F.USER_TEXT],
                                             F.HISTORY_ITEM_IDS: batch[F.HISTORY_ITEM_IDS]})
    for other in (direct, defaults):
        assert _ids(via_example[F.OUT_ITEM_IDS]) == _ids(other[F.OUT_ITEM_IDS])
        np.testing.assert_array_equal(via_example[F.SEGMENT_ID].numpy(), other[F.SEGMENT_ID].numpy())
        np.testing.assert_allclose(via_example[F.OUT_SCORES].numpy(), other[F.OUT_SCORES].numpy(), atol=1e-5)


@slow
def test_user_embedding_signature_matches_the_model(exports, reference):
    run, _, batch = reference
    got = _load(exports["brute_force"]).signatures["user_embedding"](
        **{F.USER_TEXT: batch[F.USER_TEXT], F.HISTORY_ITEM_IDS: batch[F.HISTORY_ITEM_IDS]})
    want = run.model({F.USER_TEXT: batch[F.USER_TEXT], F.HISTORY_ITEM_IDS: batch[F.HISTORY_ITEM_IDS]}, training=False)
    np.testing.assert_allclose(got[F.EMBEDDING].numpy(), want[F.EMBEDDING].numpy(), atol=1e-5)
    np.testing.assert_array_equal(got[F.SEGMENT_ID].numpy(), want[F.SEGMENT_ID].numpy())


def _exclude_request(batch, k, beta, exclude):
    import tensorflow as tf

    return dict(_request(batch, k, beta), **{F.EXCLUDE_ITEM_IDS: tf.constant(exclude, tf.string)})


@slow
@pytest.mark.parametrize("kind", ["brute_force", "scann"])
def test_serving_exclude_removes_the_excluded_items_and_nothing_else(exports, reference, kind):
    """Each row excludes serving_default's best item (and one row nothing, its row all ""): the
    excluded item is absent and the rest is serving_default's ranking, one further down;
    exclude_item_ids of width 0 answer as serving_default."""
    import tensorflow as tf

    _, _, batch = reference
    sigs = _load(exports[kind]).signatures
    rows = int(batch[F.USER_TEXT].shape[0])
    plain = sigs["serving_default"](**_request(batch, 6, BETA))
    ids, scores = _ids(plain[F.OUT_ITEM_IDS]), plain[F.OUT_SCORES].numpy()
    # Row 0 excludes nothing (an all-"" row); the others their top item, padded to width 2.
    exclude = [["", ""]] + [[ids[i][0], ""] for i in range(1, rows)]
    got = sigs["serving_exclude"](**_exclude_request(batch, 5, BETA, exclude))
    got_ids, got_scores = _ids(got[F.OUT_ITEM_IDS]), got[F.OUT_SCORES].numpy()
    assert got_ids[0] == ids[0][:5]
    np.testing.assert_allclose(got_scores[0], scores[0][:5], atol=1e-5)
    for i in range(1, rows):
        assert ids[i][0] not in got_ids[i]
        assert got_ids[i] == ids[i][1:6], i  # the rest unchanged, in order
        np.testing.assert_allclose(got_scores[i], scores[i][1:6], atol=1e-5)
    np.testing.assert_array_equal(got[F.SEGMENT_ID].numpy(), plain[F.SEGMENT_ID].numpy())
    np.testing.assert_allclose(got[F.SEGMENT_PROBS].numpy(), plain[F.SEGMENT_PROBS].numpy(), atol=1e-6)
    # No exclusion column at all (E = 0): serving_default's answer.
    empty = sigs["serving_exclude"](**_exclude_request(batch, 6, BETA, tf.zeros([rows, 0], tf.string)))
    assert _ids(empty[F.OUT_ITEM_IDS]) == ids
    # The whole catalog excluded but one item: that item only, then padding.
    n = len(reference[0].model.item_ids)
    everything = [[i for i in reference[0].model.item_ids if i != ids[r][2]] for r in range(rows)]
    last = sigs["serving_exclude"](**_exclude_request(batch, 3, BETA, everything))
    for r, row in enumerate(_ids(last[F.OUT_ITEM_IDS])):
        assert row == [ids[r][2], "", ""], (r, n)
    # A wrong batch dimension is rejected naming the input.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"inputs\.exclude_item_ids"):
        sigs["serving_exclude"](**_exclude_request(batch, 5, BETA, exclude[:-1]))


@slow
def test_export_json_records_the_repeat_rule_and_the_recall_queries(exports, trained):
    """The repeat rule of the training data (tiny preprocess: "exclude"), the signatures, and the
    ScaNN recall measured on held-out queries disjoint from the ones its depth was tuned on."""
    from serving.export import exporter as ex
    from trainer.model import run_dir as rd

    for kind in ("brute_force", "scann"):
        vdir = exports[kind].version_dir
        info = layout.read_export_info(vdir)
        assert info["repeats"] == layout.repeat_rule(info) == "exclude"
        assert "serving_exclude" in info["signatures"] and layout.has_signature(vdir, info, "serving_exclude")
        assert layout.has_signature(vdir, {}, "serving_exclude")  # read from the graph without export.json
        card = open(vdir + "/model_card.md").read()
        assert "Repeat rule of the training data: exclude" in card and "`serving_exclude`" in card
    sc = exports["scann"]
    info = layout.read_export_info(sc.version_dir)
    assert info["scann_recall_queries"] == sc.recall_queries > 0
    assert info["scann_tuning_queries"] == sc.recall_tuning_queries > 0
    run = rd.load_run(str(trained))
    distinct = len(ex.split_queries(ex.heldout_queries(run, 1000, BETA))[0]) + len(
        ex.split_queries(ex.heldout_queries(run, 1000, BETA))[1])
    assert sc.recall_queries + sc.recall_tuning_queries == distinct
    card = open(sc.version_dir + "/model_card.md").read()
    assert (f"on {sc.recall_queries} held-out (validation split) queries not used for tuning (the search depth "
            f"was tuned on {sc.recall_tuning_queries} other held-out queries)") in card
    assert layout.repeat_rule({}) is None
    with pytest.raises(ValueError, match="repeat rule"):
        layout.repeat_rule({"repeats": "sometimes"})


def test_scann_recall_is_measured_on_queries_disjoint_from_the_tuning_ones(monkeypatch):
    """Spies on index.tune_leaves and index.recall_at_k: the recall the export reports comes from
    queries none of which the search depth was tuned on; together they are every distinct query."""
    from serving.export import exporter as ex
    from serving.export import index as ix

    rng = np.random.default_rng(0)
    items = rng.normal(size=(1100, 8)).astype(np.float32)
    queries = rng.normal(size=(41, 8)).astype(np.float32)
    queries = np.concatenate([queries, queries[:3]])  # duplicates count once
    index = ix.build_index("scann", items)
    assert index.params.partitioned
    tuned, measured, inside = [], [], []
    tune, recall = ix.tune_leaves, ix.recall_at_k

    def spy_tune(index_, q, *a, **kw):
        tuned.append(np.array(q))
        inside.append(True)
        try:
            return tune(index_, q, *a, **kw)
        finally:
            inside.pop()

    def spy_recall(index_, q, *a, **kw):
        if not inside:
            measured.append(np.array(q))
        return recall(index_, q, *a, **kw)

    monkeypatch.setattr(ix, "tune_leaves", spy_tune)
    monkeypatch.setattr(ix, "recall_at_k", spy_recall)
    got, n_tune, n_measure = ex.scann_recall(index, queries, items, min_recall=0.9, seed=3)
    assert len(tuned) == 1 and len(measured) == 1
    tune_rows = {r.tobytes() for r in tuned[0]}
    measure_rows = {r.tobytes() for r in measured[0]}
    assert not tune_rows & measure_rows
    assert tune_rows | measure_rows == {r.tobytes() for r in queries}
    assert (n_tune, n_measure) == (len(tune_rows), len(measure_rows)) == (21, 20)
    assert got == recall(index, measured[0], items, k=10)
    # Deterministic for a seed; another seed splits differently.
    again = ex.split_queries(queries, 3)
    np.testing.assert_array_equal(again[0], tuned[0])
    assert not np.array_equal(ex.split_queries(queries, 4)[0], tuned[0])
    # One distinct query: nothing to tune on, the recall is measured on it.
    one_tune, one_measure = ex.split_queries(queries[:1].repeat(3, axis=0))
    assert len(one_tune) == 0 and len(one_measure) == 1


@slow
def test_warmup_file_holds_prediction_logs_the_model_answers(exports):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2


    path = exports["scann"].version_dir + "/" + contracts.WARMUP_FILE
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    assert logs
    sigs = _load(exports["scann"]).signatures
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == ["serving_default",
                                                                                    "serving_exclude"]
    for log in logs:
        req = log.predict_log.request
        name = req.model_spec.signature_name
        assert req.model_spec.name == "segrec"
        assert set(req.inputs) == {F.USER_TEXT, F.HISTORY_ITEM_IDS, F.K, F.BETA} | (
            {F.EXCLUDE_ITEM_IDS} if name == "serving_exclude" else set())
        inputs = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
        rows = len(inputs[F.USER_TEXT])
        assert inputs[F.K].shape == (rows,) and inputs[F.BETA].shape == (rows,)
        fn = sigs[name]
        out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        assert out[F.OUT_ITEM_IDS].shape == (rows, inputs[F.K].max())


@slow
def test_recall_below_min_recall_fails_and_publishes_nothing(trained, tmp_path, capsys):
    code = cli.main(["export", "--run-dir", str(trained), "--base-path", str(tmp_path), "--min-recall", "1.01"])
    assert code == 2
    assert "below --min-recall" in capsys.readouterr().err
    assert not (tmp_path / "segrec" / "1").exists()


@slow
def test_existing_version_is_not_overwritten(exports, trained, capsys):
    code = cli.main(["export", "--run-dir", str(trained), "--base-path", str(exports["base"]), "--version", "1",
                     "--index", "brute_force"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


@slow
def test_segments_override_replaces_centroids(trained, reference, tmp_path):
    from serving.export import exporter as ex

    run, _, batch = reference
    segments = json.loads((trained / "segments.json").read_text())
    k = segments["num_segments"]
    # Segment id j gets the old centroid of id perm[j] (a rotation, not an involution), so a
    # user whose old segment was s is now in segment argsort(perm)[s].
    perm = np.roll(np.arange(k), 1)
    by_id = {s["id"]: s for s in segments["segments"]}
    refreshed = dict(segments, segments=[dict(by_id[int(perm[j])], id=j) for j in range(k)])
    path = tmp_path / "refreshed.json"
    path.write_text(json.dumps(refreshed))
    summary = ex.export(ex.ExportConfig(run_dir=str(trained), base_path=str(tmp_path / "models"),
                                        index="brute_force", segments_path=str(path)))
    assert json.loads((tmp_path / "models" / "segrec" / "1" / "segments.json").read_text()) == refreshed
    assert "centroids from" in (tmp_path / "models" / "segrec" / "1" / "model_card.md").read_text()
    users = {F.USER_TEXT: batch[F.USER_TEXT], F.HISTORY_ITEM_IDS: batch[F.HISTORY_ITEM_IDS]}
    before = run.model(users, training=False)[F.SEGMENT_ID].numpy()
    sigs = _load(summary).signatures
    want = np.argsort(perm)[before]
    assert not np.array_equal(want, before)
    np.testing.assert_array_equal(sigs["user_embedding"](**users)[F.SEGMENT_ID].numpy(), want)
    np.testing.assert_array_equal(sigs["serving_default"](**_request(batch, 3, BETA))[F.SEGMENT_ID].numpy(), want)
    # A bare {"centroids": [K][d]} document works too.
    centroids = np.array([by_id[i]["centroid"] for i in range(k)])[perm]
    np.testing.assert_allclose(segments_doc.centroids({"centroids": centroids.tolist()}, "x.json"),
                               segments_doc.centroids(refreshed, "y.json"), atol=1e-6)


@slow
def test_segments_override_with_the_wrong_shape_fails_naming_the_file(trained, tmp_path, capsys):
    segments = json.loads((trained / "segments.json").read_text())
    cases = {
        "fewer.json": dict(segments, segments=segments["segments"][:2]),
        "wider.json": dict(segments, segments=[dict(s, centroid=s["centroid"] + [0.0]) for s in segments["segments"]]),
        "nocentroid.json": {"segments": [{"id": 0}]},
    }
    want = {"fewer.json": "the model needs (4, 16)", "wider.json": "d=17", "nocentroid.json": "not a segments.json"}
    for name, doc in cases.items():
        (tmp_path / name).write_text(json.dumps(doc))
        code = cli.main(["export", "--run-dir", str(trained), "--base-path", str(tmp_path / "m"),
                         "--index", "brute_force", "--segments-file", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and name in err and want[name] in err, err
    code = cli.main(["export", "--run-dir", str(trained), "--base-path", str(tmp_path / "m"),
                     "--segments-file", str(tmp_path / "missing.json")])
    assert code == 2 and "missing.json: no such file" in capsys.readouterr().err
    assert not (tmp_path / "m" / "segrec" / "1").exists()


def test_scann_recall_against_brute_force_on_a_synthetic_index():
    import tensorflow as tf

    from serving.export import index as ix

    rng = np.random.default_rng(0)
    items = rng.normal(size=(2000, 32)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = rng.normal(size=(1000, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = ix.build_index("scann", items)
    assert index.params.partitioned and index.params.num_leaves == 45  # round(sqrt(2000))
    # Unclustered vectors are the hard case for partitioning: tuning searches more leaves.
    assert ix.tune_leaves(index, queries, items, target=0.95) >= 0.95
    scores, idx = index.search(tf.constant(queries[:7]), tf.constant(12))
    assert scores.shape == (7, 12) and idx.shape == (7, 12)
    # Exact reordering: the scores are the true dot products of the items returned.
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(queries[:7] @ items.T, idx.numpy(), 1), atol=1e-4)
    assert ix.recall_at_k(ix.build_index("brute_force", items), queries, items, 10) == 1.0


@slow
def test_saved_model_cli_lists_the_signatures(exports):
    out = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all", "--dir",
         exports["brute_force"].version_dir],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("serving_default", "recommend_defaults", "serving_tf_example", "user_embedding", "serving_exclude"):
        assert f"signature_def['{name}']" in out.stdout


# --- quantised encoder, ops a server needs, token-id exports ------------------------------------
_RELOAD = """
import json, sys
import numpy as np
import tensorflow as tf
from serving.export import layout
args = json.loads(sys.argv[1])
fn = layout.load_exported(args["dir"]).signatures["user_embedding"]
out = fn(user_text=tf.constant(args["texts"]), history_item_ids=tf.constant(args["history"]))
print(json.dumps({"embedding": out["embedding"].numpy().tolist(), "info": layout.read_export_info(args["dir"])}))
"""


@pytest.fixture(scope="module")
def int8_export(trained, tmp_path_factory):
    from serving.export import exporter as ex

    base = tmp_path_factory.mktemp("int8")
    return ex.export(ex.ExportConfig(run_dir=str(trained), base_path=str(base), index="brute_force",
                                     encoder_precision="int8", target="tf-serving-stock"))


@slow
def test_int8_export_reloads_in_a_fresh_process_and_passes_the_overlap_check(int8_export, reference):
    """The saved int8 encoder answers in a new process as the in-memory quantised model does."""
    from serving.export import quantize

    run, _, batch = reference
    texts = [t.decode() for t in batch[F.USER_TEXT].numpy()]
    history = [[h.decode() for h in row] for row in batch[F.HISTORY_ITEM_IDS].numpy()]
    args = json.dumps({"dir": int8_export.version_dir, "texts": texts, "history": history})
    out = subprocess.run([sys.executable, "-c", _RELOAD, args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    quantised = quantize.model_with_precision(run.model, "int8")
    want = quantised({F.USER_TEXT: batch[F.USER_TEXT], F.HISTORY_ITEM_IDS: batch[F.HISTORY_ITEM_IDS]},
                     training=False)[F.EMBEDDING].numpy()
    np.testing.assert_allclose(np.array(got["embedding"]), want, atol=1e-5)
    info = got["info"]
    assert info["encoder_precision"] == "int8"
    quality = info["encoder_quality"]
    assert quality["overlap_at_10"] >= 0.95 and quality["queries"] > 0
    assert quality["encoder_bytes"] < 0.5 * quality["encoder_bytes_float32"]
    assert set(quality["recall"]) == set(quality["recall_float32"]) == {"recall_at_10", "recall_at_50"}
    card = (int8_export.version_dir and open(int8_export.version_dir + "/model_card.md").read())
    assert "Precision: int8" in card and "Top-10 overlap with float32" in card


@slow
def test_an_export_failing_the_overlap_check_is_not_published(trained, tmp_path, capsys, monkeypatch):
    """A quantisation that loses the ranking (stood in for by a re-seeded random encoder: the tiny
    model's real int8 copy keeps its top-10) is measured, rejected with exit 2, and not published."""
    from serving.export import quantize
    from trainer.model.text_encoder import TextEncoder

    def lossy(encoder, precision):
        return TextEncoder.from_config(dict(encoder.get_config(), seed=(encoder.seed or 0) + 1))

    monkeypatch.setattr(quantize, "encoder_with_precision", lossy)
    code = cli.main(["export", "--run-dir", str(trained), "--base-path", str(tmp_path), "--index", "brute_force",
                     "--encoder-precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and "below --min-overlap 0.95" in err and "nothing was published" in err, err
    assert not (tmp_path / "segrec").exists() or not list((tmp_path / "segrec").iterdir())


@slow
def test_non_core_ops_are_read_from_the_graph_into_card_and_export_json(exports, int8_export):
    from serving.export import graph_ops

    text_ops = ["CaseFoldUTF8", "FastWordpieceTokenizeWithOffsets", "RegexSplitWithOffsets"]
    want = {"brute_force": text_ops, "scann": text_ops + ["Scann>ScannSearchBatched", "Scann>TensorsToScann"]}
    for kind, ops in want.items():
        vdir = exports[kind].version_dir
        assert graph_ops.non_core_ops(vdir) == ops
        info = layout.read_export_info(vdir)
        assert info["non_core_ops"] == ops and info["target"] == "segrec-serve"
        card = open(vdir + "/model_card.md").read()
        assert all(f"`{op}`" in card for op in ops) and "Checked against --target segrec-serve: passed" in card
    # The int8 encoder adds no op outside core TensorFlow (it was checked for stock TF Serving).
    assert layout.read_export_info(int8_export.version_dir)["non_core_ops"] == text_ops


@slow
def test_a_target_lacking_an_op_fails_naming_it_and_publishes_nothing(trained, tmp_path, capsys):
    code = cli.main(["export", "--run-dir", str(trained), "--base-path", str(tmp_path), "--index", "scann",
                     "--target", "tf-serving-stock"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Scann>ScannSearchBatched (ScaNN)" in err and "Scann>TensorsToScann (ScaNN)" in err
    assert "--index brute_force" in err
    assert not list((tmp_path / "segrec").iterdir())  # neither the version nor its temp dir


_PLAIN_TF = """
import json, sys
import tensorflow as tf  # no tensorflow_text, no ScaNN: what a server without their ops has
args = json.loads(sys.argv[1])
fn = tf.saved_model.load(args["dir"]).signatures["serving_default"]
out = fn(input_ids=tf.constant(args["ids"], tf.int32), padding_mask=tf.constant(args["mask"], tf.int32),
         history_item_ids=tf.constant(args["history"]), k=tf.constant(args["k"], tf.int32),
         beta=tf.constant(args["beta"], tf.float32))
assert "tensorflow_text" not in sys.modules and "scann" not in sys.modules
print(json.dumps({"ids": [[x.decode() for x in r] for r in out["item_ids"].numpy()],
                  "scores": out["scores"].numpy().tolist()}))
"""


@slow
def test_token_id_export_needs_no_text_ops_and_answers_as_the_text_export(trained, exports, reference, tmp_path):
    from serving.export import exporter as ex
    from trainer.model.token_ids import TokenIds

    run, _, batch = reference
    summary = ex.export(ex.ExportConfig(run_dir=str(trained), base_path=str(tmp_path), index="brute_force",
                                        text_input="token_ids", target="tf-serving-stock"))
    vdir = summary.version_dir
    info = layout.read_export_info(vdir)
    assert info["non_core_ops"] == [] and info["text_input"] == "token_ids"
    assert set(info["signatures"]) == {"serving_default", "recommend_defaults", "user_embedding", "serving_exclude"}
    texts = [t.decode() for t in batch[F.USER_TEXT].numpy()]
    tokens = TokenIds.from_export(vdir)
    ids, mask = tokens(texts)
    # The client's ids are the encoder's own (fixed width S; the graph trims to the bucket).
    enc_ids, enc_mask = run.model.text_encoder.tokenize(batch[F.USER_TEXT])
    width = enc_ids.shape[1]
    assert ids.shape[1] == run.model.text_encoder.sequence_length and not mask[:, width:].any()
    np.testing.assert_array_equal(ids[:, :width], enc_ids.numpy())
    np.testing.assert_array_equal(mask[:, :width], enc_mask.numpy().astype(np.int32))
    rows = len(texts)
    args = json.dumps({"dir": vdir, "ids": ids.tolist(), "mask": mask.tolist(), "k": [5] * rows,
                       "beta": [BETA] * rows,
                       "history": [[h.decode() for h in r] for r in batch[F.HISTORY_ITEM_IDS].numpy()]})
    out = subprocess.run([sys.executable, "-c", _PLAIN_TF, args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = _load(exports["brute_force"]).signatures["serving_default"](**_request(batch, 5, BETA))
    assert got["ids"] == _ids(want[F.OUT_ITEM_IDS])
    np.testing.assert_allclose(np.array(got["scores"]), want[F.OUT_SCORES].numpy(), atol=1e-5)
