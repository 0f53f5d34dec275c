"""`segrec preprocess`: raw interaction logs -> the dataset dir (Apache Beam).

    sources --ReadAndParse--> records ----DedupeById---------> items, users
                         \--> dead letters (per reason)            |
    interactions --JoinCatalog(item_id)--> known, filtered ---BuildExamples(user_id)
                                                                   |
    train-*.tfrecord.gz  valid-*.tfrecord.gz  eval-*.tfrecord.gz (test)  events-*.tfrecord.gz
    items-*.tfrecord.gz  vocab/  users.jsonl  dead_letter/*.jsonl  stats.json  metadata.json

`build_pipeline(p, config)` is pure (where it runs is decided by the
PipelineOptions alone: DirectRunner here, Dataflow/Flink/Spark by flags);
`run(config, beam_args)` runs it, then checks that every row read was
accepted, filtered or dead-lettered and writes stats.json and metadata.json.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import json
import logging
import posixpath
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipelines import outputs
from beam_pipelines import transforms as T
from beam_pipelines.sources import readers, records
from trainer import features
from trainer.data import examples as ex

_LOG = logging.getLogger("segrec.preprocess")
COUNTS_FILE = "_counts.json"


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Settings of one `segrec preprocess` run (built by the CLI adapter)."""

    sources: tuple  # tuple[readers.SourceSpec, ...]
    output_dir: str
    source_name: str = "generic"
    policy: ex.ExamplePolicy = ex.ExamplePolicy()
    cutoff_quantile: Optional[float] = None  # global cutoff (test starts) at this time quantile
    valid_cutoff_quantile: Optional[float] = None  # validation starts here (default: see pick_cutoffs)
    repeats: str = ex.DEFAULT_REPEATS  # the repeat rule recorded for training, evaluation and serving
    min_user_interactions: int = 1
    min_item_interactions: int = 0
    min_rating: Optional[float] = None
    max_tags: int = 10
    overwrite: bool = False

    def __post_init__(self):
        kinds = [s.kind for s in self.sources]
        if records.INTERACTIONS not in kinds or records.ITEMS not in kinds:
            raise ValueError("preprocess needs an interactions source and an items source")
        if self.cutoff_quantile is not None and not 0.0 < self.cutoff_quantile < 1.0:
            raise ValueError(f"cutoff_quantile must be in (0, 1), got {self.cutoff_quantile}")
        if self.policy.split == ex.GLOBAL_CUTOFF and self.policy.cutoff is None and self.cutoff_quantile is None:
            raise ValueError("the global_cutoff split needs --cutoff TIMESTAMP or --cutoff-quantile Q")
        if self.valid_cutoff_quantile is not None:
            if not 0.0 < self.valid_cutoff_quantile < 1.0:
                raise ValueError(f"valid_cutoff_quantile must be in (0, 1), got {self.valid_cutoff_quantile}")
            if self.cutoff_quantile is not None and self.valid_cutoff_quantile >= self.cutoff_quantile:
                raise ValueError(f"valid_cutoff_quantile ({self.valid_cutoff_quantile}) must be below "
                                 f"cutoff_quantile ({self.cutoff_quantile}): validation comes before test")
        if (self.policy.split == ex.GLOBAL_CUTOFF and self.policy.cutoff is None and self.policy.valid_cutoff is None
                and self.valid_cutoff_quantile is None and self.cutoff_quantile is not None
                and self.cutoff_quantile <= 0.5):
            raise ValueError(f"--cutoff-quantile {self.cutoff_quantile} leaves no room for a validation period as long "
                             "as the test period before it; pass --valid-cutoff-quantile or --valid-cutoff")
        if self.repeats not in ex.REPEAT_RULES:
            raise ValueError(f"repeats must be one of {ex.REPEAT_RULES}, got {self.repeats!r}")
        if self.min_user_interactions < 0 or self.min_item_interactions < 0:
            raise ValueError("minimum interaction counts must be >= 0")


PreprocessSummary = outputs.PipelineSummary


def _specs(config: PreprocessConfig, kind: str) -> list:
    return [s for s in config.sources if s.kind == kind]


def _path(config: PreprocessConfig, *parts: str) -> str:
    return FileSystems.join(config.output_dir, *parts)


def build_pipeline(p: beam.Pipeline, config: PreprocessConfig) -> None:
    """Adds every preprocessing step to `p`; writes under config.output_dir."""
    dead, counts = [], []

    def read(kind):
        specs = _specs(config, kind)
        if not specs:
            return p | f"No[{kind}]" >> beam.Create([])
        rows, bad, cnt = p | f"Read[{kind}]" >> T.ReadSource(specs)
        dead.append(bad)
        counts.append(cnt)
        return rows

    items = read(records.ITEMS)
    users = read(records.USERS)
    tags = read(records.TAGS)
    interactions = read(records.INTERACTIONS)

    items = items | "DedupeItems" >> T.DedupeById(records.ITEMS, "item_id")
    users_out = users | "DedupeUsers" >> T.DedupeById(records.USERS, "user_id")
    dead += [items[T.DEAD], users_out[T.DEAD]]
    users = users_out.records

    tagged = (
        {"items": items.records | "KeyItems" >> beam.Map(lambda r: (r.item_id, r)),
         "tags": tags | "KeyTags" >> beam.Map(lambda r: (r.item_id, r))}
        | "GroupTags" >> beam.CoGroupByKey()
        | "AttachTags" >> beam.ParDo(T.AttachTags(config.max_tags)).with_outputs(T.DEAD, T.COUNTS, main="items")
    )
    dead.append(tagged[T.DEAD])
    counts.append(tagged[T.COUNTS])

    joined = (
        {"items": tagged.items | "KeyCatalog" >> beam.Map(lambda r: (r.item_id, r)),
         "interactions": interactions | "KeyByItem" >> beam.Map(lambda r: (r.item_id, r))}
        | "GroupByItem" >> beam.CoGroupByKey()
        | "JoinCatalog" >> beam.ParDo(T.JoinCatalog(config.min_rating, config.min_item_interactions)).with_outputs(
            T.DEAD, T.COUNTS, T.CATALOG, main="interactions")
    )
    dead.append(joined[T.DEAD])
    counts.append(joined[T.COUNTS])
    catalog = joined[T.CATALOG]

    cutoffs = None
    policy = config.policy
    if policy.split == ex.GLOBAL_CUTOFF and (policy.cutoff is None or policy.valid_cutoff is None):
        cutoffs_pc = (
            joined.interactions
            | "Timestamps" >> beam.Map(lambda kv: kv[1].timestamp)
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(1000)
            | "PickCutoffs" >> beam.Map(pick_cutoffs, policy, config.cutoff_quantile, config.valid_cutoff_quantile)
        )
        counts.append(cutoffs_pc | "CutoffCounts" >> beam.FlatMap(
            lambda c: [("value.valid_cutoff", c[0]), ("value.cutoff", c[1])]))
        cutoffs = beam.pvalue.AsSingleton(cutoffs_pc)

    titles = beam.pvalue.AsDict(catalog | "Titles" >> beam.Map(lambda r: (r.item_id, r.title)))
    built = (
        {"interactions": joined.interactions,
         "users": users | "KeyUsers" >> beam.Map(lambda r: (r.user_id, r))}
        | "GroupByUser" >> beam.CoGroupByKey()
        | "BuildExamples" >> beam.ParDo(
            T.BuildExamples(config.policy, config.min_user_interactions), titles=titles, cutoffs=cutoffs
        ).with_outputs(T.TRAIN, T.VALID, T.EVAL, T.EVENTS, T.COUNTS)
    )
    counts.append(built[T.COUNTS])
    train, valid, eval_ = built[T.TRAIN], built[T.VALID], built[T.EVAL]

    # --- Outputs ---
    for name, pcoll in ((features.TRAIN_PREFIX, train), (features.VALID_PREFIX, valid), (features.EVAL_PREFIX, eval_)):
        (pcoll
         | f"Serialize[{name}]" >> beam.Map(ex.serialize_example)
         | f"Write[{name}]" >> beam.io.WriteToTFRecord(_path(config, name), file_name_suffix=features.TFRECORD_SUFFIX))
    (built[T.EVENTS]
     | "SerializeEvents" >> beam.Map(ex.serialize_events)
     | "WriteEvents" >> beam.io.WriteToTFRecord(_path(config, features.EVENTS_PREFIX),
                                                file_name_suffix=features.TFRECORD_SUFFIX))
    (catalog
     | "SerializeItems" >> beam.Map(lambda r: ex.serialize_item(r.item_id, r.title, r.categories, r.description))
     | "WriteItems" >> beam.io.WriteToTFRecord(_path(config, features.ITEMS_PREFIX), file_name_suffix=features.TFRECORD_SUFFIX))
    _write_single(
        users | "UserJson" >> beam.Map(lambda u: json.dumps({"user_id": u.user_id, **u.attribute_dict()}, sort_keys=True)),
        _path(config, features.USERS_FILE), "Users")

    item_counts = (
        (catalog | "ItemZero" >> beam.Map(lambda r: (r.item_id, 0)),
         train | "ItemOne" >> beam.Map(lambda e: (e[features.ITEM_ID], 1)))
        | "FlattenItemCounts" >> beam.Flatten()
        | "SumItems" >> beam.CombinePerKey(sum)
    )
    user_counts = train | "UserOne" >> beam.Map(lambda e: (e[features.USER_ID], 1)) | "SumUsers" >> beam.CombinePerKey(sum)
    category_counts = (
        catalog | "Categories" >> beam.FlatMap(lambda r: [(c, 1) for c in r.categories]) | "SumCategories" >> beam.CombinePerKey(sum)
    )
    _write_single(item_counts | "ItemVocab" >> T.SortedVocab(), _path(config, features.ITEM_VOCAB), "ItemVocab")
    _write_single(item_counts | "ItemCountsTsv" >> T.SortedVocab(with_counts=True), _path(config, features.ITEM_COUNTS), "ItemCounts")
    _write_single(user_counts | "UserVocab" >> T.SortedVocab(), _path(config, features.USER_VOCAB), "UserVocab")
    _write_single(category_counts | "CategoryVocab" >> T.SortedVocab(), _path(config, features.CATEGORY_VOCAB), "CategoryVocab")

    dead_all = dead | "FlattenDead" >> beam.Flatten()
    (dead_all
     | "DeadJson" >> beam.Map(lambda d: d.to_json())
     | "WriteDead" >> beam.io.WriteToText(_path(config, features.DEAD_LETTER_DIR, "dead_letter"), file_name_suffix=".jsonl"))

    counts += [
        dead_all | "DeadKeys" >> beam.Map(lambda d: (f"dead.{d.source}.{d.reason}", 1)),
        T.count_elements(catalog, "accepted.items"),
        T.count_elements(users, "accepted.users"),
        T.count_elements(train, "examples.train"),
        T.count_elements(valid, "examples.valid"),
        T.count_elements(eval_, "examples.eval"),
    ]
    counts | "FlattenCounts" >> beam.Flatten() | "Counts" >> T.WriteCounts(_path(config, COUNTS_FILE))


def pick_cutoffs(quantiles, policy: ex.ExamplePolicy, cutoff_quantile: Optional[float],
                 valid_cutoff_quantile: Optional[float]) -> tuple:
    """(valid_cutoff, cutoff) of a global-cutoff split from the interactions'
    time quantiles (sorted, ~1000 of them).

    cutoff: policy.cutoff, else the `cutoff_quantile` quantile. valid_cutoff:
    policy.valid_cutoff, else the `valid_cutoff_quantile` quantile, else the
    quantile that gives the validation period as many events as the test
    period (2q - 1 for a test cutoff at quantile q). Raises ValueError when
    the validation period would be empty.
    """
    qs = [int(q) for q in quantiles]
    if not qs:
        return (policy.valid_cutoff or 0, policy.cutoff or 0)

    def at(q):
        return qs[min(len(qs) - 1, max(0, round(q * (len(qs) - 1))))]

    cutoff = policy.cutoff if policy.cutoff is not None else at(cutoff_quantile)
    if policy.valid_cutoff is not None:
        valid_cutoff = policy.valid_cutoff
    else:
        q = valid_cutoff_quantile
        if q is None:
            test_q = cutoff_quantile if policy.cutoff is None else bisect.bisect_left(qs, cutoff) / max(len(qs) - 1, 1)
            q = 2.0 * test_q - 1.0
            if q <= 0.0:
                raise ValueError(f"the test period starts at quantile {test_q:.3f} of time: no room for a validation "
                                 "period as long before it; pass --valid-cutoff or --valid-cutoff-quantile")
        valid_cutoff = at(q)
    if valid_cutoff >= cutoff:
        raise ValueError(f"the validation cutoff {valid_cutoff} is not earlier than the test cutoff {cutoff}: "
                         "the validation period would be empty; pass an earlier --valid-cutoff/--valid-cutoff-quantile")
    return int(valid_cutoff), int(cutoff)


def _write_single(pcoll, path: str, label: str) -> None:
    """Writes pcoll's text elements to exactly `path` (one shard, no suffix)."""
    pcoll | f"Write[{label}]" >> beam.io.WriteToText(path, num_shards=1, shard_name_template="")


# --- Driver -----------------------------------------------------------------

OUTPUT_GLOBS = (
    features.TRAIN_PATTERN, features.VALID_PATTERN, features.EVAL_PATTERN, features.EVENTS_PATTERN,
    features.ITEMS_PATTERN, features.USERS_FILE,
    features.VOCAB_DIR + "/*", features.DEAD_LETTER_DIR + "/*", features.STATS_FILE, features.METADATA_FILE, COUNTS_FILE,
)


def prepare_output_dir(config: PreprocessConfig) -> None:
    """Refuses to mix a new dataset with an old one's shards unless --overwrite."""
    outputs.prepare_output_dir(config.output_dir, OUTPUT_GLOBS, config.overwrite, "a dataset")


def compose_stats(counts: dict) -> dict:
    """stats.json from the summed counts; raises if any row is unaccounted for."""
    stats = {"rows": {}, "dead_letter": {}, "filtered": {}, "balanced": True}
    for kind in records.KINDS:
        read = counts.get(f"read.{kind}", 0)
        dead = {k.split(".")[2]: v for k, v in counts.items() if k.startswith(f"dead.{kind}.")}
        if kind == records.INTERACTIONS:
            filtered = {r: counts.get(f"filtered.{r}", 0) for r in T.FILTER_REASONS}
            accepted = counts.get("accepted.interactions", 0)
        elif kind == records.ITEMS:
            filtered = {T.ITEM_MIN_INTERACTIONS: counts.get("filtered_items.min_interactions", 0)}
            accepted = counts.get("accepted.items", 0)
        elif kind == records.USERS:
            filtered, accepted = {}, counts.get("accepted.users", 0)
        else:
            filtered, accepted = {}, counts.get("accepted.tags", 0)
        if not read and not dead and not accepted:
            continue
        n_dead, n_filtered = sum(dead.values()), sum(filtered.values())
        balanced = read == accepted + n_dead + n_filtered
        stats["rows"][kind] = {
            "read": read, "accepted": accepted, "dead_lettered": n_dead, "filtered": n_filtered, "balanced": balanced,
        }
        stats["dead_letter"][kind] = dict(sorted(dead.items()))
        stats["filtered"][kind] = {k: v for k, v in filtered.items() if v}
        stats["balanced"] &= balanced
    stats["users"] = counts.get("users_with_examples", 0)
    stats["users_without_eval"] = counts.get("users_without_eval", 0)
    stats["users_without_valid"] = counts.get("users_without_valid", 0)
    stats["items"] = counts.get("accepted.items", 0)
    stats["examples"] = {s: counts.get(f"examples.{s}", 0) for s in ex.SPLIT_NAMES}
    # Events per period: the training and validation periods' are in events-*, the test period's are
    # exactly the eval examples.
    stats["events"] = {ex.TRAIN: counts.get("events.train", 0), ex.VALID: counts.get("events.valid", 0),
                       ex.EVAL: counts.get("examples.eval", 0)}
    stats["examples_skipped_min_history"] = counts.get("examples_skipped_min_history", 0)
    for key in ("cutoff", "valid_cutoff"):
        if f"value.{key}" in counts:
            stats[key] = counts[f"value.{key}"]
    return stats


def written_files(output_dir: str) -> dict:
    groups = {
        "train": features.TRAIN_PATTERN, "valid": features.VALID_PATTERN, "eval": features.EVAL_PATTERN,
        "events": features.EVENTS_PATTERN, "items": features.ITEMS_PATTERN,
        "users": features.USERS_FILE, "vocab": features.VOCAB_DIR + "/*", "dead_letter": features.DEAD_LETTER_DIR + "/*",
        "stats": features.STATS_FILE, "metadata": features.METADATA_FILE,
    }
    return {
        name: sorted(m.path for m in FileSystems.match([FileSystems.join(output_dir, pat)])[0].metadata_list)
        for name, pat in groups.items()
    }


def run(config: PreprocessConfig, beam_args: Sequence[str] = ()) -> PreprocessSummary:
    """Checks the inputs, runs the pipeline, writes stats.json and metadata.json."""
    for spec in config.sources:
        readers.check_source(spec)
    prepare_output_dir(config)
    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    runner = options.view_as(StandardOptions).runner
    _LOG.info("preprocess: %d sources -> %s on %s", len(config.sources), config.output_dir, runner)
    start = time.time()
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, config)
    seconds = time.time() - start

    counts_path = _path(config, COUNTS_FILE)
    counts = json.loads(outputs.read_text(counts_path))
    FileSystems.delete([counts_path])
    stats = compose_stats(counts)
    # Every accepted interaction is one event of exactly one period (train, valid, or a test example).
    stats["balanced"] &= sum(stats["events"].values()) == stats["rows"].get("interactions", {}).get("accepted", 0)
    if not stats["balanced"]:
        # Rows vanished between reading and writing: a segrec bug, or a runner that lost data (the
        # multi-process DirectRunner did at 10M rows: bench/results/scale_preprocess.md). Nothing is
        # published: without stats.json and metadata.json the dir is not a dataset dir.
        raise RuntimeError(f"row accounting does not balance, rows were lost between reading and writing (a segrec "
                           f"bug or the runner's; {config.output_dir} is not a usable dataset dir): "
                           f"{json.dumps(stats['rows'])}, events per period {json.dumps(stats['events'])}")
    outputs.write_text(_path(config, features.STATS_FILE), json.dumps(stats, indent=2, sort_keys=True) + "\n")
    outputs.write_text(_path(config, features.METADATA_FILE), json.dumps(_metadata(config, stats, runner, seconds), indent=2) + "\n")
    return PreprocessSummary(config.output_dir, stats, written_files(config.output_dir), seconds)


def _metadata(config: PreprocessConfig, stats: dict, runner: str, seconds: float) -> dict:
    policy = dataclasses.asdict(config.policy)
    for key in ("cutoff", "valid_cutoff"):
        if key in stats:
            policy[key] = stats[key]
    return {
        "schema_version": features.SCHEMA_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "name": config.source_name,
            "inputs": [{"kind": s.kind, "path": s.path, "format": s.format} for s in config.sources],
        },
        "split": policy,
        "cutoff_quantile": config.cutoff_quantile,
        "valid_cutoff_quantile": config.valid_cutoff_quantile,
        # What each split is for, and which events its queries see (trainer.data.examples.VISIBLE_SPLITS).
        "splits": {
            ex.TRAIN: {"role": "fitting", "queries_see": list(ex.VISIBLE_SPLITS[ex.TRAIN])},
            ex.VALID: {"role": "validation: early stopping, best checkpoint, K, beta, baseline hyper-parameters",
                       "queries_see": list(ex.VISIBLE_SPLITS[ex.VALID])},
            ex.EVAL: {"role": "test: read once, by segrec evaluate", "queries_see": list(ex.VISIBLE_SPLITS[ex.EVAL])},
        },
        # The repeat rule: "exclude" ranks every query without the items the user consumed before it
        # (repeat targets reported apart); "allow" removes nothing (trainer.data.examples.repeat_exclusion).
        "repeats": config.repeats,
        "filters": {
            "min_user_interactions": config.min_user_interactions,
            "min_item_interactions": config.min_item_interactions,
            "min_rating": config.min_rating,
        },
        "runner": runner,
        "seconds": round(seconds, 2),
        "examples": stats["examples"],
    }


def format_summary(summary: PreprocessSummary) -> str:
    """The human-readable end-of-run summary the CLI prints."""
    s = summary.stats
    lines = [f"preprocess finished in {summary.seconds:.1f}s -> {summary.output_dir}"]
    for kind, row in s["rows"].items():
        lines.append(
            f"  {kind:<13} read {row['read']:>9,}  accepted {row['accepted']:>9,}  "
            f"dead-lettered {row['dead_lettered']:>7,}  filtered {row['filtered']:>7,}"
        )
        for reason, n in s["dead_letter"].get(kind, {}).items():
            lines.append(f"      dead-letter {reason}: {n:,}")
        for reason, n in s["filtered"].get(kind, {}).items():
            lines.append(f"      filtered {reason}: {n:,}")
    lines.append(f"  users with examples {s['users']:,}   items in catalog {s['items']:,}")
    lines.append(f"  examples: train {s['examples']['train']:,}   valid {s['examples']['valid']:,}   "
                 f"eval (test) {s['examples']['eval']:,}")
    for name, paths in summary.files.items():
        if paths:
            where = paths[0] if len(paths) == 1 else f"{posixpath.dirname(paths[0])}/ ({len(paths)} files)"
            lines.append(f"  {name:<12} {where}")
    return "\n".join(lines)
