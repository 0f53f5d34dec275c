"""Beam RunInference over an exported segrec SavedModel.

`SegRecModelHandler` is Beam's TensorFlow model handler for a segrec export:
it registers the export's custom ops (tensorflow_text WordPiece, ScaNN)
before loading (serving.export.layout.load_exported), loads the model once
per worker process (RunInference's shared handle), pads each batch of
`user_queries.UserQuery` into the signature's tensors (`batch_inputs`) and
returns one `PredictionResult` per user whose inference is that user's row
of every output (no batch dim) (`SignatureCall`). `RunSegRec` runs it
through `retrying.RunInferenceRetrying` and dead-letters the users the model
rejects even alone. Batch scoring runs RunSegRec; the segment refresh runs
the handler keyed (two windows through one model).

Text-vector cache: serving_default over an export with encode_text and
serving_text_vector encodes each distinct user_text once per worker
process (an LRU of `text_cache_size` texts per loaded model, shared by the
worker's threads: serving/server/text_cache.py), then runs
serving_text_vector on the vectors; the results are serving_default's.
`text_cache_size=0` calls serving_default as is.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
import types
import weakref
from typing import Mapping, Optional

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from beam_pipelines import transforms as T
from beam_pipelines.inference import NAMESPACE, retrying
from serving.export import layout
from serving.server import text_cache as tc
from trainer import features
from trainer.contracts import RECOMMEND_DEFAULTS, SERVING_DEFAULT, SERVING_EXCLUDE, USER_EMBEDDING

_LOG = logging.getLogger(NAMESPACE)

# The signatures a UserQuery can feed (serving_tf_example takes serialized tf.Examples).
QUERY_SIGNATURES = (SERVING_DEFAULT, RECOMMEND_DEFAULTS, USER_EMBEDDING, SERVING_EXCLUDE)
KNOB_SIGNATURES = (SERVING_DEFAULT, SERVING_EXCLUDE)  # the ones that take k and beta


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
    [B] vectors, whichever the export's signature declares. text_cache_size
    > 0: serving_default goes through the worker's text-vector cache of
    `model` when the export has the split signatures (`text_cache_for`).
    """

    def __init__(self, signature: str, k: Optional[int] = None, beta: Optional[float] = None,
                 text_cache_size: int = 0):
        self.signature = signature
        self.k = k
        self.beta = beta
        self.text_cache_size = int(text_cache_size)

    def __call__(self, model, batch, inference_args, model_id=None):
        fn = model.signatures[self.signature]
        specs = fn.structured_input_signature[1]
        inputs = batch_inputs(batch, specs, self.k, self.beta)
        cache = text_cache_for(model, self.signature, self.text_cache_size)
        if cache is not None:
            out, hits, misses = tc.recommend(functools.partial(_call, model), cache, self.signature, inputs)
            _CACHE_HITS.inc(hits)
            _CACHE_MISSES.inc(misses)
        else:
            out = _call(model, self.signature, inputs)
        out = {name: _decoded(value) for name, value in out.items()}
        return [
            PredictionResult(query, {name: value[i] for name, value in out.items()}, model_id)
            for i, query in enumerate(batch)
        ]


def batch_inputs(batch, specs: Mapping, k: Optional[int] = None, beta: Optional[float] = None) -> dict:
    """UserQuery list -> numpy inputs of a signature with TensorSpecs `specs`.

    history_item_ids [B, H]: padded with features.PAD_ITEM_ID to the batch's
    longest history, at least one column (a batch of cold users is [B, 1]);
    exclude_item_ids [B, E] (serving_exclude: each query's exclude_item_ids)
    likewise.
    """
    n = len(batch)
    inputs = {
        features.USER_TEXT: np.array([q.user_text for q in batch], dtype=object),
        features.HISTORY_ITEM_IDS: _padded([q.history_item_ids for q in batch]),
    }
    if features.EXCLUDE_ITEM_IDS in specs:
        inputs[features.EXCLUDE_ITEM_IDS] = _padded([q.exclude_item_ids for q in batch])
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


def _padded(rows) -> np.ndarray:
    """Id sequences -> [B, width] object array padded with PAD_ITEM_ID, at least one column."""
    width = max([1] + [len(r) for r in rows])
    out = np.full((len(rows), width), features.PAD_ITEM_ID, dtype=object)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # loaded model -> its TextVectorCache
_CACHES_LOCK = threading.Lock()
_CACHE_HITS = Metrics.counter(NAMESPACE, "text_cache.hits")
_CACHE_MISSES = Metrics.counter(NAMESPACE, "text_cache.misses")


def text_cache_for(model, signature: str, size: int) -> Optional[tc.TextVectorCache]:
    """The worker's text-vector cache of a loaded `model` (one per model, shared by threads), or None:
    size 0, a signature other than serving_default / serving_exclude, or an export without the split signatures."""
    if size <= 0 or signature not in (SERVING_DEFAULT, SERVING_EXCLUDE) or \
            not tc.usable(model.signatures.keys(), signature):
        return None
    with _CACHES_LOCK:
        cache = _CACHES.get(model)
        if cache is None:
            cache = _CACHES[model] = tc.TextVectorCache(size)
        return cache


def _call(model, signature: str, inputs: dict) -> dict:
    """One call of a signature of the loaded model: numpy in, numpy out."""
    import tensorflow as tf

    out = model.signatures[signature](**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: value.numpy() for name, value in out.items()}


def _decoded(value: np.ndarray) -> np.ndarray:
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
      signature: serving_default or serving_exclude (need k and beta; the
        latter also sends each query's exclude_item_ids), recommend_defaults
        or user_embedding.
      k, beta: the knobs of serving_default.
      min_batch_size, max_batch_size: RunInference batching bounds.
      text_cache_size: user texts whose vectors a worker keeps per loaded
        model (serving_default and serving_exclude; 0 = no cache).
      **kwargs: passed to TFModelHandlerTensor (e.g. model_copies).
    """

    def __init__(self, model_dir: str, signature: str = SERVING_DEFAULT, k: Optional[int] = None,
                 beta: Optional[float] = None, min_batch_size: Optional[int] = None,
                 max_batch_size: Optional[int] = None, text_cache_size: int = tc.DEFAULT_SIZE, **kwargs):
        if signature not in QUERY_SIGNATURES:
            raise ValueError(f"signature must be one of {QUERY_SIGNATURES}, got {signature!r}")
        if signature in KNOB_SIGNATURES and (k is None or beta is None):
            raise ValueError(f"{signature} needs k and beta (export.json holds the export's own)")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if beta is not None and not np.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta}")
        if min_batch_size is not None and max_batch_size is not None and min_batch_size > max_batch_size:
            raise ValueError(f"min_batch_size {min_batch_size} > max_batch_size {max_batch_size}")
        if text_cache_size < 0:
            raise ValueError(f"text_cache_size must be >= 0, got {text_cache_size}")
        version_dir = layout.resolve_version_dir(model_dir)
        super().__init__(version_dir, inference_fn=SignatureCall(signature, k, beta, text_cache_size),
                         min_batch_size=min_batch_size, max_batch_size=max_batch_size, **kwargs)
        self.version_dir = version_dir
        self.signature = signature

    def load_model(self):
        _LOG.info("loading %s (%s) on this worker", self._model_uri, self.signature)
        return layout.load_exported(self._model_uri)

    def get_num_bytes(self, batch) -> int:
        return sum(len(q.user_text) + sum(len(h) for h in q.history_item_ids)
                   + sum(len(e) for e in q.exclude_item_ids) for q in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


def _model_dead(failed):
    query, error = failed
    yield pvalue.TaggedOutput(T.DEAD, retrying.inference_dead_letter(query, error))
    yield T.tagged_count(f"dead.{retrying.MODEL_SOURCE}.{retrying.INFERENCE_ERROR}")


class RunSegRec(beam.PTransform):
    """PCollection[UserQuery] -> {"results", T.DEAD, T.COUNTS} (a dict with a .results property).

    results: (UserQuery, {output name: numpy array}), the signature's
    outputs, one user's row each (item_ids [k] str, scores [k], segment_id
    [], segment_probs [K]; or embedding [d], segment_id, segment_probs for
    user_embedding). T.DEAD: a records.DeadLetter (source MODEL_SOURCE,
    reason INFERENCE_ERROR, the error in detail) for each user whose query
    fails inference even alone (see retrying.RunInferenceRetrying).
    T.COUNTS: dead.model.inference_error, inference.failed_batches,
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
        run = queries | "RunInference" >> retrying.RunInferenceRetrying(self.handler)
        results = run["results"] | "Unpack" >> beam.Map(lambda r: (r.example, r.inference))
        dead = run[retrying.FAILED] | "DeadLetter" >> beam.FlatMap(_model_dead).with_outputs(T.DEAD, T.COUNTS)
        counts = (run[T.COUNTS], dead[T.COUNTS]) | "FlattenCounts" >> beam.Flatten()
        return _Results(results, dead[T.DEAD], counts)


class _Results(dict):
    """RunSegRec's outputs: .results, [T.DEAD], [T.COUNTS] (a dict, so Beam sees PCollections)."""

    def __init__(self, results, dead, counts):
        super().__init__({"results": results, T.DEAD: dead, T.COUNTS: counts})

    @property
    def results(self):
        return self["results"]
