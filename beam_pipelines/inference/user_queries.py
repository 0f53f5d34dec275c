"""The user queries the model reads: one `UserQuery` per user, built from raw logs or a dataset dir.

    interactions, items, users --BuildUserQueries(as_of, window)--> UserQuery per user
                                                     \\--> dead letters (per reason), counts
    dataset dir (train/eval tf.Examples) --QueriesFromDataset--> UserQuery per user (its newest query)

`BuildUserQueries` builds each user's query features with the very functions
preprocess uses for training examples (`examples.query_features`:
`history_for` + `user_text`), after preprocess's own dedupe and catalog-join
steps, so a scored user looks to the model exactly as a training query
would at the same time. Users without a query are dead-lettered with source
QUERY_SOURCE and a reason in QUERY_REASONS. `QueriesFromDataset` reads back
the queries preprocess wrote (per user, the newest eval example, else the
newest training example): they ARE the model's eval queries, byte for byte.

With `consumed=True` both also fill each query's `exclude_item_ids` with the
user's whole consumed set (`examples.consumed_before`: every distinct item
consumed strictly before the query, unbounded, where the history keeps at
most max_history), for the export's serving_exclude signature: from raw logs,
every accepted event before as_of (the window limits what the query reads,
not what the user has consumed); from a dataset dir, the events-* log's
events the query's split may see (examples.VISIBLE_SPLITS) plus the targets
of the user's earlier training examples (all a schema-1 dir without events-*
has), strictly earlier than the query.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines import transforms as T
from beam_pipelines.inference import NAMESPACE
from beam_pipelines.sources import records
from trainer import features
from trainer.data import examples as ex

# Why a user has no query (dead-letter source QUERY_SOURCE). Stable names:
# stats.json and tests key on them.
QUERY_SOURCE = "user_query"
NO_EVENTS = "no_events"  # a profile but no interaction at all (and cold users not scored)
UNUSABLE_EVENTS = "unusable_events"  # every interaction names an unknown item or was filtered
NO_EVENTS_IN_WINDOW = "no_events_in_window"  # events, but none in [as_of - window, as_of)
QUERY_REASONS = (NO_EVENTS, UNUSABLE_EVENTS, NO_EVENTS_IN_WINDOW)

# Unreadable examples of a dataset dir (they name no user).
EXAMPLES_SOURCE = "examples"
BAD_EXAMPLE = "bad_example"
_SCORE_NAMESPACE = "segrec.score"  # QueriesFromDataset's counters, as `segrec score` has always named them


@dataclasses.dataclass(frozen=True)
class UserQuery:
    """One user's query features, as every signature of the export reads them.

    history_item_ids: most recent first, at most the policy's max_history,
    empty for a cold user. exclude_item_ids: items the answer must not hold
    (serving_exclude's input): the user's whole consumed set when the query
    was built with consumed=True, else empty; not a model input.
    """

    user_id: str
    user_text: str
    history_item_ids: tuple = ()  # tuple[str, ...]
    exclude_item_ids: tuple = ()  # tuple[str, ...], most recent first


# --- from canonical records ----------------------------------------------------------------------


def _query_dead(user_id: str, reason: str, detail: str, raw: dict) -> pvalue.TaggedOutput:
    Metrics.counter(NAMESPACE, f"dead_letter.{reason}").inc()
    letter = records.DeadLetter(QUERY_SOURCE, f"user {user_id}", reason, detail,
                                json.dumps(raw, sort_keys=True, ensure_ascii=False))
    return pvalue.TaggedOutput(T.DEAD, letter)


class BuildQuery(beam.DoFn):
    """(user_id, {events, seen, users}) -> UserQuery, or a DEAD letter with its reason.

    events: the user's interactions with catalog items that preprocess's
    JoinCatalog kept; seen: item ids of all their parsed interactions;
    users: their profile (0 or 1). Side inputs: titles (item_id -> title);
    as_of (epoch seconds, events at or after it are ignored) when the
    transform was given a window but no as_of.
    """

    def __init__(self, policy: ex.ExamplePolicy, as_of: Optional[int], window_seconds: Optional[int],
                 cold_users: bool, consumed: bool = False):
        self._policy = policy
        self._as_of = as_of
        self._window = window_seconds
        self._cold = cold_users
        self._consumed = consumed
        self._built = Metrics.counter(NAMESPACE, "queries_built")

    def process(self, element, titles, as_of=None):
        user_id, grouped = element
        inters = list(grouped["events"])
        seen = list(grouped["seen"])
        users = list(grouped["users"])
        as_of = self._as_of if self._as_of is not None else as_of
        attributes = users[0].attribute_dict() if users else {}
        events = ex.sort_events(ex.Event(r.item_id, r.timestamp, r.weight) for r in inters)
        yield T.tagged_count("users.in")
        if inters:
            yield T.tagged_count("accepted.interactions", len(inters))
        usable = events
        if as_of is not None:
            start = as_of - self._window if self._window is not None else None
            usable = [e for e in events if e.timestamp < as_of and (start is None or e.timestamp >= start)]
        if usable or (self._cold and users):
            text, history = ex.query_features(usable, attributes, titles, self._policy, before=as_of)
            self._built.inc()
            yield T.tagged_count("users.queries")
            if not history:
                yield T.tagged_count("users.cold")
            if self._consumed:
                before = as_of if as_of is not None else (events[-1].timestamp + 1 if events else 0)
                yield UserQuery(user_id, text, tuple(history), tuple(ex.consumed_before(events, before)))
            else:
                yield UserQuery(user_id, text, tuple(history))
            return
        raw = {"user_id": user_id, "interactions": len(seen), "usable_interactions": len(events),
               "profile": attributes if users else None}
        if not seen:
            reason, detail = NO_EVENTS, "the user has a profile but no interactions (pass cold users to score them)"
        elif not events:
            unknown = sum(1 for item in seen if item not in titles)
            reason = UNUSABLE_EVENTS
            detail = (f"none of the user's {len(seen)} interactions is usable: {unknown} name items not in the "
                      "catalog, the rest were filtered (duplicates, below min rating)")
        else:
            reason = NO_EVENTS_IN_WINDOW
            window = f"[{as_of - self._window}, {as_of})" if self._window is not None else f"before {as_of}"
            detail = f"none of the user's {len(events)} usable interactions falls in {window}"
            raw["first_timestamp"], raw["last_timestamp"] = events[0].timestamp, events[-1].timestamp
        yield T.tagged_count(f"dead.{QUERY_SOURCE}.{reason}")
        yield _query_dead(user_id, reason, detail, raw)


class BuildUserQueries(beam.PTransform):
    """{"interactions", "items"[, "users"]} canonical records -> one UserQuery per user.

    Users in = every user id with a parsed interaction or a profile; each
    becomes a UserQuery (main output `queries`) or a DEAD letter (source
    QUERY_SOURCE, reason in QUERY_REASONS). Interactions go through
    preprocess's own steps first: catalog and profiles deduplicated by id,
    interactions joined to the catalog (unknown items dead-lettered,
    duplicates and ratings below min_rating filtered), so the events behind
    a query are the ones behind a training example.

    The query is as of `as_of` (epoch seconds; events at or after it are
    ignored): None = after the last event (of the whole input when a window
    is given, computed in the pipeline). window_seconds: only events in
    [as_of - window_seconds, as_of) count. cold_users: users with a profile
    and no usable event are scored as cold users (empty history, profile
    text) instead of dead-lettered. consumed: fill each query's
    exclude_item_ids with every accepted event's item before as_of (see the
    module doc).

    Outputs (a dict with a .queries property): `queries`, T.DEAD (records.DeadLetter: the
    row-level ones of the dedupe/join steps and the user-level ones) and
    T.COUNTS ((key, n) pairs: users.in, users.queries (queries built), users.cold,
    dead.<source>.<reason>, filtered.<reason>, accepted.*).
    """

    def __init__(self, policy: ex.ExamplePolicy = ex.ExamplePolicy(), as_of: Optional[int] = None,
                 window_seconds: Optional[int] = None, cold_users: bool = False,
                 min_rating: Optional[float] = None, consumed: bool = False):
        super().__init__()
        if window_seconds is not None and window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        self._consumed = consumed
        self._policy = policy
        self._as_of = as_of
        self._window = window_seconds
        self._cold = cold_users
        self._min_rating = min_rating

    def expand(self, inputs):
        p = inputs["interactions"].pipeline
        interactions, items = inputs["interactions"], inputs["items"]
        users = inputs.get("users")
        if users is None:
            users = p | "NoUsers" >> beam.Create([])
        items = items | "DedupeItems" >> T.DedupeById(records.ITEMS, "item_id")
        users = users | "DedupeUsers" >> T.DedupeById(records.USERS, "user_id")
        joined = (
            {"items": items.records | "KeyItems" >> beam.Map(lambda r: (r.item_id, r)),
             "interactions": interactions | "KeyByItem" >> beam.Map(lambda r: (r.item_id, r))}
            | "GroupByItem" >> beam.CoGroupByKey()
            | "JoinCatalog" >> beam.ParDo(T.JoinCatalog(self._min_rating, 0)).with_outputs(
                T.DEAD, T.COUNTS, T.CATALOG, main="interactions")
        )
        titles = beam.pvalue.AsDict(joined[T.CATALOG] | "Titles" >> beam.Map(lambda r: (r.item_id, r.title)))
        as_of = None
        if self._as_of is None and self._window is not None:
            as_of = beam.pvalue.AsSingleton(
                joined.interactions
                | "Timestamps" >> beam.Map(lambda kv: kv[1].timestamp)
                | "Latest" >> beam.CombineGlobally(lambda ts: max(ts, default=-1) + 1)
            )
        built = (
            {"events": joined.interactions,
             "seen": interactions | "Seen" >> beam.Map(lambda r: (r.user_id, r.item_id)),
             "users": users.records | "KeyUsers" >> beam.Map(lambda r: (r.user_id, r))}
            | "GroupByUser" >> beam.CoGroupByKey()
            | "BuildQuery" >> beam.ParDo(
                BuildQuery(self._policy, self._as_of, self._window, self._cold, self._consumed), titles=titles,
                as_of=as_of
            ).with_outputs(T.DEAD, T.COUNTS, main="queries")
        )
        dead = (items[T.DEAD], users[T.DEAD], joined[T.DEAD], built[T.DEAD]) | "FlattenDead" >> beam.Flatten()
        counts = (
            joined[T.COUNTS],
            built[T.COUNTS],
            T.count_elements(joined[T.CATALOG], "accepted.items"),
            T.count_elements(users.records, "accepted.users"),
            (items[T.DEAD], users[T.DEAD], joined[T.DEAD])
            | "FlattenRowDead" >> beam.Flatten()
            | "RowDeadKeys" >> beam.Map(lambda d: (f"dead.{d.source}.{d.reason}", 1)),
        ) | "FlattenCounts" >> beam.Flatten()
        return _Outputs(built.queries, dead, counts)


class _Outputs(dict):
    """BuildUserQueries' outputs: .queries, [T.DEAD], [T.COUNTS] (a dict, so Beam sees PCollections)."""

    def __init__(self, queries, dead, counts):
        super().__init__({"queries": queries, T.DEAD: dead, T.COUNTS: counts})

    @property
    def queries(self):
        return self["queries"]


# --- from a dataset dir ----------------------------------------------------------------------------


class ParseExample(beam.DoFn):
    """Serialized query/positive tf.Example -> (user_id, (rank, timestamp, item_id, text, history)).

    rank 1 = eval, 0 = train: a user's newest eval query wins over any train
    query. Unreadable examples -> DEAD (they name no user).
    """

    def __init__(self, split: str):
        self._split = split
        self._rank = 1 if split == ex.EVAL else 0

    def process(self, raw: bytes):
        import tensorflow as tf

        try:
            feats = tf.train.Example.FromString(raw).features.feature

            def strings(name):
                return [v.decode("utf-8") for v in feats[name].bytes_list.value]

            user = strings(features.USER_ID)
            if not user or not user[0]:
                raise ValueError("no user_id")
            text = strings(features.USER_TEXT)
            ts = list(feats[features.TIMESTAMP].int64_list.value)
            item = strings(features.ITEM_ID)
            value = (self._rank, ts[0] if ts else 0, item[0] if item else "", text[0] if text else "",
                     tuple(strings(features.HISTORY_ITEM_IDS)))
        except Exception as err:  # a corrupt record or one from another schema
            Metrics.counter(_SCORE_NAMESPACE, f"dead_letter.{BAD_EXAMPLE}").inc()
            yield beam.pvalue.TaggedOutput(T.DEAD, records.DeadLetter(
                EXAMPLES_SOURCE, f"{self._split} example", BAD_EXAMPLE, f"not a segrec query example: {err}",
                records.raw_text(raw[:200])))
            yield T.tagged_count(f"dead.{EXAMPLES_SOURCE}.{BAD_EXAMPLE}")
            return
        yield user[0], value


def _newest_query(element):
    user_id, values = element
    _, _, _, text, history = max(values, key=lambda v: v[:3])
    return UserQuery(user_id, text, history)


def _parse_events(raw: bytes):
    """Serialized events-* record -> (user_id, ((item_id, timestamp, split), ...)); a corrupt one is skipped
    (the log only adds exclusions; the queries come from the examples)."""
    import tensorflow as tf

    try:
        feats = tf.train.Example.FromString(raw).features.feature
        user = feats[features.USER_ID].bytes_list.value[0].decode("utf-8")
        items = [v.decode("utf-8") for v in feats[features.EVENT_ITEM_IDS].bytes_list.value]
        stamps = list(feats[features.EVENT_TIMESTAMPS].int64_list.value)
        splits = [v.decode("utf-8") for v in feats[features.EVENT_SPLITS].bytes_list.value]
    except Exception:  # noqa: BLE001
        Metrics.counter(_SCORE_NAMESPACE, "events_unreadable").inc()
        return
    yield user, tuple(zip(items, stamps, splits))


def _newest_query_with_consumed(element):
    """(user_id, {"rows", "events"}) -> the newest query, its exclude_item_ids the user's consumed set:
    the events its split may see and the earlier training targets, strictly before it, plus its history."""
    user_id, grouped = element
    values = list(grouped["rows"])
    if not values:  # in the event log only (no example in train/eval): no query, as without the log
        return
    rank, ts, _, text, history = max(values, key=lambda v: v[:3])
    visible = ex.VISIBLE_SPLITS[ex.EVAL if rank == 1 else ex.TRAIN]
    seen = [ex.Event(item, t) for log in grouped["events"] for item, t, split in log if split in visible]
    seen += [ex.Event(v[2], v[1]) for v in values if v[0] == 0 and v[2]]  # training targets
    consumed = ex.consumed_before(ex.sort_events(seen), ts)
    known = set(consumed)
    consumed += [h for h in history if h and h not in known]
    yield UserQuery(user_id, text, history, tuple(consumed))


class QueriesFromDataset(beam.PTransform):
    """dataset dir -> {"queries", T.DEAD, T.COUNTS} like BuildUserQueries (see the module doc).

    consumed: fill each query's exclude_item_ids with the user's consumed set
    (the events-* log when the dir has one, and the training targets)."""

    def __init__(self, dataset_dir: str, consumed: bool = False):
        super().__init__()
        self._dir = dataset_dir
        self._consumed = consumed

    def expand(self, pbegin):
        parsed = []
        for split, pattern in ((ex.TRAIN, features.TRAIN_PATTERN), (ex.EVAL, features.EVAL_PATTERN)):
            parsed.append(
                pbegin
                | f"Read[{split}]" >> beam.io.ReadFromTFRecord(FileSystems.join(self._dir, pattern))
                | f"Parse[{split}]" >> beam.ParDo(ParseExample(split)).with_outputs(T.DEAD, T.COUNTS, main="rows")
            )
        rows = [r.rows for r in parsed] | "FlattenRows" >> beam.Flatten()
        if self._consumed:
            queries = (
                {"rows": rows, "events": self._events(pbegin)}
                | "GroupByUser" >> beam.CoGroupByKey()
                | "Newest" >> beam.FlatMap(_newest_query_with_consumed)
            )
        else:
            queries = rows | "GroupByUser" >> beam.GroupByKey() | "Newest" >> beam.Map(_newest_query)
        dead = [r[T.DEAD] for r in parsed] | "FlattenDead" >> beam.Flatten()
        counts = (
            [r[T.COUNTS] for r in parsed]
            + [queries | "UsersIn" >> beam.Map(lambda q: ("users.in", 1)),
               queries | "UsersQueries" >> beam.Map(lambda q: ("users.queries", 1)),
               queries | "UsersCold" >> beam.FlatMap(lambda q: [] if q.history_item_ids else [("users.cold", 1)])]
        ) | "FlattenCounts" >> beam.Flatten()
        return {"queries": queries, T.DEAD: dead, T.COUNTS: counts}

    def _events(self, pbegin):
        """(user_id, events) of the events-* log; nothing for a dir written before the log existed."""
        pattern = FileSystems.join(self._dir, features.EVENTS_PATTERN)
        if not FileSystems.match([pattern])[0].metadata_list:
            return pbegin | "NoEvents" >> beam.Create([])
        return (pbegin
                | "Read[events]" >> beam.io.ReadFromTFRecord(pattern)
                | "Parse[events]" >> beam.FlatMap(_parse_events))
