"""`segrec preprocess`: raw interaction logs -> the dataset dir (Apache Beam).

    sources --ReadAndParse--> records ----DedupeById---------> items, users
                         \--> dead letters (per reason)            |
    interactions --JoinCatalog(item_id)--> known, filtered ---BuildExamples(user_id)
                                                                   |
    train-*.tfrecord.gz  eval-*.tfrecord.gz  items-*.tfrecord.gz  vocab/  users.jsonl
    dead_letter/*.jsonl  stats.json  metadata.json

`build_pipeline(p, config)` is pure (where it runs is decided by the
PipelineOptions alone: DirectRunner here, Dataflow/Flink/Spark by flags);
`run(config, beam_args)` runs it, then checks that every row read was
accepted, filtered or dead-lettered and writes stats.json and metadata.json.
"""

from __future__ import annotations

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
    cutoff_quantile: Optional[float] = None  # global cutoff at this time quantile
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

    cutoff = None
    if config.policy.split == ex.GLOBAL_CUTOFF and config.policy.cutoff is None:
        q = config.cutoff_quantile
        cutoff_pc = (
            joined.interactions
            | "Timestamps" >> beam.Map(lambda kv: kv[1].timestamp)
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(1000)
            | "PickCutoff" >> beam.Map(lambda qs: int(qs[min(len(qs) - 1, round(q * (len(qs) - 1)))]) if qs else 0)
        )
        counts.append(cutoff_pc | "CutoffCount" >> beam.Map(lambda c: ("value.cutoff", c)))
        cutoff = beam.pvalue.AsSingleton(cutoff_pc)

    titles = beam.pvalue.AsDict(catalog | "Titles" >> beam.Map(lambda r: (r.item_id, r.title)))
    built = (
        {"interactions": joined.interactions,
         "users": users | "KeyUsers" >> beam.Map(lambda r: (r.user_id, r))}
        | "GroupByUser" >> beam.CoGroupByKey()
        | "BuildExamples" >> beam.ParDo(
            T.BuildExamples(config.policy, config.min_user_interactions), titles=titles, cutoff=cutoff
        ).with_outputs(T.TRAIN, T.EVAL, T.COUNTS)
    )
    counts.append(built[T.COUNTS])
    train, eval_ = built[T.TRAIN], built[T.EVAL]

    # --- Outputs ---
    for name, pcoll in ((features.TRAIN_PREFIX, train), (features.EVAL_PREFIX, eval_)):
        (pcoll
         | f"Serialize[{name}]" >> beam.Map(ex.serialize_example)
         | f"Write[{name}]" >> beam.io.WriteToTFRecord(_path(config, name), file_name_suffix=features.TFRECORD_SUFFIX))
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
        T.count_elements(eval_, "examples.eval"),
    ]
    counts | "FlattenCounts" >> beam.Flatten() | "Counts" >> T.WriteCounts(_path(config, COUNTS_FILE))


def _write_single(pcoll, path: str, label: str) -> None:
    """Writes pcoll's text elements to exactly `path` (one shard, no suffix)."""
    pcoll | f"Write[{label}]" >> beam.io.WriteToText(path, num_shards=1, shard_name_template="")


# --- Driver -----------------------------------------------------------------

OUTPUT_GLOBS = (
    features.TRAIN_PATTERN, features.EVAL_PATTERN, features.ITEMS_PATTERN, features.USERS_FILE,
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
    stats["items"] = counts.get("accepted.items", 0)
    stats["examples"] = {ex.TRAIN: counts.get("examples.train", 0), ex.EVAL: counts.get("examples.eval", 0)}
    stats["examples_skipped_min_history"] = counts.get("examples_skipped_min_history", 0)
    if "value.cutoff" in counts:
        stats["cutoff"] = counts["value.cutoff"]
    return stats


def written_files(output_dir: str) -> dict:
    groups = {
        "train": features.TRAIN_PATTERN, "eval": features.EVAL_PATTERN, "items": features.ITEMS_PATTERN,
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
    if not stats["balanced"]:
        raise RuntimeError(f"row accounting does not balance (a segrec bug): {json.dumps(stats['rows'])}")
    outputs.write_text(_path(config, features.STATS_FILE), json.dumps(stats, indent=2, sort_keys=True) + "\n")
    outputs.write_text(_path(config, features.METADATA_FILE), json.dumps(_metadata(config, stats, runner, seconds), indent=2) + "\n")
    return PreprocessSummary(config.output_dir, stats, written_files(config.output_dir), seconds)


def _metadata(config: PreprocessConfig, stats: dict, runner: str, seconds: float) -> dict:
    policy = dataclasses.asdict(config.policy)
    if "cutoff" in stats:
        policy["cutoff"] = stats["cutoff"]
    return {
        "schema_version": features.SCHEMA_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "name": config.source_name,
            "inputs": [{"kind": s.kind, "path": s.path, "format": s.format} for s in config.sources],
        },
        "split": policy,
        "cutoff_quantile": config.cutoff_quantile,
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
    lines.append(f"  examples: train {s['examples']['train']:,}   eval {s['examples']['eval']:,}")
    for name, paths in summary.files.items():
        if paths:
            where = paths[0] if len(paths) == 1 else f"{posixpath.dirname(paths[0])}/ ({len(paths)} files)"
            lines.append(f"  {name:<12} {where}")
    return "\n".join(lines)
