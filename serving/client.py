"""`RecommenderClient`: typed recommendations from `segrec serve` or TF Serving.

Only PredictionService calls are used (Predict, GetModelMetadata), so the same
client talks to stock TF Serving. serving_default takes k and beta with the
batch dimension ([B], one per user); the answer's item_ids / scores have
max(k) columns, "" / -inf past a row's k or where the catalog runs out, and
the client drops those pads. Every attempt has a deadline; UNAVAILABLE
(server starting, restarting, connection refused) is retried with
exponential backoff and jitter, nothing else is (a bad request stays bad).

Segment labels come from, in order: a segments.json path given to the
client; the server's "segrec" metadata field (segrec serve only — TF Serving
rejects the field, and the client then goes without labels, "segment <id>").
beta=None means the model's default: the client's `default_beta`, else the
default the server publishes, else the export's `recommend_defaults`
signature (its k must be >= the k asked for).

Exclusions: `recommend(..., exclude=ids)` (or a third element per user in
`recommend_many`) names items the user must not get back besides the
history, e.g. everything they ever consumed (the history the model reads
holds at most 50). Requests with any exclusion go to the export's
serving_exclude signature (it needs a beta: the client's, the server's
default, or an explicit one); without exclusions the client sends exactly
what it always did (serving_default / recommend_defaults), so exports older
than serving_exclude keep working.

Token-id exports (`segrec export --text-input token_ids`, for servers
without tensorflow_text's ops) take input_ids / padding_mask instead of
user_text: give the client `token_ids=TokenIds.from_export(version_dir)`
(trainer/model/token_ids.py: the export's own vocabulary and tokenisation)
and it tokenises each user_text before sending it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from typing import Mapping, Optional, Sequence

import grpc
import numpy as np

from trainer import features
from trainer.contracts import RECOMMEND_DEFAULTS, SERVING_DEFAULT, SERVING_EXCLUDE  # noqa: F401
from trainer.segments import document as segments_doc

SEGREC_METADATA = "segrec"


@dataclasses.dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    title: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """items best first, padding ("" ids, -inf scores) dropped."""

    items: list
    segment_id: int
    segment_label: str
    segment_probs: list
    model_version: int


class RecommendError(RuntimeError):
    """A call that failed for good; `code` is the grpc.StatusCode."""

    def __init__(self, code, message: str):
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code
        self.details = message


class RecommenderClient:
    """Args:
      target: "host:port". timeout: deadline of each attempt, seconds.
      retries: extra attempts after UNAVAILABLE; backoff: first wait, doubled each retry.
      tls / root_certificates: connect over TLS (roots None = the system's).
      token: sent as `authorization: Bearer <token>`.
      segments_path: a segments.json to label segments from; titles: item_id -> title.
      default_beta: beta when recommend() gets None (None = the model's default).
      token_ids: a trainer.model.token_ids.TokenIds for token-id exports (None: send user_text).
    """

    def __init__(self, target: str, timeout: float = 5.0, retries: int = 3, backoff: float = 0.1,
                 model_name: str = "segrec", tls: bool = False, root_certificates: Optional[bytes] = None,
                 token: Optional[str] = None, segments_path: Optional[str] = None,
                 titles: Optional[Mapping[str, str]] = None, default_beta: Optional[float] = None,
                 max_message_bytes: int = 64 * 1024 * 1024, token_ids=None):
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.target, self.timeout, self.retries, self.backoff = target, timeout, retries, backoff
        self.model_name = model_name
        self.titles = dict(titles or {})
        self.default_beta = default_beta
        self.token_ids = token_ids
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._file_labels = _labels_from_file(segments_path) if segments_path else None
        self._server_info: dict = {}  # version -> the server's "segrec" metadata ({} when unsupported)

    # --- public API -----------------------------------------------------------------------
    def recommend(self, user_text: str, history: Sequence[str] = (), k: int = 10, beta: Optional[float] = None,
                  version_label: Optional[str] = None, version: Optional[int] = None,
                  exclude: Sequence[str] = ()) -> Recommendation:
        """exclude: item ids never to return besides the history (e.g. the user's whole consumed set)."""
        user = (user_text, history, exclude) if exclude else (user_text, history)
        return self.recommend_many([user], k, beta, version_label, version)[0]

    def recommend_many(self, users: Sequence, k: int = 10, beta: Optional[float] = None,
                       version_label: Optional[str] = None, version: Optional[int] = None) -> list:
        """users: [(user_text, history ids)] or [(user_text, history ids, exclude ids)] -> one
        Recommendation each, in order. Any exclusion sends the batch to serving_exclude."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        if not users:
            return []
        if beta is None:
            beta = self.default_beta
        if beta is None:
            beta = self._info(version_label, version).get("default_beta")
        excludes = [list(u[2]) if len(u) > 2 and u[2] else [] for u in users]
        users = [(u[0], u[1]) for u in users]
        if any(excludes) and beta is None:
            raise ValueError("excluding items needs beta (serving_exclude has no defaults signature) and the "
                             "server publishes no default beta: pass beta= (or default_beta= to the client)")
        hist = _padded([h for _, h in users])
        request = predict_pb2.PredictRequest()
        _set_spec(request.model_spec, self.model_name, version_label, version)
        texts = [t for t, _ in users]
        if self.token_ids is not None:
            ids, mask = self.token_ids(texts)
            request.inputs[features.INPUT_IDS].CopyFrom(tf.make_tensor_proto(ids))
            request.inputs[features.PADDING_MASK].CopyFrom(tf.make_tensor_proto(mask))
        else:
            request.inputs[features.USER_TEXT].CopyFrom(tf.make_tensor_proto(np.array(texts, dtype=object)))
        request.inputs[features.HISTORY_ITEM_IDS].CopyFrom(tf.make_tensor_proto(hist))
        truncate = None
        if beta is None:  # no published default: the export's own defaults signature
            request.model_spec.signature_name = RECOMMEND_DEFAULTS
            truncate = k
        else:
            request.model_spec.signature_name = SERVING_DEFAULT
            if any(excludes):
                request.model_spec.signature_name = SERVING_EXCLUDE
                request.inputs[features.EXCLUDE_ITEM_IDS].CopyFrom(tf.make_tensor_proto(_padded(excludes)))
            # One k and beta per row: serving_default's knobs have the batch dimension.
            request.inputs[features.K].CopyFrom(tf.make_tensor_proto(np.full(len(users), k, np.int32)))
            request.inputs[features.BETA].CopyFrom(tf.make_tensor_proto(np.full(len(users), beta, np.float32)))
        response = self._with_retries(self._stub.Predict, request)
        out = {name: tf.make_ndarray(t) for name, t in response.outputs.items()}
        model_version = response.model_spec.version.value
        if truncate is not None and out[features.OUT_ITEM_IDS].shape[1] < truncate:
            raise RecommendError(None, f"k={k} is more than the model's default k "
                                       f"{out[features.OUT_ITEM_IDS].shape[1]}; pass beta to ask for more")
        labels = self._labels(model_version, version_label, version)
        recs = []
        for row in range(len(users)):
            # At most k: TF Serving's batching may hand back a merged call's wider (padded) rows.
            ids = out[features.OUT_ITEM_IDS][row][:k]
            scores = out[features.OUT_SCORES][row][:k]
            items = [ScoredItem(i.decode(), float(s), self.titles.get(i.decode()))
                     for i, s in zip(ids, scores) if i and math.isfinite(s)]
            seg = int(out[features.SEGMENT_ID][row])
            recs.append(Recommendation(items=items, segment_id=seg,
                                       segment_label=labels.get(str(seg), f"segment {seg}"),
                                       segment_probs=[float(p) for p in out[features.SEGMENT_PROBS][row]],
                                       model_version=model_version))
        return recs

    def model_status(self) -> dict:
        """ModelService.GetModelStatus (TF Serving and segrec serve both answer it) plus the
        defaults `segrec serve` publishes: {"versions": [{version, state, error}],
        "default_beta", "default_k", "k_max"} (None where the server does not say)."""
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        request = get_model_status_pb2.GetModelStatusRequest()
        _set_spec(request.model_spec, self.model_name, None, None)
        status = self._with_retries(model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus, request)
        versions = [{"version": s.version, "state": get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                     "error": s.status.error_message} for s in status.model_version_status]
        info = self._info(None, None)
        return {"versions": versions, **{key: info.get(key) for key in ("default_beta", "default_k", "k_max")}}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- internals ----------------------------------------------------------------------------
    def _with_retries(self, method, request):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(delay * (0.5 + random.random()))
                    delay *= 2
                    continue
                raise RecommendError(code, err.details() if hasattr(err, "details") else str(err)) from None
        raise AssertionError("unreachable")

    def _info(self, version_label, version) -> dict:
        """The server's segrec metadata for the version a request would hit ({} from TF Serving)."""
        from google.protobuf import wrappers_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        key = (version_label, version)
        if key in self._server_info:
            return self._server_info[key]
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SEGREC_METADATA])
        _set_spec(request.model_spec, self.model_name, version_label, version)
        try:
            response = self._with_retries(self._stub.GetModelMetadata, request)
            value = wrappers_pb2.StringValue()
            response.metadata[SEGREC_METADATA].Unpack(value)
            info = json.loads(value.value)
        except RecommendError as err:
            # TF Serving rejects the field (INVALID_ARGUMENT); other servers may lack the call.
            if err.code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
                raise
            info = {}
        if version is not None or version_label:
            self._server_info[key] = info  # "latest" may change; re-asked each time
        return info

    def _labels(self, model_version: int, version_label, version) -> dict:
        if self._file_labels is not None:
            return self._file_labels
        return self._info(None, model_version).get("segments") or {}


def _padded(rows: Sequence) -> np.ndarray:
    """Id lists -> [B, width] object array, right-padded with "" (at least one column)."""
    width = max(1, max(len(r) for r in rows))
    return np.array([list(r) + [features.PAD_ITEM_ID] * (width - len(r)) for r in rows], dtype=object)


def _set_spec(spec, name: str, version_label: Optional[str], version: Optional[int]) -> None:
    spec.name = name
    if version_label:
        spec.version_label = version_label
    if version is not None:
        spec.version.value = version


def _labels_from_file(path: str) -> dict:
    return {str(k): v for k, v in segments_doc.labels(segments_doc.load(path)).items()}


def format_recommendation(rec: Recommendation) -> str:
    """A readable table: rank, item, score (and title when known)."""
    probs = ", ".join(f"{p:.2f}" for p in rec.segment_probs)
    lines = [f"model version {rec.model_version}   segment {rec.segment_id}: {rec.segment_label}   "
             f"probs [{probs}]", ""]
    with_titles = any(i.title for i in rec.items)
    width = max([len("item")] + [len(i.item_id) for i in rec.items])
    head = f"{'rank':>4}  {'item':<{width}}  {'score':>8}" + ("  title" if with_titles else "")
    lines += [head, "-" * len(head)]
    for rank, item in enumerate(rec.items, 1):
        row = f"{rank:>4}  {item.item_id:<{width}}  {item.score:>8.4f}"
        lines.append(row + (f"  {item.title or ''}" if with_titles else ""))
    if not rec.items:
        lines.append("(no items)")
    return "\n".join(lines)
