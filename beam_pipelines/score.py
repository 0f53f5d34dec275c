"""`segrec score`: batch recommendations and segment assignments (Apache Beam RunInference).

    raw sources --ReadSource--> records --BuildUserQueries--> UserQuery per user
    (or) dataset dir --QueriesFromDataset-----------------/        \\--> dead letters
    UserQuery --RunSegRec(serving_exclude | serving_default, k, beta)--> --ToRecord--> one record per user
                                                 \\--> dead letters (model, inference_error)
    recommendations-*.jsonl / -*.parquet / BigQuery   dead_letter/*.jsonl   stats.json

Where the queries come from:
- raw input (the readers and source flags of `segrec preprocess`): each
  user's query as of `as_of` (default: after their last event, i.e. now),
  built by inference.user_queries.BuildUserQueries with preprocess's own
  query code.
- a dataset dir (what preprocess wrote): it holds no raw interactions, so
  the queries are the newest ones preprocess built: per user, the eval
  example with the latest timestamp (its history is the whole training
  period), else the latest training example. Their features ARE the
  model's eval queries, byte for byte; the user's held-out events are not
  in them (score raw input for "as of now"); inference.user_queries.QueriesFromDataset.

What a user gets back never holds what they already consumed: under the
repeat rule the model was trained with (export.json's "repeats", else the
training data's metadata.json) "exclude", each query carries the user's
whole consumed set (user_queries, consumed=True: every item of the events
the query may see, not only the <= max_history of its history) and runs
through the export's serving_exclude signature (`scoring_signature`). An
export older than serving_exclude is scored with serving_default, which
removes only the history, and a warning says so. Under "allow" nothing is
added (re-consumption is a legitimate recommendation; the history is still
removed, as in the graph).

One output record per scored user: user_id, segment_id, segment_label
(from the segments.json beside the model), items and scores (top-k, best
first, unfillable slots dropped) and model_version. A user whose query the
model rejects (even alone: a failing batch is retried one user at a time)
is dead-lettered with source "model", reason "inference_error" and the
error. stats.json checks users in = scored + dead-lettered (no query, or
rejected by the model), queries = scored + rejected, and records written =
scored. `build_pipeline` is pure; `run` decides nothing but options
(DirectRunner by default, single or multi-process; Dataflow by flags).

The model runs through inference.model_handler.RunSegRec, which encodes each
distinct user_text once per worker (the text-vector cache, when the export
has encode_text and serving_text_vector); the output record, its schemas and
its sinks are score_records'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipelines import outputs, preprocess, score_records
from beam_pipelines import transforms as T
from beam_pipelines.inference import model_handler, retrying, user_queries
from beam_pipelines.sources import readers, records
from serving.export import layout
from serving.server import text_cache
from trainer import features
from trainer.contracts import SERVING_DEFAULT, SERVING_EXCLUDE
from trainer.data import examples as ex
from trainer.segments import document as segments_doc

_LOG = logging.getLogger("segrec.score")

COUNTS_FILE = "_counts.json"
_BQ_TABLE = re.compile(r"^[\w.-]+:\w+\.[\w$-]+$")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Settings of one `segrec score` run (built by the CLI adapter).

    Exactly one of dataset_dir / sources. k, beta: None = the export's
    defaults (its model card). formats: file sinks under output_dir (may be
    empty when bigquery_table is set). as_of, window_seconds, cold_users,
    policy, min_rating: how raw input becomes queries (BuildUserQueries);
    policy None = the max_history / text_history the model was trained with
    (training_policy), so scored queries look like its training queries.
    text_cache_size: user texts whose encoder vectors a worker keeps, so
    each distinct user_text is encoded once per worker (0 = off; exports
    without encode_text / serving_text_vector score as before).
    """

    model_dir: str
    output_dir: str
    dataset_dir: Optional[str] = None
    sources: tuple = ()  # tuple[source_spec.SourceSpec, ...]
    source_name: str = "generic"
    policy: Optional[ex.ExamplePolicy] = None
    min_rating: Optional[float] = None
    as_of: Optional[int] = None
    window_seconds: Optional[int] = None
    cold_users: bool = False
    k: Optional[int] = None
    beta: Optional[float] = None
    min_batch_size: Optional[int] = None
    max_batch_size: Optional[int] = 256
    formats: tuple = (score_records.JSONL,)
    bigquery_table: Optional[str] = None
    overwrite: bool = False
    text_cache_size: int = text_cache.DEFAULT_SIZE

    def __post_init__(self):
        if bool(self.dataset_dir) == bool(self.sources):
            raise ValueError("score needs either --dataset-dir or raw input (--input-dir / --interactions + --items), not both")
        if self.sources:
            kinds = [s.kind for s in self.sources]
            if records.INTERACTIONS not in kinds or records.ITEMS not in kinds:
                raise ValueError("raw input needs an interactions source and an items source")
        elif self.as_of is not None or self.window_seconds is not None or self.cold_users:
            raise ValueError("--as-of, --window-days and --cold-users apply to raw input, not --dataset-dir")
        unknown = set(self.formats) - set(score_records.FORMATS)
        if unknown:
            raise ValueError(f"--format must be among {score_records.FORMATS}, got {sorted(unknown)}")
        if not self.formats and not self.bigquery_table:
            raise ValueError("nothing to write: give --format jsonl/parquet and/or --bigquery-table")
        if self.bigquery_table and not _BQ_TABLE.match(self.bigquery_table):
            raise ValueError(f"--bigquery-table {self.bigquery_table!r}: expected PROJECT:DATASET.TABLE")
        for name in ("min_batch_size", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.min_batch_size and self.max_batch_size and self.min_batch_size > self.max_batch_size:
            raise ValueError(f"--min-batch-size {self.min_batch_size} > --max-batch-size {self.max_batch_size}")
        if self.text_cache_size < 0:
            raise ValueError(f"text_cache_size must be >= 0, got {self.text_cache_size}")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know of the export, resolved on the driver."""

    version_dir: str
    version: int
    k: int
    beta: float
    labels: tuple  # segment id -> label (empty when the export has no segments.json)
    policy: ex.ExamplePolicy = ex.ExamplePolicy()  # the query policy raw input is built with
    signature: str = SERVING_DEFAULT  # SERVING_EXCLUDE: each query excludes the user's whole consumed set
    repeats: str = ex.DEFAULT_REPEATS  # the repeat rule the model was trained with

    @property
    def exclude_consumed(self) -> bool:
        return self.signature == SERVING_EXCLUDE


ScoreSummary = outputs.PipelineSummary


def resolve_model(config: ScoreConfig) -> ModelInfo:
    """The version to load and its k / beta / labels; a clear error for bad knobs."""
    version_dir = layout.resolve_version_dir(config.model_dir)
    defaults = layout.read_export_info(version_dir)
    k = config.k if config.k is not None else defaults.get("k")
    beta = config.beta if config.beta is not None else defaults.get("beta")
    if k is None or beta is None:
        raise records.InputError(f"{version_dir}: export.json records no default k/beta; pass --k and --beta")
    k_max = defaults.get("k_max")
    if not 1 <= k <= (k_max or k):
        raise ValueError(f"--k must be in [1, {k_max}] (the export's k_max), got {k}")
    if beta != beta or beta in (float("inf"), float("-inf")):
        raise ValueError(f"--beta must be finite, got {beta}")
    segments = segments_doc.load_beside(version_dir)
    labels = tuple(segments_doc.label_list(segments)) if segments else ()
    if not segments:
        _LOG.warning("%s has no segments.json: segment_label will be empty", version_dir)
    policy = config.policy or training_policy(version_dir)
    signature, repeats = scoring_signature(version_dir, defaults)
    return ModelInfo(version_dir, layout.model_version(version_dir), int(k), float(beta), labels, policy,
                     signature, repeats)


def scoring_signature(version_dir: str, info: dict) -> tuple:
    """(signature, repeat rule): serving_exclude (the user's whole consumed set removed) under the
    "exclude" rule when the export has it; serving_default under "allow", or, with a warning, for an
    export older than serving_exclude. info: the export's export.json."""
    rule = layout.repeat_rule(info) or _dataset_repeat_rule(info)
    if rule == ex.REPEATS_ALLOW:
        _LOG.info("repeat rule 'allow': consumed items may be recommended again (only the history is removed)")
        return SERVING_DEFAULT, rule
    if layout.has_signature(version_dir, info, SERVING_EXCLUDE):
        return SERVING_EXCLUDE, rule
    _LOG.warning("%s has no %s signature (exported before it existed): only each user's history (at most "
                 "max_history items) is removed, so already consumed items can be recommended; re-export "
                 "the model to exclude the whole consumed set", version_dir, SERVING_EXCLUDE)
    return SERVING_DEFAULT, rule


def _dataset_repeat_rule(info: dict) -> str:
    """The repeat rule in the metadata.json of the dataset dir export.json names (an export
    written before export.json recorded it); the default when unreadable."""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(FileSystems.join(info["dataset_dir"], features.METADATA_FILE)) as f:
            rule = json.load(f).get("repeats", ex.DEFAULT_REPEATS)
    except Exception:  # noqa: BLE001  (no export.json, dataset moved: the default rule)
        return ex.DEFAULT_REPEATS
    return rule if rule in ex.REPEAT_RULES else ex.DEFAULT_REPEATS


def training_policy(version_dir: str) -> ex.ExamplePolicy:
    """max_history / text_history of the dataset the export was trained on (export.json
    names the dataset dir, whose metadata.json records them); the defaults when unreadable."""
    import tensorflow as tf

    try:
        dataset_dir = layout.read_export_info(version_dir)["dataset_dir"]
        with tf.io.gfile.GFile(FileSystems.join(dataset_dir, features.METADATA_FILE)) as f:
            split = json.load(f)["split"]
        policy = ex.ExamplePolicy(max_history=int(split["max_history"]), text_history=int(split["text_history"]))
    except Exception as err:  # no card, dataset moved, older metadata: fall back, say so
        _LOG.warning("cannot read the training data's query policy (%s); using max_history=%d, text_history=%d "
                     "(pass --max-history/--text-history to match training)", err, features.MAX_HISTORY,
                     features.TEXT_HISTORY)
        return ex.ExamplePolicy()
    _LOG.info("queries as in training: max_history=%d, text_history=%d (from %s)", policy.max_history,
              policy.text_history, dataset_dir)
    return policy


# --- the pipeline -------------------------------------------------------------------------------


def _path(config: ScoreConfig, *parts: str) -> str:
    return FileSystems.join(config.output_dir, *parts)


def read_raw(p: beam.Pipeline, sources: Sequence) -> tuple:
    """{"interactions", "items", "users"} records, and the row-level dead letters and counts of reading."""
    pcolls, dead, counts = {}, [], []
    for kind in (records.INTERACTIONS, records.ITEMS, records.USERS):
        specs = [s for s in sources if s.kind == kind]
        if not specs:
            continue
        rows, bad, cnt = p | f"Read[{kind}]" >> T.ReadSource(specs)
        pcolls[kind] = rows
        dead.append(bad)
        counts += [cnt, bad | f"DeadKeys[{kind}]" >> beam.Map(lambda d: (f"dead.{d.source}.{d.reason}", 1))]
    return pcolls, dead, counts


def build_pipeline(p: beam.Pipeline, config: ScoreConfig, info: ModelInfo) -> None:
    """Adds every scoring step to `p`; writes under config.output_dir (and BigQuery)."""
    dead, counts = [], []
    if config.dataset_dir:
        built = p | "QueriesFromDataset" >> user_queries.QueriesFromDataset(
            config.dataset_dir, consumed=info.exclude_consumed)
    else:
        pcolls, dead, counts = read_raw(p, config.sources)
        built = pcolls | "BuildUserQueries" >> user_queries.BuildUserQueries(
            info.policy, config.as_of, config.window_seconds, config.cold_users, config.min_rating,
            consumed=info.exclude_consumed)
    dead.append(built[T.DEAD])
    counts.append(built[T.COUNTS])

    run = built["queries"] | "RunSegRec" >> model_handler.RunSegRec(
        info.version_dir, info.signature, info.k, info.beta, config.min_batch_size, config.max_batch_size,
        text_cache_size=config.text_cache_size)
    dead.append(run[T.DEAD])
    counts += [run[T.COUNTS], T.count_elements(run.results, "users.scored")]
    out = run.results | "ToRecord" >> beam.ParDo(score_records.ToRecord(info.labels, info.version))
    counts.append(T.count_elements(out, "records.written"))
    out | "WriteRecords" >> score_records.WriteRecords(
        config.output_dir, config.formats, config.bigquery_table, config.overwrite)

    (dead
     | "FlattenDead" >> beam.Flatten()
     | "DeadJson" >> beam.Map(lambda d: d.to_json())
     | "WriteDead" >> beam.io.WriteToText(_path(config, features.DEAD_LETTER_DIR, "dead_letter"), file_name_suffix=".jsonl"))
    counts | "FlattenCounts" >> beam.Flatten() | "Counts" >> T.WriteCounts(_path(config, COUNTS_FILE))


# --- driver -------------------------------------------------------------------------------------

OUTPUT_GLOBS = (score_records.RECORDS_PREFIX + "-*", features.DEAD_LETTER_DIR + "/*", features.STATS_FILE,
                COUNTS_FILE)


def prepare_output_dir(config: ScoreConfig) -> None:
    """Refuses to mix new results with an old run's shards unless --overwrite."""
    outputs.prepare_output_dir(config.output_dir, OUTPUT_GLOBS, config.overwrite, "scoring results")


def check_inputs(config: ScoreConfig) -> None:
    if config.dataset_dir:
        for pattern in (features.TRAIN_PATTERN, features.EVAL_PATTERN):
            if not FileSystems.match([FileSystems.join(config.dataset_dir, pattern)])[0].metadata_list:
                raise records.InputError(
                    f"--dataset-dir {config.dataset_dir}: no {pattern} (expected a dataset dir written by "
                    "`segrec preprocess`)")
    for spec in config.sources:
        readers.check_source(spec)
    if config.bigquery_table:
        score_records.check_bigquery()


def compose_stats(counts: dict, config: ScoreConfig, info: ModelInfo) -> dict:
    """stats.json from the summed counts; `balanced` says every user and record is accounted for."""
    dead = {}
    for key, n in counts.items():
        if key.startswith("dead."):
            _, source, reason = key.split(".", 2)
            dead.setdefault(source, {})[reason] = n
    users_in, queries, scored = counts.get("users.in", 0), counts.get("users.queries", 0), counts.get("users.scored", 0)
    rejected = sum(dead.get(retrying.MODEL_SOURCE, {}).values())
    users_dead = sum(dead.get(user_queries.QUERY_SOURCE, {}).values()) + rejected
    written = counts.get("records.written", 0)
    stats = {
        "users": {"in": users_in, "queries": queries, "scored": scored, "cold": counts.get("users.cold", 0),
                  "dead_lettered": users_dead, "inference_failed": rejected,
                  "balanced": users_in == scored + users_dead and queries == scored + rejected},
        "inference": {"failed_batches": counts.get("inference.failed_batches", 0),
                      "retried_one_by_one": counts.get("inference.retried_elements", 0)},
        "records_written": written,
        "dead_letter": {s: dict(sorted(r.items())) for s, r in sorted(dead.items())},
        "model": {"version_dir": info.version_dir, "version": info.version, "signature": info.signature,
                  "k": info.k, "beta": info.beta, "repeats": info.repeats,
                  "exclude_consumed": info.exclude_consumed},
        "input": {"dataset_dir": config.dataset_dir} if config.dataset_dir else {
            "source": config.source_name, "as_of": config.as_of, "window_seconds": config.window_seconds,
            "cold_users": config.cold_users, "max_history": info.policy.max_history,
            "text_history": info.policy.text_history,
            "inputs": [{"kind": s.kind, "path": s.path, "format": s.format} for s in config.sources]},
        "outputs": {"formats": list(config.formats), "bigquery_table": config.bigquery_table},
    }
    stats["balanced"] = stats["users"]["balanced"] and written == scored
    if config.sources:
        rows = preprocess.compose_stats(counts)
        stats["rows"] = rows["rows"]
        stats["filtered"] = rows["filtered"]
        stats["balanced"] = stats["balanced"] and rows["balanced"]
    return stats


def beam_metrics(result) -> tuple:
    """(counters, distributions) of the segrec.* namespaces of a finished pipeline.

    counters: "namespace/name" -> n. distributions (e.g. RunInference's
    inference_request_batch_size, inference_batch_latency_micro_secs):
    "namespace/name" -> {count, sum, min, max, mean}. Both {} when the runner
    reports no metrics.
    """
    try:
        metrics = result.metrics().query()
    except Exception:  # some runners (or modes) do not report metrics
        return {}, {}
    counters, dists = {}, {}
    for c in metrics.get("counters", []):
        if c.key.metric.namespace.startswith("segrec"):
            name = f"{c.key.metric.namespace}/{c.key.metric.name}"
            counters[name] = counters.get(name, 0) + int(c.committed if c.committed is not None else c.attempted or 0)
    for d in metrics.get("distributions", []):
        value = d.committed if d.committed is not None else d.attempted
        if not d.key.metric.namespace.startswith("segrec") or value is None or not value.count:
            continue
        name = f"{d.key.metric.namespace}/{d.key.metric.name}"
        agg = dists.setdefault(name, {"count": 0, "sum": 0, "min": value.min, "max": value.max})
        agg["count"] += value.count
        agg["sum"] += value.sum
        agg["min"], agg["max"] = min(agg["min"], value.min), max(agg["max"], value.max)
    for agg in dists.values():
        agg["mean"] = round(agg["sum"] / agg["count"], 3)
    return dict(sorted(counters.items())), dict(sorted(dists.items()))


def run(config: ScoreConfig, beam_args: Sequence[str] = ()) -> ScoreSummary:
    """Checks inputs and model, runs the pipeline, writes stats.json (raises if totals do not balance)."""
    check_inputs(config)
    info = resolve_model(config)
    prepare_output_dir(config)
    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    runner = options.view_as(StandardOptions).runner
    source = config.dataset_dir or f"{len(config.sources)} {config.source_name} sources"
    _LOG.info("score: %s with %s (%s, k=%d, beta=%g, batches %s..%s) -> %s on %s", source, info.version_dir,
              info.signature, info.k, info.beta, config.min_batch_size or 1, config.max_batch_size or "auto",
              config.output_dir, runner)
    start = time.time()
    p = beam.Pipeline(options=options)
    build_pipeline(p, config, info)
    result = p.run()
    result.wait_until_finish()
    seconds = time.time() - start

    counts_path = _path(config, COUNTS_FILE)
    counts = json.loads(outputs.read_text(counts_path))
    FileSystems.delete([counts_path])
    stats = compose_stats(counts, config, info)
    stats["runner"] = runner
    stats["seconds"] = round(seconds, 2)
    stats["beam_counters"], stats["beam_distributions"] = beam_metrics(result)
    outputs.write_text(_path(config, features.STATS_FILE), json.dumps(stats, indent=2, sort_keys=True) + "\n")
    if not stats["balanced"]:
        raise RuntimeError(f"user accounting does not balance (a segrec bug): {json.dumps(stats['users'])}, "
                           f"records written {stats['records_written']}")
    retrying.check_not_all_rejected(stats["users"]["queries"], stats["users"]["scored"],
                                    _path(config, features.DEAD_LETTER_DIR))
    return ScoreSummary(config.output_dir, stats, written_files(config.output_dir), seconds)


def written_files(output_dir: str) -> dict:
    prefix = score_records.RECORDS_PREFIX
    groups = {"jsonl": prefix + "-*.jsonl", "parquet": prefix + "-*.parquet",
              "dead_letter": features.DEAD_LETTER_DIR + "/*", "stats": features.STATS_FILE}
    return {name: sorted(m.path for m in FileSystems.match([FileSystems.join(output_dir, pat)])[0].metadata_list)
            for name, pat in groups.items()}


def format_summary(summary: ScoreSummary) -> str:
    """The human-readable end-of-run summary the CLI prints."""
    s = summary.stats
    u, m = s["users"], s["model"]
    lines = [
        f"score finished in {summary.seconds:.1f}s -> {summary.output_dir}",
        f"  model        version {m['version']} ({m['version_dir']}), k={m['k']} beta={m['beta']}, "
        f"{m['signature']} (repeat rule {m.get('repeats')})",
        f"  users in {u['in']:,}   scored {u['scored']:,} (cold {u['cold']:,})   dead-lettered {u['dead_lettered']:,}"
        + (f" (model rejected {u['inference_failed']:,})" if u["inference_failed"] else ""),
    ]
    if s["inference"]["failed_batches"]:
        lines.append(f"  inference    {s['inference']['failed_batches']:,} batches failed; their "
                     f"{s['inference']['retried_one_by_one']:,} users retried one by one")
    for kind, row in s.get("rows", {}).items():
        lines.append(f"  {kind:<13} read {row['read']:>9,}  accepted {row['accepted']:>9,}  "
                     f"dead-lettered {row['dead_lettered']:>7,}  filtered {row['filtered']:>7,}")
    for source, reasons in s["dead_letter"].items():
        for reason, n in reasons.items():
            lines.append(f"      dead-letter {source}.{reason}: {n:,}")
    lines.append(f"  records written {s['records_written']:,}")
    if s["outputs"]["bigquery_table"]:
        lines.append(f"  bigquery     {s['outputs']['bigquery_table']}")
    for name, paths in summary.files.items():
        if paths:
            where = paths[0] if len(paths) == 1 else f"{posixpath.dirname(paths[0])}/ ({len(paths)} files)"
            lines.append(f"  {name:<12} {where}")
    return "\n".join(lines)
