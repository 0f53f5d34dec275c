"""Query features and example building (pure Python, shared with scoring)."""

import pytest

from trainer import features as F
from trainer.data import examples as ex

E = ex.Event
TITLES = {"a": "Alpha", "b": "Beta", "c": "Gamma", "d": "Delta", "e": "Epsilon"}


def test_history_is_strictly_earlier_most_recent_first_and_deduplicated():
    events = ex.sort_events([E("a", 10), E("b", 20), E("a", 30), E("c", 40), E("d", 40)])
    # Before t=40: a@30, b@20 (a@10 is a repeat of a). c and d share t=40: excluded.
    assert ex.history_for(events, 40, 50) == ["a", "b"]
    assert ex.history_for(events, 40, 1) == ["a"]
    assert ex.history_for(events, 10, 50) == []


def test_leave_last_one_split_and_no_leak():
    events = [E("a", 10), E("b", 20), E("c", 30), E("d", 40)]
    out, skipped = ex.build_user_examples("u1", events, {"age": "30"}, TITLES, ex.ExamplePolicy(text_history=5))
    assert skipped == 0
    train = [e for s, e in out if s == ex.TRAIN]
    valid = [e for s, e in out if s == ex.VALID]
    evals = [e for s, e in out if s == ex.EVAL]
    assert [e[F.ITEM_ID] for e in train] == ["a", "b"]
    assert [e[F.ITEM_ID] for e in valid] == ["c"]
    assert [e[F.ITEM_ID] for e in evals] == ["d"]
    # Validation queries see the training period; test queries the training and validation periods.
    assert valid[0][F.HISTORY_ITEM_IDS] == ["b", "a"]
    assert evals[0][F.HISTORY_ITEM_IDS] == ["c", "b", "a"]
    # No train query ever sees the validation or test item; no validation query the test item.
    assert all(not {"c", "d"} & set(e[F.HISTORY_ITEM_IDS]) for e in train)
    assert "d" not in valid[0][F.HISTORY_ITEM_IDS]
    assert train[1][F.USER_TEXT] == "user: age 30. recent: Alpha."
    assert evals[0][F.USER_TEXT] == "user: age 30. recent: Gamma; Beta; Alpha."
    # The default policy keeps user_text to the profile (--text-history 0).
    out, _ = ex.build_user_examples("u1", events, {"age": "30"}, TITLES, ex.ExamplePolicy())
    assert {e[F.USER_TEXT] for _, e in out} == {"user: age 30."}


def test_leave_last_n_validation_and_test_periods():
    events = [E(x, t) for x, t in zip("abcdef", (10, 20, 30, 40, 50, 60))]
    out, _ = ex.build_user_examples("u", events, {}, TITLES, ex.ExamplePolicy(leave_last_n=2))
    by = {s: [e for t, e in out if t == s] for s in ex.SPLIT_NAMES}
    assert [e[F.ITEM_ID] for e in by[ex.TRAIN]] == ["a", "b"]
    assert [e[F.ITEM_ID] for e in by[ex.VALID]] == ["c", "d"]
    assert [e[F.ITEM_ID] for e in by[ex.EVAL]] == ["e", "f"]
    # Both validation queries see only the training period (not each other) ...
    assert all(e[F.HISTORY_ITEM_IDS] == ["b", "a"] for e in by[ex.VALID])
    # ... and both test queries the training and validation periods (not each other).
    assert all(e[F.HISTORY_ITEM_IDS] == ["d", "c", "b", "a"] for e in by[ex.EVAL])


def test_users_with_few_events_get_test_before_validation_and_always_train():
    policy = ex.ExamplePolicy(leave_last_n=2)
    # 3 or 4 events (n < len <= 2n): test targets, no validation target, >= 1 training event behind them.
    for k in (3, 4):
        out, _ = ex.build_user_examples("u", [E(x, i) for i, x in enumerate("abcd"[:k])], {}, TITLES, policy)
        splits = [s for s, _ in out]
        assert splits.count(ex.EVAL) == 2 and ex.VALID not in splits and splits.count(ex.TRAIN) == k - 2
        assert all(e[F.HISTORY_ITEM_IDS] for s, e in out if s == ex.EVAL)
    # n or fewer: training only.
    out, _ = ex.build_user_examples("u", [E("a", 10)], {}, TITLES, ex.ExamplePolicy())
    assert [s for s, _ in out] == [ex.TRAIN]


def test_global_cutoff_split():
    events = [E("a", 10), E("b", 20), E("c", 30), E("d", 40)]
    policy = ex.ExamplePolicy(split=ex.GLOBAL_CUTOFF, valid_cutoff=20, cutoff=30)
    out, _ = ex.build_user_examples("u", events, {}, TITLES, policy)
    assert [(s, e[F.ITEM_ID]) for s, e in out] == [("train", "a"), ("valid", "b"), ("eval", "c"), ("eval", "d")]
    assert [e[F.HISTORY_ITEM_IDS] for s, e in out if s == ex.VALID] == [["a"]]
    assert [e[F.HISTORY_ITEM_IDS] for s, e in out if s == ex.EVAL] == [["b", "a"], ["b", "a"]]
    with pytest.raises(ValueError, match="valid_cutoff"):
        ex.split_events(events, ex.ExamplePolicy(split=ex.GLOBAL_CUTOFF, cutoff=30))
    with pytest.raises(ValueError, match="earlier"):
        ex.ExamplePolicy(split=ex.GLOBAL_CUTOFF, valid_cutoff=30, cutoff=30)


def test_events_record_holds_the_training_and_validation_periods_only():
    events = [E("c", 30), E("a", 10), E("b", 20), E("a", 40), E("d", 50)]
    rec = ex.events_record("u", events, ex.ExamplePolicy())
    assert rec[F.EVENT_ITEM_IDS] == ["a", "b", "c", "a"]  # oldest first; the test event d is not there
    assert rec[F.EVENT_TIMESTAMPS] == [10, 20, 30, 40]
    assert rec[F.EVENT_SPLITS] == ["train", "train", "train", "valid"]


def test_consumed_before_and_the_repeat_rule():
    labelled = ex.label_events([E("a", 10), E("b", 20), E("a", 30), E("c", 40), E("d", 50)], ex.ExamplePolicy())
    # Test query (target d at 50) sees train + valid; the validation query (target c at 40) train only.
    test_seen = ex.consumed_before(ex.visible_events(labelled, ex.EVAL), 50)
    valid_seen = ex.consumed_before(ex.visible_events(labelled, ex.VALID), 40)
    assert test_seen == ["c", "a", "b"] and valid_seen == ["a", "b"]
    # Unbounded, unlike the query's history.
    many = ex.sort_events([E(f"i{k}", k) for k in range(80)])
    assert len(ex.consumed_before(many, 100)) == 80 and len(ex.history_for(many, 100, 50)) == 50
    assert ex.repeat_exclusion(test_seen, "d", "exclude") == (frozenset("abc"), False)
    assert ex.repeat_exclusion(test_seen, "a", "exclude") == (frozenset("abc"), True)
    assert ex.repeat_exclusion(test_seen, "a", "allow") == (frozenset(), True)
    with pytest.raises(ValueError, match="repeat rule"):
        ex.repeat_exclusion(test_seen, "a", "sometimes")


def test_max_examples_per_user_keeps_most_recent_and_min_history_skips():
    events = [E(x, t) for x, t in zip("abcdef", (1, 2, 3, 4, 5, 6))]  # e: validation, f: test
    policy = ex.ExamplePolicy(max_examples_per_user=2)
    out, _ = ex.build_user_examples("u", events, {}, TITLES, policy)
    assert [e[F.ITEM_ID] for s, e in out if s == ex.TRAIN] == ["c", "d"]
    assert [e[F.ITEM_ID] for s, e in out if s != ex.TRAIN] == ["e", "f"]  # never thinned
    out, skipped = ex.build_user_examples("u", events, {}, TITLES, ex.ExamplePolicy(min_history=2))
    assert skipped == 2  # a (0 history) and b (1 history)
    assert [e[F.ITEM_ID] for s, e in out if s == ex.TRAIN] == ["c", "d"]


def test_user_text_is_deterministic_and_bounded():
    text = ex.user_text({"occupation": "writer", "age": "23"}, ["T1", "", "T3"])
    assert text == "user: age 23, occupation writer. recent: T1; T3."
    assert ex.user_text({}, []) == "user: unknown."


@pytest.mark.parametrize("bad", [dict(split="random"), dict(leave_last_n=0), dict(max_history=0), dict(min_history=-1)])
def test_policy_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        ex.ExamplePolicy(**bad)


def test_serialized_example_parses_with_the_feature_spec():
    import tensorflow as tf

    example = {F.USER_ID: "u1", F.USER_TEXT: "user: x.", F.HISTORY_ITEM_IDS: ["b", "a"], F.ITEM_ID: "c",
               F.TIMESTAMP: 1234, F.WEIGHT: 2.0}
    parsed = tf.io.parse_single_example(ex.serialize_example(example), F.example_feature_spec())
    assert parsed[F.USER_ID].numpy() == b"u1"
    assert parsed[F.HISTORY_ITEM_IDS].numpy().tolist() == [b"b", b"a"]
    assert int(parsed[F.TIMESTAMP]) == 1234 and float(parsed[F.WEIGHT]) == 2.0
    item = tf.io.parse_single_example(ex.serialize_item("i1", "Boots", ["outdoor"], "warm"), F.item_feature_spec())
    assert item[F.ITEM_TEXT].numpy() == b"Boots | outdoor | warm"
    assert item[F.ITEM_CATEGORIES].numpy().tolist() == [b"outdoor"]
