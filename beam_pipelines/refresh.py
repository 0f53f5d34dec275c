"""`segrec segments refresh`: follow the segments as users change (Apache Beam).

    sources --ReadSource--> records --BuildUserQueries(as_of, window)------------> current queries
                                   \\-BuildUserQueries(as_of - window, window)--> previous queries
    (window, UserQuery) --RunInference(keyed SegRecModelHandler, user_embedding)--> embeddings
                                                                             \\--> rejected users
    previous embeddings --assign(old centroids)--> old segment per user  (or --previous-assignments)
    current embeddings --mini-batch k-means x iterations (CombineGlobally)--> new centroids
                       --assign(new centroids)--> new segment per user
    previous embeddings --the same k-means from the old centroids--> baseline for the centroid shift
    --> assignments, migration matrix and sizes (CombineGlobally), profile rows, embedding sample

Both windows go through one RunInference with a KeyedModelHandler around
inference.model_handler's SegRecModelHandler, so each worker loads the
model once. A batch the model rejects is retried one user at a time
(inference.retrying.RunInferenceRetrying); users rejected even alone are
dead-lettered (source "model", reason "inference_error", either window)
and left out of the k-means, the assignments and the drift counts. Every
aggregate is a Beam combine of bounded size: k-means statistics are [K, d]
sums and [K] counts per mini-batch (trainer.segments.drift.batch_stats /
apply_batch), the migration matrix is [K, K]. What the driver does after
the pipeline, and its bound:
  - drift figures and the verdict from those [K, K] / [K] counts;
  - profiles (trainer.segments.profiles) from the written profile rows of at
    most `max_profile_users` users (a seeded hash sample above that: sizes
    and shares always come from the full counts) and the catalog;
  - embeddings.npz for `segrec segments report` from a fixed-size sample
    (`embedding_sample` users, Beam's Sample.FixedSizeGlobally).
Without --as-of, a first small pipeline finds the last event time.
This module is the driver (config, plan, `build_pipeline`, `run`); the
pipeline's per-element steps are `refresh_steps`', and the figures and
files written after the pipeline `refresh_report`'s.

Output (`output_dir`):
    segments-v<N>.json   the new segments: centroids [K][d] in the format
                         `segrec train` writes (so `segrec export --segments`
                         loads it), profiles, and a `refresh` block (version,
                         window, drift figures, verdict)
    segments-v<N-1>.json the previous one, copied here if not already (kept)
    segments.json        a copy of the newest version
    v<N>/assignments-*.jsonl (and .parquet with format parquet): user_id,
                         previous_segment (null: not in the previous window),
                         segment, similarity (cosine to its centroid)
    v<N>/drift.json, v<N>/drift.md   verdict and its reasons, each check with
                         the counts behind it, per segment: users before / now,
                         PSI term (smoothed counts), centroid shift, status;
                         migration
    v<N>/embeddings.npz  the embedding sample (segments_report.load_embeddings)
    v<N>/stats.json      counts: users in = embedded + dead-lettered, queries
                         built = embedded + rejected by the model, ...
    v<N>/dead_letter/    users without a query in the window, users the
                         model rejected, bad rows

Verdict (trainer.segments.drift.summarize_drift) and the CLI's exit status:
0 no drift; EXIT_DRIFT (3) retraining advised; EXIT_INSUFFICIENT_DATA (4)
too few users to judge (a window under `min_window_users`, or a check that
could not be judged: see drift.json's "reasons"). Every file is written
whatever the verdict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from beam_pipelines import outputs, refresh_report, refresh_steps
from beam_pipelines import transforms as T
from beam_pipelines.inference import model_handler, retrying, user_queries
from beam_pipelines.refresh_steps import CURRENT, PREVIOUS
from beam_pipelines.sources import readers, records
from serving.export import layout
from trainer import features
from trainer.contracts import SEGMENTS_FILE, USER_EMBEDDING
from trainer.data import examples as ex
from trainer.segments import document
from trainer.segments import drift as sd

_LOG = logging.getLogger("segrec.refresh")
EXIT_CODES = refresh_report.EXIT_CODES  # verdict -> `segrec segments refresh` exit status
EXIT_DRIFT = EXIT_CODES[sd.RETRAIN]  # 3: retraining advised
EXIT_INSUFFICIENT_DATA = EXIT_CODES[sd.INSUFFICIENT_DATA]  # 4: too few users to judge drift
WORK_DIR = "_work"
_VERSION_FILE = re.compile(r"^segments-v(\d+)\.json$")


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
    """Settings of one `segrec segments refresh` run (built by the CLI adapter).

    as_of: epoch seconds, the end (exclusive) of the current window; None =
      just after the last event. window_days: length of each window; the
      previous window is [as_of - 2w, as_of - w).
    previous: segments.json whose centroids are the starting point (None: the
      one beside the model). previous_assignments: a previous refresh's
      assignments (jsonl, glob allowed): old segments come from there instead
      of embedding the previous window.
    min_segment_users, min_window_users, min_compared_users: how many users
      a drift figure needs to count (trainer.segments.drift.DriftMinimums);
      min_segment_users is also the profiles' privacy floor.
    """

    model_dir: str
    sources: tuple  # tuple[source_spec.SourceSpec, ...]
    output_dir: str
    as_of: Optional[int] = None
    window_days: float = 30.0
    previous: Optional[str] = None
    previous_assignments: Optional[str] = None
    min_segment_users: int = 20
    min_window_users: int = 200
    min_compared_users: int = 100
    thresholds: sd.DriftThresholds = sd.DriftThresholds()
    kmeans: sd.KMeansSettings = sd.KMeansSettings()
    policy: ex.ExamplePolicy = ex.ExamplePolicy()
    min_rating: Optional[float] = None
    min_batch_size: Optional[int] = None
    max_batch_size: Optional[int] = None
    formats: tuple = ("jsonl",)
    embedding_sample: int = 5000
    max_profile_users: int = 200_000
    overwrite: bool = False

    def __post_init__(self):
        kinds = [s.kind for s in self.sources]
        if records.INTERACTIONS not in kinds or records.ITEMS not in kinds:
            raise ValueError("refresh needs an interactions source and an items source (as preprocess)")
        if not self.window_days > 0:
            raise ValueError(f"--window-days must be > 0, got {self.window_days}")
        _ = self.minimums  # DriftMinimums names the flag of a minimum under 1
        bad = set(self.formats) - {"jsonl", "parquet"}
        if bad or not self.formats:
            raise ValueError(f"--format must be jsonl and/or parquet, got {self.formats}")
        if self.embedding_sample < 0 or self.max_profile_users < 1:
            raise ValueError("--embedding-sample must be >= 0 and --max-profile-users >= 1")

    @property
    def minimums(self) -> sd.DriftMinimums:
        return sd.DriftMinimums(window_users=self.min_window_users, compared_users=self.min_compared_users,
                                segment_users=self.min_segment_users)

    @property
    def window_seconds(self) -> int:
        return int(round(self.window_days * refresh_report.DAY))


@dataclasses.dataclass(frozen=True)
class RefreshPlan:
    """What run() resolves before the pipeline: the model, the start, the version, where things go."""

    version_dir: str
    previous_path: str
    previous_doc: dict
    old_centroids: np.ndarray  # [K, d]
    as_of: int
    version: int
    run_dir: str  # output_dir/v<N>

    def work(self, name: str) -> str:
        return FileSystems.join(self.run_dir, WORK_DIR, name)


@dataclasses.dataclass(frozen=True)
class RefreshSummary:
    output_dir: str
    version: int
    segments_path: str
    drift: dict
    stats: dict
    files: dict
    seconds: float

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.drift["verdict"]]


def _single(pcoll, path: str, label: str) -> None:
    pcoll | f"Write[{label}]" >> beam.io.WriteToText(path, num_shards=1, shard_name_template="")


def build_pipeline(p: beam.Pipeline, config: RefreshConfig, plan: RefreshPlan) -> None:
    """Adds every refresh step to `p` (pure: where it runs is the PipelineOptions' business)."""
    from apache_beam.ml.inference.base import KeyedModelHandler

    k, d = plan.old_centroids.shape
    old_centroids = plan.old_centroids
    dead, counts, parse_dead = [], [], []

    def read(kind):
        specs = [s for s in config.sources if s.kind == kind]
        if not specs:
            return p | f"No[{kind}]" >> beam.Create([])
        rows, bad, cnt = p | f"Read[{kind}]" >> T.ReadSource(specs)
        dead.append(bad)
        parse_dead.append(bad)
        counts.append(cnt)
        return rows

    recs = {"interactions": read(records.INTERACTIONS), "items": read(records.ITEMS), "users": read(records.USERS)}
    w = config.window_seconds
    cur = recs | "QueriesCurrent" >> user_queries.BuildUserQueries(config.policy, plan.as_of, w,
                                                                   min_rating=config.min_rating)
    dead.append(cur[T.DEAD])
    counts.append(cur[T.COUNTS])
    keyed = [cur.queries | "KeyCurrent" >> beam.Map(lambda q: (CURRENT, q))]
    if config.previous_assignments is None:
        prev = recs | "QueriesPrevious" >> user_queries.BuildUserQueries(config.policy, plan.as_of - w, w,
                                                                          min_rating=config.min_rating)
        # The previous window's row-level dead letters repeat the current one's; only its counts are kept.
        counts.append(prev[T.COUNTS] | "PrefixPrevious" >> beam.Map(lambda kv: (f"previous.{kv[0]}", kv[1])))
        keyed.append(prev.queries | "KeyPrevious" >> beam.Map(lambda q: (PREVIOUS, q)))

    handler = KeyedModelHandler(model_handler.SegRecModelHandler(
        plan.version_dir, USER_EMBEDDING, min_batch_size=config.min_batch_size, max_batch_size=config.max_batch_size))
    run = keyed | "FlattenQueries" >> beam.Flatten() | "RunInference" >> retrying.RunInferenceRetrying(handler)
    results = run["results"] | "Unpack" >> beam.Map(refresh_steps.unpack_embedding)
    rejected = run[retrying.FAILED] | "Rejected" >> beam.FlatMap(refresh_steps.rejected_dead_letter).with_outputs(
        T.DEAD, T.COUNTS)
    dead.append(rejected[T.DEAD])
    counts += [run[T.COUNTS], rejected[T.COUNTS]]
    current = results | "OnlyCurrent" >> beam.Filter(lambda r: r[0] == CURRENT)
    counts.append(T.count_elements(current, "users.embedded"))
    emb = current | "Embeddings" >> beam.Map(lambda r: (r[1], r[3]))

    if config.previous_assignments is None:
        prev_emb = (results | "OnlyPrevious" >> beam.Filter(lambda r: r[0] == PREVIOUS)
                    | "PrevEmbeddings" >> beam.Map(lambda r: (r[1], r[3])))
        old = (prev_emb
               | "AssignOld" >> beam.Map(refresh_steps.assign_one, old_centroids)
               | "OldLabel" >> beam.Map(lambda r: (r[0], r[1])))
    else:
        parsed = (p | "ReadPrevAssignments" >> beam.io.ReadFromText(config.previous_assignments)
                  | "ParsePrevAssignments" >> beam.FlatMap(refresh_steps.parse_assignment, k).with_outputs(
                      T.DEAD, main="rows"))
        dead.append(parsed[T.DEAD])
        counts.append(parsed[T.DEAD] | "BadAssignKeys" >> beam.Map(lambda d_: ("dead.previous_assignments.bad_assignment", 1)))
        old = parsed.rows
    counts.append(T.count_elements(old, "previous.users_assigned"))

    # Mini-batch k-means from the old centroids, prior counts = old sizes x prior_weight.
    old_sizes = (old | "OldSegment" >> beam.Map(lambda kv: kv[1])
                 | "OldSizes" >> beam.CombineGlobally(refresh_steps.CountsFn((k,))))
    weight = config.kmeans.prior_weight
    init = old_sizes | "InitState" >> beam.Map(lambda sizes: (old_centroids, sizes.astype(np.float64) * weight))
    state = refresh_steps.mini_batch_kmeans(emb, init, config.kmeans, k, d, "")
    final = beam.pvalue.AsSingleton(state | "FinalCentroids" >> beam.Map(lambda st: st[0]))
    # Like-for-like baseline: the same update over the previous window. A trained model's centroids are
    # not the mean direction of their members, so shift is measured against this, not against them.
    if config.previous_assignments is None:
        baseline = (refresh_steps.mini_batch_kmeans(prev_emb, init, config.kmeans, k, d, "Baseline")
                    | "BaselineCentroids" >> beam.Map(lambda st: st[0].tolist()))
    else:
        baseline = p | "NoBaseline" >> beam.Create([None])
    new = (emb | "AssignNew" >> beam.Map(lambda r, c: refresh_steps.assign_one(r, c) + (r[1],), final)
           | "KeyNew" >> beam.Map(lambda r: (r[0], r)))

    users_attr = recs["users"] | "UserAttrs" >> beam.Map(lambda u: (u.user_id, u.attribute_dict()))
    joined = ({"new": new, "old": old, "hist": current | "Hist" >> beam.Map(lambda r: (r[1], r[2])), "user": users_attr}
              | "GroupByUser" >> beam.CoGroupByKey()
              | "Join" >> beam.FlatMap(refresh_steps.join_user).with_outputs(
                  T.COUNTS, "pairs", "profile", "sample", main="assignments"))
    counts.append(joined[T.COUNTS])
    assignments = joined.assignments
    counts.append(T.count_elements(assignments, "users.assigned"))

    # --- outputs ---
    if "jsonl" in config.formats:
        (assignments | "AssignJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
         | "WriteAssignJsonl" >> beam.io.WriteToText(FileSystems.join(plan.run_dir, "assignments"), file_name_suffix=".jsonl"))
    if "parquet" in config.formats:
        import pyarrow as pa

        schema = pa.schema([("user_id", pa.string()), ("previous_segment", pa.int64()), ("segment", pa.int64()),
                            ("similarity", pa.float64())])
        assignments | "WriteAssignParquet" >> beam.io.WriteToParquet(
            FileSystems.join(plan.run_dir, "assignments"), schema, file_name_suffix=".parquet")
    _single(joined.profile, plan.work("profile_rows.jsonl"), "ProfileRows")
    _single(recs["items"] | "CatalogJson" >> beam.Map(lambda r: json.dumps(
        {"item_id": r.item_id, "title": r.title, "categories": list(r.categories)}, ensure_ascii=False)),
        plan.work("catalog.jsonl"), "Catalog")
    migration = joined.pairs | "Migration" >> beam.CombineGlobally(refresh_steps.CountsFn((k, k)))
    new_sizes = (assignments | "NewSegment" >> beam.Map(lambda r: r["segment"])
                 | "NewSizes" >> beam.CombineGlobally(refresh_steps.CountsFn((k,))))
    sample = joined.sample | "Sample" >> beam.combiners.Sample.FixedSizeGlobally(config.embedding_sample)
    _single(
        migration | "DriftCounts" >> beam.Map(
            lambda m, old_s, new_s, st, smp, base: json.dumps({
                "migration": m.tolist(), "sizes_old": old_s.tolist(), "sizes_new": new_s.tolist(),
                "centroids": st[0].tolist(), "counts": st[1].tolist(), "baseline": base, "sample": smp}),
            beam.pvalue.AsSingleton(old_sizes), beam.pvalue.AsSingleton(new_sizes),
            beam.pvalue.AsSingleton(state), beam.pvalue.AsSingleton(sample), beam.pvalue.AsSingleton(baseline)),
        plan.work("drift_counts.json"), "DriftCounts")

    dead_all = dead | "FlattenDead" >> beam.Flatten()
    (dead_all | "DeadJson" >> beam.Map(lambda x: x.to_json())
     | "WriteDead" >> beam.io.WriteToText(FileSystems.join(plan.run_dir, "dead_letter", "dead_letter"),
                                          file_name_suffix=".jsonl"))
    # ReadSource does not count its parse errors (the later steps count their own).
    counts.append(parse_dead | "ParseDeadOnce" >> beam.Flatten()
                  | "ParseDeadKeys" >> beam.Map(lambda x: (f"dead.{x.source}.{x.reason}", 1)))
    counts | "FlattenCounts" >> beam.Flatten() | "Counts" >> T.WriteCounts(plan.work("counts.json"))


# --- the driver ------------------------------------------------------------------------------------
def _exists(path: str) -> bool:
    return FileSystems.exists(path)


def _versions(output_dir: str) -> list:
    if not _exists(output_dir):
        return []
    found = FileSystems.match([FileSystems.join(output_dir, "segments-v*.json")])[0].metadata_list
    return sorted(int(m.group(1)) for f in found if (m := _VERSION_FILE.match(os.path.basename(f.path))))


def _latest_event(config: RefreshConfig, options: PipelineOptions, out: str) -> int:
    """A small pipeline: the last accepted interaction time (+1, so it is inside the window)."""
    with beam.Pipeline(options=options) as p:
        rows, _, _ = p | "Read" >> T.ReadSource([s for s in config.sources if s.kind == records.INTERACTIONS])
        (rows | "Timestamps" >> beam.Map(lambda r: r.timestamp)
         | "Latest" >> beam.CombineGlobally(lambda ts: max(ts, default=-1))
         | "Write" >> beam.io.WriteToText(out, num_shards=1, shard_name_template=""))
    latest = int(outputs.read_text(out).strip())
    FileSystems.delete([out])
    if latest < 0:
        raise records.InputError("no interaction could be read; nothing to refresh (see the readers' dead letters)")
    return latest + 1


def plan_refresh(config: RefreshConfig, options: PipelineOptions) -> RefreshPlan:
    """Resolves the model, the previous segments, as_of and the new version; prepares the output dir."""

    version_dir = layout.resolve_version_dir(config.model_dir)
    previous = config.previous or layout.join(version_dir, SEGMENTS_FILE)
    if not _exists(previous):
        raise records.InputError(f"{previous}: no segments.json (pass --previous PATH: the current segments)")
    try:
        doc = document.load(previous)
        centroids = document.centroids(doc, previous)
    except ValueError as err:  # names the file and what is wrong with it
        raise records.InputError(str(err)) from err
    if centroids.ndim != 2 or centroids.shape[0] < 1:
        raise records.InputError(f"{previous}: centroids have shape {centroids.shape}; expected [K, d]")
    prev_version = int((doc.get("refresh") or {}).get("version", 0))
    version = max([prev_version] + _versions(config.output_dir)) + 1
    run_dir = FileSystems.join(config.output_dir, f"v{version}")
    if _exists(run_dir):
        if not config.overwrite:
            raise records.InputError(f"{run_dir} exists; pass --overwrite or another --output-dir")
        FileSystems.delete([run_dir])
    import tensorflow as tf

    tf.io.gfile.makedirs(run_dir)
    as_of = config.as_of
    if as_of is None:
        as_of = _latest_event(config, options, FileSystems.join(run_dir, WORK_DIR, "latest.txt"))
        _LOG.info("refresh: --as-of not given; last event -> as_of %d", as_of)
    return RefreshPlan(version_dir, previous, doc, centroids.astype(np.float64), int(as_of), version, run_dir)


def _options(beam_args: Sequence[str]) -> PipelineOptions:
    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    return options


def run(config: RefreshConfig, beam_args: Sequence[str] = ()) -> RefreshSummary:
    """Plans, runs the pipeline, then writes the new segments, the drift report and stats.json."""
    start = time.time()
    for spec in config.sources:
        readers.check_source(spec)
    options = _options(beam_args)
    plan = plan_refresh(config, options)
    w = config.window_seconds
    _LOG.info("refresh v%d: model %s, %d segments, window [%d, %d)%s -> %s", plan.version, plan.version_dir,
              len(plan.old_centroids), plan.as_of - w, plan.as_of,
              "" if config.previous_assignments else f", previous window [{plan.as_of - 2 * w}, {plan.as_of - w})",
              config.output_dir)
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, config, plan)
    _LOG.info("refresh: pipeline done in %.1fs; profiling and writing the report", time.time() - start)

    counts = json.loads(outputs.read_text(plan.work("counts.json")))
    stats = refresh_report.compose_stats(counts, previous_window=config.previous_assignments is None)
    if not (stats["balanced"] and stats["users"]["balanced"]):
        raise RuntimeError(f"accounting does not balance (a segrec bug): {json.dumps(stats)}")
    queries, embedded = stats["users"]["queries"], stats["users"]["embedded"]
    if queries and not embedded:  # leave the figures behind before failing
        outputs.write_text(FileSystems.join(plan.run_dir, features.STATS_FILE), json.dumps(stats, indent=2) + "\n")
    retrying.check_not_all_rejected(queries, embedded, FileSystems.join(plan.run_dir, "dead_letter"))

    dc = json.loads(outputs.read_text(plan.work("drift_counts.json")))
    new_centroids = np.asarray(dc["centroids"], np.float64)
    drift = refresh_report.drift_figures(
        dc, plan.old_centroids, new_centroids, minimums=config.minimums,
        thresholds=config.thresholds, version=plan.version, as_of=plan.as_of, window_seconds=w,
        previous_segments=plan.previous_path, model=plan.version_dir,
        old_assignments=config.previous_assignments or "previous window embedded",
        kmeans=dataclasses.asdict(config.kmeans))
    doc = refresh_report.new_segments_doc(
        new_centroids, dc["sizes_new"], drift, profile_rows_path=plan.work("profile_rows.jsonl"),
        catalog_path=plan.work("catalog.jsonl"), max_profile_users=config.max_profile_users,
        min_segment_users=config.min_segment_users, beta=plan.previous_doc.get("beta"))
    files = refresh_report.write_outputs(config.output_dir, plan.run_dir, plan.version, plan.previous_doc, doc, drift,
                                         stats, dc["sample"], plan.old_centroids.shape[1])
    FileSystems.delete([FileSystems.join(plan.run_dir, WORK_DIR)])
    return RefreshSummary(config.output_dir, plan.version, files["segments"], drift, stats, files, time.time() - start)


def format_summary(summary: RefreshSummary) -> str:
    d, u = summary.drift, summary.stats["users"]
    lines = [f"segments refresh v{summary.version} finished in {summary.seconds:.1f}s -> {summary.output_dir}",
             f"  users: {u['in']:,} in, {u['embedded']:,} embedded, {u['dead_lettered']:,} dead-lettered "
             f"({', '.join(f'{k} {v:,}' for k, v in u['dead_letter'].items()) or 'none'}); "
             f"{u['in_previous_window']:,} in the previous window, {u['entered']:,} entered, {u['left']:,} left",
             f"  drift: {refresh_report.figures_line(d)}",
             f"  {d['verdict_text']}"]
    lines += [f"  not judged: {why}" for why in d["insufficient"] if why not in d["reasons"]]
    for name in ("segments", "segments_latest", "drift_md", "drift_json", "stats", "embeddings"):
        lines.append(f"  {name:<16} {summary.files[name]}")
    if summary.files["assignments"]:
        lines.append(f"  {'assignments':<16} {summary.files['assignments'][0]}"
                     + (f" (+{len(summary.files['assignments']) - 1})" if len(summary.files["assignments"]) > 1 else ""))
    return "\n".join(lines)
