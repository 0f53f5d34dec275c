"""`segrec frontend`: the reference web integration of a recommender page.

A FastAPI app that serves one static page (serving/frontend/static/) and a small JSON
API the page calls with fetch:

    GET  /api/health      is the gRPC server up; the model's versions and defaults
    GET  /api/users?q=    existing users of --dataset-dir (a few hundred at most)
    GET  /api/items?q=    catalog search by id or title, to pick liked items
    POST /api/recommend   one user (existing, or a typed profile + liked items)
                          -> items with titles and scores, the segment and its profile

Every recommendation goes through `serving.client.RecommenderClient`, so the
same code talks to `segrec serve` and to TF Serving. A typed profile becomes
`user_text` with `trainer.data.examples.user_text`, exactly as preprocessing
built the training queries. Errors are never swallowed: a failed gRPC call is
answered with an HTTP status mapped from its gRPC code and the server's own
message, `{"error": {"source", "code", "message"}}`, and the page shows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Optional

import grpc
import pydantic

from serving import client as cl
from trainer import features
from trainer.contracts import SEGMENTS_FILE
from trainer.data import examples
from trainer.segments import document as segments_doc

_LOG = logging.getLogger("segrec.frontend")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

# gRPC status -> HTTP status of the API's answer. A code the server did not
# send (None) comes from the client's own checks of the request.
HTTP_STATUS = {
    None: 400,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
BAD_GATEWAY = 502  # INTERNAL, UNKNOWN, ...: the server failed, not the request


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
    """Settings of one `segrec frontend`.

    target: host:port of `segrec serve` or TF Serving. dataset_dir: a dataset
    dir written by `segrec preprocess`, for existing users and item titles
    (None: typed profiles and raw item ids only). segments_path: a segments.json
    for segment profiles; model_base_path: else the served version's own
    segments.json, <model_base_path>/<model_name>/<version>/segments.json.
    max_users: existing users listed (the first ones in id order).
    """

    target: str = "localhost:8500"
    host: str = "127.0.0.1"
    port: int = 8080
    dataset_dir: Optional[str] = None
    segments_path: Optional[str] = None
    model_base_path: Optional[str] = None
    model_name: str = "segrec"
    timeout: float = 5.0
    retries: int = 2
    tls: bool = False
    root_certificates: Optional[bytes] = None
    token: Optional[str] = None
    max_users: int = 300


class FrontendError(Exception):
    """A request the frontend itself refuses (before any gRPC call)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- what the page can pick from: users and items of a dataset dir ---------------------------------
@dataclasses.dataclass(frozen=True)
class User:
    """An existing user as of now: the query features of their latest example.

    history: item ids, most recent first. held_out: the eval target (the item
    the user really took next), "" when the user has no eval example.
    """

    user_id: str
    user_text: str
    history: tuple
    attributes: dict
    held_out: str = ""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What the page can pick from. titles / categories: item_id -> title /
    tuple of categories; users: user_id -> User, in listing order."""

    titles: dict
    categories: dict
    users: dict
    attribute_names: tuple
    # How preprocessing bounded a query (metadata.json "split"); typed queries follow it.
    max_history: int = features.MAX_HISTORY
    text_history: int = features.TEXT_HISTORY

    @staticmethod
    def empty() -> "Dataset":
        return Dataset(titles={}, categories={}, users={}, attribute_names=())


def load_dataset(dataset_dir: str, max_users: int = 300) -> Dataset:
    """The items and up to `max_users` users (first in id order) of a dataset dir.

    A user's query is their latest eval example: its history is the whole
    training period, so it is the user "as of now", as evaluation sees them.
    Users without an eval example (too few events) get their latest training
    example, read only when the eval users are fewer than `max_users` (the
    training split of a large dataset takes a while to read).
    """
    from trainer.data import arrays as da
    from trainer.data import tf_dataset as data

    items = data.load_catalog(dataset_dir)
    attributes = da.load_users(dataset_dir)
    ev = da.load_split(dataset_dir, "eval")
    rows = [(ev, r, True) for r in da.latest_per_user(ev)]
    if len(rows) < max_users:
        train = da.load_split(dataset_dir, "train")
        have = {str(ev.user_ids[r]) for _, r, _ in rows}
        rows += [(train, r, False) for r in da.latest_per_user(train) if str(train.user_ids[r]) not in have]
    by_user = {}
    for split, row, is_eval in rows:
        uid = str(split.user_ids[row])
        by_user[uid] = User(user_id=uid, user_text=str(split.user_texts[row]), history=tuple(split.histories[row]),
                            attributes=attributes.get(uid, {}), held_out=str(split.item_ids[row]) if is_eval else "")
    chosen = sorted(by_user, key=_natural_key)[:max_users]
    names = sorted({name for attrs in attributes.values() for name in attrs})
    policy = _read_json(os.path.join(dataset_dir, features.METADATA_FILE)).get("split", {})
    return Dataset(titles=dict(zip(items.item_ids, items.titles)),
                   categories=dict(zip(items.item_ids, items.categories)),
                   users={u: by_user[u] for u in chosen}, attribute_names=tuple(names),
                   max_history=int(policy.get("max_history", features.MAX_HISTORY)),
                   text_history=int(policy.get("text_history", features.TEXT_HISTORY)))


def _read_json(path: str) -> dict:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _natural_key(text: str) -> tuple:
    """"u2" before "u10"; plain numbers in numeric order."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p)


def typed_query(profile: dict, liked: list, titles: dict, max_history: int = features.MAX_HISTORY,
                text_history: int = features.TEXT_HISTORY) -> tuple:
    """(user_text, history) of a typed profile and liked items (most recent first).

    Built as preprocessing builds a training query (examples.user_text): the
    profile in sorted attribute order, then the titles of the `text_history`
    most recent items; at most `max_history` items, each once.
    """
    history = list(dict.fromkeys(liked))[:max_history]  # de-duplicated, order kept
    recent = [titles.get(i, "") for i in history[:text_history]]
    return examples.user_text(profile, recent), history


# --- segment profiles ----------------------------------------------------------------------------
class SegmentProfiles:
    """segment id -> its segments.json entry (centroid dropped), per model version."""

    def __init__(self, segments_path: Optional[str], model_base_path: Optional[str], model_name: str):
        self._fixed = _read_segments(segments_path) if segments_path else None
        self._base = os.path.join(model_base_path, model_name) if model_base_path else None
        self._by_version: dict = {}

    def get(self, version: int, segment_id: int) -> Optional[dict]:
        doc = self._fixed
        if doc is None and self._base is not None:
            if version not in self._by_version:
                path = os.path.join(self._base, str(version), SEGMENTS_FILE)
                self._by_version[version] = _read_segments(path) if os.path.exists(path) else {}
            doc = self._by_version[version]
        return (doc or {}).get(segment_id)


def _read_segments(path: str) -> dict:
    return {i: {k: v for k, v in s.items() if k != "centroid"} for i, s in segments_doc.by_id(segments_doc.load(path)).items()}


# --- the model's status, for /api/health ------------------------------------------------------------
# --- the app ---------------------------------------------------------------------------------------
class RecommendRequest(pydantic.BaseModel):
    """POST /api/recommend: either user_id (an existing user) or profile + liked (a typed user)."""

    user_id: Optional[str] = None
    profile: dict[str, str] = pydantic.Field(default_factory=dict, description="attribute name -> value")
    liked: list[str] = pydantic.Field(default_factory=list, description="item ids, most recent first")
    k: int = 10  # checked by the model server, whose message the page shows
    beta: Optional[float] = None  # None: the model's default
    version_label: Optional[str] = None


def create_app(config: FrontendConfig, dataset: Optional[Dataset] = None):
    """The FastAPI app. dataset: preloaded users and items (default: read from
    config.dataset_dir, or none)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    if dataset is None:
        dataset = load_dataset(config.dataset_dir, config.max_users) if config.dataset_dir else Dataset.empty()
    profiles = SegmentProfiles(config.segments_path, config.model_base_path, config.model_name)
    client = cl.RecommenderClient(config.target, timeout=config.timeout, retries=config.retries,
                                  model_name=config.model_name, tls=config.tls,
                                  root_certificates=config.root_certificates, token=config.token,
                                  segments_path=config.segments_path, titles=dataset.titles)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        client.close()

    app = FastAPI(title="segrec frontend", description=__doc__.split("\n\n")[0], lifespan=lifespan)
    app.state.client, app.state.dataset, app.state.config = client, dataset, config

    @app.exception_handler(cl.RecommendError)
    def _grpc_error(request: Request, err: cl.RecommendError):
        if err.code is None:  # refused by the client's own checks, before or after the call
            return _error(HTTP_STATUS[None], "client", "CLIENT", err.details)
        if err.code not in HTTP_STATUS:
            _LOG.warning("the model server failed: %s", err)
        return _error(HTTP_STATUS.get(err.code, BAD_GATEWAY), "server", err.code.name, err.details)

    @app.exception_handler(FrontendError)
    def _frontend_error(request: Request, err: FrontendError):
        return _error(err.status, "frontend", err.code, err.message)

    @app.exception_handler(RequestValidationError)
    def _invalid_json(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return _error(422, "frontend", "INVALID_REQUEST", f"{where}: {first['msg']}")

    def _error(status: int, source: str, code: str, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"source": source, "code": code,
                                                                   "message": message}})

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health")
    def health():
        """503 with the gRPC error when the model server cannot be reached."""
        status = client.model_status()
        return {"status": "ok", "target": config.target, "model_name": config.model_name, **status,
                "users": len(dataset.users), "items": len(dataset.titles)}

    @app.get("/api/users")
    def users(q: str = "", limit: int = 500):
        """Existing users whose id or profile contains q (case-insensitive)."""
        q = q.strip().lower()
        found = []
        for user in dataset.users.values():
            if q and q not in user.user_id.lower() and q not in examples.profile_text(user.attributes).lower():
                continue
            found.append({"user_id": user.user_id, "profile": examples.profile_text(user.attributes),
                          "history_length": len(user.history)})
        return {"users": found[: max(limit, 0)], "total": len(dataset.users),
                "attribute_names": list(dataset.attribute_names)}

    @app.get("/api/items")
    def items(q: str = "", limit: int = 20):
        """Catalog items whose id or title contains q; exact id matches first."""
        q = q.strip().lower()
        if not q:
            return {"items": []}
        hits = [(i.lower() != q, i) for i, t in dataset.titles.items() if q in i.lower() or q in t.lower()]
        return {"items": [_item(i) for _, i in sorted(hits, key=lambda h: (h[0], _natural_key(h[1])))[:limit]]}

    def _item(item_id: str) -> dict:
        return {"item_id": item_id, "title": dataset.titles.get(item_id, ""),
                "categories": list(dataset.categories.get(item_id, ()))}

    @app.post("/api/recommend")
    def recommend(body: RecommendRequest):
        if body.user_id is not None:
            user = dataset.users.get(body.user_id)
            if user is None:
                raise FrontendError(404, "UNKNOWN_USER", f"user_id: no user {body.user_id!r} in the dataset")
            user_text, history, held_out = user.user_text, list(user.history), user.held_out
        else:
            unknown = [i for i in body.liked if dataset.titles and i not in dataset.titles]
            if unknown:
                raise FrontendError(400, "UNKNOWN_ITEM", f"liked: item {unknown[0]!r} is not in the catalog")
            user_text, history = typed_query(body.profile, body.liked, dataset.titles, dataset.max_history,
                                             dataset.text_history)
            held_out = ""
        rec = client.recommend(user_text, history, k=body.k, beta=body.beta, version_label=body.version_label)
        probs = rec.segment_probs
        return {
            "query": {"user_id": body.user_id, "user_text": user_text, "history": [_item(i) for i in history],
                      "held_out": _item(held_out) if held_out else None},
            "model_version": rec.model_version,
            "beta": body.beta,
            "segment": {"id": rec.segment_id, "label": rec.segment_label,
                        "confidence": probs[rec.segment_id] if rec.segment_id < len(probs) else None,
                        "probs": probs, "profile": profiles.get(rec.model_version, rec.segment_id)},
            "items": [{"item_id": i.item_id, "title": i.title or "", "score": i.score,
                       "categories": list(dataset.categories.get(i.item_id, ())),
                       "held_out": i.item_id == held_out} for i in rec.items],
        }

    return app


def run(config: FrontendConfig) -> int:
    """Serves the page until Ctrl-C / SIGTERM."""
    import uvicorn

    dataset = Dataset.empty()
    if config.dataset_dir:
        print(f"segrec frontend: reading users and items of {config.dataset_dir} ...", flush=True)
        dataset = load_dataset(config.dataset_dir, config.max_users)
    app = create_app(config, dataset)
    print(f"segrec frontend: {len(dataset.users)} users, {len(dataset.titles)} items; "
          f"model {config.model_name!r} at {config.target}; open http://{config.host}:{config.port}/", flush=True)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal.
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0
