"""The REST subset of TF Serving's JSON API: a FastAPI app over the same
`Predictor` as gRPC, served by uvicorn next to the gRPC port.

    POST /v1/models/<name>[/versions/<N>|/labels/<L>]:predict
         {"signature_name": ..., "inputs": {...}}     -> {"outputs": {...}}
         {"signature_name": ..., "instances": [...]}  -> {"predictions": [...]}
    GET  /v1/models/<name>[/versions/<N>|/labels/<L>]  -> model_version_status
    GET  /v1/models/<name>[...]/metadata               -> signature_def (as JSON)

The JSON is turned into a PredictRequest with the signature's dtypes and goes
through the gRPC path's validation, batching and model call, so REST and gRPC
answer alike. serving_default's k and beta are inputs like the others, one
value per row: columnar `"inputs": {"user_text": [...], ..., "k": [10, 5],
"beta": [0.5, 0.0]}`, or per instance in the row format `"instances":
[{"user_text": "...", "history_item_ids": [...], "k": 10, "beta": 0.5}, ...]`
(instances' histories of different lengths are right-padded with ""; so are
serving_exclude's exclude_item_ids, e.g. `"signature_name": "serving_exclude",
"instances": [{..., "exclude_item_ids": ["i1", "i7"]}]`).
Errors are {"error": "..."} with an HTTP status for the code (any other path
or method: 404). With a token, every request needs `Authorization: Bearer <token>`.

`RestServer` runs uvicorn in a thread on a socket bound at construction;
`stop()` stops accepting and lets the in-flight requests finish.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from serving.server.errors import ServeError
from trainer import features

_LOG = logging.getLogger("segrec.serve")
_HTTP = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400, "RESOURCE_EXHAUSTED": 429,
         "UNAUTHENTICATED": 401, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503, "INTERNAL": 500}
_STATES = {10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
_CODES = {0: "OK", 3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 13: "INTERNAL"}
# Where a model_spec can point: the latest version, a version, a label.
_SPECS = ("/v1/models/{name}", "/v1/models/{name}/versions/{version:int}", "/v1/models/{name}/labels/{label}")
_USAGE = "use /v1/models/<name>[:predict]"


class RestServer:
    """The app of `create_app` under uvicorn, in a daemon thread, on host:port (0 = any free port)."""

    def __init__(self, predictor, host: str, port: int, token: Optional[str] = None, grace_seconds: float = 10.0):
        import uvicorn

        self.predictor = predictor
        self._socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(create_app(predictor, token), log_config=None, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=grace_seconds)
        self.server = uvicorn.Server(config)
        self._grace_seconds = grace_seconds
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="segrec-rest", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        self._thread.join(0)
        for _ in range(int(timeout / 0.01)):
            if self.server.started or not self._thread.is_alive():
                break
            self._thread.join(0.01)
        if not self.server.started:
            raise OSError(f"the REST server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop accepting; answer what is in flight (up to grace_seconds)."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self._grace_seconds + 5)
        self._socket.close()


def create_app(predictor, token: Optional[str] = None):
    """The FastAPI app of the routes above; every call is counted as `REST <method>` in the metrics."""
    app = FastAPI(title="segrec serve REST", openapi_url=None, docs_url=None, redoc_url=None)

    def error(request: Request, code: str, message: str):
        request.state.code = code
        return _json(_HTTP.get(code, 500), {"error": message})

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        request.state.code = "OK"
        try:
            if token and request.headers.get("authorization") != f"Bearer {token}":
                return error(request, "UNAUTHENTICATED", "missing or wrong bearer token (header Authorization)")
            return await call_next(request)
        except Exception as err:  # noqa: BLE001  (a server bug; the server keeps serving)
            _LOG.exception("REST %s %s failed", request.method, request.url.path)
            return error(request, "INTERNAL", f"{type(err).__name__}")
        finally:
            if predictor.metrics is not None:
                predictor.metrics.observe_request(f"REST {request.method}", request.state.code, 0.0)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError):
        return error(request, err.code, str(err))

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, err: HTTPException):  # no such path, or not with this method: 404
        path = request.url.path
        if err.status_code == 405:
            return error(request, "NOT_FOUND", f"{request.method} {path} is not supported")
        return error(request, "NOT_FOUND", f"no route {path!r}; {_USAGE}")

    async def answer(fn, *args):
        """200 with the JSON of fn(*args), run in a worker thread (it waits for the model)."""
        return _json(200, await run_in_threadpool(fn, *args))

    async def predict(request: Request):
        spec = _model_spec(request)
        length = int(request.headers.get("content-length") or 0)
        if length > predictor.config.max_message_bytes:
            raise ServeError("INVALID_ARGUMENT", f"body of {length} bytes is over the limit")
        body = await request.body()
        if len(body) > predictor.config.max_message_bytes:
            raise ServeError("INVALID_ARGUMENT", f"body of {len(body)} bytes is over the limit")
        return await answer(predict_json, predictor, spec, body)

    async def status(request: Request):
        return await answer(status_json, predictor, _model_spec(request))

    async def metadata(request: Request):
        return await answer(metadata_json, predictor, _model_spec(request))

    for path in _SPECS:
        app.add_api_route(path + ":predict", predict, methods=["POST"])
        app.add_api_route(path + "/metadata", metadata, methods=["GET"])
        app.add_api_route(path, status, methods=["GET"])
    return app


def _json(status: int, body: dict):
    """json.dumps as TF Serving's REST API: -inf scores of padding slots stay -Infinity."""
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _model_spec(request: Request):
    from tensorflow_serving.apis import model_pb2

    params = request.path_params
    # Starlette's {name} / {label} take any text but "/"; TF Serving's names have no ":" either.
    if any(":" in str(params.get(key, "")) for key in ("name", "label")):
        raise ServeError("NOT_FOUND", f"{request.method} {request.url.path} is not supported; {_USAGE}")
    spec = model_pb2.ModelSpec(name=params["name"])
    if "version" in params:
        spec.version.value = params["version"]
    if "label" in params:
        spec.version_label = params["label"]
    return spec


def predict_json(predictor, spec, body: bytes) -> dict:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    try:
        doc = json.loads(body or b"{}")
    except ValueError as err:
        raise ServeError("INVALID_ARGUMENT", f"body: not JSON ({err})") from None
    if not isinstance(doc, dict) or ("inputs" in doc) == ("instances" in doc):
        raise ServeError("INVALID_ARGUMENT", "body: give exactly one of 'inputs' (columnar) or 'instances' (rows)")
    request = predict_pb2.PredictRequest(model_spec=spec)
    request.model_spec.signature_name = str(doc.get("signature_name") or "serving_default")
    loaded = predictor.resolve(request.model_spec)
    specs = loaded.inputs.get(request.model_spec.signature_name, {})
    rows = "instances" in doc
    inputs = _columns(doc["instances"], specs) if rows else doc["inputs"]
    if not isinstance(inputs, dict):
        raise ServeError("INVALID_ARGUMENT", "inputs: must be an object of input name -> value")
    for name, value in inputs.items():
        dtype = specs[name].dtype if name in specs else None
        try:
            arr = np.array(value, dtype=object if dtype == "object" else dtype)
            if arr.dtype == object:
                arr = np.vectorize(lambda x: x.encode() if isinstance(x, str) else x, otypes=[object])(arr)
            request.inputs[name].CopyFrom(tf.make_tensor_proto(arr))
        except (ValueError, TypeError) as err:
            raise ServeError("INVALID_ARGUMENT", f"inputs.{name}: cannot make a tensor of it ({err})") from None
    response = predictor.predict(request)
    out = {name: _jsonable(tf.make_ndarray(t)) for name, t in response.outputs.items()}
    if rows:
        n = len(next(iter(out.values()))) if out else 0
        return {"predictions": [{k: v[i] for k, v in out.items()} for i in range(n)]}
    return {"outputs": out}


_PADDED_IDS = (features.HISTORY_ITEM_IDS, features.EXCLUDE_ITEM_IDS)  # per-instance id lists, padded with ""


def _columns(instances, specs) -> dict:
    if not isinstance(instances, list) or not instances or not all(isinstance(r, dict) for r in instances):
        raise ServeError("INVALID_ARGUMENT", "instances: must be a non-empty list of objects")
    cols = {}
    for name in instances[0]:
        values = [r.get(name) for r in instances]
        if name in specs and specs[name].rank == 0:  # an older export's scalar knob: one value for all rows
            if len({json.dumps(v) for v in values}) != 1:
                raise ServeError("INVALID_ARGUMENT", f"instances.{name}: must be the same in every instance")
            cols[name] = values[0]
        elif name in _PADDED_IDS and all(isinstance(v, list) for v in values):
            width = max([len(v) for v in values] + [1])
            cols[name] = [v + [features.PAD_ITEM_ID] * (width - len(v)) for v in values]
        else:
            cols[name] = values
    return cols


def _jsonable(arr: np.ndarray):
    if arr.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(arr).tolist()
    return arr.tolist()


def status_json(predictor, spec) -> dict:
    from tensorflow_serving.apis import get_model_status_pb2

    response = predictor.status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
    return {"model_version_status": [
        {"version": str(s.version), "state": _STATES.get(s.state, "UNKNOWN"),
         "status": {"error_code": _CODES.get(s.status.error_code, str(s.status.error_code)),
                    "error_message": s.status.error_message}}
        for s in response.model_version_status]}


def metadata_json(predictor, spec) -> dict:
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
    response = predictor.metadata(request)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigs)
    return {"model_spec": {"name": response.model_spec.name, "version": str(response.model_spec.version.value)},
            "metadata": {"signature_def": json_format.MessageToDict(sigs)}}
