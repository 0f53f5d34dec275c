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
    out, skipped = ex.build_user_examples("u1", events, {"age": "30"}, TITLES, ex.ExamplePolicy())
    assert skipped == 0
    train = [e for s, e in out if s == ex.TRAIN]
    evals = [e for s, e in out if s == ex.EVAL]
    assert [e[F.ITEM_ID] for e in train] == ["a", "b", "c"]
    assert [e[F.ITEM_ID] for e in evals] == ["d"]
    assert evals[0][F.HISTORY_ITEM_IDS] == ["c", "b", "a"]
    # No train query ever sees the eval item.
    assert all("d" not in e[F.HISTORY_ITEM_IDS] for e in train)
    assert train[2][F.USER_TEXT] == "user: age 30. recent: Beta; Alpha."


def test_leave_last_n_eval_queries_see_only_training_period():
    events = [E("a", 10), E("b", 20), E("c", 30), E("d", 40)]
    out, _ = ex.build_user_examples("u", events, {}, TITLES, ex.ExamplePolicy(leave_last_n=2))
    evals = [e for s, e in out if s == ex.EVAL]
    assert [e[F.ITEM_ID] for e in evals] == ["c", "d"]
    assert all(e[F.HISTORY_ITEM_IDS] == ["b", "a"] for e in evals)


def test_user_with_too_few_events_has_no_eval():
    out, _ = ex.build_user_examples("u", [E("a", 10)], {}, TITLES, ex.ExamplePolicy())
    assert [s for s, _ in out] == [ex.TRAIN]


def test_global_cutoff_split():
    events = [E("a", 10), E("b", 20), E("c", 30), E("d", 40)]
    policy = ex.ExamplePolicy(split=ex.GLOBAL_CUTOFF, cutoff=30)
    out, _ = ex.build_user_examples("u", events, {}, TITLES, policy)
    assert [(s, e[F.ITEM_ID]) for s, e in out] == [("train", "a"), ("train", "b"), ("eval", "c"), ("eval", "d")]
    assert [e[F.HISTORY_ITEM_IDS] for s, e in out if s == ex.EVAL] == [["b", "a"], ["b", "a"]]


def test_max_examples_per_user_keeps_most_recent_and_min_history_skips():
    events = [E(x, t) for x, t in zip("abcde", (1, 2, 3, 4, 5))]
    policy = ex.ExamplePolicy(max_examples_per_user=2)
    out, _ = ex.build_user_examples("u", events, {}, TITLES, policy)
    assert [e[F.ITEM_ID] for s, e in out if s == ex.TRAIN] == ["c", "d"]
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
