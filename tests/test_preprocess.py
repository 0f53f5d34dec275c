"""`segrec preprocess` end to end: real MovieLens 100K, generated data, bad input."""

from __future__ import annotations

import collections
import glob
import json
import os

import pytest

from beam_pipelines.sources import files, movielens, readers
from trainer import features as F
from trainer.cli import main as cli
from trainer.data import examples as ex


def read_examples(pattern: str) -> list:
    import tensorflow as tf

    files = sorted(glob.glob(pattern))
    assert files, f"no files match {pattern}"
    out = []
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096)
    for raw in ds:
        p = tf.io.parse_example(raw, F.example_feature_spec())
        users, items = p[F.USER_ID].numpy(), p[F.ITEM_ID].numpy()
        times, texts = p[F.TIMESTAMP].numpy(), p[F.USER_TEXT].numpy()
        hist = p[F.HISTORY_ITEM_IDS].to_list()
        for i in range(len(users)):
            out.append({
                F.USER_ID: users[i].decode(),
                F.ITEM_ID: items[i].decode(),
                F.TIMESTAMP: int(times[i]),
                F.HISTORY_ITEM_IDS: [h.decode() for h in hist[i]],
                F.USER_TEXT: texts[i].decode(),
            })
    return out


def earliest_times(interactions) -> dict:
    """(user, item) -> earliest timestamp the user interacted with the item."""
    first = {}
    for r in interactions:
        key = (r.user_id, r.item_id)
        first[key] = min(first.get(key, r.timestamp), r.timestamp)
    return first


@pytest.fixture(scope="module")
def ml100k_dataset(ml100k, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml100k_dataset")
    assert cli.main(["preprocess", "--source", "ml-100k", "--input-dir", str(ml100k), "--output-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_ml100k_every_row_accounted_for(ml100k_dataset):
    stats = json.loads((ml100k_dataset / F.STATS_FILE).read_text())
    assert stats["balanced"]
    assert stats["rows"]["interactions"]["read"] == 100_000
    assert stats["rows"]["interactions"]["accepted"] == 100_000
    assert stats["users"] == 943 and stats["items"] == 1682
    # Leave-last-1: one test (eval) and one validation example per user (each has >= 20 ratings), every
    # other interaction trains; every interaction is one event of exactly one period.
    assert stats["examples"] == {"train": 100_000 - 2 * 943, "valid": 943, "eval": 943}
    assert stats["events"] == {"train": 100_000 - 2 * 943, "valid": 943, "eval": 943}
    assert stats["users_without_valid"] == 0 and stats["users_without_eval"] == 0
    assert len((ml100k_dataset / F.ITEM_VOCAB).read_text().split()) == 1682
    assert len((ml100k_dataset / F.USER_VOCAB).read_text().split()) == 943
    assert len((ml100k_dataset / F.USERS_FILE).read_text().splitlines()) == 943
    meta = json.loads((ml100k_dataset / F.METADATA_FILE).read_text())
    assert meta["schema_version"] == F.SCHEMA_VERSION and meta["split"]["split"] == ex.LEAVE_LAST_N
    assert meta["repeats"] == "exclude" and meta["splits"]["eval"]["queries_see"] == ["train", "valid"]


@pytest.mark.slow
def test_ml100k_history_strictly_before_target_and_eval_is_last(ml100k, ml100k_dataset):
    spec = movielens.movielens_100k_sources(str(ml100k))[0]
    rows = [readers.parse_row(spec, r) for r in files.iter_raw_rows(spec, spec.path)]
    first = earliest_times(rows)
    last_time = collections.defaultdict(int)
    for r in rows:
        last_time[r.user_id] = max(last_time[r.user_id], r.timestamp)
    train = read_examples(str(ml100k_dataset / F.TRAIN_PATTERN))
    valid = read_examples(str(ml100k_dataset / F.VALID_PATTERN))
    evals = read_examples(str(ml100k_dataset / F.EVAL_PATTERN))
    assert len(train) == 98_114 and len(valid) == 943 and len(evals) == 943
    for e in train + valid + evals:
        for h in e[F.HISTORY_ITEM_IDS]:
            assert first[(e[F.USER_ID], h)] < e[F.TIMESTAMP]
        assert len(e[F.HISTORY_ITEM_IDS]) <= F.MAX_HISTORY
    for e in evals:
        assert e[F.TIMESTAMP] == last_time[e[F.USER_ID]]
    # No eval target is ever in a training query's history for its user.
    eval_item = {e[F.USER_ID]: e[F.ITEM_ID] for e in evals}
    assert not [e for e in train if eval_item.get(e[F.USER_ID]) in e[F.HISTORY_ITEM_IDS]]


@pytest.mark.slow
def test_ml100k_validation_holds_no_test_item_and_no_later_event(ml100k, ml100k_dataset):
    """On the real MovieLens 100K: each user's validation example is their second-to-last event, its
    query sees only the training period, and nothing of the test period is in the validation split or
    the event log; test queries see the validation item."""
    spec = readers.movielens_100k_sources(str(ml100k))[0]
    rows = [readers.parse_row(spec, r) for r in files.iter_raw_rows(spec, spec.path)]
    timeline = collections.defaultdict(list)
    for r in rows:
        timeline[r.user_id].append((r.timestamp, r.item_id))
    for events in timeline.values():
        events.sort()
    train = read_examples(str(ml100k_dataset / F.TRAIN_PATTERN))
    valid = {e[F.USER_ID]: e for e in read_examples(str(ml100k_dataset / F.VALID_PATTERN))}
    test = {e[F.USER_ID]: e for e in read_examples(str(ml100k_dataset / F.EVAL_PATTERN))}
    assert set(valid) == set(test) == set(timeline)
    for user, events in timeline.items():
        v, t = valid[user], test[user]
        (v_time, v_item), (t_time, t_item) = events[-2], events[-1]
        assert (v[F.TIMESTAMP], v[F.ITEM_ID]) == (v_time, v_item) and (t[F.TIMESTAMP], t[F.ITEM_ID]) == (t_time, t_item)
        # No test item and no event at or after the validation target in the validation query.
        assert t_item not in v[F.HISTORY_ITEM_IDS] and v_item not in v[F.HISTORY_ITEM_IDS]
        allowed = {i for ts, i in events[:-2] if ts < v_time}
        assert set(v[F.HISTORY_ITEM_IDS]) <= allowed
        assert v[F.TIMESTAMP] <= t[F.TIMESTAMP]
        # The test query sees the validation period (when it is strictly earlier).
        if v_time < t_time:
            assert t[F.HISTORY_ITEM_IDS][0] == v_item
    # Training examples hold no validation or test target, and no training query sees one.
    later = {(u, valid[u][F.ITEM_ID]) for u in valid} | {(u, test[u][F.ITEM_ID]) for u in test}
    assert not [e for e in train if (e[F.USER_ID], e[F.ITEM_ID]) in later]
    assert not [e for e in train if any((e[F.USER_ID], h) in later for h in e[F.HISTORY_ITEM_IDS])]
    # The event log holds the training and validation periods only: exactly everything but the test events.
    from trainer.data import arrays as da

    log = da.load_events(str(ml100k_dataset))
    assert len(log) == 100_000 - 943 and set(log.splits) == {"train", "valid"}
    assert not {(u, i, t) for u, i, t in zip(log.user_ids, log.item_ids, log.timestamps)} & \
        {(u, e[F.ITEM_ID], e[F.TIMESTAMP]) for u, e in test.items()}
    assert {(u, i) for u, i, s in zip(log.user_ids, log.item_ids, log.splits) if s == "valid"} == \
        {(u, e[F.ITEM_ID]) for u, e in valid.items()}


def test_generated_global_cutoff_keeps_eval_period_out_of_training(tiny_generated, tmp_path):
    out = tmp_path / "ds"
    code = cli.main(["preprocess", "--input-dir", str(tiny_generated), "--output-dir", str(out),
                     "--split", "global_cutoff", "--cutoff-quantile", "0.8"])
    assert code == 0
    stats = json.loads((out / F.STATS_FILE).read_text())
    cutoff, valid_cutoff = stats["cutoff"], stats["valid_cutoff"]
    train = read_examples(str(out / F.TRAIN_PATTERN))
    valid = read_examples(str(out / F.VALID_PATTERN))
    evals = read_examples(str(out / F.EVAL_PATTERN))
    assert train and valid and evals
    assert max(e[F.TIMESTAMP] for e in train) < valid_cutoff <= min(e[F.TIMESTAMP] for e in valid)
    assert max(e[F.TIMESTAMP] for e in valid) < cutoff <= min(e[F.TIMESTAMP] for e in evals)
    spec = readers.generic_sources(str(tiny_generated / "interactions.csv"), str(tiny_generated / "items.csv"))[0]
    first = earliest_times(readers.parse_row(spec, r) for r in files.iter_raw_rows(spec, spec.path))
    # Training and validation queries see the training period; test queries the training and validation periods.
    for e in train + valid:
        assert all(first[(e[F.USER_ID], h)] < min(e[F.TIMESTAMP], valid_cutoff) for h in e[F.HISTORY_ITEM_IDS])
    for e in evals:
        assert all(first[(e[F.USER_ID], h)] < min(e[F.TIMESTAMP], cutoff) for h in e[F.HISTORY_ITEM_IDS])
    # About 20% of the interactions are at or after the 0.8 quantile of time, and by default as many
    # in the validation period before it (from the 0.6 quantile).
    n = len(train) + len(valid) + len(evals)
    assert 0.1 < len(evals) / n < 0.3 and 0.1 < len(valid) / n < 0.3
    meta = json.loads((out / F.METADATA_FILE).read_text())
    assert meta["split"]["cutoff"] == cutoff and meta["split"]["valid_cutoff"] == valid_cutoff


def test_leave_last_n_and_max_examples_per_user(tiny_generated, tmp_path):
    out = tmp_path / "ds"
    assert cli.main(["preprocess", "--input-dir", str(tiny_generated), "--output-dir", str(out),
                     "--leave-last-n", "2", "--max-examples-per-user", "3"]) == 0
    train = read_examples(str(out / F.TRAIN_PATTERN))
    valid = read_examples(str(out / F.VALID_PATTERN))
    evals = read_examples(str(out / F.EVAL_PATTERN))
    per_user_eval = collections.Counter(e[F.USER_ID] for e in evals)
    per_user_valid = collections.Counter(e[F.USER_ID] for e in valid)
    per_user_train = collections.Counter(e[F.USER_ID] for e in train)
    assert set(per_user_eval.values()) == {2} and set(per_user_valid.values()) == {2}
    assert set(per_user_valid) <= set(per_user_eval)
    assert max(per_user_train.values()) == 3
    # --max-examples-per-user thins the training examples, never the event log the baselines fit on.
    stats = json.loads((out / F.STATS_FILE).read_text())
    assert stats["events"]["train"] > stats["examples"]["train"] == len(train)


def test_existing_output_needs_overwrite(tiny_generated, tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["preprocess", "--input-dir", str(tiny_generated), "--output-dir", str(out)]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    assert len(glob.glob(str(out / F.TRAIN_PATTERN))) >= 1


def test_missing_file_fails_fast_naming_it(tmp_path, capsys):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni1,One\n")
    code = cli.main(["preprocess", "--interactions", str(tmp_path / "nope.csv"), "--items", str(items),
                     "--output-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err and "error" in err
    assert not (tmp_path / "out").exists()


def test_wrong_format_fails_fast_naming_file_and_expectation(tmp_path, capsys):
    inter = tmp_path / "interactions.csv"
    inter.write_text("who,what,when\na,b,1\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\nb,B\n")
    code = cli.main(["preprocess", "--interactions", str(inter), "--items", str(items), "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "interactions.csv" in err and "user_id" in err
    # The same file with a column mapping is fine.
    code = cli.main(["preprocess", "--interactions", str(inter), "--items", str(items), "--output-dir", str(tmp_path / "o"),
                     "--map", "interactions.user_id=who", "--map", "interactions.item_id=what", "--map", "timestamp=when"])
    assert code == 0


@pytest.mark.integration
def test_multi_process_direct_runner_gives_the_same_dataset(tiny_generated, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    base = ["preprocess", "--input-dir", str(tiny_generated)]
    assert cli.main(base + ["--output-dir", str(single)]) == 0
    assert cli.main(base + ["--output-dir", str(multi), "--direct_num_workers", "2",
                            "--direct_running_mode", "multi_processing"]) == 0
    key = lambda e: (e[F.USER_ID], e[F.TIMESTAMP], e[F.ITEM_ID])  # noqa: E731
    for pattern in (F.TRAIN_PATTERN, F.VALID_PATTERN, F.EVAL_PATTERN):
        a = sorted(read_examples(str(single / pattern)), key=key)
        b = sorted(read_examples(str(multi / pattern)), key=key)
        assert a == b
    sa = json.loads((single / F.STATS_FILE).read_text())
    sb = json.loads((multi / F.STATS_FILE).read_text())
    assert sa == sb
    assert os.path.exists(multi / F.ITEM_VOCAB)


def test_bad_rows_fixture_dead_letters_each_and_totals_balance(tmp_path):
    """One bad row of each kind: expected reasons at file:line, good rows all arrive, totals balance."""
    from conftest import TEST_DATA

    fixture = TEST_DATA / "bad_rows"
    expected = json.loads((fixture / "expected.json").read_text())
    out = tmp_path / "ds"
    code = cli.main(["preprocess", "--interactions", str(fixture / "interactions.csv"), "--items", str(fixture / "items.csv"),
                     "--users", str(fixture / "users.csv"), "--output-dir", str(out)])
    assert code == 0
    letters = []
    for path in glob.glob(str(out / F.DEAD_LETTER_DIR / "*.jsonl")):
        letters += [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    got = {(os.path.basename(d["location"].rsplit(":", 1)[0]), d["location"].rsplit(":", 1)[1], d["reason"]) for d in letters}
    want = set()
    for name, lines in expected.items():
        if name.startswith("_"):
            continue
        for line, outcome in lines.items():
            if line == "pipeline":
                want |= {(name, ln, reason) for ln, reason in outcome.items()}
            elif outcome != "ok":
                want.add((name, line, outcome))
    assert got == want
    assert all(d["raw"] and d["detail"] for d in letters)

    stats = json.loads((out / F.STATS_FILE).read_text())
    assert stats["balanced"]
    rows = stats["rows"]
    assert rows["interactions"] == {"read": 10, "accepted": 4, "dead_lettered": 6, "filtered": 0, "balanced": True}
    assert rows["items"]["read"] == 8 and rows["items"]["accepted"] == 5 and rows["items"]["dead_lettered"] == 3
    assert rows["users"]["read"] == 6 and rows["users"]["accepted"] == 3 and rows["users"]["dead_lettered"] == 3
    assert stats["dead_letter"]["interactions"] == {
        "bad_encoding": 1, "bad_number": 1, "bad_timestamp": 1, "malformed_row": 1, "missing_field": 1, "unknown_item": 1}
    # Every good interaction arrived as an example (train, valid or eval).
    examples = [e for pattern in (F.TRAIN_PATTERN, F.VALID_PATTERN, F.EVAL_PATTERN)
                for e in read_examples(str(out / pattern))]
    assert len(examples) == 4
    assert "i_unknown" not in {e[F.ITEM_ID] for e in examples}
