"""Query features and (query, positive) examples, built the same way everywhere.

Preprocessing builds training/validation/test examples with these functions;
batch scoring and the frontend build a user's query features with the very
same `user_text` and `history_for` so that what the model sees at serving
time is what it was trained on. The repeat rule (`repeat_exclusion`) says
which already-consumed items a query is ranked without; train-time recall,
`segrec evaluate` and every baseline apply it through this one function.
Pure Python: no Beam, no TensorFlow at import.
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Iterable, Mapping, Optional, Sequence

from trainer import features

# Split policies.
LEAVE_LAST_N = "leave_last_n"
GLOBAL_CUTOFF = "global_cutoff"
SPLITS = (LEAVE_LAST_N, GLOBAL_CUTOFF)

# Split names (the dataset dir's file prefixes). EVAL is the test split.
TRAIN = features.TRAIN_PREFIX
VALID = features.VALID_PREFIX
EVAL = features.EVAL_PREFIX
SPLIT_NAMES = (TRAIN, VALID, EVAL)
# The events a query of each split may see (strictly earlier than its
# target): validation queries see the training period, test queries the
# training and validation periods, so a test query knows everything that
# happened before the test period.
VISIBLE_SPLITS = {TRAIN: (TRAIN,), VALID: (TRAIN,), EVAL: (TRAIN, VALID)}

# Repeat rules: what happens to items a user already consumed.
REPEATS_EXCLUDE = "exclude"  # ranked without every item consumed before the query; repeat targets reported apart
REPEATS_ALLOW = "allow"  # nothing removed: re-consumption is a legitimate recommendation
REPEAT_RULES = (REPEATS_EXCLUDE, REPEATS_ALLOW)
DEFAULT_REPEATS = REPEATS_EXCLUDE


@dataclasses.dataclass(frozen=True)
class ExamplePolicy:
    """How one user's timeline becomes examples.

    split: LEAVE_LAST_N (of each user's events, the last `leave_last_n` are
      test (eval) targets and the `leave_last_n` before them validation
      targets) or GLOBAL_CUTOFF (events at or after `cutoff` are test
      targets, those in [valid_cutoff, cutoff) validation targets).
    max_history: history_item_ids kept per example, most recent first.
    text_history: recent item titles folded into user_text.
    max_examples_per_user: most recent training cut points kept per user
      (0 keeps every one).
    min_history: training targets with fewer history items are skipped.
    """

    split: str = LEAVE_LAST_N
    leave_last_n: int = 1
    cutoff: Optional[int] = None
    valid_cutoff: Optional[int] = None
    max_history: int = features.MAX_HISTORY
    text_history: int = features.TEXT_HISTORY
    max_examples_per_user: int = 0
    min_history: int = 0

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.split == LEAVE_LAST_N and self.leave_last_n < 1:
            raise ValueError(f"leave_last_n must be >= 1, got {self.leave_last_n}")
        if self.max_history < 1 or self.text_history < 0:
            raise ValueError("max_history must be >= 1 and text_history >= 0")
        if self.max_examples_per_user < 0 or self.min_history < 0:
            raise ValueError("max_examples_per_user and min_history must be >= 0")
        if self.cutoff is not None and self.valid_cutoff is not None and self.valid_cutoff >= self.cutoff:
            raise ValueError(f"valid_cutoff ({self.valid_cutoff}) must be earlier than cutoff ({self.cutoff})")


@dataclasses.dataclass(frozen=True)
class Event:
    """One accepted interaction of a user (already validated)."""

    item_id: str
    timestamp: int
    weight: float = 1.0


def profile_text(attributes: Mapping[str, str]) -> str:
    """A user's profile as text, e.g. "age 24, gender M, occupation technician".

    Attributes come in sorted key order, so the same profile always gives the
    same text (and the same cached encoder output).
    """
    parts = [f"{k} {v}" for k, v in sorted(attributes.items()) if str(v).strip()]
    return ", ".join(parts)


def user_text(attributes: Mapping[str, str], recent_titles: Sequence[str]) -> str:
    """The text the user tower's BERT reads: profile + most recent item titles.

    recent_titles: most recent first, already bounded by the caller.
    """
    profile = profile_text(attributes)
    text = f"user: {profile}." if profile else "user: unknown."
    titles = [t for t in recent_titles if t]
    if titles:
        text += " recent: " + "; ".join(titles) + "."
    return text


def history_for(events: Sequence[Event], before: int, max_history: int) -> list:
    """Item ids of `events` strictly earlier than `before`, most recent first.

    events: sorted by (timestamp, item_id). An item seen several times keeps
    only its most recent position; nothing at or after `before` is used, so a
    query never sees its own target or anything later.
    """
    out, seen = [], set()
    for event in reversed(events):
        if event.timestamp >= before:
            continue
        if event.item_id in seen:
            continue
        seen.add(event.item_id)
        out.append(event.item_id)
        if len(out) >= max_history:
            break
    return out


def sort_events(events: Iterable[Event]) -> list:
    return sorted(events, key=lambda e: (e.timestamp, e.item_id))


def split_events(events: Sequence[Event], policy: ExamplePolicy) -> tuple:
    """(train_events, valid_events, eval_events) of one user's sorted timeline.

    Leave-last-n (n = policy.leave_last_n): a user with more than 2n events
    gets n test (eval) targets, the n events before them as validation
    targets, and trains on the rest; a user with n+1..2n events gets test
    targets but no validation target (the test population stays what it was
    without a validation split); a user with n or fewer events only trains.
    So every validation and test query has at least one training event
    behind it.

    Global cutoff: events at or after `cutoff` are test targets, those in
    [valid_cutoff, cutoff) validation targets, earlier ones train. A user first
    seen after a cutoff gets queries with no training history (cold users).
    """
    if policy.split == LEAVE_LAST_N:
        n = policy.leave_last_n
        if len(events) <= n:
            return list(events), [], []
        if len(events) <= 2 * n:
            return list(events[:-n]), [], list(events[-n:])
        return list(events[: -2 * n]), list(events[-2 * n : -n]), list(events[-n:])
    cutoff, valid_cutoff = policy.cutoff, policy.valid_cutoff
    if cutoff is None or valid_cutoff is None:
        raise ValueError("the global_cutoff split needs a cutoff and a valid_cutoff timestamp")
    return ([e for e in events if e.timestamp < valid_cutoff],
            [e for e in events if valid_cutoff <= e.timestamp < cutoff],
            [e for e in events if e.timestamp >= cutoff])


def label_events(events: Sequence[Event], policy: ExamplePolicy) -> list:
    """[(split, event)] of one user's timeline, oldest first (events-* records its train and valid events)."""
    train, valid, test = split_events(sort_events(events), policy)
    labelled = [(TRAIN, e) for e in train] + [(VALID, e) for e in valid] + [(EVAL, e) for e in test]
    return sorted(labelled, key=lambda se: (se[1].timestamp, se[1].item_id, SPLIT_NAMES.index(se[0])))


def visible_events(labelled: Sequence[tuple], split: str) -> list:
    """The events of `labelled` [(split, event)] a query of `split` may see (any time; see VISIBLE_SPLITS)."""
    seen = VISIBLE_SPLITS[split]
    return [e for s, e in labelled if s in seen]


def consumed_before(events: Sequence[Event], before: int) -> list:
    """Every distinct item of `events` strictly earlier than `before`, most
    recent first: the unbounded history (history_for keeps its first
    max_history). What the repeat rule removes from the query's candidates.

    events: sorted by (timestamp, item_id), already restricted to what the
    query may see (visible_events).
    """
    return history_for(events, before, max_history=len(events) + 1)


def repeat_exclusion(consumed: Collection[str], target: Optional[str], rule: str) -> tuple:
    """The repeat rule for one query: (items to rank the query without, is_repeat).

    consumed: everything the user consumed before the query (consumed_before,
    plus the query's own history). is_repeat: the target is among them.
    exclude: every consumed item (a repeat target's query is then not scored
    in the main metrics, but reported on its own, ranked with nothing
    removed); allow: nothing is removed.
    """
    if rule not in REPEAT_RULES:
        raise ValueError(f"repeat rule must be one of {REPEAT_RULES}, got {rule!r}")
    consumed = frozenset(consumed)
    is_repeat = target is not None and target in consumed
    return (consumed if rule == REPEATS_EXCLUDE else frozenset()), is_repeat


def build_user_examples(
    user_id: str,
    events: Sequence[Event],
    attributes: Mapping[str, str],
    titles: Mapping[str, str],
    policy: ExamplePolicy,
) -> tuple:
    """All (split, example dict) of one user, and the number skipped.

    events: the user's accepted events, any order. Every query sees only the
    events its split may see (VISIBLE_SPLITS), strictly earlier than its
    target: training and validation queries the training period, test
    queries the training and validation periods. Nothing of a later period
    leaks into any query.

    Returns (examples, skipped_min_history) where examples is a list of
    (TRAIN|VALID|EVAL, dict with the features.EXAMPLE_FEATURES keys).
    """
    events = sort_events(events)
    train_events, valid_events, eval_events = split_events(events, policy)
    targets = list(train_events)
    if policy.max_examples_per_user > 0:
        targets = targets[-policy.max_examples_per_user :]
    out, skipped = [], 0
    for target in targets:
        text, history = query_features(train_events, attributes, titles, policy, before=target.timestamp)
        if len(history) < policy.min_history:
            skipped += 1
            continue
        out.append((TRAIN, _example(user_id, target, text, history)))
    before_test = sort_events(train_events + valid_events)
    for split, split_targets, seen in ((VALID, valid_events, train_events), (EVAL, eval_events, before_test)):
        for target in split_targets:
            text, history = query_features(seen, attributes, titles, policy, before=target.timestamp)
            out.append((split, _example(user_id, target, text, history)))
    return out, skipped


def events_record(user_id: str, events: Sequence[Event], policy: ExamplePolicy) -> dict:
    """One user's events-* record: every event of the training and validation
    periods, oldest first, with its split. The test period's events are the
    user's eval examples and appear nowhere else."""
    labelled = [(s, e) for s, e in label_events(events, policy) if s != EVAL]
    return {
        features.USER_ID: user_id,
        features.EVENT_ITEM_IDS: [e.item_id for _, e in labelled],
        features.EVENT_TIMESTAMPS: [int(e.timestamp) for _, e in labelled],
        features.EVENT_SPLITS: [s for s, _ in labelled],
    }


def query_text(history: Sequence[str], attributes: Mapping[str, str], titles: Mapping[str, str],
               policy: ExamplePolicy) -> str:
    """user_text of a query whose history is `history` (most recent first)."""
    return user_text(attributes, [titles.get(i, "") for i in history[: policy.text_history]])


def query_features(
    events: Sequence[Event],
    attributes: Mapping[str, str],
    titles: Mapping[str, str],
    policy: ExamplePolicy,
    before: Optional[int] = None,
) -> tuple:
    """(user_text, history_item_ids) of a user's query as of time `before`.

    The same query preprocessing builds for a training target at `before`;
    batch scoring and segment refresh call it with `before` = the scoring
    time (None: after the last event, so every event counts).
    events: sorted by (timestamp, item_id) (see sort_events).
    """
    if before is None:
        before = (events[-1].timestamp + 1) if events else 0
    history = history_for(events, before, policy.max_history)
    return query_text(history, attributes, titles, policy), history


def _example(user_id, target: Event, text: str, history) -> dict:
    return {
        features.USER_ID: user_id,
        features.USER_TEXT: text,
        features.HISTORY_ITEM_IDS: list(history),
        features.ITEM_ID: target.item_id,
        features.TIMESTAMP: int(target.timestamp),
        features.WEIGHT: float(target.weight),
    }


def serialize_example(example: Mapping) -> bytes:
    """A features.EXAMPLE_FEATURES dict as a serialized tf.train.Example."""
    import tensorflow as tf

    def b(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))

    feats = {
        features.USER_ID: b([example[features.USER_ID]]),
        features.USER_TEXT: b([example[features.USER_TEXT]]),
        features.HISTORY_ITEM_IDS: b(example[features.HISTORY_ITEM_IDS]),
        features.ITEM_ID: b([example[features.ITEM_ID]]),
        features.TIMESTAMP: tf.train.Feature(int64_list=tf.train.Int64List(value=[example[features.TIMESTAMP]])),
        features.WEIGHT: tf.train.Feature(float_list=tf.train.FloatList(value=[example[features.WEIGHT]])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def serialize_events(record: Mapping) -> bytes:
    """An events_record dict as a serialized tf.train.Example (features.EVENT_FEATURES)."""
    import tensorflow as tf

    def b(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))

    feats = {
        features.USER_ID: b([record[features.USER_ID]]),
        features.EVENT_ITEM_IDS: b(record[features.EVENT_ITEM_IDS]),
        features.EVENT_TIMESTAMPS: tf.train.Feature(
            int64_list=tf.train.Int64List(value=[int(t) for t in record[features.EVENT_TIMESTAMPS]])),
        features.EVENT_SPLITS: b(record[features.EVENT_SPLITS]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def item_text(title: str, categories: Sequence[str], description: str) -> str:
    """The item's text: title, categories and description in one string."""
    text = title
    if categories:
        text += " | " + ", ".join(categories)
    if description:
        text += " | " + description
    return text


def serialize_item(item_id: str, title: str, categories: Sequence[str], description: str) -> bytes:
    """A catalog entry as a serialized tf.train.Example (features.ITEM_FEATURES)."""
    import tensorflow as tf

    def b(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))

    feats = {
        features.ITEM_ID: b([item_id]),
        features.ITEM_TITLE: b([title]),
        features.ITEM_TEXT: b([item_text(title, categories, description)]),
        features.ITEM_CATEGORIES: b(list(categories)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()
