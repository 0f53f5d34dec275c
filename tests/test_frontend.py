"""`segrec frontend`'s JSON API (FastAPI TestClient) against a real `segrec serve`
subprocess over the tiny export: users and items listed, recommendations with
titles outside the history, beta moving the list, the server's
INVALID_ARGUMENT shown as a 400 with its message, a server that is down as a
503. Unit tests of the query building and segment profiles need no server."""

from __future__ import annotations

import json
import pathlib

import pytest
from test_server import build_tiny_export

from serving.frontend import web as frontend
from trainer import features as F
from trainer.data import examples

MAX_STRING_MB = 0.5  # the server's limit on one string, so a too-large profile stays small


# --- a real server, the app in front of it ----------------------------------------------------------
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_generated):
    return build_tiny_export(tmp_path_factory, tiny_generated)


def dataset_dir_of(export_dir: str) -> str:
    """build_tiny_export writes <root>/ds (preprocessed) and <root>/models/segrec/1."""
    return str(pathlib.Path(export_dir).parents[2] / "ds")


@pytest.fixture(scope="module")
def served(export_dir, tmp_path_factory):
    from serving.server.launch import ServerProcess

    base = str(pathlib.Path(export_dir).parents[1])
    log = tmp_path_factory.mktemp("frontend_serve") / "serve.log"
    with ServerProcess(base, rest_port=0, metrics_port=0, log_path=str(log),
                       extra_args=["--max-string-mb", str(MAX_STRING_MB), "--poll-seconds", "30"]) as server:
        yield {"target": server.target, "base": base, "process": server}


@pytest.fixture(scope="module")
def api(served, export_dir):
    from fastapi.testclient import TestClient

    config = frontend.FrontendConfig(target=served["target"], dataset_dir=dataset_dir_of(export_dir),
                                     model_base_path=served["base"], timeout=10)
    with TestClient(frontend.create_app(config)) as client:
        yield client


def recommend(api, **body):
    response = api.post("/api/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def first_user_with_history(api) -> str:
    users = api.get("/api/users").json()["users"]
    return next(u["user_id"] for u in users if u["history_length"] >= 2)


# --- the API against the server --------------------------------------------------------------------
@pytest.mark.integration
def test_health_reports_the_served_version_and_defaults(api, served):
    h = api.get("/api/health").json()
    assert h["status"] == "ok" and h["target"] == served["target"]
    assert h["versions"] == [{"version": 1, "state": "AVAILABLE", "error": ""}]
    assert 0 <= h["default_beta"] and h["k_max"] >= 10
    assert h["users"] > 0 and h["items"] > 0


@pytest.mark.integration
def test_users_are_listed_and_searchable(api, export_dir):
    data = api.get("/api/users").json()
    users = data["users"]
    assert len(users) == data["total"] > 10
    ids = [u["user_id"] for u in users]
    assert len(set(ids)) == len(ids)
    assert all(u["history_length"] >= 0 for u in users)
    some = ids[3]
    assert some in [u["user_id"] for u in api.get("/api/users", params={"q": some}).json()["users"]]
    assert api.get("/api/users", params={"q": "no such user, nowhere"}).json()["users"] == []


@pytest.mark.integration
def test_items_search_by_title_and_id(api, export_dir):
    from trainer.data import tf_dataset as data

    catalog = data.load_catalog(dataset_dir_of(export_dir))
    item_id, title = catalog.item_ids[0], catalog.titles[0]
    by_title = api.get("/api/items", params={"q": title.upper()}).json()["items"]
    assert {"item_id": item_id, "title": title} in [{k: i[k] for k in ("item_id", "title")} for i in by_title]
    by_id = api.get("/api/items", params={"q": item_id}).json()["items"]
    assert by_id[0]["item_id"] == item_id  # an exact id first
    assert api.get("/api/items", params={"q": ""}).json()["items"] == []


@pytest.mark.integration
def test_existing_user_gets_titled_items_outside_their_history(api):
    user_id = first_user_with_history(api)
    r = recommend(api, user_id=user_id, k=8, beta=0.5)
    history = {h["item_id"] for h in r["query"]["history"]}
    assert len(history) >= 2 and r["query"]["user_text"].startswith("user:")
    items = r["items"]
    assert len(items) == 8
    assert all(i["title"] for i in items)  # titles from the dataset's catalog
    assert not history & {i["item_id"] for i in items}  # seen items are excluded
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    seg = r["segment"]
    assert seg["label"] and abs(sum(seg["probs"]) - 1) < 1e-4 and seg["confidence"] == seg["probs"][seg["id"]]
    # The profile is the served version's segments.json entry.
    doc = json.load(open(pathlib.Path(api.app.state.config.model_base_path) / "segrec" / "1" / "segments.json"))
    entry = next(s for s in doc["segments"] if s["id"] == seg["id"])
    assert seg["profile"]["label"] == entry["label"] == seg["label"] and "centroid" not in seg["profile"]
    assert r["model_version"] == 1
    held = r["query"]["held_out"]
    assert [i["held_out"] for i in items] == [bool(held) and i["item_id"] == held["item_id"] for i in items]


@pytest.mark.integration
def test_typed_profile_becomes_user_text_like_preprocessing(api, export_dir):
    items = api.get("/api/items", params={"q": "a", "limit": 3}).json()["items"]
    liked = [i["item_id"] for i in items]
    profile = {"occupation": "engineer", "age": "31"}
    r = recommend(api, profile=profile, liked=liked + liked[:1], k=5, beta=0.5)  # a duplicate is dropped
    # The dataset was preprocessed with the default --text-history 0: the profile alone, as in training.
    assert json.loads((pathlib.Path(dataset_dir_of(export_dir)) / "metadata.json").read_text())["split"]["text_history"] == 0
    assert r["query"]["user_text"] == examples.user_text(profile, []) == "user: age 31, occupation engineer."
    assert [h["item_id"] for h in r["query"]["history"]] == liked
    assert len(r["items"]) == 5 and not set(liked) & {i["item_id"] for i in r["items"]}
    cold = recommend(api, profile={}, liked=[], k=5, beta=0.5)  # a cold user: the segment's centroid
    assert cold["query"]["user_text"] == "user: unknown." and len(cold["items"]) == 5


@pytest.mark.integration
def test_beta_changes_the_list_or_its_scores(api):
    user_id = first_user_with_history(api)
    low = recommend(api, user_id=user_id, k=10, beta=0.0)
    high = recommend(api, user_id=user_id, k=10, beta=1.0)
    assert low["beta"] == 0.0 and high["beta"] == 1.0
    pairs = lambda r: [(i["item_id"], round(i["score"], 5)) for i in r["items"]]  # noqa: E731
    assert pairs(low) != pairs(high)
    # beta=None is the model's default, which /api/health publishes.
    default = api.get("/api/health").json()["default_beta"]
    assert pairs(recommend(api, user_id=user_id, k=10)) == pairs(recommend(api, user_id=user_id, k=10, beta=default))


@pytest.mark.integration
def test_bad_k_is_the_servers_invalid_argument_as_a_400(api):
    response = api.post("/api/recommend", json={"user_id": first_user_with_history(api), "k": 0, "beta": 0.5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["source"] == "server" and error["code"] == "INVALID_ARGUMENT"
    assert error["message"].startswith(f"inputs.{F.K}: 0") and "out of range" in error["message"]


@pytest.mark.integration
def test_too_large_profile_is_the_servers_invalid_argument_as_a_400(api):
    huge = "x" * int((MAX_STRING_MB + 0.1) * 1024 * 1024)
    response = api.post("/api/recommend", json={"profile": {"about": huge}, "k": 5, "beta": 0.5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["source"] == "server"
    assert error["message"].startswith(f"inputs.{F.USER_TEXT}: a string of ")
    assert "more than the limit" in error["message"]


@pytest.mark.integration
def test_frontend_refuses_unknown_users_items_and_malformed_json(api):
    r = api.post("/api/recommend", json={"user_id": "no-such-user", "k": 5})
    assert r.status_code == 404 and r.json()["error"] == {
        "source": "frontend", "code": "UNKNOWN_USER", "message": "user_id: no user 'no-such-user' in the dataset"}
    r = api.post("/api/recommend", json={"liked": ["not-an-item"], "k": 5})
    assert r.status_code == 400 and r.json()["error"]["message"] == "liked: item 'not-an-item' is not in the catalog"
    r = api.post("/api/recommend", json={"k": "ten"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("body.k: ")


@pytest.mark.integration
def test_page_and_static_files_are_served(api):
    page = api.get("/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = api.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]


# --- no server -------------------------------------------------------------------------------------
def test_server_down_is_a_503_with_the_grpc_message(tmp_path):
    from fastapi.testclient import TestClient

    from serving.server.launch import free_port

    config = frontend.FrontendConfig(target=f"127.0.0.1:{free_port()}", timeout=2, retries=1)
    with TestClient(frontend.create_app(config)) as api:
        for response in (api.get("/api/health"),
                         api.post("/api/recommend", json={"profile": {"age": "31"}, "k": 5, "beta": 0.5})):
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["source"] == "server" and error["code"] == "UNAVAILABLE" and error["message"]
        assert api.get("/api/users").json() == {"users": [], "total": 0, "attribute_names": []}


def test_load_dataset_lists_users_as_of_now(export_dir):
    from trainer.data import arrays as da

    ds = dataset_dir_of(export_dir)
    ev = da.load_split(ds, "eval")
    data = frontend.load_dataset(ds, max_users=5)
    everyone = sorted(set(ev.user_ids), key=frontend._natural_key)
    assert list(data.users) == everyone[:5]
    for user in data.users.values():
        # The latest eval example: the whole training history (a repeat buy may hold the target too).
        rows = [r for r in range(len(ev)) if ev.user_ids[r] == user.user_id]
        last = max(rows, key=lambda r: ev.timestamps[r])
        assert user.held_out == ev.item_ids[last]
        assert list(user.history) == ev.histories[last] and user.user_text == ev.user_texts[last]
        assert user.attributes  # from users.jsonl
    assert len(frontend.load_dataset(ds, max_users=1000).users) == len(everyone)
    meta = json.load(open(pathlib.Path(ds) / F.METADATA_FILE))["split"]
    assert (data.max_history, data.text_history) == (meta["max_history"], meta["text_history"])


@pytest.mark.parametrize("code, status, source", [
    ("INVALID_ARGUMENT", 400, "server"), ("UNAUTHENTICATED", 401, "server"), ("NOT_FOUND", 404, "server"),
    ("RESOURCE_EXHAUSTED", 429, "server"), ("DEADLINE_EXCEEDED", 504, "server"), ("INTERNAL", 502, "server"),
    (None, 400, "client"),
])
def test_grpc_codes_map_to_http_statuses_with_the_message(code, status, source, monkeypatch):
    import grpc
    from fastapi.testclient import TestClient

    from serving.client import RecommendError

    def fail(*args, **kwargs):
        raise RecommendError(getattr(grpc.StatusCode, code) if code else None, "what the server said")

    app = frontend.create_app(frontend.FrontendConfig(target="127.0.0.1:1"))
    monkeypatch.setattr(app.state.client, "recommend", fail)
    response = TestClient(app).post("/api/recommend", json={"k": 5})
    assert response.status_code == status
    assert response.json()["error"] == {"source": source, "code": code or "CLIENT", "message": "what the server said"}


def test_typed_query_bounds_history_and_text_titles():
    titles = {f"i{n}": f"Title {n}" for n in range(80)}
    liked = [f"i{n}" for n in range(80)]
    text, history = frontend.typed_query({"b": "2", "a": "1", "empty": " "}, liked + ["i0"], titles)
    assert history == liked[: F.MAX_HISTORY]
    # Profile in sorted key order, blank values dropped; by default (TEXT_HISTORY 0) no titles.
    assert F.TEXT_HISTORY == 0 and text == "user: a 1, b 2."
    text, _ = frontend.typed_query({"b": "2", "a": "1"}, liked, titles, text_history=5)
    assert text == "user: a 1, b 2. recent: " + "; ".join(f"Title {n}" for n in range(5)) + "."
    # A dataset preprocessed with other bounds (metadata.json) is followed.
    text, history = frontend.typed_query({}, liked, titles, max_history=3, text_history=1)
    assert (text, history) == ("user: unknown. recent: Title 0.", liked[:3])


def test_segment_profiles_from_a_file_or_beside_each_version(tmp_path):
    doc = {"segments": [{"id": 0, "label": "outdoor", "size": 3, "centroid": [0.1, 0.2]},
                        {"id": 1, "label": "music", "size": 5, "centroid": [0.3, 0.4]}]}
    path = tmp_path / "segments.json"
    path.write_text(json.dumps(doc))
    fixed = frontend.SegmentProfiles(str(path), None, "segrec")
    assert fixed.get(7, 1) == {"id": 1, "label": "music", "size": 5}
    assert fixed.get(7, 9) is None
    (tmp_path / "m" / "segrec" / "2").mkdir(parents=True)
    (tmp_path / "m" / "segrec" / "2" / "segments.json").write_text(json.dumps(doc))
    per_version = frontend.SegmentProfiles(None, str(tmp_path / "m"), "segrec")
    assert per_version.get(2, 0)["label"] == "outdoor"
    assert per_version.get(3, 0) is None  # that version has no segments.json
    assert frontend.SegmentProfiles(None, None, "segrec").get(1, 0) is None


def test_natural_order_of_user_ids():
    assert sorted(["u10", "u2", "3", "u1", "20"], key=frontend._natural_key) == ["3", "20", "u1", "u2", "u10"]


def test_cli_rejects_a_missing_dataset_dir(tmp_path, capsys):
    from trainer.cli import main as cli

    assert cli.main(["frontend", "--dataset-dir", str(tmp_path / "nope")]) == 2
    assert "--dataset-dir" in capsys.readouterr().err
