"""The REST subset of TF Serving's JSON API, over the same `Predictor` as gRPC.

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
(instances' histories of different lengths are right-padded with "").
Errors are {"error": "..."} with an HTTP status for the code.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from typing import Optional

import numpy as np

from trainer import features

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<verb>:predict|/metadata)?$")
_HTTP = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400, "RESOURCE_EXHAUSTED": 429,
         "UNAUTHENTICATED": 401, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503, "INTERNAL": 500}
_STATES = {10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
_CODES = {0: "OK", 3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 13: "INTERNAL"}


class RestServer:
    def __init__(self, predictor, host: str, port: int, token: Optional[str] = None):
        self.predictor = predictor
        handler = _handler_class(predictor, token)
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="segrec-rest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler_class(predictor, token):
    from serving.server.grpc_server import ServeError

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: metrics count the calls
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            code = "OK"
            try:
                if token and self.headers.get("Authorization") != f"Bearer {token}":
                    raise ServeError("UNAUTHENTICATED", "missing or wrong bearer token (header Authorization)")
                m = _PATH.match(self.path.split("?")[0])
                if not m:
                    raise ServeError("NOT_FOUND", f"no route {self.path!r}; use /v1/models/<name>[:predict]")
                spec = _model_spec(m)
                if method == "POST" and m.group("verb") == ":predict":
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > predictor.config.max_message_bytes:
                        raise ServeError("INVALID_ARGUMENT", f"body of {length} bytes is over the limit")
                    self._send(200, predict_json(predictor, spec, self.rfile.read(length)))
                elif method == "GET" and m.group("verb") == "/metadata":
                    self._send(200, metadata_json(predictor, spec))
                elif method == "GET" and not m.group("verb"):
                    self._send(200, status_json(predictor, spec))
                else:
                    raise ServeError("NOT_FOUND", f"{method} {self.path} is not supported")
            except ServeError as err:
                code = err.code
                self._send(_HTTP.get(err.code, 500), {"error": str(err)})
            except Exception as err:  # noqa: BLE001  (a server bug; the server keeps serving)
                code = "INTERNAL"
                self._send(500, {"error": f"{type(err).__name__}"})
            finally:
                if predictor.metrics is not None:
                    predictor.metrics.observe_request(f"REST {method}", code, 0.0)

        def do_POST(self):
            self._dispatch("POST")

        def do_GET(self):
            self._dispatch("GET")

    return Handler


def _model_spec(m):
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=m.group("name"))
    if m.group("version"):
        spec.version.value = int(m.group("version"))
    if m.group("label"):
        spec.version_label = m.group("label")
    return spec


def predict_json(predictor, spec, body: bytes) -> dict:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from serving.server.grpc_server import ServeError

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


def _columns(instances, specs) -> dict:
    from serving.server.grpc_server import ServeError

    if not isinstance(instances, list) or not instances or not all(isinstance(r, dict) for r in instances):
        raise ServeError("INVALID_ARGUMENT", "instances: must be a non-empty list of objects")
    cols = {}
    for name in instances[0]:
        values = [r.get(name) for r in instances]
        if name in specs and specs[name].rank == 0:  # an older export's scalar knob: one value for all rows
            if len({json.dumps(v) for v in values}) != 1:
                raise ServeError("INVALID_ARGUMENT", f"instances.{name}: must be the same in every instance")
            cols[name] = values[0]
        elif name == features.HISTORY_ITEM_IDS and all(isinstance(v, list) for v in values):
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
