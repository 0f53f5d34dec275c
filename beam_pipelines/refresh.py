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
beam_pipelines.inference's SegRecModelHandler, so each worker loads the
model once. A batch the model rejects is retried one user at a time
(inference.RunInferenceRetrying); users rejected even alone are
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
    v<N>/drift.json, v<N>/drift.md   migration, centroid shift, PSI, new /
                         vanished segments, verdict
    v<N>/embeddings.npz  the embedding sample (segments_report.load_embeddings)
    v<N>/stats.json      counts: users in = embedded + dead-lettered, queries
                         built = embedded + rejected by the model, ...
    v<N>/dead_letter/    users without a query in the window, users the
                         model rejected, bad rows

Exit status (the CLI's): 0 no drift, EXIT_DRIFT (3) when retraining is advised.
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
from beam_pipelines import inference as inf
from beam_pipelines import outputs
from beam_pipelines import transforms as T
from beam_pipelines.sources import readers, records
from serving.export import layout
from trainer import features
from trainer.contracts import SEGMENTS_FILE
from trainer.data import examples as ex
from trainer.segments import document
from trainer.segments import drift as sd

_LOG = logging.getLogger("segrec.refresh")
EXIT_DRIFT = 3  # `segrec segments refresh` exit status when retraining is advised
CURRENT, PREVIOUS = "current", "previous"
WORK_DIR = "_work"
DAY = 86_400
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
    """

    model_dir: str
    sources: tuple  # tuple[readers.SourceSpec, ...]
    output_dir: str
    as_of: Optional[int] = None
    window_days: float = 30.0
    previous: Optional[str] = None
    previous_assignments: Optional[str] = None
    min_segment_users: int = 20
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
        if self.min_segment_users < 1:
            raise ValueError(f"--min-segment-users must be >= 1, got {self.min_segment_users}")
        bad = set(self.formats) - {"jsonl", "parquet"}
        if bad or not self.formats:
            raise ValueError(f"--format must be jsonl and/or parquet, got {self.formats}")
        if self.embedding_sample < 0 or self.max_profile_users < 1:
            raise ValueError("--embedding-sample must be >= 0 and --max-profile-users >= 1")

    @property
    def window_seconds(self) -> int:
        return int(round(self.window_days * DAY))


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
        return EXIT_DRIFT if self.drift["retrain_advised"] else 0


# --- per-element steps (module-level: they pickle to workers) ---------------------------------------
def _unpack(kv):
    window, result = kv
    q = result.example
    return window, q.user_id, tuple(q.history_item_ids), np.asarray(result.inference[features.EMBEDDING], np.float32)


def _rejected(failed):
    """((window, UserQuery), error) of RunInferenceRetrying -> its dead letter and count."""
    (window, query), error = failed
    prefix = "" if window == CURRENT else f"{window}."
    where = "" if window == CURRENT else f" ({window} window)"
    yield beam.pvalue.TaggedOutput(T.DEAD, inf.inference_dead_letter(query, error, where))
    yield beam.pvalue.TaggedOutput(T.COUNTS, (f"{prefix}dead.{inf.MODEL_SOURCE}.{inf.INFERENCE_ERROR}", 1))


def _assign_one(uid_emb, centroids):
    uid, emb = uid_emb
    labels, cos = sd.assign(emb[None, :], centroids)
    return uid, int(labels[0]), float(cos[0])


def _batch_member(uid_emb, state):
    _, emb = uid_emb
    labels, _ = sd.assign(emb[None, :], state[0])
    return int(labels[0]), emb


class _StatsFn(beam.CombineFn):
    """(segment, embedding [d]) -> (sums [K, d], counts [K]): one mini-batch's k-means statistics."""

    def __init__(self, k: int, d: int):
        self._k, self._d = k, d

    def create_accumulator(self):
        return np.zeros((self._k, self._d)), np.zeros(self._k)

    def add_input(self, acc, element):
        label, emb = element
        sums, counts = acc
        sums[label] += sd.unit(emb[None, :])[0]
        counts[label] += 1
        return sums, counts

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(a[0] for a in accs), sum(a[1] for a in accs)

    def extract_output(self, acc):
        return acc


class _CountsFn(beam.CombineFn):
    """Integer ids (or (a, b) pairs) -> counts [K] (or [K, K])."""

    def __init__(self, shape: tuple):
        self._shape = shape

    def create_accumulator(self):
        return np.zeros(self._shape, np.int64)

    def add_input(self, acc, element):
        acc[element] += 1
        return acc

    def merge_accumulators(self, accs):
        return sum(accs)

    def extract_output(self, acc):
        return acc


def _update(state, stats):
    centroids, counts = state
    return sd.apply_batch(centroids, counts, stats[0], stats[1])


def _parse_assignment(line: str, k: int):
    """A previous refresh's assignments line -> (user_id, segment), or a dead letter."""
    try:
        row = json.loads(line)
        seg = int(row["segment"])
        if not 0 <= seg < k:
            raise ValueError(f"segment {seg} outside 0..{k - 1}")
        yield str(row["user_id"]), seg
    except (ValueError, KeyError, TypeError) as err:
        yield beam.pvalue.TaggedOutput(T.DEAD, records.DeadLetter("previous_assignments", "line", "bad_assignment",
                                                                   str(err), line[:500]))


def _joined(element):
    """(user_id, {new, old, hist, user}) -> one tagged output per kind of record."""
    uid, g = element
    new, old = list(g["new"]), list(g["old"])
    prev = old[0] if old else None
    if not new:
        if old:
            yield beam.pvalue.TaggedOutput(T.COUNTS, ("users.left", 1))  # in the previous window only
        return
    _, seg, cos, emb = new[0]
    yield {"user_id": uid, "previous_segment": prev, "segment": seg, "similarity": round(cos, 6)}
    if prev is not None:
        yield beam.pvalue.TaggedOutput("pairs", (prev, seg))
    else:
        yield beam.pvalue.TaggedOutput(T.COUNTS, ("users.entered", 1))
    hist = list(g["hist"])
    users = list(g["user"])
    yield beam.pvalue.TaggedOutput("profile", json.dumps(
        {"user_id": uid, "segment": seg, "history": list(hist[0]) if hist else [],
         "attributes": users[0] if users else {}}, sort_keys=True, ensure_ascii=False))
    yield beam.pvalue.TaggedOutput("sample", (uid, -1 if prev is None else prev, seg, emb.tolist()))


def _kmeans(emb, init, km: sd.KMeansSettings, k: int, d: int, prefix: str):
    """(user_id, embedding) pcoll + singleton (centroids, counts) -> singleton after km.iterations mini-batches."""
    state = init
    for it in range(km.iterations):
        member = emb | f"{prefix}Batch{it}" >> beam.Filter(
            lambda r, it=it: sd.in_batch(r[0], it, km.batch_fraction, km.seed))
        stats = (member | f"{prefix}Nearest{it}" >> beam.Map(_batch_member, beam.pvalue.AsSingleton(state))
                 | f"{prefix}Stats{it}" >> beam.CombineGlobally(_StatsFn(k, d)))
        state = state | f"{prefix}Update{it}" >> beam.Map(_update, beam.pvalue.AsSingleton(stats))
    return state


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
    cur = recs | "QueriesCurrent" >> inf.BuildUserQueries(config.policy, plan.as_of, w, min_rating=config.min_rating)
    dead.append(cur[T.DEAD])
    counts.append(cur[T.COUNTS])
    keyed = [cur.queries | "KeyCurrent" >> beam.Map(lambda q: (CURRENT, q))]
    if config.previous_assignments is None:
        prev = recs | "QueriesPrevious" >> inf.BuildUserQueries(config.policy, plan.as_of - w, w,
                                                                 min_rating=config.min_rating)
        # The previous window's row-level dead letters repeat the current one's; only its counts are kept.
        counts.append(prev[T.COUNTS] | "PrefixPrevious" >> beam.Map(lambda kv: (f"previous.{kv[0]}", kv[1])))
        keyed.append(prev.queries | "KeyPrevious" >> beam.Map(lambda q: (PREVIOUS, q)))

    handler = KeyedModelHandler(inf.SegRecModelHandler(
        plan.version_dir, inf.USER_EMBEDDING, min_batch_size=config.min_batch_size, max_batch_size=config.max_batch_size))
    run = keyed | "FlattenQueries" >> beam.Flatten() | "RunInference" >> inf.RunInferenceRetrying(handler)
    results = run["results"] | "Unpack" >> beam.Map(_unpack)
    rejected = run[inf.FAILED] | "Rejected" >> beam.FlatMap(_rejected).with_outputs(T.DEAD, T.COUNTS)
    dead.append(rejected[T.DEAD])
    counts += [run[T.COUNTS], rejected[T.COUNTS]]
    current = results | "OnlyCurrent" >> beam.Filter(lambda r: r[0] == CURRENT)
    counts.append(T.count_elements(current, "users.embedded"))
    emb = current | "Embeddings" >> beam.Map(lambda r: (r[1], r[3]))

    if config.previous_assignments is None:
        prev_emb = (results | "OnlyPrevious" >> beam.Filter(lambda r: r[0] == PREVIOUS)
                    | "PrevEmbeddings" >> beam.Map(lambda r: (r[1], r[3])))
        old = (prev_emb
               | "AssignOld" >> beam.Map(_assign_one, old_centroids)
               | "OldLabel" >> beam.Map(lambda r: (r[0], r[1])))
    else:
        parsed = (p | "ReadPrevAssignments" >> beam.io.ReadFromText(config.previous_assignments)
                  | "ParsePrevAssignments" >> beam.FlatMap(_parse_assignment, k).with_outputs(T.DEAD, main="rows"))
        dead.append(parsed[T.DEAD])
        counts.append(parsed[T.DEAD] | "BadAssignKeys" >> beam.Map(lambda d_: ("dead.previous_assignments.bad_assignment", 1)))
        old = parsed.rows
    counts.append(T.count_elements(old, "previous.users_assigned"))

    # Mini-batch k-means from the old centroids, prior counts = old sizes x prior_weight.
    old_sizes = (old | "OldSegment" >> beam.Map(lambda kv: kv[1])
                 | "OldSizes" >> beam.CombineGlobally(_CountsFn((k,))))
    weight = config.kmeans.prior_weight
    init = old_sizes | "InitState" >> beam.Map(lambda sizes: (old_centroids, sizes.astype(np.float64) * weight))
    state = _kmeans(emb, init, config.kmeans, k, d, "")
    final = beam.pvalue.AsSingleton(state | "FinalCentroids" >> beam.Map(lambda st: st[0]))
    # Like-for-like baseline: the same update over the previous window. A trained model's centroids are
    # not the mean direction of their members, so shift is measured against this, not against them.
    if config.previous_assignments is None:
        baseline = _kmeans(prev_emb, init, config.kmeans, k, d, "Baseline") | "BaselineCentroids" >> beam.Map(
            lambda st: st[0].tolist())
    else:
        baseline = p | "NoBaseline" >> beam.Create([None])
    new = (emb | "AssignNew" >> beam.Map(lambda r, c: _assign_one(r, c) + (r[1],), final)
           | "KeyNew" >> beam.Map(lambda r: (r[0], r)))

    users_attr = recs["users"] | "UserAttrs" >> beam.Map(lambda u: (u.user_id, u.attribute_dict()))
    joined = ({"new": new, "old": old, "hist": current | "Hist" >> beam.Map(lambda r: (r[1], r[2])), "user": users_attr}
              | "GroupByUser" >> beam.CoGroupByKey()
              | "Join" >> beam.FlatMap(_joined).with_outputs(T.COUNTS, "pairs", "profile", "sample", main="assignments"))
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
    migration = joined.pairs | "Migration" >> beam.CombineGlobally(_CountsFn((k, k)))
    new_sizes = (assignments | "NewSegment" >> beam.Map(lambda r: r["segment"])
                 | "NewSizes" >> beam.CombineGlobally(_CountsFn((k,))))
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
    doc = document.load(previous)
    try:
        centroids = document.centroids(doc, previous)
    except (KeyError, TypeError) as err:
        raise records.InputError(f"{previous}: not a segments.json (needs segments[].centroid)") from err
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
    from beam_pipelines import preprocess

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
    stats = preprocess.compose_stats(counts)
    users_in, queries = counts.get("users.in", 0), counts.get("users.queries", 0)
    embedded = counts.get("users.embedded", 0)
    user_dead = {k.split(".", 2)[2]: v for k, v in counts.items() if k.startswith(f"dead.{inf.QUERY_SOURCE}.")}
    model_dead = f"dead.{inf.MODEL_SOURCE}.{inf.INFERENCE_ERROR}"
    rejected, prev_rejected = counts.get(model_dead, 0), counts.get(f"{PREVIOUS}.{model_dead}", 0)
    if rejected:
        user_dead[inf.INFERENCE_ERROR] = rejected
    balanced = users_in == embedded + sum(user_dead.values()) and queries == embedded + rejected
    if config.previous_assignments is None:  # the previous window's queries: embedded (assigned) or rejected
        balanced &= counts.get("previous.users.queries", 0) == counts.get("previous.users_assigned", 0) + prev_rejected
    stats["users"] = {
        "in": users_in, "queries": queries, "embedded": embedded, "dead_lettered": sum(user_dead.values()),
        "dead_letter": user_dead, "assigned": counts.get("users.assigned", 0),
        "in_previous_window": counts.get("previous.users_assigned", 0),
        "previous_window_inference_failed": prev_rejected,
        "entered": counts.get("users.entered", 0), "left": counts.get("users.left", 0),
        "balanced": balanced,
    }
    stats["inference"] = {"failed_batches": counts.get("inference.failed_batches", 0),
                          "retried_one_by_one": counts.get("inference.retried_elements", 0)}
    stats["previous_assignments_dead_lettered"] = counts.get("dead.previous_assignments.bad_assignment", 0)
    if not (stats["balanced"] and stats["users"]["balanced"]):
        raise RuntimeError(f"accounting does not balance (a segrec bug): {json.dumps(stats)}")
    if queries and not embedded:  # leave the figures behind before failing
        outputs.write_text(FileSystems.join(plan.run_dir, features.STATS_FILE), json.dumps(stats, indent=2) + "\n")
    inf.check_not_all_rejected(queries, embedded, FileSystems.join(plan.run_dir, "dead_letter"))

    dc = json.loads(outputs.read_text(plan.work("drift_counts.json")))
    new_centroids = np.asarray(dc["centroids"], np.float64)
    # With --previous-assignments the previous centroids came out of the same update: they are the baseline.
    baseline = np.asarray(dc["baseline"], np.float64) if dc["baseline"] is not None else plan.old_centroids
    drift = sd.summarize_drift(baseline, new_centroids, np.asarray(dc["migration"]), np.asarray(dc["sizes_old"]),
                               np.asarray(dc["sizes_new"]), min_segment_users=config.min_segment_users,
                               thresholds=config.thresholds)
    drift.update({"version": plan.version, "as_of": plan.as_of, "window_seconds": w,
                  "centroid_shift_baseline": ("the same k-means update over the previous window"
                                              if dc["baseline"] is not None else "the previous segments' centroids"),
                  "centroid_shift_from_previous": [float(x) for x in sd.centroid_shift(plan.old_centroids, new_centroids)],
                  "previous_segments": plan.previous_path, "model": plan.version_dir,
                  "old_assignments": config.previous_assignments or "previous window embedded",
                  "kmeans": dataclasses.asdict(config.kmeans)})
    doc = _new_segments(config, plan, new_centroids, dc, drift)
    files = _write_outputs(config, plan, doc, drift, stats, dc)
    return RefreshSummary(config.output_dir, plan.version, files["segments"], drift, stats, files, time.time() - start)


def _new_segments(config: RefreshConfig, plan: RefreshPlan, centroids: np.ndarray, dc: dict, drift: dict) -> dict:
    """The new segments.json: profiles of a bounded (hash-sampled) set of users, full-count sizes."""
    from trainer.segments import profiles

    sizes = np.asarray(dc["sizes_new"], np.int64)
    total = int(sizes.sum())
    fraction = min(1.0, config.max_profile_users / max(total, 1))
    user_ids, labels, histories, attributes = [], [], {}, {}
    with FileSystems.open(plan.work("profile_rows.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            uid = row["user_id"]
            if fraction < 1.0 and sd.stable_fraction(uid, "profile") >= fraction:
                continue
            user_ids.append(uid)
            labels.append(row["segment"])
            histories[uid] = row["history"]
            attributes[uid] = row["attributes"]
    titles, categories = {}, {}
    with FileSystems.open(plan.work("catalog.jsonl")) as f:
        for line in f:
            item = json.loads(line)
            titles[item["item_id"]] = item["title"]
            categories[item["item_id"]] = tuple(item["categories"])
    inputs = profiles.ProfileInputs(user_ids=user_ids, labels=np.asarray(labels, np.int64),
                                    centroids=centroids.astype(np.float32), histories=histories,
                                    attributes=attributes, item_titles=titles, item_categories=categories)
    # Profiling needs the full-count sizes: a segment is profiled only if it is big enough in the whole window.
    doc = profiles.build_profiles(inputs, min_profile_size=1)
    for seg in doc["segments"]:
        n = int(sizes[seg["id"]])
        seg["size"], seg["share"] = n, round(n / max(total, 1), 4)
        if n < config.min_segment_users:  # privacy floor: no profile of any kind
            profiles.drop_profile(seg)
    doc.update({"num_users": total, "min_profile_size": config.min_segment_users,
                "profiled_users": len(user_ids),
                "beta": plan.previous_doc.get("beta"),
                "refresh": {k: drift[k] for k in ("version", "as_of", "window_seconds", "previous_segments", "model",
                                                  "migration", "sizes_old", "psi_total", "moved_share",
                                                  "max_centroid_shift", "new_segments", "vanished_segments",
                                                  "retrain_advised", "verdict")}})
    return doc


def drift_markdown(drift: dict, doc: dict) -> str:
    """drift.md: the verdict line first, then the tables."""
    k = drift["num_segments"]
    labels = {s["id"]: s["label"] for s in doc["segments"]}
    lines = [f"# Segment refresh v{drift['version']}", "", f"**{drift['verdict']}**", "",
             f"- Window: [{drift['as_of'] - drift['window_seconds']}, {drift['as_of']}) "
             f"({drift['window_seconds'] / DAY:g} days); old segments: {drift['old_assignments']}",
             f"- Users: {drift['users_new']} now, {drift['users_old']} before, {drift['users_both']} in both, "
             f"{drift['users_moved']} changed segment ({drift['moved_share']:.1%})",
             f"- PSI total {drift['psi_total']:.4f}; max centroid shift {drift['max_centroid_shift']:.4f} "
             f"(1 - cosine, against {drift['centroid_shift_baseline']})",
             f"- New segments (grew past {drift['min_segment_users']} users): {drift['new_segments'] or 'none'}; "
             f"vanished: {drift['vanished_segments'] or 'none'}",
             f"- Thresholds: {drift['thresholds']}", "", "## Per segment", "",
             "| Segment | Label | Users before | Users now | PSI | Centroid shift |", "|---|---|---:|---:|---:|---:|"]
    for i in range(k):
        lines.append(f"| {i} | {labels.get(i, '')} | {drift['sizes_old'][i]} | {drift['sizes_new'][i]} | "
                     f"{drift['psi'][i]:.4f} | {drift['centroid_shift'][i]:.4f} |")
    lines += ["", "## Migration (rows: before, columns: now)", "",
              "| before \\ now | " + " | ".join(str(i) for i in range(k)) + " |", "|---" * (k + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(str(x) for x in row) + " |" for i, row in enumerate(drift["migration"])]
    return "\n".join(lines) + "\n"


def _write_outputs(config, plan, doc, drift, stats, dc) -> dict:
    from trainer.segments import segment_report as rep

    out = config.output_dir
    files = {"segments": FileSystems.join(out, f"segments-v{plan.version}.json"),
             "segments_latest": FileSystems.join(out, SEGMENTS_FILE),
             "drift_json": FileSystems.join(plan.run_dir, "drift.json"),
             "drift_md": FileSystems.join(plan.run_dir, "drift.md"),
             "stats": FileSystems.join(plan.run_dir, features.STATS_FILE),
             "embeddings": FileSystems.join(plan.run_dir, rep.EMBEDDINGS_NPZ)}
    old_copy = FileSystems.join(out, f"segments-v{plan.version - 1}.json")
    if not _exists(old_copy):
        document.save(plan.previous_doc, old_copy)
        files["segments_previous"] = old_copy
    document.save(doc, files["segments"])
    document.save(doc, files["segments_latest"])
    outputs.write_text(files["drift_json"], json.dumps(drift, indent=2) + "\n")
    outputs.write_text(files["drift_md"], drift_markdown(drift, doc))
    outputs.write_text(files["stats"], json.dumps(stats, indent=2, sort_keys=True) + "\n")
    sample = dc["sample"]
    d = plan.old_centroids.shape[1]
    rep.save_embeddings(files["embeddings"], rep.EmbeddingSet(
        np.array([r[0] for r in sample], dtype=str), np.array([r[3] for r in sample], np.float32).reshape(-1, d),
        np.array([r[2] for r in sample], np.int64), np.array([r[1] for r in sample], np.int64), source="refresh"))
    FileSystems.delete([FileSystems.join(plan.run_dir, WORK_DIR)])
    found = FileSystems.match([FileSystems.join(plan.run_dir, "assignments*")])[0].metadata_list
    files["assignments"] = sorted(m.path for m in found)
    return files


def format_summary(summary: RefreshSummary) -> str:
    d, u = summary.drift, summary.stats["users"]
    lines = [f"segments refresh v{summary.version} finished in {summary.seconds:.1f}s -> {summary.output_dir}",
             f"  users: {u['in']:,} in, {u['embedded']:,} embedded, {u['dead_lettered']:,} dead-lettered "
             f"({', '.join(f'{k} {v:,}' for k, v in u['dead_letter'].items()) or 'none'}); "
             f"{u['in_previous_window']:,} in the previous window, {u['entered']:,} entered, {u['left']:,} left",
             f"  drift: PSI {d['psi_total']:.3f}, {d['moved_share']:.1%} of {d['users_both']:,} users moved, "
             f"max centroid shift {d['max_centroid_shift']:.3f}",
             f"  {d['verdict']}"]
    for name in ("segments", "segments_latest", "drift_md", "drift_json", "stats", "embeddings"):
        lines.append(f"  {name:<16} {summary.files[name]}")
    if summary.files["assignments"]:
        lines.append(f"  {'assignments':<16} {summary.files['assignments'][0]}"
                     + (f" (+{len(summary.files['assignments']) - 1})" if len(summary.files["assignments"]) > 1 else ""))
    return "\n".join(lines)
