"""`segrec score` and beam_pipelines.inference (model_handler, retrying,
user_queries) over the tiny export: batched RunInference equals the
SavedModel's own serving_default per user; queries equal preprocess's; bad users go to the dead letter and totals balance; the
CLI writes JSONL and Parquet; multi-process DirectRunner gives the same; a
user the model rejects is dead-lettered and costs none of its batch mates."""

from __future__ import annotations

import csv
import functools
import glob
import importlib.util
import json
import os
import pathlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from test_server import build_tiny_export

from beam_pipelines import score, score_records
from beam_pipelines import transforms as T
from beam_pipelines.inference import model_handler, retrying, user_queries
from beam_pipelines.inference.user_queries import UserQuery
from beam_pipelines.sources import readers, records
from serving.export import layout
from trainer import features as F
from trainer.cli import main as cli
from trainer.contracts import USER_EMBEDDING
from trainer.data import examples as ex

K, BETA = 5, 0.3


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_generated):
    return build_tiny_export(tmp_path_factory, tiny_generated)


@pytest.fixture(scope="module")
def base_path(export_dir):
    return str(pathlib.Path(export_dir).parents[1])


def _raw_sources(d) -> list:
    d = pathlib.Path(d)
    users = d / "users.csv"
    return readers.generic_sources(str(d / "interactions.csv"), str(d / "items.csv"),
                                   str(users) if users.exists() else None)


def _records(p, sources) -> dict:
    out = {}
    for kind in (records.INTERACTIONS, records.ITEMS, records.USERS):
        specs = [s for s in sources if s.kind == kind]
        if specs:
            out[kind] = (p | f"Read[{kind}]" >> T.ReadSource(specs))[0]
    return out


@functools.lru_cache(maxsize=1)
def _loaded(version_dir):
    from serving.export import exporter as export

    return export.load_exported(version_dir)


def _direct(version_dir, query: UserQuery, k=K, beta=BETA) -> dict:
    """The SavedModel's serving_default on this one user alone (a batch of 1)."""
    import tensorflow as tf

    fn = _loaded(version_dir).signatures["serving_default"]
    hist = list(query.history_item_ids) or [F.PAD_ITEM_ID]
    out = fn(user_text=tf.constant([query.user_text]), history_item_ids=tf.constant([hist]),
             k=tf.constant([k], tf.int32), beta=tf.constant([beta], tf.float32))
    return {name: v.numpy()[0] for name, v in out.items()}


# --- pure helpers -------------------------------------------------------------------------------


def test_batch_inputs_pad_history_and_shape_knobs_like_the_signature():
    import tensorflow as tf

    specs = {F.USER_TEXT: tf.TensorSpec([None], tf.string), F.HISTORY_ITEM_IDS: tf.TensorSpec([None, None], tf.string),
             F.USER_ID: tf.TensorSpec([None], tf.string), F.K: tf.TensorSpec([None], tf.int32),
             F.BETA: tf.TensorSpec([], tf.float32)}
    batch = [UserQuery("u1", "a", ("x", "y", "z")), UserQuery("u2", "b", ())]
    got = model_handler.batch_inputs(batch, specs, k=4, beta=0.5)
    # Padded to the longest history (3) with "".
    assert got[F.HISTORY_ITEM_IDS].tolist() == [["x", "y", "z"], ["", "", ""]]
    assert got[F.USER_ID].tolist() == ["u1", "u2"]
    assert got[F.K].tolist() == [4, 4] and got[F.K].dtype == np.int32  # [B] spec -> one per row
    assert got[F.BETA].shape == () and got[F.BETA].dtype == np.float32  # scalar spec -> scalar
    cold = model_handler.batch_inputs([UserQuery("u", "t")], {F.USER_TEXT: None, F.HISTORY_ITEM_IDS: None})
    assert cold[F.HISTORY_ITEM_IDS].shape == (1, 1)  # at least one column
    assert F.EXCLUDE_ITEM_IDS not in got  # only serving_exclude takes it
    excl = model_handler.batch_inputs(
        [UserQuery("u1", "a", ("x",), ("x", "p", "q")), UserQuery("u2", "b", (), ())],
        {**specs, F.EXCLUDE_ITEM_IDS: tf.TensorSpec([None, None], tf.string)}, k=4, beta=0.5)
    assert excl[F.EXCLUDE_ITEM_IDS].tolist() == [["x", "p", "q"], ["", "", ""]]
    with pytest.raises(ValueError, match="'k'"):
        model_handler.batch_inputs(batch, specs, k=None, beta=0.5)


def test_resolve_version_dir(export_dir, base_path, tmp_path):
    assert layout.resolve_version_dir(export_dir) == export_dir
    assert layout.resolve_version_dir(base_path) == export_dir
    assert layout.resolve_version_dir(os.path.join(base_path, "segrec")) == export_dir
    with pytest.raises(layout.NoExportError, match="segrec export"):
        layout.resolve_version_dir(str(tmp_path))
    defaults = layout.read_export_info(export_dir)
    assert defaults["k"] >= 1 and defaults["k_max"] >= defaults["k"] and np.isfinite(defaults["beta"])


def test_bigquery_rows_match_the_schema():
    record = {"user_id": "u1", "segment_id": np.int32(2), "segment_label": "outdoor", "items": np.array(["a", "b"]),
              "scores": [np.float32(0.5), 0.25], "model_version": 3}
    row = score_records.bigquery_row(record)
    fields = score_records.bigquery_schema()["fields"]
    assert list(row) == [f["name"] for f in fields]
    assert row == {"user_id": "u1", "segment_id": 2, "segment_label": "outdoor", "items": ["a", "b"],
                   "scores": [0.5, 0.25], "model_version": 3}
    assert json.loads(json.dumps(row)) == row  # JSON types only
    modes = {f["name"]: f["mode"] for f in fields}
    assert modes["items"] == modes["scores"] == "REPEATED" and modes["segment_label"] == "NULLABLE"
    assert score_records.bigquery_row({**record, "segment_label": None})["segment_label"] is None


@pytest.mark.skipif(importlib.util.find_spec("apitools") is not None, reason="apache-beam[gcp] is installed")
def test_bigquery_without_gcp_extras_is_a_clear_error(tiny_generated, base_path, tmp_path, capsys):
    code = cli.main(["score", "--input-dir", str(tiny_generated), "--model-dir", base_path, "--output-dir",
                     str(tmp_path / "o"), "--bigquery-table", "proj:ds.recs"])
    assert code == 2
    assert "segrec[gcp]" in capsys.readouterr().err
    assert cli.main(["score", "--input-dir", str(tiny_generated), "--model-dir", base_path, "--output-dir",
                     str(tmp_path / "o"), "--bigquery-table", "not a table"]) == 2


# --- queries ------------------------------------------------------------------------------------


def test_queries_equal_preprocess_eval_queries(tiny_generated, base_path, tmp_path):
    """Preprocess (leave-last-1) built each user's eval query from every event but the last;
    BuildUserQueries over the same input minus each user's last event builds the same query
    (both come from examples.query_features)."""
    from trainer.data import arrays as da

    rows = list(csv.DictReader(open(tiny_generated / "interactions.csv", encoding="utf-8")))
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r)
    kept, ties = [], set()
    for user, events in by_user.items():
        events.sort(key=lambda r: (int(r["timestamp"]), r["item_id"]))
        kept += events[:-1]
        if len(events) > 1 and events[-2]["timestamp"] == events[-1]["timestamp"]:
            ties.add(user)  # preprocess excludes a same-second event from the eval query; "now" includes it
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_csv(raw / "interactions.csv", list(rows[0]), [list(r.values()) for r in kept])
    for name in ("items.csv", "users.csv"):
        (raw / name).write_bytes((tiny_generated / name).read_bytes())

    split = da.load_split(str(pathlib.Path(base_path).parent / "ds"), "eval")  # build_tiny_export's dataset
    expected = {str(u): (str(t), tuple(h)) for u, t, h in zip(split.user_ids, split.user_texts, split.histories)
                if str(u) not in ties}
    assert len(expected) >= 40

    with TestPipeline() as p:
        built = _records(p, _raw_sources(raw)) | user_queries.BuildUserQueries()
        got = (built.queries
               | beam.Filter(lambda q, keep: q.user_id in keep, keep=set(expected))
               | beam.Map(lambda q: (q.user_id, (q.user_text, q.history_item_ids))))
        assert_that(got, equal_to(list(expected.items())))


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def bad_users(tmp_path_factory, tiny_generated):
    """Real catalog + five users: ok, only unknown items, profile only, only old events, a bad row.

    With as_of=1000 and a 100 s window ([900, 1000)):
      u_ok       events at 950, 960 (known items)  -> scored, history [i2, i1]
      u_unknown  events at 950 on items not in the catalog -> unusable_events
      u_profile  a profile, no interaction          -> no_events (or cold with cold_users)
      u_old      events at 100 and 1005 only        -> no_events_in_window
      u_badrow   one good event at 970, one row with a bad timestamp -> scored; the row dead-lettered
    """
    d = tmp_path_factory.mktemp("bad_users")
    items = list(csv.DictReader(open(tiny_generated / "items.csv", encoding="utf-8")))
    with open(d / "items.csv", "w", encoding="utf-8") as f:
        f.write(open(tiny_generated / "items.csv", encoding="utf-8").read())
    i1, i2, i3 = (items[n]["item_id"] for n in range(3))
    _write_csv(d / "interactions.csv", ["user_id", "item_id", "timestamp"], [
        ["u_ok", i1, 950], ["u_ok", i2, 960],
        ["u_unknown", "nope1", 950], ["u_unknown", "nope2", 951],
        ["u_old", i1, 100], ["u_old", i3, 1005],
        ["u_badrow", i3, 970], ["u_badrow", i1, "yesterday"],
    ])
    _write_csv(d / "users.csv", ["user_id", "age"], [["u_ok", "30"], ["u_profile", "41"]])
    return d, (i1, i2, i3)


def test_bad_users_go_to_the_dead_letter_and_totals_balance(bad_users):
    d, (i1, i2, i3) = bad_users
    with TestPipeline() as p:
        built = _records(p, _raw_sources(d)) | user_queries.BuildUserQueries(as_of=1000, window_seconds=100)
        assert_that(built.queries | "Ids" >> beam.Map(lambda q: (q.user_id, q.history_item_ids)),
                    equal_to([("u_ok", (i2, i1)), ("u_badrow", (i3,))]), label="Queries")
        users_dead = (built[T.DEAD]
                      | beam.Filter(lambda d_: d_.source == user_queries.QUERY_SOURCE)
                      | beam.Map(lambda d_: (d_.location, d_.reason)))
        assert_that(users_dead, equal_to([("user u_unknown", user_queries.UNUSABLE_EVENTS),
                                          ("user u_profile", user_queries.NO_EVENTS),
                                          ("user u_old", user_queries.NO_EVENTS_IN_WINDOW)]), label="UserDead")
        rows_dead = (built[T.DEAD] | "Rows" >> beam.Filter(lambda d_: d_.source != user_queries.QUERY_SOURCE)
                     | "RowReasons" >> beam.Map(lambda d_: (d_.source, d_.reason)))
        # The read step dead-letters the bad timestamp (not counted here); the join the unknown items.
        assert_that(rows_dead, equal_to([("interactions", "unknown_item")] * 2), label="RowDead")
        counts = built[T.COUNTS] | beam.CombinePerKey(sum) | beam.Filter(lambda kv: kv[0].startswith("users."))
        assert_that(counts, equal_to([("users.in", 5), ("users.queries", 2)]), label="Counts")


def test_cold_users_are_scored_from_their_profile(bad_users):
    d, _ = bad_users
    with TestPipeline() as p:
        built = _records(p, _raw_sources(d)) | user_queries.BuildUserQueries(as_of=1000, window_seconds=100,
                                                                             cold_users=True)
        cold = built.queries | beam.Filter(lambda q: q.user_id == "u_profile")
        assert_that(cold, equal_to([UserQuery("u_profile", ex.user_text({"age": "41"}, []), ())]))


# --- RunInference against the SavedModel ------------------------------------------------------


def test_batched_results_equal_per_user_serving_default(tiny_generated, export_dir):
    def check(results):
        assert len(results) == 50
        for query, out in results:
            want = _direct(export_dir, query)
            assert list(out[F.OUT_ITEM_IDS]) == [x.decode() for x in want[F.OUT_ITEM_IDS]], query.user_id
            np.testing.assert_allclose(out[F.OUT_SCORES], want[F.OUT_SCORES], rtol=1e-5, atol=1e-6)
            assert int(out[F.SEGMENT_ID]) == int(want[F.SEGMENT_ID])
            np.testing.assert_allclose(out[F.SEGMENT_PROBS], want[F.SEGMENT_PROBS], rtol=1e-5, atol=1e-6)
        # Histories of different lengths shared batches: padding changed nothing.
        assert len({len(q.history_item_ids) for q, _ in results}) > 1

    with TestPipeline() as p:
        built = _records(p, _raw_sources(tiny_generated)) | user_queries.BuildUserQueries()
        run = built.queries | model_handler.RunSegRec(export_dir, k=K, beta=BETA, min_batch_size=8, max_batch_size=16)
        assert_that(run.results | beam.combiners.ToList(), lambda got: check(got[0]))
        assert_that(run[T.DEAD], equal_to([]), label="NoDead")


def test_user_embedding_signature(export_dir):
    queries = [UserQuery("a", "user: unknown.", ()), UserQuery("b", "user: age 30.", ("x", "y"))]

    def check(results):
        assert sorted(q.user_id for q, _ in results) == ["a", "b"]
        for _, out in results:
            assert set(out) == {F.EMBEDDING, F.SEGMENT_ID, F.SEGMENT_PROBS}
            assert out[F.EMBEDDING].shape == (16,) and out[F.SEGMENT_PROBS].shape == (4,)
            assert abs(float(np.linalg.norm(out[F.EMBEDDING])) - 1.0) < 1e-4  # L2-normalised u

    with TestPipeline() as p:
        results = (p | beam.Create(queries) | model_handler.RunSegRec(export_dir, signature=USER_EMBEDDING)).results
        assert_that(results | beam.combiners.ToList(), lambda got: check(got[0]))


# --- the CLI end to end -------------------------------------------------------------------------


def _read_jsonl(out) -> dict:
    rows = {}
    for path in glob.glob(str(out / "recommendations-*.jsonl")):
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            rows[r["user_id"]] = r
    return rows


def test_cli_writes_jsonl_and_parquet_and_refuses_to_overwrite(tiny_generated, base_path, export_dir, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "scores"
    args = ["score", "--input-dir", str(tiny_generated), "--model-dir", base_path, "--output-dir", str(out),
            "--k", str(K), "--beta", str(BETA), "--format", "jsonl,parquet", "--max-batch-size", "16"]
    assert cli.main(args) == 0
    rows = _read_jsonl(out)
    assert len(rows) == 50
    table = pq.read_table(sorted(glob.glob(str(out / "recommendations-*.parquet")))).to_pylist()
    assert {r["user_id"]: r for r in table}.keys() == rows.keys()
    segments = json.load(open(os.path.join(export_dir, "segments.json")))
    labels = {s["id"]: s["label"] for s in segments["segments"]}
    for r in table:
        j = rows[r["user_id"]]
        assert r["items"] == j["items"] and len(j["items"]) == K and r["model_version"] == j["model_version"] == 1
        np.testing.assert_allclose(r["scores"], j["scores"], rtol=1e-6)
        assert j["segment_label"] == labels[j["segment_id"]]
        assert j["scores"] == sorted(j["scores"], reverse=True)
    stats = json.load(open(out / "stats.json"))
    assert stats["balanced"] and stats["users"] == {"in": 50, "queries": 50, "scored": 50, "cold": 0,
                                                    "dead_lettered": 0, "inference_failed": 0, "balanced": True}
    assert stats["inference"] == {"failed_batches": 0, "retried_one_by_one": 0}
    assert stats["records_written"] == 50 and stats["model"]["k"] == K
    assert stats["beam_counters"].get("segrec.score/users_scored") == 50
    assert cli.main(args) == 2  # refuses to overwrite
    assert cli.main(args + ["--overwrite"]) == 0


def test_cli_dead_letters_bad_users(bad_users, base_path, tmp_path):
    d, _ = bad_users
    out = tmp_path / "scores"
    assert cli.main(["score", "--input-dir", str(d), "--model-dir", base_path, "--output-dir", str(out),
                     "--as-of", "1000", "--window-days", str(100 / 86400)]) == 0
    stats = json.load(open(out / "stats.json"))
    assert stats["users"]["in"] == 5 and stats["users"]["scored"] == 2 and stats["users"]["dead_lettered"] == 3
    assert stats["dead_letter"]["user_query"] == {"no_events": 1, "no_events_in_window": 1, "unusable_events": 1}
    assert stats["dead_letter"]["interactions"] == {"bad_timestamp": 1, "unknown_item": 2}
    assert stats["rows"]["interactions"] == {"read": 8, "accepted": 5, "dead_lettered": 3, "filtered": 0,
                                             "balanced": True}
    letters = [json.loads(line) for path in glob.glob(str(out / "dead_letter" / "*.jsonl")) for line in open(path)]
    by_user = {d_["location"]: d_ for d_ in letters if d_["source"] == "user_query"}
    assert json.loads(by_user["user u_old"]["raw"])["last_timestamp"] == 1005
    assert set(_read_jsonl(out)) == {"u_ok", "u_badrow"}


def test_cli_scores_a_dataset_dir_from_its_newest_queries(export_dir, base_path, tmp_path):
    from trainer.data import arrays as da

    ds = pathlib.Path(base_path).parent / "ds"  # what build_tiny_export preprocessed
    out = tmp_path / "scores"
    assert cli.main(["score", "--dataset-dir", str(ds), "--model-dir", export_dir, "--output-dir", str(out),
                     "--k", str(K), "--beta", str(BETA)]) == 0
    rows = _read_jsonl(out)
    split = da.load_split(str(ds), "eval")
    assert len(split) and set(str(u) for u in split.user_ids) <= set(rows)
    user, text, hist = str(split.user_ids[0]), str(split.user_texts[0]), tuple(str(h) for h in split.histories[0])
    want = _direct(export_dir, UserQuery(user, text, hist))
    assert rows[user]["items"] == [x.decode() for x in want[F.OUT_ITEM_IDS]]
    assert rows[user]["segment_id"] == int(want[F.SEGMENT_ID])


@pytest.mark.slow
def test_multi_process_direct_runner_gives_the_same_output(tiny_generated, base_path, tmp_path):
    outs = {}
    for name, extra in (("single", []), ("multi", ["--direct_num_workers", "2", "--direct_running_mode",
                                                   "multi_processing"])):
        out = tmp_path / name
        assert cli.main(["score", "--input-dir", str(tiny_generated), "--model-dir", base_path, "--output-dir",
                         str(out), "--k", str(K), "--beta", str(BETA)] + extra) == 0
        outs[name] = _read_jsonl(out)
        assert json.load(open(out / "stats.json"))["balanced"]
    assert outs["single"].keys() == outs["multi"].keys() and len(outs["single"]) == 50
    for user, r in outs["single"].items():
        m = outs["multi"][user]
        assert (r["items"], r["segment_id"]) == (m["items"], m["segment_id"]), user
        np.testing.assert_allclose(r["scores"], m["scores"], rtol=1e-5)


def test_query_policy_follows_the_training_data(tmp_path, export_dir):
    ds, version = tmp_path / "ds", tmp_path / "segrec" / "7"
    ds.mkdir()
    version.mkdir(parents=True)
    (ds / "metadata.json").write_text(json.dumps({"split": {"max_history": 3, "text_history": 1}}))
    (version / "export.json").write_text(json.dumps({"dataset_dir": str(ds)}))  # what `segrec export` writes
    assert score.training_policy(str(version)) == ex.ExamplePolicy(max_history=3, text_history=1)
    (ds / "metadata.json").unlink()
    assert score.training_policy(str(version)) == ex.ExamplePolicy()  # unreadable -> the defaults
    # The tiny export names its real dataset dir, preprocessed with the defaults.
    assert score.training_policy(export_dir) == ex.ExamplePolicy()


# --- the consumed set (serving_exclude) -----------------------------------------------------------


def _consumed(d) -> dict:
    """user -> every item of their accepted (catalog) interactions in a raw input dir."""
    items = {r["item_id"] for r in csv.DictReader(open(d / "items.csv", encoding="utf-8"))}
    out = {}
    for r in csv.DictReader(open(d / "interactions.csv", encoding="utf-8")):
        if r["item_id"] in items:
            out.setdefault(r["user_id"], set()).add(r["item_id"])
    return out


def _without_exclude(export_dir, tmp_path) -> str:
    """A copy of the export whose export.json predates serving_exclude (and the repeat rule)."""
    import shutil

    version = tmp_path / "old" / "segrec" / "1"
    shutil.copytree(export_dir, version)
    info = json.loads((version / "export.json").read_text())
    info["signatures"] = [name for name in info["signatures"] if name != "serving_exclude"]
    info.pop("repeats", None)
    (version / "export.json").write_text(json.dumps(info))
    return str(version)


def test_scoring_excludes_the_whole_consumed_set_beyond_max_history(tiny_generated, export_dir, tmp_path, caplog):
    """Queries built with max_history 2 (users have ~12 events): serving_default (an export without
    serving_exclude) leaks items the users already consumed; the export's serving_exclude never does,
    and otherwise keeps serving_default's ranking."""
    consumed = _consumed(tiny_generated)
    args = ["--input-dir", str(tiny_generated), "--k", str(K), "--beta", str(BETA), "--max-history", "2"]
    out = tmp_path / "new"
    assert cli.main(["score", "--model-dir", export_dir, "--output-dir", str(out)] + args) == 0
    stats = json.load(open(out / "stats.json"))
    assert stats["model"]["signature"] == "serving_exclude" and stats["model"]["exclude_consumed"]
    assert stats["model"]["repeats"] == "exclude" and stats["balanced"]
    rows = _read_jsonl(out)
    assert len(rows) == 50
    for user, r in rows.items():
        assert len(r["items"]) == K and not set(r["items"]) & consumed[user], user

    old = tmp_path / "old_out"
    with caplog.at_level("WARNING", logger="segrec.score"):
        assert cli.main(["score", "--model-dir", _without_exclude(export_dir, tmp_path),
                         "--output-dir", str(old)] + args) == 0
    assert "no serving_exclude signature" in caplog.text
    assert json.load(open(old / "stats.json"))["model"]["signature"] == "serving_default"
    old_rows = _read_jsonl(old)
    leaked = {u for u, r in old_rows.items() if set(r["items"]) & consumed[u]}
    assert len(leaked) >= 5, "the toy must leak consumed items through serving_default for the test to mean much"
    for user, r in rows.items():  # the same ranking with the consumed items taken out
        kept = [i for i in old_rows[user]["items"] if i not in consumed[user]]
        assert r["items"][: len(kept)] == kept, user


def test_dataset_dir_queries_carry_the_events_their_split_may_see(export_dir, base_path):
    """QueriesFromDataset(consumed=True): each newest (eval) query excludes every train/valid event of
    its user before it, plus its history; without consumed=True nothing changes."""
    import tensorflow as tf

    from trainer.data import arrays as da

    ds = str(pathlib.Path(base_path).parent / "ds")
    split = da.load_split(ds, "eval")
    eval_ts = {}
    for u, t in zip(split.user_ids, split.timestamps):
        eval_ts[str(u)] = max(eval_ts.get(str(u), 0), int(t))
    expected = {}
    for raw in tf.data.TFRecordDataset(glob.glob(os.path.join(ds, F.EVENTS_PATTERN)), compression_type="GZIP"):
        feats = tf.train.Example.FromString(raw.numpy()).features.feature
        user = feats[F.USER_ID].bytes_list.value[0].decode()
        if user not in eval_ts:
            continue
        items = [v.decode() for v in feats[F.EVENT_ITEM_IDS].bytes_list.value]
        stamps = list(feats[F.EVENT_TIMESTAMPS].int64_list.value)
        expected[user] = {i for i, t in zip(items, stamps) if t < eval_ts[user]}
    assert len(expected) >= 40

    def check(queries):
        by_user = {q.user_id: q for q in queries}
        for user, want in expected.items():
            q = by_user[user]
            assert set(q.exclude_item_ids) == want | set(q.history_item_ids), user
            assert len(q.exclude_item_ids) == len(set(q.exclude_item_ids))

    with TestPipeline() as p:
        with_consumed = p | "Consumed" >> user_queries.QueriesFromDataset(ds, consumed=True)
        plain = p | "Plain" >> user_queries.QueriesFromDataset(ds)
        assert_that(with_consumed["queries"] | "All" >> beam.combiners.ToList(), lambda got: check(got[0]),
                    label="Consumed")
        assert_that(plain["queries"] | "NoExclusions" >> beam.Filter(lambda q: q.exclude_item_ids), equal_to([]),
                    label="Plain")


def test_the_signature_follows_the_repeat_rule_and_the_export(export_dir, tmp_path, caplog):
    from trainer.contracts import SERVING_DEFAULT, SERVING_EXCLUDE

    info = layout.read_export_info(export_dir)
    assert score.scoring_signature(export_dir, info) == (SERVING_EXCLUDE, "exclude")
    # "allow": re-consumption is legitimate, nothing beyond the history is removed.
    assert score.scoring_signature(export_dir, dict(info, repeats="allow")) == (SERVING_DEFAULT, "allow")
    # An export.json without the rule: the training data's metadata.json says it.
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "metadata.json").write_text(json.dumps({"repeats": "allow"}))
    older = {k: v for k, v in info.items() if k != "repeats"}
    assert score.scoring_signature(export_dir, dict(older, dataset_dir=str(ds))) == (SERVING_DEFAULT, "allow")
    (ds / "metadata.json").unlink()
    assert score.scoring_signature(export_dir, dict(older, dataset_dir=str(ds))) == (SERVING_EXCLUDE, "exclude")
    # An export without serving_exclude keeps today's behaviour, with a warning.
    with caplog.at_level("WARNING", logger="segrec.score"):
        got = score.scoring_signature(export_dir, dict(info, signatures=[SERVING_DEFAULT]))
    assert got == (SERVING_DEFAULT, "exclude") and "no serving_exclude signature" in caplog.text
    # The ModelInfo the pipeline is built from.
    model = score.resolve_model(score.ScoreConfig(model_dir=export_dir, output_dir=str(tmp_path / "o"),
                                                  dataset_dir=str(ds)))
    assert model.signature == SERVING_EXCLUDE and model.exclude_consumed


# --- users the model rejects --------------------------------------------------------------------


def reject_users(monkeypatch, rejected) -> None:
    """Makes the export reject any batch holding a user for whom rejected(user_id) is true, with the
    InvalidArgumentError an in-graph assert raises (the batch fails whole, as in TensorFlow)."""
    import tensorflow as tf

    call = model_handler.SignatureCall.__call__

    def rejecting(self, model, batch, inference_args, model_id=None):
        bad = [q.user_id for q in batch if rejected(q.user_id)]
        if bad:
            raise tf.errors.InvalidArgumentError(
                None, None, f"Graph execution error:\n\nDetected at node Assert\nassertion failed: [user {bad[0]}]")
        return call(self, model, batch, inference_args, model_id)

    monkeypatch.setattr(model_handler.SignatureCall, "__call__", rejecting)


def _eval_queries(base_path) -> list:
    """build_tiny_export's eval queries (50 users), as UserQuery."""
    from trainer.data import arrays as da

    split = da.load_split(str(pathlib.Path(base_path).parent / "ds"), "eval")
    return [UserQuery(str(u), str(t), tuple(str(h) for h in hist))
            for u, t, hist in zip(split.user_ids, split.user_texts, split.histories)]


def test_describe_error_is_one_bounded_utf8_line():
    err = ValueError("Graph execution error:\n\n  assertion failed: [x]\n\t" + "\ud800" + "y" * 5000)
    text = retrying.describe_error(err)
    assert text.startswith("ValueError: Graph execution error: assertion failed: [x] \\ud800y")
    assert "\n" not in text and len(text) == retrying.MAX_ERROR_CHARS and text.endswith("...")
    text.encode("utf-8")  # writable to a dead-letter file


def test_a_query_the_model_rejects_is_dead_lettered_and_its_batch_mates_scored(export_dir, base_path):
    """A lone surrogate cannot become a tf.string: the whole batch fails. Its other users are
    retried one by one and scored exactly as the model scores them alone; the bad one is
    dead-lettered with the error."""
    good = _eval_queries(base_path)
    bad = UserQuery("u_bad", good[0].user_text + " \ud800", good[0].history_item_ids)
    queries = good[:20] + [bad] + good[20:]

    def check_results(results):
        assert sorted(q.user_id for q, _ in results) == sorted(q.user_id for q in good)
        for query, out in results:
            want = _direct(export_dir, query)
            assert list(out[F.OUT_ITEM_IDS]) == [x.decode() for x in want[F.OUT_ITEM_IDS]], query.user_id
            np.testing.assert_allclose(out[F.OUT_SCORES], want[F.OUT_SCORES], rtol=1e-5, atol=1e-6)
            assert int(out[F.SEGMENT_ID]) == int(want[F.SEGMENT_ID])

    def check_dead(letters):
        assert [(d.source, d.location, d.reason) for d in letters] == [
            (retrying.MODEL_SOURCE, "user u_bad", retrying.INFERENCE_ERROR)]
        assert "UTF-8" in letters[0].detail and letters[0].detail.startswith("the model rejected")
        assert json.loads(letters[0].raw)["user_text"] == bad.user_text
        letters[0].to_json().encode("utf-8")

    def check_counts(counts):
        counts = dict(counts)
        assert counts[f"dead.{retrying.MODEL_SOURCE}.{retrying.INFERENCE_ERROR}"] == 1
        assert counts["inference.failed_batches"] >= 1
        assert counts["inference.retried_elements"] >= 2  # the bad user had batch mates, retried alone

    with TestPipeline() as p:
        run = p | beam.Create(queries) | model_handler.RunSegRec(export_dir, k=K, beta=BETA, min_batch_size=10,
                                                       max_batch_size=10)
        assert_that(run.results | beam.combiners.ToList(), lambda got: check_results(got[0]), label="Results")
        assert_that(run[T.DEAD] | "DeadList" >> beam.combiners.ToList(), lambda got: check_dead(got[0]),
                    label="Dead")
        assert_that(run[T.COUNTS] | beam.CombinePerKey(sum) | "CountList" >> beam.combiners.ToList(),
                    lambda got: check_counts(got[0]), label="Counts")


def test_keyed_handler_keeps_keys_through_the_retry(export_dir):
    """RunInferenceRetrying with a KeyedModelHandler (as segment refresh uses it)."""
    from apache_beam.ml.inference.base import KeyedModelHandler

    queries = [("a", UserQuery(f"u{i}", f"user: age {20 + i}.", ())) for i in range(4)]
    queries.insert(2, ("b", UserQuery("u_bad", "user: \ud800", ())))
    handler = KeyedModelHandler(model_handler.SegRecModelHandler(export_dir, USER_EMBEDDING, min_batch_size=5,
                                                       max_batch_size=5))

    def check_failed(failed):
        assert len(failed) == 1
        (key, query), error = failed[0]
        assert (key, query.user_id) == ("b", "u_bad") and "UTF-8" in error

    with TestPipeline() as p:
        run = p | beam.Create(queries) | retrying.RunInferenceRetrying(handler)
        assert_that(run["results"] | beam.Map(lambda kv: (kv[0], kv[1].example.user_id)),
                    equal_to([("a", f"u{i}") for i in range(4)]), label="Results")
        assert_that(run[retrying.FAILED] | beam.combiners.ToList(), lambda got: check_failed(got[0]), label="Failed")


def test_cli_dead_letters_users_the_model_rejects(tiny_generated, base_path, export_dir, tmp_path, monkeypatch):
    users = sorted({r["user_id"] for r in csv.DictReader(open(tiny_generated / "interactions.csv", encoding="utf-8"))})
    bad = users[7]
    reject_users(monkeypatch, lambda user_id: user_id == bad)
    out = tmp_path / "scores"
    assert cli.main(["score", "--input-dir", str(tiny_generated), "--model-dir", base_path, "--output-dir", str(out),
                     "--k", str(K), "--beta", str(BETA), "--min-batch-size", "16", "--max-batch-size", "16"]) == 0
    stats = json.load(open(out / "stats.json"))
    assert stats["balanced"]
    assert stats["users"] == {"in": 50, "queries": 50, "scored": 49, "cold": 0, "dead_lettered": 1,
                              "inference_failed": 1, "balanced": True}
    assert stats["dead_letter"] == {"model": {"inference_error": 1}} and stats["records_written"] == 49
    assert stats["inference"]["failed_batches"] >= 1 and stats["inference"]["retried_one_by_one"] >= 2
    letters = [json.loads(line) for path in glob.glob(str(out / "dead_letter" / "*.jsonl")) for line in open(path)]
    assert len(letters) == 1
    letter = letters[0]
    assert (letter["source"], letter["location"], letter["reason"]) == ("model", f"user {bad}", "inference_error")
    assert f"InvalidArgumentError: Graph execution error: Detected at node Assert assertion failed: [user {bad}]" \
        in letter["detail"]
    assert json.loads(letter["raw"])["user_id"] == bad
    # Everyone else is scored as the model scores them.
    rows = _read_jsonl(out)
    assert set(rows) == set(users) - {bad}
    with TestPipeline() as p:  # the same queries the score run built
        queries = _records(p, _raw_sources(tiny_generated)) | user_queries.BuildUserQueries()
        assert_that(queries.queries | beam.combiners.ToList(), lambda got: _check_rows(got[0], rows, export_dir))


def _check_rows(queries, rows, export_dir):
    for query in queries:
        if query.user_id not in rows:
            continue
        want = _direct(export_dir, query)
        assert rows[query.user_id]["items"] == [x.decode() for x in want[F.OUT_ITEM_IDS]], query.user_id
        assert rows[query.user_id]["segment_id"] == int(want[F.SEGMENT_ID])


def test_cli_fails_when_the_model_rejects_every_user(tiny_generated, base_path, tmp_path, monkeypatch, capsys):
    reject_users(monkeypatch, lambda user_id: True)
    out = tmp_path / "scores"
    assert cli.main(["score", "--input-dir", str(tiny_generated), "--model-dir", base_path, "--output-dir", str(out),
                     "--k", str(K), "--beta", str(BETA)]) == 2
    assert "the model rejected all 50 user queries" in capsys.readouterr().err
    stats = json.load(open(out / "stats.json"))  # the figures are left behind
    assert stats["users"]["scored"] == 0 and stats["users"]["inference_failed"] == 50 and stats["balanced"]
