"""`segrec serve`: a development server speaking TF Serving's gRPC API.

    PredictionService  Predict, GetModelMetadata (signature_def, plus a
                       segrec-only "segrec" field: segments and defaults);
                       Classify, Regress, MultiInference -> UNIMPLEMENTED
    ModelService       GetModelStatus (state and load error of each version)
    grpc.health.v1     Health/Check (SERVING once a version is loaded)

A request goes: auth (optional bearer token) -> model_spec -> version
(model_manager) -> validation (before the model) -> batching queue (bounded,
adaptive: serving/server/batching.py) -> the SavedModel signature. A wrong request is INVALID_ARGUMENT / NOT_FOUND /
FAILED_PRECONDITION with the field named; a full queue RESOURCE_EXHAUSTED.
`Predictor` holds that logic once; the gRPC servicers and the REST adapter
(serving/server/rest_api.py) are thin wrappers around it. SIGTERM stops taking new
calls (health turns NOT_SERVING, Predict answers UNAVAILABLE), answers the
in-flight and queued ones and exits 0.

Fault drill: `fault_delay_ms` (`segrec serve --fault-delay-ms`) adds that
much latency inside every model call, so tests and drills can hold a request
inside the model (visible as the `segrec_requests_in_model` gauge) while
they send SIGTERM, fill the queue or publish a version. Never set it in
production.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Optional

import grpc
import numpy as np

from serving.server import batching
from serving.server import model_manager as mm
from serving.server import validation as val
from trainer.segments import document as segments_doc

_LOG = logging.getLogger("segrec.serve")
SEGREC_METADATA = "segrec"  # GetModelMetadata field of segments.json + defaults (not in TF Serving)
SIGNATURE_DEF = "signature_def"
_MAX_WAIT_S = 60.0


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one `segrec serve`.

    model_base_path holds <model_name>/<N>/. rest_port / metrics_port 0 = off.
    version_labels: label -> version. max_batch_size: rows of one model call
    (and of one request); batch_timeout_ms: with batch_threads > 1, how long
    the oldest queued request waits for others while the model is busy (a
    request that finds the model idle runs at once); batch_threads: model
    calls that may run at the same time; max_queue: requests waiting before
    RESOURCE_EXHAUSTED. fault_delay_ms: latency added inside every model
    call (fault drills and tests only).
    token: bearer token every call must carry (None = no auth). tls_cert /
    tls_key: PEM files for a TLS port. max_message_bytes: gRPC receive limit.
    """

    model_base_path: str
    model_name: str = "segrec"
    host: str = "127.0.0.1"
    port: int = 8500
    poll_seconds: float = 2.0
    max_batch_size: int = 64
    batch_timeout_ms: float = 5.0
    max_queue: int = 256
    rest_port: int = 0
    metrics_port: int = 0
    version_labels: tuple = ()  # ((label, version), ...) so the dataclass stays hashable
    max_string_bytes: int = 10 * 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    grpc_workers: int = 16
    token: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    grace_seconds: float = 10.0
    batch_threads: int = 1
    fault_delay_ms: float = 0.0

    @property
    def labels(self) -> dict:
        return dict(self.version_labels)


def parse_labels(text: str) -> tuple:
    """"stable=1,canary=2" -> (("stable", 1), ("canary", 2))."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        label, sep, version = part.partition("=")
        if not sep or not label.strip() or not version.strip().isdigit():
            raise ValueError(f"--version-labels: {part!r} is not LABEL=VERSION (e.g. stable=1,canary=2)")
        out.append((label.strip(), int(version)))
    return tuple(out)


class ServeError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# --- the logic shared by gRPC and REST ---------------------------------------------------
class Predictor:
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

    def _run(self, loaded, signature, inputs):
        if self._fault_delay_s:
            time.sleep(self._fault_delay_s)  # fault drill: the request is inside the model meanwhile
        return loaded.call(signature, inputs)

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
            raise _model_error(err) from None
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


def _model_error(err: Exception) -> ServeError:
    import tensorflow as tf

    if isinstance(err, tf.errors.InvalidArgumentError):
        return ServeError("INVALID_ARGUMENT", err.message.split("\n")[0])
    _LOG.exception("the model failed", exc_info=err)
    return ServeError("INTERNAL", f"the model failed: {type(err).__name__}")


def _fill_spec(spec, name: str, version: int, signature: str) -> None:
    spec.name = name
    spec.version.value = version
    if signature:
        spec.signature_name = signature


def _tensor_proto(value: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(value)


# --- gRPC adapters ----------------------------------------------------------------------------
def _servicers():
    from tensorflow_serving.apis import (
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def __init__(self, predictor: Predictor, metrics):
            self.predictor, self.metrics = predictor, metrics

        def Predict(self, request, context):
            return _call(self.metrics, "Predict", context,
                         lambda: self.predictor.predict(request, context.time_remaining()))

        def GetModelMetadata(self, request, context):
            return _call(self.metrics, "GetModelMetadata", context, lambda: self.predictor.metadata(request))

        def Classify(self, request, context):
            return _unimplemented(self.metrics, "Classify", context)

        def Regress(self, request, context):
            return _unimplemented(self.metrics, "Regress", context)

        def MultiInference(self, request, context):
            return _unimplemented(self.metrics, "MultiInference", context)

    class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
        def __init__(self, predictor: Predictor, metrics):
            self.predictor, self.metrics = predictor, metrics

        def GetModelStatus(self, request, context):
            return _call(self.metrics, "GetModelStatus", context, lambda: self.predictor.status(request))

        def HandleReloadConfigRequest(self, request, context):
            return _unimplemented(self.metrics, "HandleReloadConfigRequest", context)

    return PredictionServicer, ModelServicer


def _call(metrics, method: str, context, fn):
    start = time.perf_counter()
    code = "OK"
    try:
        return fn()
    except ServeError as err:
        code = err.code
        context.abort(getattr(grpc.StatusCode, err.code), str(err))
    except Exception as err:  # noqa: BLE001  (a server bug: INTERNAL, logged, the server keeps serving)
        code = "INTERNAL"
        _LOG.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: {type(err).__name__}")
    finally:
        if metrics is not None:
            metrics.observe_request(method, code, time.perf_counter() - start)


def _unimplemented(metrics, method: str, context):
    if metrics is not None:
        metrics.observe_request(method, "UNIMPLEMENTED", 0.0)
    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by segrec serve; use Predict")


class _TokenInterceptor(grpc.ServerInterceptor):
    """Every call but health checks must carry `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata authorization)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self._expected:
            return continuation(details)
        return self._deny


# --- grpc.health.v1 without grpcio-health-checking ------------------------------------------------
# HealthCheckRequest {string service = 1;} / HealthCheckResponse {ServingStatus status = 1;}
# are one-field messages, encoded here by hand: grpcio-health-checking is not installed.
SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3
KNOWN_SERVICES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


def _health_service(is_serving):
    def check(raw: bytes, context):
        service = _decode_health_request(raw)
        if service not in KNOWN_SERVICES:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return bytes([0x08, SERVING if is_serving() else NOT_SERVING])

    handler = grpc.unary_unary_rpc_method_handler(check, request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": handler})


def _decode_health_request(raw: bytes) -> str:
    # field 1, wire type 2 (tag 0x0a), varint length, utf-8 bytes; anything else is ignored.
    if len(raw) >= 2 and raw[0] == 0x0A:
        length, shift, i = 0, 0, 1
        while i < len(raw):
            b = raw[i]
            length |= (b & 0x7F) << shift
            i += 1
            shift += 7
            if not b & 0x80:
                break
        return raw[i:i + length].decode("utf-8", "replace")
    return ""


# --- the server ---------------------------------------------------------------------------------------
class Server:
    """Owns the manager, the predictor, the gRPC (and optional REST / metrics) servers."""

    def __init__(self, config: ServeConfig, loader=mm.load_version):
        from serving.server import prometheus as metrics_mod

        self.config = config
        self.metrics = metrics_mod.Metrics() if config.metrics_port else None
        self.manager = mm.ModelManager(config.model_base_path, config.model_name, config.poll_seconds,
                                       labels=config.labels, loader=loader,
                                       on_change=self.metrics.observe_versions if self.metrics else None)
        self.predictor = Predictor(config, self.manager, self.metrics)
        self._draining = False
        self.grpc_server = None
        self.rest = None
        self.port = None

    def start(self) -> int:
        from tensorflow_serving.apis import (
            model_service_pb2_grpc,
            prediction_service_pb2_grpc,
        )

        self.manager.start()
        c = self.config
        interceptors = [_TokenInterceptor(c.token)] if c.token else []
        self.grpc_server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=c.grpc_workers, thread_name_prefix="segrec-grpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", c.max_message_bytes),
                     ("grpc.max_send_message_length", c.max_message_bytes)],
            maximum_concurrent_rpcs=c.max_queue + c.grpc_workers,
        )
        prediction, model = _servicers()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            prediction(self.predictor, self.metrics), self.grpc_server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(model(self.predictor, self.metrics),
                                                                  self.grpc_server)
        self.grpc_server.add_generic_rpc_handlers((_health_service(self.is_serving),))
        address = f"{c.host}:{c.port}"
        if c.tls_cert and c.tls_key:
            with open(c.tls_key, "rb") as k, open(c.tls_cert, "rb") as cert:
                creds = grpc.ssl_server_credentials([(k.read(), cert.read())])
            self.port = self.grpc_server.add_secure_port(address, creds)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.grpc_server.start()
        if c.rest_port:
            from serving.server import rest_api as rest

            self.rest = rest.RestServer(self.predictor, c.host, c.rest_port, token=c.token)
            self.rest.start()
        if self.metrics is not None:
            self.metrics.serve(c.host, c.metrics_port)
            self.metrics.observe_versions(self.manager.snapshot)
        return self.port

    def is_serving(self) -> bool:
        return not self._draining and bool(self.manager.snapshot.loaded)

    def stop(self) -> None:
        """Stop taking calls, answer the in-flight ones (up to grace_seconds), stop polling."""
        self.predictor.draining = True  # first: once health says NOT_SERVING, Predict is refused
        self._draining = True
        if self.rest is not None:
            self.rest.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(self.config.grace_seconds).wait(self.config.grace_seconds + 1)
        self.predictor.stop()
        self.manager.stop()


def serve(config: ServeConfig, ready=None) -> int:
    """Runs until SIGTERM / SIGINT; returns 0 after draining."""
    server = Server(config)
    port = server.start()
    snap = server.manager.snapshot
    loaded = sorted(snap.loaded)
    extra = "".join([f", REST :{config.rest_port}" if config.rest_port else "",
                     f", metrics :{config.metrics_port}" if config.metrics_port else ""])
    print(f"segrec serve: model {config.model_name!r} versions {loaded or 'none yet'} on "
          f"{config.host}:{port}{extra}", flush=True)
    if ready is not None:
        ready(port)
    done = threading.Event()

    def on_signal(signum, frame):
        _LOG.info("signal %d: draining", signum)
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not done.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.stop()
    print("segrec serve: stopped", flush=True)
    return 0
