"""The steps of `segrec preprocess`, one DoFn or composite PTransform each.

Every step that can reject a row sends it to the tagged DEAD output as a
`records.DeadLetter` (never dropped silently), and every step reports what it
did on the tagged COUNTS output as (key, n) pairs, which the pipeline sums
into stats.json. Beam Metrics counters mirror the counts for live monitoring
(Dataflow's UI, DirectRunner's result).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from beam_pipelines.sources import files, readers, records, source_spec
from trainer import features
from trainer.data import examples as ex

DEAD = "dead_letter"
COUNTS = "counts"
CATALOG = "catalog"
TRAIN = ex.TRAIN
VALID = ex.VALID
EVAL = ex.EVAL
EVENTS = "events"

NAMESPACE = "segrec.preprocess"
PROGRESS_EVERY = 100_000
_LOG = logging.getLogger(NAMESPACE)

# Filter reasons: rows that are valid but not used. They are counted, not
# dead-lettered, because nothing is wrong with them.
DUPLICATE = "duplicate"
BELOW_MIN_RATING = "below_min_rating"
ITEM_MIN_INTERACTIONS = "item_min_interactions"
USER_MIN_INTERACTIONS = "user_min_interactions"
FILTER_REASONS = (DUPLICATE, BELOW_MIN_RATING, ITEM_MIN_INTERACTIONS, USER_MIN_INTERACTIONS)


def _dead(kind: str, location: str, reason: str, detail: str, raw: object) -> pvalue.TaggedOutput:
    Metrics.counter(NAMESPACE, f"dead_letter.{kind}.{reason}").inc()
    letter = records.DeadLetter(kind, location, reason, detail, records.raw_text(raw))
    return pvalue.TaggedOutput(DEAD, letter)


def tagged_count(key: str, n: int = 1) -> pvalue.TaggedOutput:
    """(key, n) on the COUNTS output: what a step reports for stats.json."""
    return pvalue.TaggedOutput(COUNTS, (key, n))


_LOC = re.compile(r"^(.*):(?:row )?(\d+)$")


def location_key(location: str) -> tuple:
    """Sort key of "path:line" / "path:row N": by file, then numerically by line."""
    m = _LOC.match(location)
    return (m.group(1), int(m.group(2))) if m else (location, 0)


class ReadAndParse(beam.DoFn):
    """SourceSpec -> records of its kind; bad rows -> DEAD; rows read -> COUNTS.

    One element per source spec; the files of a spec are read in order, so
    every row keeps its "path:line" location for the dead-letter output.
    """

    def process(self, spec: source_spec.SourceSpec):
        kind = spec.kind
        read_counter = Metrics.counter(NAMESPACE, f"read.{kind}")
        total = 0
        for path in files.expand_paths(spec):
            n = 0
            for row in files.iter_raw_rows(spec, path):
                n += 1
                read_counter.inc()
                try:
                    yield readers.parse_row(spec, row)
                except records.RowError as err:
                    yield _dead(kind, row.location, err.reason, err.detail, row.payload)
                if n % PROGRESS_EVERY == 0:
                    _LOG.info("read %s: %d rows from %s", kind, n, path)
            total += n
            _LOG.info("read %s: %d rows from %s (done)", kind, n, path)
        yield tagged_count(f"read.{kind}", total)


class KeepFirstById(beam.DoFn):
    """(id, [records]) -> the first record by source location; others -> DEAD."""

    def __init__(self, kind: str):
        self._kind = kind

    def process(self, element):
        key, group = element
        group = sorted(group, key=lambda r: location_key(r.location))
        yield group[0]
        for dup in group[1:]:
            yield _dead(
                self._kind,
                dup.location,
                records.DUPLICATE_ID,
                f"{self._kind[:-1]} id {key!r} already defined at {group[0].location}",
                repr(dup),
            )


class DedupeById(beam.PTransform):
    """Catalog/user rows unique by id; later duplicates go to the dead letter."""

    def __init__(self, kind: str, id_field: str):
        super().__init__()
        self._kind = kind
        self._id_field = id_field

    def expand(self, pcoll):
        id_field = self._id_field
        return (
            pcoll
            | "KeyById" >> beam.Map(lambda r: (getattr(r, id_field), r))
            | "GroupById" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(KeepFirstById(self._kind)).with_outputs(DEAD, main="records")
        )


class AttachTags(beam.DoFn):
    """(item_id, {items, tags}) -> item with its most frequent tags in the description.

    Tags naming an item that is not in the catalog -> DEAD (unknown_item).
    """

    def __init__(self, max_tags: int = 10):
        self._max_tags = max_tags

    def process(self, element):
        item_id, grouped = element
        items, tags = list(grouped["items"]), list(grouped["tags"])
        if not items:
            for tag in tags:
                yield _dead(records.TAGS, tag.location, records.UNKNOWN_ITEM, f"tag names item {item_id!r} not in the catalog", repr(tag))
            return
        item = items[0]
        if tags:
            freq = {}
            for tag in tags:
                t = tag.tag.strip().lower()
                if t:
                    freq[t] = freq.get(t, 0) + 1
            top = sorted(freq, key=lambda t: (-freq[t], t))[: self._max_tags]
            if top:
                desc = (item.description + ". " if item.description else "") + "tags: " + ", ".join(top)
                item = records.Item(item.item_id, item.title, item.categories, desc, item.location)
            yield tagged_count("accepted.tags", len(tags))
        yield item


class JoinCatalog(beam.DoFn):
    """(item_id, {interactions, items}) -> interactions of known, kept items.

    In order: interactions naming an unknown item -> DEAD; exact duplicates
    (same user, item, timestamp) and ratings below `min_rating` are filtered;
    an item left with fewer than `min_item_interactions` is dropped with its
    interactions. Kept catalog items go to the CATALOG output with their
    interaction count.
    """

    def __init__(self, min_rating, min_item_interactions: int):
        self._min_rating = min_rating
        self._min_item = min_item_interactions

    def process(self, element):
        item_id, grouped = element
        items, inters = list(grouped["items"]), list(grouped["interactions"])
        if not items:
            for r in inters:
                yield _dead(records.INTERACTIONS, r.location, records.UNKNOWN_ITEM, f"item_id {item_id!r} is not in the item catalog", repr(r))
            return
        inters.sort(key=lambda r: location_key(r.location))
        kept, seen = [], set()
        for r in inters:
            key = (r.user_id, r.timestamp)
            if key in seen:
                yield tagged_count(f"filtered.{DUPLICATE}")
                continue
            seen.add(key)
            if self._min_rating is not None and r.rating is not None and r.rating < self._min_rating:
                yield tagged_count(f"filtered.{BELOW_MIN_RATING}")
                continue
            kept.append(r)
        if len(kept) < self._min_item:
            if kept:
                yield tagged_count(f"filtered.{ITEM_MIN_INTERACTIONS}", len(kept))
            yield tagged_count("filtered_items.min_interactions")
            return
        yield pvalue.TaggedOutput(CATALOG, items[0])
        for r in kept:
            yield (r.user_id, r)


class BuildExamples(beam.DoFn):
    """(user_id, {interactions, users}) -> TRAIN / VALID / EVAL example dicts,
    and the user's EVENTS record (training- and validation-period events).

    Side inputs: `titles` (item_id -> title) for user_text, and `cutoffs`
    ((valid_cutoff, cutoff) timestamps of a global-cutoff split computed by
    the pipeline, or None) for the split.
    """

    def __init__(self, policy: ex.ExamplePolicy, min_user_interactions: int):
        self._policy = policy
        self._min_user = min_user_interactions
        self._users = Metrics.counter(NAMESPACE, "users_with_examples")

    def process(self, element, titles, cutoffs=None):
        user_id, grouped = element
        inters = list(grouped["interactions"])
        users = list(grouped["users"])
        if not inters:
            return
        if len(inters) < self._min_user:
            yield tagged_count(f"filtered.{USER_MIN_INTERACTIONS}", len(inters))
            return
        policy = self._policy
        if cutoffs is not None and policy.split == ex.GLOBAL_CUTOFF:
            policy = dataclasses.replace(policy, valid_cutoff=int(cutoffs[0]), cutoff=int(cutoffs[1]))
        attributes = users[0].attribute_dict() if users else {}
        events = [ex.Event(r.item_id, r.timestamp, r.weight) for r in inters]
        built, skipped = ex.build_user_examples(user_id, events, attributes, titles, policy)
        record = ex.events_record(user_id, events, policy)
        yield tagged_count("accepted.interactions", len(inters))
        if skipped:
            yield tagged_count("examples_skipped_min_history", skipped)
        n_split = {split: sum(1 for s, _ in built if s == split) for split in (TRAIN, VALID, EVAL)}
        yield tagged_count("users_with_examples")
        if n_split[EVAL] == 0:
            yield tagged_count("users_without_eval")
        if n_split[VALID] == 0:
            yield tagged_count("users_without_valid")
        for split in (TRAIN, VALID):
            n = record[features.EVENT_SPLITS].count(split)
            if n:
                yield tagged_count(f"events.{split}", n)
        self._users.inc()
        for split, example in built:
            yield pvalue.TaggedOutput(split, example)
        yield pvalue.TaggedOutput(EVENTS, record)


class ReadSource(beam.PTransform):
    """Source specs of one kind -> (records, dead letters, counts)."""

    def __init__(self, specs):
        super().__init__()
        self._specs = list(specs)

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "Specs" >> beam.Create(self._specs)
            | "ReadAndParse" >> beam.ParDo(ReadAndParse()).with_outputs(DEAD, COUNTS, main="records")
        )
        # Reading a file is serial; spread the parsed rows over workers.
        rows = parsed.records | "Spread" >> beam.Reshuffle()
        return rows, parsed[DEAD], parsed[COUNTS]


def count_elements(pcoll, key: str):
    """A PCollection of one (key, n) pair: the number of elements of pcoll."""
    return pcoll | f"Count[{key}]" >> beam.combiners.Count.Globally() | f"Key[{key}]" >> beam.Map(lambda n: (key, n))


class SortedVocab(beam.PTransform):
    """(token, count) pairs -> one text element: tokens by count desc, then token.

    With_counts also emits a TSV element ("token<TAB>count" lines).
    """

    def __init__(self, with_counts: bool = False):
        super().__init__()
        self._with_counts = with_counts

    def expand(self, pcoll):
        with_counts = self._with_counts

        def render(pairs):
            pairs = sorted(pairs, key=lambda kv: (-kv[1], kv[0]))
            if with_counts:
                return "\n".join(f"{k}\t{v}" for k, v in pairs)
            return "\n".join(k for k, _ in pairs)

        return pcoll | "ToList" >> beam.combiners.ToList() | "Render" >> beam.Map(render)


def counts_json(pairs) -> str:
    """Summed (key, n) pairs as one JSON object, keys sorted."""
    return json.dumps(dict(sorted(pairs)), sort_keys=True)


class WriteCounts(beam.PTransform):
    """(key, n) pairs -> their per-key sums as one JSON object in exactly
    `path` (the driver reads it back to compose stats.json)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, pairs):
        return (pairs
                | "SumCounts" >> beam.CombinePerKey(sum)
                | "AllCounts" >> beam.combiners.ToList()
                | "CountsJson" >> beam.Map(counts_json)
                | "WriteCounts" >> beam.io.WriteToText(self._path, num_shards=1, shard_name_template=""))
