"""Beam RunInference over an exported segrec SavedModel, and the user queries it reads.

    interactions, items, users --BuildUserQueries--> UserQuery per user
                                              \\--> dead letters (per reason), counts
    UserQuery --RunSegRec(model_dir, signature, k, beta)--> (UserQuery, {output: numpy})
                                                     \\--> dead letters (inference_error), counts

`BuildUserQueries` builds each user's query features with the very functions
preprocess uses for training examples (`examples.query_features`:
`history_for` + `user_text`), so a scored user looks to the model exactly as
a training query would at the same time. `RunSegRec` is Beam's RunInference
with `SegRecModelHandler`, a TensorFlow model handler that registers the
export's custom ops (tensorflow_text WordPiece, ScaNN) before loading, loads
the model once per worker process (RunInference's shared handle), pads each
batch of queries into the signature's tensors and returns one
`PredictionResult` per user whose inference is that user's row of every
output (no batch dim). Batch scoring (`segrec score`) and segment refresh
(`segrec segments refresh`) both run the model through this module.

A batch the model rejects (a string the tokenizer or tf.constant refuses,
an in-graph assert, an out-of-memory batch) does not fail the job:
`RunInferenceRetrying` runs Beam's RunInference with exception handling,
sends each element of a failed batch through the same handler alone, and
returns the elements that still fail with their error. RunSegRec turns
those into dead letters (source MODEL_SOURCE, reason INFERENCE_ERROR), so
one bad user never costs the other users of its batch.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
import types
from typing import Mapping, Optional

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from beam_pipelines import transforms as T
from beam_pipelines.sources import records
from trainer import features
from trainer.data import examples as ex

NAMESPACE = "segrec.inference"
_LOG = logging.getLogger(NAMESPACE)

from serving.export import layout
from trainer.contracts import RECOMMEND_DEFAULTS, SERVING_DEFAULT, USER_EMBEDDING

SIGNATURES = (SERVING_DEFAULT, RECOMMEND_DEFAULTS, USER_EMBEDDING)

# Why a user has no query (dead-letter source QUERY_SOURCE). Stable names:
# stats.json and tests key on them.
QUERY_SOURCE = "user_query"
NO_EVENTS = "no_events"  # a profile but no interaction at all (and cold users not scored)
UNUSABLE_EVENTS = "unusable_events"  # every interaction names an unknown item or was filtered
NO_EVENTS_IN_WINDOW = "no_events_in_window"  # events, but none in [as_of - window, as_of)
QUERY_REASONS = (NO_EVENTS, UNUSABLE_EVENTS, NO_EVENTS_IN_WINDOW)

# Users whose query the model rejects even alone (dead-letter source MODEL_SOURCE).
MODEL_SOURCE = "model"
INFERENCE_ERROR = "inference_error"
FAILED = "failed"  # RunInferenceRetrying's output of (element, error text) pairs
MAX_ERROR_CHARS = 1000

PROGRESS_EVERY = 10_000


@dataclasses.dataclass(frozen=True)
class UserQuery:
    """One user's query features, as every signature of the export reads them.

    history_item_ids: most recent first, at most the policy's max_history,
    empty for a cold user.
    """

    user_id: str
    user_text: str
    history_item_ids: tuple = ()  # tuple[str, ...]


# --- the model handler ----------------------------------------------------------------------


def _tensorflow_inference():
    """apache_beam.ml.inference.tensorflow_inference, importable on setuptools >= 82.

    Beam's TF handler imports tensorflow_hub, whose import calls
    `pkg_resources.parse_version` once to check the TF version; setuptools
    82 removed pkg_resources (tensorflow/hub#934, unfixed in 0.16.1). When
    it is missing, a module holding just parse_version (from `packaging`)
    stands in for that one import and is removed again afterwards, so no
    other code ever sees a partial pkg_resources.
    """
    name = "apache_beam.ml.inference.tensorflow_inference"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != "pkg_resources":
            raise
    from packaging.version import parse

    shim = types.ModuleType("pkg_resources")
    shim.parse_version = parse
    sys.modules["pkg_resources"] = shim
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


_tfi = _tensorflow_inference()


class SignatureCall:
    """The handler's inference_fn: a batch of UserQuery -> one PredictionResult each.

    Picklable (plain fields), so it travels to Beam workers with the handler.
    k and beta are fed only to signatures that take them, as scalars or as
    [B] vectors, whichever the export's signature declares.
    """

    def __init__(self, signature: str, k: Optional[int] = None, beta: Optional[float] = None):
        self.signature = signature
        self.k = k
        self.beta = beta

    def __call__(self, model, batch, inference_args, model_id=None):
        import tensorflow as tf

        fn = model.signatures[self.signature]
        specs = fn.structured_input_signature[1]
        inputs = batch_inputs(batch, specs, self.k, self.beta)
        out = fn(**{name: tf.constant(value) for name, value in inputs.items()})
        out = {name: _numpy(value) for name, value in out.items()}
        return [
            PredictionResult(query, {name: value[i] for name, value in out.items()}, model_id)
            for i, query in enumerate(batch)
        ]


def batch_inputs(batch, specs: Mapping, k: Optional[int] = None, beta: Optional[float] = None) -> dict:
    """UserQuery list -> numpy inputs of a signature with TensorSpecs `specs`.

    history_item_ids [B, H]: padded with features.PAD_ITEM_ID to the batch's
    longest history, at least one column (a batch of cold users is [B, 1]).
    """
    n = len(batch)
    width = max([1] + [len(q.history_item_ids) for q in batch])
    history = np.full((n, width), features.PAD_ITEM_ID, dtype=object)
    for i, q in enumerate(batch):
        history[i, : len(q.history_item_ids)] = q.history_item_ids
    inputs = {
        features.USER_TEXT: np.array([q.user_text for q in batch], dtype=object),
        features.HISTORY_ITEM_IDS: history,
    }
    if features.USER_ID in specs:
        inputs[features.USER_ID] = np.array([q.user_id for q in batch], dtype=object)
    for name, value, dtype in ((features.K, k, np.int32), (features.BETA, beta, np.float32)):
        if name not in specs:
            continue
        if value is None:
            raise ValueError(f"the signature takes {name!r}; pass {name}= to the model handler")
        rank = specs[name].shape.rank
        inputs[name] = np.asarray(value, dtype) if rank == 0 else np.full((n,), value, dtype)
    unknown = set(specs) - set(inputs)
    if unknown:
        raise ValueError(f"the signature needs inputs {sorted(unknown)} that a UserQuery does not provide")
    return inputs


def _numpy(tensor) -> np.ndarray:
    value = tensor.numpy()
    if value.dtype == object:  # tf.string -> python str
        value = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(value) if value.size else value
    return value


class SegRecModelHandler(_tfi.TFModelHandlerTensor):
    """Beam's TensorFlow model handler for a segrec export.

    Elements are UserQuery; load_model registers the export's custom ops
    (serving.export.layout.load_exported) on the worker before loading; batching
    follows min_batch_size / max_batch_size (Beam's BatchElements).

    Args:
      model_dir: a version dir, or a base path (its latest version).
      signature: serving_default (needs k and beta), recommend_defaults or
        user_embedding.
      k, beta: the knobs of serving_default.
      min_batch_size, max_batch_size: RunInference batching bounds.
      **kwargs: passed to TFModelHandlerTensor (e.g. model_copies).
    """

    def __init__(self, model_dir: str, signature: str = SERVING_DEFAULT, k: Optional[int] = None,
                 beta: Optional[float] = None, min_batch_size: Optional[int] = None,
                 max_batch_size: Optional[int] = None, **kwargs):
        if signature not in SIGNATURES:
            raise ValueError(f"signature must be one of {SIGNATURES}, got {signature!r}")
        if signature == SERVING_DEFAULT and (k is None or beta is None):
            raise ValueError("serving_default needs k and beta (export.json holds the export's own)")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if beta is not None and not np.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta}")
        if min_batch_size is not None and max_batch_size is not None and min_batch_size > max_batch_size:
            raise ValueError(f"min_batch_size {min_batch_size} > max_batch_size {max_batch_size}")
        version_dir = layout.resolve_version_dir(model_dir)
        super().__init__(version_dir, inference_fn=SignatureCall(signature, k, beta),
                         min_batch_size=min_batch_size, max_batch_size=max_batch_size, **kwargs)
        self.version_dir = version_dir
        self.signature = signature

    def load_model(self):
        _LOG.info("loading %s (%s) on this worker", self._model_uri, self.signature)
        return layout.load_exported(self._model_uri)

    def get_num_bytes(self, batch) -> int:
        return sum(len(q.user_text) + sum(len(h) for h in q.history_item_ids) for q in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


def describe_error(err: BaseException) -> str:
    """"<Type>: <message>" on one line, at most MAX_ERROR_CHARS, encodable as UTF-8.

    TensorFlow's messages span lines ("Graph execution error: ... assertion
    failed: [...]"); a message may quote the offending text, lone surrogates
    included, which could not be written to a UTF-8 dead-letter file as is.
    """
    text = " ".join(f"{type(err).__name__}: {err}".split())
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _batch_error(error) -> str:
    """The batch's error as Beam's exception handling passes it: (type, repr, traceback lines).

    TensorFlow's errors have an empty repr; the traceback's last line holds the message.
    """
    if isinstance(error, tuple) and len(error) == 3:
        lines = "".join(error[2] or ()).strip().splitlines()
        text = lines[-1] if lines else str(error[1])
    else:
        text = str(error)
    return text[:300]


class RetryOneByOne(beam.DoFn):
    """RunInference's failed batches -> each element alone through the same model handler.

    Input: the `failed_inferences` of RunInference(...).with_exception_handling(),
    (batch, (exception type, repr, traceback)). Main output: what the
    handler returns for each element that succeeds alone (PredictionResult,
    or (key, PredictionResult) with a KeyedModelHandler); FAILED: (element,
    describe_error(its own exception)) for the ones that fail alone too;
    COUNTS: inference.failed_batches, inference.retried_elements.

    The model is loaded on a worker's first failed batch, not in setup: a
    job where nothing fails never loads this second copy. exc_class: what
    an element's failure may raise (anything else fails the job).
    """

    def __init__(self, handler, exc_class=Exception):
        from apache_beam.utils import shared

        self._handler = handler
        self._exc_class = exc_class
        self._shared = shared.Shared()
        self._model = None
        self._failed = Metrics.counter(NAMESPACE, "inference_failed_batches")
        self._dead = Metrics.counter(NAMESPACE, f"dead_letter.{INFERENCE_ERROR}")

    def process(self, failed):
        batch, error = failed
        batch = list(batch)
        _LOG.warning("inference failed on a batch of %d (%s); retrying its elements one by one", len(batch),
                     _batch_error(error))
        self._failed.inc()
        yield T._count("inference.failed_batches")
        yield T._count("inference.retried_elements", len(batch))
        if self._model is None:
            self._model = self._shared.acquire(self._handler.load_model, tag="retry-one-by-one")
        for element in batch:
            try:
                results = list(self._handler.run_inference([element], self._model))
            except self._exc_class as err:  # the element's own failure: dead-lettered by the caller
                self._dead.inc()
                yield pvalue.TaggedOutput(FAILED, (element, describe_error(err)))
                continue
            yield from results


class RunInferenceRetrying(beam.PTransform):
    """RunInference(handler) where a failing batch costs only its failing elements.

    PCollection[example] -> {"results": what RunInference returns,
    FAILED: (example, error text) of the examples that fail even alone,
    T.COUNTS: inference.failed_batches, inference.retried_elements}.

    Beam's RunInference has no per-element fallback: with exception
    handling, a batch whose inference raises goes whole to
    `failed_inferences`. RetryOneByOne re-runs each of its elements alone
    with the same handler (keyed or not), so the good ones are still scored.
    """

    def __init__(self, handler, exc_class=Exception):
        """handler: a ModelHandler (keyed or not); exc_class: the exception class(es) that mark a
        failed inference (RunInference.with_exception_handling's; anything else fails the job)."""
        super().__init__()
        self._handler = handler
        self._exc_class = exc_class

    def expand(self, examples):
        results, dlq = examples | "RunInference" >> RunInference(self._handler).with_exception_handling(
            exc_class=self._exc_class)
        retry = RetryOneByOne(self._handler, self._exc_class)
        retried = dlq.failed_inferences | "RetryOneByOne" >> beam.ParDo(retry).with_outputs(
            FAILED, T.COUNTS, main="results")
        merged = (results, retried.results) | "MergeResults" >> beam.Flatten()
        return {"results": merged, FAILED: retried[FAILED], T.COUNTS: retried[T.COUNTS]}


def inference_dead_letter(query: UserQuery, error: str, where: str = "") -> records.DeadLetter:
    """The dead letter of a user the model rejects: source MODEL_SOURCE, reason INFERENCE_ERROR.

    raw holds the query (ASCII-escaped JSON: the text the model refused may
    not be valid UTF-8 on its own); where (e.g. " (previous window)") is
    appended to the location.
    """
    raw = json.dumps({"user_id": query.user_id, "user_text": query.user_text,
                      "history_item_ids": list(query.history_item_ids)}, sort_keys=True, ensure_ascii=True)
    return records.DeadLetter(MODEL_SOURCE, f"user {query.user_id}{where}", INFERENCE_ERROR,
                              f"the model rejected this user's query even alone: {error}", raw)


def _model_dead(failed):
    query, error = failed
    yield pvalue.TaggedOutput(T.DEAD, inference_dead_letter(query, error))
    yield T._count(f"dead.{MODEL_SOURCE}.{INFERENCE_ERROR}")


class RunSegRec(beam.PTransform):
    """PCollection[UserQuery] -> {"results", T.DEAD, T.COUNTS} (a dict with a .results property).

    results: (UserQuery, {output name: numpy array}), the signature's
    outputs, one user's row each (item_ids [k] str, scores [k], segment_id
    [], segment_probs [K]; or embedding [d], segment_id, segment_probs for
    user_embedding). T.DEAD: a records.DeadLetter (source MODEL_SOURCE,
    reason INFERENCE_ERROR, the error in detail) for each user whose query
    fails inference even alone (see RunInferenceRetrying). T.COUNTS:
    dead.model.inference_error, inference.failed_batches,
    inference.retried_elements. Every query is in exactly one of results
    and T.DEAD.

    Args as SegRecModelHandler.
    """

    def __init__(self, model_dir: str, signature: str = SERVING_DEFAULT, k: Optional[int] = None,
                 beta: Optional[float] = None, min_batch_size: Optional[int] = None,
                 max_batch_size: Optional[int] = None, **handler_kwargs):
        super().__init__()
        self.handler = SegRecModelHandler(model_dir, signature, k, beta, min_batch_size, max_batch_size,
                                          **handler_kwargs)

    @property
    def version_dir(self) -> str:
        return self.handler.version_dir

    def expand(self, queries):
        run = queries | "RunInference" >> RunInferenceRetrying(self.handler)
        results = run["results"] | "Unpack" >> beam.Map(lambda r: (r.example, r.inference))
        dead = run[FAILED] | "DeadLetter" >> beam.FlatMap(_model_dead).with_outputs(T.DEAD, T.COUNTS)
        counts = (run[T.COUNTS], dead[T.COUNTS]) | "FlattenCounts" >> beam.Flatten()
        return _Results(results, dead[T.DEAD], counts)


class _Results(dict):
    """RunSegRec's outputs: .results, [T.DEAD], [T.COUNTS] (a dict, so Beam sees PCollections)."""

    def __init__(self, results, dead, counts):
        super().__init__({"results": results, T.DEAD: dead, T.COUNTS: counts})

    @property
    def results(self):
        return self["results"]


def check_not_all_rejected(queries: int, scored: int, dead_letter_dir: str) -> None:
    """Every query failing inference is the model's or the job's fault, not the users': an error.

    (One bad user is dead-lettered and the job succeeds; all of them is
    e.g. a model that does not take these inputs.)
    """
    if queries and not scored:
        raise records.InputError(
            f"the model rejected all {queries:,} user queries (reason {INFERENCE_ERROR}; the errors are in "
            f"{dead_letter_dir}): check that --model-dir is a segrec export matching this input")


# --- user queries from canonical records ----------------------------------------------------


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
                 cold_users: bool):
        self._policy = policy
        self._as_of = as_of
        self._window = window_seconds
        self._cold = cold_users
        self._built = Metrics.counter(NAMESPACE, "queries_built")

    def process(self, element, titles, as_of=None):
        user_id, grouped = element
        inters = list(grouped["events"])
        seen = list(grouped["seen"])
        users = list(grouped["users"])
        as_of = self._as_of if self._as_of is not None else as_of
        attributes = users[0].attribute_dict() if users else {}
        events = ex.sort_events(ex.Event(r.item_id, r.timestamp, r.weight) for r in inters)
        yield T._count("users.in")
        if inters:
            yield T._count("accepted.interactions", len(inters))
        usable = events
        if as_of is not None:
            start = as_of - self._window if self._window is not None else None
            usable = [e for e in events if e.timestamp < as_of and (start is None or e.timestamp >= start)]
        if usable or (self._cold and users):
            text, history = ex.query_features(usable, attributes, titles, self._policy, before=as_of)
            self._built.inc()
            yield T._count("users.queries")
            if not history:
                yield T._count("users.cold")
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
        yield T._count(f"dead.{QUERY_SOURCE}.{reason}")
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
    text) instead of dead-lettered.

    Outputs (a dict with a .queries property): `queries`, T.DEAD (records.DeadLetter: the
    row-level ones of the dedupe/join steps and the user-level ones) and
    T.COUNTS ((key, n) pairs: users.in, users.queries (queries built), users.cold,
    dead.<source>.<reason>, filtered.<reason>, accepted.*).
    """

    def __init__(self, policy: ex.ExamplePolicy = ex.ExamplePolicy(), as_of: Optional[int] = None,
                 window_seconds: Optional[int] = None, cold_users: bool = False,
                 min_rating: Optional[float] = None):
        super().__init__()
        if window_seconds is not None and window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
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
                BuildQuery(self._policy, self._as_of, self._window, self._cold), titles=titles, as_of=as_of
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


def _join(a: str, b: str) -> str:
    return os.path.join(a, b) if "://" not in a else a.rstrip("/") + "/" + b
