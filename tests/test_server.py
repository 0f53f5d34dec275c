"""`segrec serve` in a subprocess on a free localhost port over a tiny export:
results equal the SavedModel's, bad requests get the right code naming the
field, hot swap under load, a corrupt version, SIGTERM. Unit tests of the
batcher, the model manager and the label parser need no server."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from trainer import features as F

TINY_TRAIN = ["--encoder", "tiny", "--embedding-dim", "16", "--segments", "4", "--epochs", "1", "--warmup-epochs", "0",
              "--batch-size", "64", "--recall-k", "10", "--quiet"]
MAX_BATCH = 16
MAX_STRING_MB = 0.5
integration = pytest.mark.integration


# --- shared by test_client.py -----------------------------------------------------------------
def build_tiny_export(tmp_path_factory, generated) -> str:
    """A brute-force export of a tiny trained run, built once per session: <dir>/segrec/1."""
    root = tmp_path_factory.getbasetemp() / "serve_tiny_export"
    done = root / "done"
    if not done.exists():
        from serving import export as ex
        from trainer import cli

        ds, run = root / "ds", root / "run"
        assert cli.main(["preprocess", "--input-dir", str(generated), "--output-dir", str(ds)]) == 0
        assert cli.main(["train", "--dataset-dir", str(ds), "--output-dir", str(run)] + TINY_TRAIN) == 0
        ex.export(ex.ExportConfig(run_dir=str(run), base_path=str(root / "models"), index="brute_force"))
        done.write_text("ok")
    return str(root / "models" / "segrec" / "1")


def copy_base(version_dir: str, base) -> str:
    os.makedirs(base / "segrec", exist_ok=True)
    shutil.copytree(version_dir, base / "segrec" / "1")
    return str(base)


def publish(base, src_version: int, version: int) -> None:
    """Copies a version under a hidden name and renames it into place (as export does)."""
    tmp = base / "segrec" / f".tmp-{version}"
    shutil.copytree(base / "segrec" / str(src_version), tmp)
    os.rename(tmp, base / "segrec" / str(version))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def item_ids(version_dir: str) -> list:
    return [x.decode() for x in _loaded(version_dir).item_id_table.numpy()]


def users(ids, n=5, seed=0):
    rng = np.random.default_rng(seed)
    texts = ["loves hiking and camping", "plays guitar in a band", "cooks dinner every day", "", "??? 日本語"]
    out = []
    for i in range(n):
        hist = list(rng.choice(ids, size=int(rng.integers(0, 4)), replace=False))
        out.append((texts[i % len(texts)], hist))
    return out


@functools.lru_cache(maxsize=2)
def _loaded(version_dir):
    from serving import export as ex

    return ex.load_exported(version_dir)


def direct_call(version_dir, batch, k, beta):
    """The SavedModel's own serving_default on the same users."""
    import tensorflow as tf

    width = max(1, max(len(h) for _, h in batch))
    hist = [h + [""] * (width - len(h)) for _, h in batch]
    fn = _loaded(version_dir).signatures["serving_default"]
    out = fn(user_text=tf.constant([t for t, _ in batch]), history_item_ids=tf.constant(hist, tf.string),
             k=tf.constant(k), beta=tf.constant(beta, tf.float32))
    return {k_: v.numpy() for k_, v in out.items()}


# --- the subprocess server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_generated):
    return build_tiny_export(tmp_path_factory, tiny_generated)


@pytest.fixture(scope="module")
def served(export_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_base")
    copy_base(export_dir, base)
    port, rest_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "trainer.cli", "serve", "--model-base-path", str(base), "--port", str(port),
           "--rest-port", str(rest_port), "--metrics-port", str(metrics_port), "--poll-seconds", "0.3",
           "--max-batch-size", str(MAX_BATCH), "--version-labels", "stable=1",
           "--max-string-mb", str(MAX_STRING_MB)]
    log = open(base / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(__file__)))
    target = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, (base / "serve.log").read_text()[-3000:]
        if _healthy(target):
            break
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("segrec serve did not become healthy in 90 s:\n" + (base / "serve.log").read_text()[-3000:])
    yield {"proc": proc, "target": target, "base": base, "rest": rest_port, "metrics": metrics_port,
           "export": export_dir, "ids": item_ids(export_dir)}
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    log.close()


def _healthy(target) -> bool:
    import grpc

    with grpc.insecure_channel(target) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        try:
            return check(b"", timeout=1) == b"\x08\x01"
        except grpc.RpcError:
            return False


@pytest.fixture(scope="module")
def stub(served):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(served["target"], options=[("grpc.max_send_message_length", 64 << 20)])
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def request(batch, k=5, beta=0.5, signature="serving_default", **spec):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = spec.pop("name", "segrec")
    req.model_spec.signature_name = signature
    if "version" in spec:
        req.model_spec.version.value = spec.pop("version")
    if "label" in spec:
        req.model_spec.version_label = spec.pop("label")
    width = max(1, max(len(h) for _, h in batch))
    req.inputs[F.USER_TEXT].CopyFrom(tf.make_tensor_proto(np.array([t for t, _ in batch], dtype=object)))
    req.inputs[F.HISTORY_ITEM_IDS].CopyFrom(tf.make_tensor_proto(
        np.array([h + [""] * (width - len(h)) for _, h in batch], dtype=object)))
    if signature == "serving_default":
        req.inputs[F.K].CopyFrom(tf.make_tensor_proto(np.int32(k)))
        req.inputs[F.BETA].CopyFrom(tf.make_tensor_proto(np.float32(beta)))
    return req


def outputs(response):
    import tensorflow as tf

    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


# --- tests against the subprocess ----------------------------------------------------------------
@integration
def test_client_results_equal_the_saved_model(served):
    from serving.client import RecommenderClient

    batch = users(served["ids"], n=6)
    want = direct_call(served["export"], batch, 7, 0.5)
    with RecommenderClient(served["target"], timeout=10) as client:
        got = client.recommend_many(batch, k=7, beta=0.5)
    for row, rec in enumerate(got):
        ids = [x.decode() for x in want[F.OUT_ITEM_IDS][row]]
        assert [i.item_id for i in rec.items] == [i for i in ids if i]
        np.testing.assert_allclose([i.score for i in rec.items], want[F.OUT_SCORES][row][: len(rec.items)], atol=1e-5)
        assert rec.segment_id == want[F.SEGMENT_ID][row] and rec.model_version == 1
        np.testing.assert_allclose(rec.segment_probs, want[F.SEGMENT_PROBS][row], atol=1e-5)
        assert rec.segment_label  # from the server's segments.json


def _bad_cases(ids):
    import tensorflow as tf

    good = users(ids, n=2)

    def edit(fn, **kw):
        req = request(good, **kw)
        fn(req)
        return req

    def set_input(name, value):
        return lambda r: r.inputs[name].CopyFrom(tf.make_tensor_proto(value))

    return {
        "unknown signature": (request(good, signature="nope"), "INVALID_ARGUMENT", "signature_name"),
        "missing user_text": (edit(lambda r: r.inputs.pop(F.USER_TEXT)), "INVALID_ARGUMENT", "inputs.user_text"),
        "extra input": (edit(set_input("colour", np.array([b"red", b"blue"], dtype=object))),
                        "INVALID_ARGUMENT", "inputs.colour"),
        "k wrong dtype": (edit(set_input(F.K, np.float32(3))), "INVALID_ARGUMENT", "inputs.k"),
        "user_text wrong dtype": (edit(set_input(F.USER_TEXT, np.array([1, 2], np.int32))),
                                  "INVALID_ARGUMENT", "inputs.user_text"),
        "user_text wrong rank": (edit(set_input(F.USER_TEXT, np.array([[b"a"], [b"b"]], dtype=object))),
                                 "INVALID_ARGUMENT", "inputs.user_text"),
        "history wrong rank": (edit(set_input(F.HISTORY_ITEM_IDS, np.array([b"a", b"b"], dtype=object))),
                               "INVALID_ARGUMENT", "inputs.history_item_ids"),
        "k = 0": (request(good, k=0), "INVALID_ARGUMENT", "inputs.k"),
        "k > k_max": (request(good, k=101), "INVALID_ARGUMENT", "inputs.k"),
        "k huge": (request(good, k=2**31 - 1), "INVALID_ARGUMENT", "inputs.k"),
        "beta nan": (request(good, beta=float("nan")), "INVALID_ARGUMENT", "inputs.beta"),
        "batch too big": (request(users(ids, n=MAX_BATCH + 1)), "INVALID_ARGUMENT", "batch"),
        "batch sizes differ": (edit(set_input(F.USER_TEXT, np.array([b"a"], dtype=object))),
                               "INVALID_ARGUMENT", "batch sizes differ"),
        "string too long": (request([("x" * int(MAX_STRING_MB * 1.5 * 2**20), [])]), "INVALID_ARGUMENT",
                            "inputs.user_text"),
        "values do not fill shape": (edit(lambda r: r.inputs[F.USER_TEXT].tensor_shape.dim[0].__setattr__("size", 5)),
                                     "INVALID_ARGUMENT", "inputs.user_text"),
        "unknown label": (request(good, label="gold"), "INVALID_ARGUMENT", "version_label"),
        "unknown version": (request(good, version=99), "NOT_FOUND", "version"),
        "unknown model": (request(good, name="other"), "NOT_FOUND", "model_spec.name"),
        "no model name": (request(good, name=""), "INVALID_ARGUMENT", "model_spec.name"),
        "output_filter": (edit(lambda r: r.output_filter.append("nope")), "INVALID_ARGUMENT", "output_filter"),
    }


@integration
def test_bad_requests_get_the_right_code_naming_the_field(served, stub):
    import grpc

    cases = _bad_cases(served["ids"])
    wrong = []
    for name, (req, code, field) in cases.items():
        try:
            stub.Predict(req, timeout=10)
            wrong.append(f"{name}: succeeded")
        except grpc.RpcError as err:
            if err.code().name != code or field not in err.details():
                wrong.append(f"{name}: {err.code().name} {err.details()!r}")
    assert not wrong, "\n".join(wrong)
    # The server keeps serving, and answers the same good request as before.
    good = outputs(stub.Predict(request(users(served["ids"], n=2)), timeout=10))
    assert good[F.OUT_ITEM_IDS].shape == (2, 5)
    with pytest.raises(grpc.RpcError) as err:
        from tensorflow_serving.apis import classification_pb2

        stub.Classify(classification_pb2.ClassificationRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@integration
def test_random_requests_never_crash_the_server(served, stub):
    import grpc
    import tensorflow as tf
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    texts = st.text(max_size=30).map(lambda s: s.encode("utf-8"))
    dtypes = st.sampled_from([np.int32, np.int64, np.float32, object])
    ids = served["ids"]

    @st.composite
    def tensor(draw):
        dtype = draw(dtypes)
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = int(np.prod(shape)) if shape else 1
        if dtype is object:
            values = draw(st.lists(st.one_of(texts, st.sampled_from([i.encode() for i in ids] + [b""])),
                                   min_size=n, max_size=n))
            return np.array(values, dtype=object).reshape(shape)
        return np.array(draw(st.lists(st.integers(-5, 200), min_size=n, max_size=n)), dtype=dtype).reshape(shape)

    @st.composite
    def requests(draw):
        from tensorflow_serving.apis import predict_pb2

        req = predict_pb2.PredictRequest()
        req.model_spec.name = "segrec"
        req.model_spec.signature_name = draw(st.sampled_from(
            ["serving_default", "recommend_defaults", "user_embedding", "serving_tf_example", ""]))
        names = draw(st.lists(st.sampled_from([F.USER_TEXT, F.HISTORY_ITEM_IDS, F.K, F.BETA, F.EXAMPLES]),
                              unique=True))
        for name in names:
            req.inputs[name].CopyFrom(tf.make_tensor_proto(draw(tensor())))
        return req

    codes = []

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests())
    def check(req):
        try:
            stub.Predict(req, timeout=20)
            codes.append("OK")
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err.details()
            codes.append(err.code().name)

    check()
    assert len(codes) >= 30
    assert outputs(stub.Predict(request(users(ids, n=1)), timeout=10))[F.OUT_ITEM_IDS].shape == (1, 5)


@integration
def test_metadata_status_and_labels(served, stub):
    import grpc
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc)

    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "segrec"
    meta = stub.GetModelMetadata(req, timeout=10)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    meta.metadata["signature_def"].Unpack(sigs)
    assert set(sigs.signature_def) == {"serving_default", "recommend_defaults", "serving_tf_example",
                                       "user_embedding"}
    assert set(sigs.signature_def["serving_default"].inputs) == {F.USER_TEXT, F.HISTORY_ITEM_IDS, F.K, F.BETA}
    with grpc.insecure_channel(served["target"]) as ch:
        status = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "segrec"}), timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [(1, 30)]  # AVAILABLE
    via_label = stub.Predict(request(users(served["ids"], n=1), label="stable"), timeout=10)
    assert via_label.model_spec.version.value == 1


@integration
def test_rest_equals_grpc(served, stub):
    import json
    import urllib.request

    batch = users(served["ids"], n=3)
    width = max(1, max(len(h) for _, h in batch))
    body = {"signature_name": "serving_default",
            "inputs": {F.USER_TEXT: [t for t, _ in batch], F.HISTORY_ITEM_IDS: [h + [""] * (width - len(h))
                                                                                for _, h in batch],
                       F.K: 4, F.BETA: 0.5}}
    base = f"http://127.0.0.1:{served['rest']}/v1/models/segrec"
    rq = urllib.request.Request(base + ":predict", data=json.dumps(body).encode(), method="POST")
    got = json.loads(urllib.request.urlopen(rq, timeout=10).read())["outputs"]
    want = outputs(stub.Predict(request(batch, k=4), timeout=10))
    assert got[F.OUT_ITEM_IDS] == [[x.decode() for x in row] for row in want[F.OUT_ITEM_IDS]]
    np.testing.assert_allclose(np.array(got[F.OUT_SCORES], dtype=np.float64), want[F.OUT_SCORES], atol=1e-6)
    assert got[F.SEGMENT_ID] == want[F.SEGMENT_ID].tolist()
    status = json.loads(urllib.request.urlopen(base, timeout=10).read())
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    bad = urllib.request.Request(base + ":predict", data=b'{"inputs": {"k": 3}}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400 and "inputs." in json.loads(err.value.read())["error"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{served['metrics']}/metrics", timeout=10).read().decode()
    assert 'segrec_requests_total{code="INVALID_ARGUMENT",method="Predict"}' in metrics
    assert "segrec_loaded_version 1.0" in metrics and "segrec_batch_rows_bucket" in metrics


@integration
def test_new_version_under_load_then_a_corrupt_one(served):
    """4 threads x 40 requests while version 2 is published: zero failures, then
    version 2 serves; a corrupt version 3 leaves version 2 serving and says why."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    from serving.client import RecommenderClient

    batch = users(served["ids"], n=1)
    failures, versions = [], []
    stop_at = time.time() + 60

    def worker(i):
        with RecommenderClient(served["target"], timeout=10, retries=0) as client:
            for j in range(40):
                if time.time() > stop_at:
                    break
                try:
                    versions.append(client.recommend(*batch[0], k=3, beta=0.5).model_version)
                except Exception as err:  # noqa: BLE001
                    failures.append(repr(err))
                if i == 0 and j == 5:
                    publish(served["base"], 1, 2)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    assert not failures and len(versions) >= 100
    with RecommenderClient(served["target"], timeout=10) as client:
        for _ in range(100):  # the poll is 0.3 s; the load a second or two
            if client.recommend(*batch[0], k=3, beta=0.5).model_version == 2:
                break
            time.sleep(0.2)
        assert client.recommend(*batch[0], k=3, beta=0.5).model_version == 2
        assert client.recommend(*batch[0], k=3, beta=0.5, version_label="stable").model_version == 1

        corrupt = served["base"] / "segrec" / "3"
        corrupt.mkdir()
        (corrupt / "saved_model.pb").write_bytes(b"not a saved model")
        with grpc.insecure_channel(served["target"]) as ch:
            status_stub = model_service_pb2_grpc.ModelServiceStub(ch)
            req = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "segrec", "version": {"value": 3}})
            s = None
            for _ in range(100):
                try:
                    s = status_stub.GetModelStatus(req, timeout=10).model_version_status[0]
                except grpc.RpcError as err:  # NOT_FOUND until the next poll sees the dir
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                if s is not None and s.state == 50:  # END
                    break
                time.sleep(0.2)
        assert s.state == 50 and s.status.error_code != 0 and s.status.error_message
        assert client.recommend(*batch[0], k=3, beta=0.5).model_version == 2


@integration
def test_sigterm_drains_in_flight_and_exits_zero(served):
    from serving.client import RecommenderClient

    batch = users(served["ids"], n=1)
    with RecommenderClient(served["target"], timeout=15, retries=0) as client:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.recommend, *batch[0], k=3, beta=0.5) for _ in range(8)]
            time.sleep(0.05)
            served["proc"].send_signal(signal.SIGTERM)
            done = [f.exception() for f in futures]
    assert served["proc"].wait(30) == 0
    # Calls sent before the signal are answered; later ones may be refused, never half-done.
    assert all(e is None or "UNAVAILABLE" in str(e) for e in done), done


# --- unit tests (no server) -----------------------------------------------------------------------
def test_batcher_merges_pads_history_and_splits():
    from serving import batching

    calls = []

    def run(loaded, signature, inputs):
        calls.append({k: v.copy() for k, v in inputs.items()})
        return {"n": np.array([sum(1 for x in row if x) for row in inputs[F.HISTORY_ITEM_IDS]])}

    b = batching.Batcher(run, max_batch_size=8, timeout_s=0.2, max_queue=10)
    k = np.int32(3)
    futs = [b.submit("v1", "sig", {F.USER_TEXT: np.array([b"a"] * r, dtype=object),
                                   F.HISTORY_ITEM_IDS: np.array([[b"x"] * w] * r, dtype=object), F.K: k})
            for r, w in ((1, 1), (2, 3), (1, 2))]
    # 1 + 2 + 1 rows with histories of widths 1, 3, 2: one call, padded to width 3.
    assert [f.result(5)["n"].tolist() for f in futs] == [[1], [3, 3], [2]]
    assert len(calls) == 1 and calls[0][F.HISTORY_ITEM_IDS].shape == (4, 3)
    # A different k cannot share the call.
    f1 = b.submit("v1", "sig", {F.HISTORY_ITEM_IDS: np.array([[b"x"]], dtype=object), F.K: np.int32(1)})
    f2 = b.submit("v1", "sig", {F.HISTORY_ITEM_IDS: np.array([[b"x"]], dtype=object), F.K: np.int32(2)})
    f1.result(5), f2.result(5)
    assert len(calls) == 3
    b.stop()


def test_batcher_queue_is_bounded():
    from serving import batching

    release = threading.Event()

    def run(loaded, signature, inputs):
        release.wait(10)
        return {"y": inputs["x"]}

    b = batching.Batcher(run, max_batch_size=1, timeout_s=0.0, max_queue=2)
    futs = [b.submit("v", "s", {"x": np.array([i])}) for i in range(1)]
    time.sleep(0.2)  # the worker holds the first task
    futs += [b.submit("v", "s", {"x": np.array([i])}) for i in range(2)]
    with pytest.raises(batching.QueueFull):
        b.submit("v", "s", {"x": np.array([9])})
    release.set()
    assert [f.result(5)["y"].tolist() for f in futs] == [[0], [0], [1]]
    b.stop()


def test_model_manager_keeps_the_old_version_when_a_new_one_fails(tmp_path):
    from serving import model_manager as mm

    def loader(path, version):
        if "bad" in open(os.path.join(path, "saved_model.pb")).read():
            raise ValueError("corrupt saved_model.pb")
        return mm.LoadedVersion(version, path, None, {}, {}, None)

    def write(version, text):
        d = tmp_path / "segrec" / str(version)
        d.mkdir(parents=True, exist_ok=True)
        (d / "saved_model.pb").write_text(text)

    manager = mm.ModelManager(str(tmp_path), labels={"stable": 1}, loader=loader)
    with pytest.raises(mm.NoVersionError) as err:
        manager.resolve()
    assert err.value.code == "FAILED_PRECONDITION"
    write(1, "ok")
    manager.poll_once()
    assert manager.resolve().version == 1
    write(2, "bad")
    (tmp_path / "segrec" / ".tmp-3").mkdir()  # half-written exports are ignored
    manager.poll_once()
    assert manager.resolve().version == 1
    state = manager.snapshot.states[2]
    assert state.state == mm.END and "corrupt" in state.error_message
    write(2, "ok now!")  # fixed files are retried
    manager.poll_once()
    assert manager.resolve().version == 2 and manager.resolve(label="stable").version == 1
    write(3, "ok")
    manager.poll_once()
    assert sorted(manager.snapshot.loaded) == [1, 3]  # latest + labelled
    with pytest.raises(mm.NoVersionError) as err:
        manager.resolve(2)
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(mm.NoVersionError) as err:
        manager.resolve(label="canary")
    assert err.value.code == "INVALID_ARGUMENT"


def test_parse_labels():
    from serving import server

    assert server.parse_labels("stable=1, canary=2") == (("stable", 1), ("canary", 2))
    assert server.parse_labels("") == ()
    with pytest.raises(ValueError, match="LABEL=VERSION"):
        server.parse_labels("stable:1")
