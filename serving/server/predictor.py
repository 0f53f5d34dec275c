"""`Predictor`: the request logic of `segrec serve`, shared by gRPC and REST.

A call goes: model_spec -> version (model_manager) -> validation (before the
model: validation.py) -> batching queue (bounded, adaptive: batching.py) ->
the SavedModel signature -> a TF Serving response proto. Every failure is a
`ServeError` (errors.py) naming the field: INVALID_ARGUMENT / NOT_FOUND /
FAILED_PRECONDITION for a wrong request, RESOURCE_EXHAUSTED for a full queue,
UNAVAILABLE while draining. The gRPC servicers (grpc_api.py) and the REST app
(rest_api.py) are thin adapters over it.

GetModelMetadata answers signature_def, plus a segrec-only "segrec" field
(a JSON string: version, k_max, default_k, default_beta and the segment
labels of segments.json, read through trainer/segments/document.py).

Text-vector cache: a serving_default / recommend_defaults call to a version
with a text cache (model_manager) goes through text_cache.recommend: each
row's user_text vector from the cache, only the misses through encode_text,
then serving_text_vector; same answer, hits and misses counted.

Fault drill: `fault_delay_ms` adds that much latency inside every model call,
so tests and drills can hold a request inside the model (the
`segrec_requests_in_model` gauge) while they send SIGTERM, fill the queue or
publish a version. Never set it in production.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Optional

import numpy as np

from serving.server import batching
from serving.server import model_manager as mm
from serving.server import text_cache as tc
from serving.server import validation as val
from serving.server.config import ServeConfig
from serving.server.errors import ServeError, from_model_error
from trainer.segments import document as segments_doc

SEGREC_METADATA = "segrec"  # GetModelMetadata field of segments.json + defaults (not in TF Serving)
SIGNATURE_DEF = "signature_def"
_MAX_WAIT_S = 60.0


class Predictor:
    """Predict / GetModelMetadata / GetModelStatus over a ModelManager's versions.

    `draining` (set by the server on SIGTERM) refuses new Predict calls with
    UNAVAILABLE; `stop()` answers what is queued, then refuses new work.
    """

    def __init__(self, config: ServeConfig, manager: mm.ModelManager, metrics=None):
        self.config = config
        self.manager = manager
        self.metrics = metrics
        self.limits = val.Limits(max_batch=config.max_batch_size, max_string_bytes=config.max_string_bytes)
        self.draining = False
        self._fault_delay_s = max(0.0, config.fault_delay_ms) / 1000.0
        self.batcher = batching.Batcher(self._run, max_batch_size=config.max_batch_size,
                                        timeout_s=config.batch_timeout_ms / 1000.0, max_queue=config.max_queue,
                                        num_threads=config.batch_threads,
                                        on_batch=metrics.observe_batch if metrics else None,
                                        in_model=metrics.observe_in_model if metrics else None)
        if metrics is not None:
            metrics.track_queue(self.batcher.queued)
            metrics.track_text_cache(self.text_cache_entries)

    def _run(self, loaded, signature, inputs):
        if self._fault_delay_s:
            time.sleep(self._fault_delay_s)  # fault drill: the request is inside the model meanwhile
        if getattr(loaded, "text_cache", None) is not None and tc.usable(
                loaded.inputs, signature, loaded.default_k, loaded.default_beta):
            return self._run_cached(loaded, signature, inputs)
        return loaded.call(signature, inputs)

    def _run_cached(self, loaded, signature, inputs):
        outputs, hits, misses = tc.recommend(loaded.call, loaded.text_cache, signature, inputs,
                                             loaded.default_k, loaded.default_beta)
        if self.metrics is not None:
            self.metrics.observe_text_cache(hits, misses)
        return outputs

    def text_cache_entries(self) -> int:
        """Entries of every loaded version's text cache (the gauge reads it at each scrape)."""
        loaded = self.manager.snapshot.loaded.values()
        return sum(len(lv.text_cache) for lv in loaded if getattr(lv, "text_cache", None) is not None)

    def resolve(self, model_spec) -> mm.LoadedVersion:
        if not model_spec.name:
            raise ServeError("INVALID_ARGUMENT", "model_spec.name: missing")
        if model_spec.name != self.config.model_name:
            raise ServeError("NOT_FOUND", f"model_spec.name: no model {model_spec.name!r}; this server serves "
                                          f"{self.config.model_name!r}")
        has_version = model_spec.HasField("version")
        if has_version and model_spec.version_label:
            raise ServeError("INVALID_ARGUMENT", "model_spec: set version or version_label, not both")
        try:
            return self.manager.resolve(model_spec.version.value if has_version else None, model_spec.version_label)
        except mm.NoVersionError as err:
            raise ServeError(err.code, str(err)) from None

    def predict(self, request, timeout: Optional[float] = None):
        from tensorflow_serving.apis import predict_pb2

        if self.draining:
            raise ServeError("UNAVAILABLE", "the server is shutting down; retry on another replica")
        loaded = self.resolve(request.model_spec)
        try:
            signature = val.check_signature(request.model_spec.signature_name, loaded)
            inputs = val.decode_inputs(request, signature, loaded, self.limits)
            wanted = val.check_output_filter(request.output_filter, signature, loaded)
        except val.RequestError as err:
            raise ServeError(err.code, str(err)) from None
        try:
            future = self.batcher.submit(loaded, signature, inputs)
        except batching.QueueFull as err:
            raise ServeError("RESOURCE_EXHAUSTED", str(err)) from None
        except batching.ShuttingDown as err:
            raise ServeError("UNAVAILABLE", str(err)) from None
        try:
            outputs = future.result(timeout=min(timeout or _MAX_WAIT_S, _MAX_WAIT_S))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ServeError("DEADLINE_EXCEEDED", "the model did not answer before the deadline") from None
        except Exception as err:  # noqa: BLE001
            raise from_model_error(err) from None
        response = predict_pb2.PredictResponse()
        _fill_spec(response.model_spec, self.config.model_name, loaded.version, signature)
        for name, value in outputs.items():
            if wanted is None or name in wanted:
                response.outputs[name].CopyFrom(_tensor_proto(value))
        return response

    def metadata(self, request):
        from google.protobuf import wrappers_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        loaded = self.resolve(request.model_spec)
        fields = list(request.metadata_field)
        if not fields:
            raise ServeError("INVALID_ARGUMENT", "metadata_field: empty; ask for 'signature_def'")
        for field in fields:
            if field not in (SIGNATURE_DEF, SEGREC_METADATA):
                raise ServeError("INVALID_ARGUMENT", f"metadata_field: {field!r} is not supported; "
                                                     f"use {SIGNATURE_DEF!r} (or {SEGREC_METADATA!r})")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _fill_spec(response.model_spec, self.config.model_name, loaded.version, "")
        if SIGNATURE_DEF in fields:
            response.metadata[SIGNATURE_DEF].Pack(loaded.signature_defs)
        if SEGREC_METADATA in fields:
            info = {"version": loaded.version, "k_max": loaded.k_max, "default_k": loaded.default_k,
                    "default_beta": loaded.default_beta, "segments": _segment_labels(loaded.segments)}
            response.metadata[SEGREC_METADATA].Pack(wrappers_pb2.StringValue(value=json.dumps(info)))
        return response

    def status(self, request):
        from tensorflow_serving.apis import get_model_status_pb2

        spec = request.model_spec
        if spec.name != self.config.model_name:
            raise ServeError("NOT_FOUND", f"model_spec.name: no model {spec.name!r}; this server serves "
                                          f"{self.config.model_name!r}")
        states = self.manager.snapshot.states
        if spec.version_label:
            if spec.version_label not in self.manager.labels:
                raise ServeError("INVALID_ARGUMENT", f"model_spec.version_label: unknown label {spec.version_label!r}")
            versions = [self.manager.labels[spec.version_label]]
        elif spec.HasField("version"):
            versions = [spec.version.value]
        else:
            versions = sorted(states)
        missing = [v for v in versions if v not in states]
        if missing or not versions:
            raise ServeError("NOT_FOUND", f"model_spec.version: no version {missing or ''} of "
                                          f"{self.config.model_name!r} has been seen")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            s = states[v]
            item = response.model_version_status.add(version=v, state=s.state)
            item.status.error_code = s.error_code
            item.status.error_message = s.error_message
        return response

    def stop(self) -> None:
        self.batcher.stop()


def _segment_labels(segments: Optional[dict]) -> dict:
    return {str(k): v for k, v in segments_doc.labels(segments).items()}


def _fill_spec(spec, name: str, version: int, signature: str) -> None:
    spec.name = name
    spec.version.value = version
    if signature:
        spec.signature_name = signature


def _tensor_proto(value: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(value)
