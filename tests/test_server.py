"""`segrec serve` in a subprocess on a free localhost port over a tiny export:
results equal the SavedModel's, bad requests get the right code naming the
field, hot swap under load, a corrupt version. A second "drill" server (TLS,
bearer token, a queue of 1, batches of 1, --fault-delay-ms) holds requests
inside the model: TLS, RESOURCE_EXHAUSTED when the queue is full, SIGTERM
drains the request in the model and refuses new ones. Unit tests of the
adaptive batcher, the model manager and the label parser need no server."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest

from serving.server.launch import ServerProcess, free_port, health_status  # noqa: F401  (free_port: test_client imports it)
from trainer import features as F

TINY_TRAIN = ["--encoder", "tiny", "--embedding-dim", "16", "--num-segments", "4", "--epochs", "1", "--warmup-epochs", "0",
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
        from serving.export import exporter as ex
        from trainer.cli import main as cli

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
    from serving.export import exporter as ex

    return ex.load_exported(version_dir)


def direct_call(version_dir, batch, k, beta):
    """The SavedModel's own serving_default on the same users (k, beta: one for all rows or one per row)."""
    import tensorflow as tf

    width = max(1, max(len(h) for _, h in batch))
    hist = [h + [""] * (width - len(h)) for _, h in batch]
    fn = _loaded(version_dir).signatures["serving_default"]
    out = fn(user_text=tf.constant([t for t, _ in batch]), history_item_ids=tf.constant(hist, tf.string),
             k=tf.constant(np.broadcast_to(np.asarray(k, np.int32), [len(batch)])),
             beta=tf.constant(np.broadcast_to(np.asarray(beta, np.float32), [len(batch)])))
    return {k_: v.numpy() for k_, v in out.items()}


# --- the subprocess server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_generated):
    return build_tiny_export(tmp_path_factory, tiny_generated)


@pytest.fixture(scope="module")
def served(export_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_base")
    copy_base(export_dir, base)
    server = ServerProcess(base, log_path=base / "serve.log", extra_args=[
        "--poll-seconds", "0.3", "--max-batch-size", MAX_BATCH, "--version-labels", "stable=1",
        "--max-string-mb", MAX_STRING_MB])
    with server:
        yield {"server": server, "proc": server.proc, "target": server.target, "base": base,
               "rest": server.rest_port, "metrics": server.metrics_port, "export": export_dir,
               "ids": item_ids(export_dir)}


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
    if signature == "serving_default":  # one k and beta per row, or the same for every row
        req.inputs[F.K].CopyFrom(tf.make_tensor_proto(np.broadcast_to(np.asarray(k, np.int32), [len(batch)])))
        req.inputs[F.BETA].CopyFrom(tf.make_tensor_proto(
            np.broadcast_to(np.asarray(beta, np.float32), [len(batch)])))
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
        "k wrong dtype": (edit(set_input(F.K, np.array([3, 3], np.float32))), "INVALID_ARGUMENT", "inputs.k"),
        "user_text wrong dtype": (edit(set_input(F.USER_TEXT, np.array([1, 2], np.int32))),
                                  "INVALID_ARGUMENT", "inputs.user_text"),
        "user_text wrong rank": (edit(set_input(F.USER_TEXT, np.array([[b"a"], [b"b"]], dtype=object))),
                                 "INVALID_ARGUMENT", "inputs.user_text"),
        "history wrong rank": (edit(set_input(F.HISTORY_ITEM_IDS, np.array([b"a", b"b"], dtype=object))),
                               "INVALID_ARGUMENT", "inputs.history_item_ids"),
        "k = 0": (request(good, k=0), "INVALID_ARGUMENT", "inputs.k"),
        "k = 0 in row 1": (request(good, k=[5, 0]), "INVALID_ARGUMENT", "inputs.k: 0 (row 1)"),
        "k scalar": (edit(set_input(F.K, np.int32(3))), "INVALID_ARGUMENT", "inputs.k: a scalar"),
        "k not one per row": (edit(set_input(F.K, np.array([3, 3, 3], np.int32))), "INVALID_ARGUMENT",
                              "inputs.k: 3 values for 2 rows"),
        "beta not one per row": (edit(set_input(F.BETA, np.array([0.5], np.float32))), "INVALID_ARGUMENT",
                                 "inputs.beta: 1 values for 2 rows"),
        "beta inf in row 1": (request(good, beta=[0.0, float("inf")]), "INVALID_ARGUMENT", "inputs.beta"),
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


def exclude_request(batch, exclude, k=5, beta=0.5):
    """serving_exclude: serving_default's inputs + exclude_item_ids (given as is: any shape or dtype)."""
    import tensorflow as tf

    req = request(batch, k, beta)
    req.model_spec.signature_name = "serving_exclude"
    req.inputs[F.EXCLUDE_ITEM_IDS].CopyFrom(tf.make_tensor_proto(exclude))
    return req


@integration
def test_serving_exclude_removes_the_items_and_bad_exclusions_are_invalid_argument(served, stub):
    """Each user excludes serving_default's best item: the rest is serving_default's ranking, over gRPC
    and REST (instances of different lengths). A malformed exclude_item_ids gets INVALID_ARGUMENT naming
    it, and the server answers the next request."""
    import json

    import grpc

    batch = users(served["ids"], n=3, seed=5)
    plain = outputs(stub.Predict(request(batch, k=6), timeout=10))
    ids = [[x.decode() for x in row] for row in plain[F.OUT_ITEM_IDS]]
    exclude = np.array([[ids[0][0], ""], [ids[1][0], ids[1][0]], [ids[2][0], "not-an-item"]], dtype=object)
    got = outputs(stub.Predict(exclude_request(batch, exclude), timeout=10))
    assert [[x.decode() for x in row] for row in got[F.OUT_ITEM_IDS]] == [row[1:6] for row in ids]
    np.testing.assert_allclose(got[F.OUT_SCORES], plain[F.OUT_SCORES][:, 1:6], atol=1e-5)

    bad = {
        "rank 1": np.array([b"a", b"b", b"c"], dtype=object),
        "rank 3": np.array([[[b"a"]], [[b"b"]], [[b"c"]]], dtype=object),
        "int dtype": np.array([[1], [2], [3]], np.int32),
        "batch of 2": np.array([[b"a"], [b"b"]], dtype=object),
    }
    wrong = []
    for name, value in bad.items():
        try:
            stub.Predict(exclude_request(batch, value), timeout=10)
            wrong.append(f"{name}: succeeded")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or "exclude_item_ids" not in err.details():
                wrong.append(f"{name}: {err.code().name} {err.details()!r}")
    missing = exclude_request(batch, exclude)
    missing.inputs.pop(F.EXCLUDE_ITEM_IDS)
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(missing, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs.exclude_item_ids: missing" in \
        err.value.details()
    assert not wrong, "\n".join(wrong)
    # Still serving: the same good request answers as before.
    again = outputs(stub.Predict(exclude_request(batch, exclude), timeout=10))
    np.testing.assert_array_equal(again[F.OUT_ITEM_IDS], got[F.OUT_ITEM_IDS])

    # REST's row format pads each instance's exclusions like its history.
    instances = [{F.USER_TEXT: t, F.HISTORY_ITEM_IDS: h, F.K: 5, F.BETA: 0.5,
                  F.EXCLUDE_ITEM_IDS: [x for x in row if x]} for (t, h), row in zip(batch, exclude.tolist())]
    rq = urllib.request.Request(f"http://127.0.0.1:{served['rest']}/v1/models/segrec:predict", method="POST",
                                data=json.dumps({"signature_name": "serving_exclude", "instances": instances}).encode())
    rows = json.loads(urllib.request.urlopen(rq, timeout=10).read())["predictions"]
    assert [r[F.OUT_ITEM_IDS] for r in rows] == [row[1:6] for row in ids]


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
            ["serving_default", "recommend_defaults", "user_embedding", "serving_tf_example", "serving_exclude", ""]))
        names = draw(st.lists(st.sampled_from([F.USER_TEXT, F.HISTORY_ITEM_IDS, F.K, F.BETA, F.EXAMPLES,
                                               F.EXCLUDE_ITEM_IDS]), unique=True))
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
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
    )

    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "segrec"
    meta = stub.GetModelMetadata(req, timeout=10)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    meta.metadata["signature_def"].Unpack(sigs)
    assert set(sigs.signature_def) == {"serving_default", "recommend_defaults", "serving_tf_example",
                                       "user_embedding", "encode_text", "serving_text_vector", "serving_exclude"}
    assert set(sigs.signature_def["serving_default"].inputs) == {F.USER_TEXT, F.HISTORY_ITEM_IDS, F.K, F.BETA}
    assert set(sigs.signature_def["serving_exclude"].inputs) == {F.USER_TEXT, F.HISTORY_ITEM_IDS, F.K, F.BETA,
                                                                 F.EXCLUDE_ITEM_IDS}
    with grpc.insecure_channel(served["target"]) as ch:
        status = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "segrec"}), timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [(1, 30)]  # AVAILABLE
    via_label = stub.Predict(request(users(served["ids"], n=1), label="stable"), timeout=10)
    assert via_label.model_spec.version.value == 1


@integration
def test_health_and_reflection_list_the_services(served):
    """grpc.health.v1 Check / Watch, and server reflection as grpcurl uses it: list, then describe."""
    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(served["target"]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == serving
        watch.cancel()
        asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="tensorflow.serving.PredictionService")]
        listed, described = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter(asks),
                                                                                                    timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert "tensorflow.serving.PredictionService" in names
    assert names == {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                     "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    # What grpcurl needs to call Predict: the service's file (and the files it imports).
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    assert "Predict" in [m.name for f in files for s in f.service if s.name == "PredictionService" for m in s.method]
    assert "tensorflow_serving/apis/predict.proto" in {f.name for f in files}


@integration
def test_rest_equals_grpc(served, stub):
    import json
    import urllib.request

    batch = users(served["ids"], n=3)
    width = max(1, max(len(h) for _, h in batch))
    body = {"signature_name": "serving_default",
            "inputs": {F.USER_TEXT: [t for t, _ in batch], F.HISTORY_ITEM_IDS: [h + [""] * (width - len(h))
                                                                                for _, h in batch],
                       F.K: [4] * 3, F.BETA: [0.5] * 3}}
    base = f"http://127.0.0.1:{served['rest']}/v1/models/segrec"
    rq = urllib.request.Request(base + ":predict", data=json.dumps(body).encode(), method="POST")
    got = json.loads(urllib.request.urlopen(rq, timeout=10).read())["outputs"]
    want = outputs(stub.Predict(request(batch, k=4), timeout=10))
    assert got[F.OUT_ITEM_IDS] == [[x.decode() for x in row] for row in want[F.OUT_ITEM_IDS]]
    np.testing.assert_allclose(np.array(got[F.OUT_SCORES], dtype=np.float64), want[F.OUT_SCORES], atol=1e-6)
    assert got[F.SEGMENT_ID] == want[F.SEGMENT_ID].tolist()
    # TF Serving's row format: k and beta per instance, histories of any length.
    ks, betas = [2, 5, 3], [0.0, 0.5, 2.0]
    instances = [{F.USER_TEXT: t, F.HISTORY_ITEM_IDS: h, F.K: k, F.BETA: b}
                 for (t, h), k, b in zip(batch, ks, betas)]
    rq = urllib.request.Request(base + ":predict", data=json.dumps({"instances": instances}).encode(), method="POST")
    rows = json.loads(urllib.request.urlopen(rq, timeout=10).read())["predictions"]
    want = outputs(stub.Predict(request(batch, k=ks, beta=betas), timeout=10))
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert row[F.OUT_ITEM_IDS] == [x.decode() for x in want[F.OUT_ITEM_IDS][i]]
        assert len([x for x in row[F.OUT_ITEM_IDS] if x]) == ks[i] and row[F.SEGMENT_ID] == want[F.SEGMENT_ID][i]
    status = json.loads(urllib.request.urlopen(base, timeout=10).read())
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    for body, field in ((b'{"inputs": {"k": 3}}', "inputs."),
                        (json.dumps({"inputs": dict(body["inputs"], k=4)}).encode(), "inputs.k: a scalar")):
        bad = urllib.request.Request(base + ":predict", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=10)
        assert err.value.code == 400 and field in json.loads(err.value.read())["error"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{served['metrics']}/metrics", timeout=10).read().decode()
    assert 'segrec_requests_total{code="INVALID_ARGUMENT",method="Predict"}' in metrics
    assert "segrec_loaded_version 1.0" in metrics and "segrec_batch_rows_bucket" in metrics
    assert "segrec_requests_in_model 0.0" in metrics and "segrec_queued_requests 0.0" in metrics


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


# --- the drill server: TLS + token, batches of 1, a queue of 1, 1.5 s inside the model ------------------
DRILL_TOKEN = "drill-token"
DRILL_DELAY_MS = 1500


def self_signed_cert(directory) -> tuple:
    """(cert path, key path, cert PEM bytes) for CN/SAN 127.0.0.1 + localhost, made with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key), cert.read_bytes()


@pytest.fixture(scope="module")
def drill(export_dir, tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("the openssl CLI makes the test certificate")
    base = tmp_path_factory.mktemp("drill_base")
    copy_base(export_dir, base)
    cert, key, ca = self_signed_cert(base)
    server = ServerProcess(base, rest_port=0, log_path=base / "serve.log", tls_ca=ca, token=DRILL_TOKEN,
                           env={"SEGREC_DRILL_TOKEN": DRILL_TOKEN}, extra_args=[
                               "--tls-cert", cert, "--tls-key", key, "--token-env", "SEGREC_DRILL_TOKEN",
                               "--max-batch-size", 1, "--max-queue", 1, "--fault-delay-ms", DRILL_DELAY_MS,
                               "--poll-seconds", 30])
    with server:
        yield {"server": server, "ca": ca, "ids": item_ids(export_dir), "export": export_dir}


def _drill_stub(drill):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.secure_channel(drill["server"].target, grpc.ssl_channel_credentials(root_certificates=drill["ca"]))
    return channel, prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _gauge(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


AUTH = (("authorization", f"Bearer {DRILL_TOKEN}"),)


@integration
def test_tls_with_token(drill):
    from serving.client import RecommenderClient, RecommendError

    user = users(drill["ids"], n=1)[0]
    want = direct_call(drill["export"], [user], 4, 0.5)
    with RecommenderClient(drill["server"].target, timeout=20, root_certificates=drill["ca"],
                           token=DRILL_TOKEN) as client:
        rec = client.recommend(*user, k=4, beta=0.5)
    assert [i.item_id for i in rec.items] == [x.decode() for x in want[F.OUT_ITEM_IDS][0] if x]
    # Plaintext to the TLS port fails to connect; TLS without the token is refused.
    with RecommenderClient(drill["server"].target, timeout=5, retries=0, token=DRILL_TOKEN) as plain:
        with pytest.raises(RecommendError) as err:
            plain.recommend(*user, k=4, beta=0.5)
    assert err.value.code.name == "UNAVAILABLE"
    with RecommenderClient(drill["server"].target, timeout=5, retries=0, root_certificates=drill["ca"]) as anon:
        with pytest.raises(RecommendError) as err:
            anon.recommend(*user, k=4, beta=0.5)
    assert err.value.code.name == "UNAUTHENTICATED"


@integration
def test_full_queue_is_resource_exhausted_over_grpc(drill):
    """One request held in the model, one queued: a burst sent meanwhile gets
    RESOURCE_EXHAUSTED (never INTERNAL), and the server serves afterwards."""
    server = drill["server"]
    channel, stub = _drill_stub(drill)
    with channel:
        req = request(users(drill["ids"], n=1), k=3)
        first = stub.Predict.future(req, timeout=60, metadata=AUTH)
        _wait_for(lambda: _gauge(server, "segrec_requests_in_model") >= 1, "a request inside the model")
        queued = stub.Predict.future(req, timeout=60, metadata=AUTH)
        _wait_for(lambda: _gauge(server, "segrec_queued_requests") >= 1 or queued.done(), "a queued request")
        burst = [stub.Predict.future(req, timeout=60, metadata=AUTH) for _ in range(6)]
        codes = [_code(f) for f in [first, queued] + burst]
        assert codes[:2] == ["OK", "OK"], codes
        assert "RESOURCE_EXHAUSTED" in codes[2:] and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert _code(stub.Predict.future(req, timeout=60, metadata=AUTH)) == "OK"
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'segrec_requests_total{code="RESOURCE_EXHAUSTED",method="Predict"}' in text


def _code(future) -> str:
    import grpc

    try:
        future.result()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


@integration
def test_sigterm_answers_the_request_in_the_model_refuses_new_ones_and_exits_zero(drill):
    """Runs last on the drill server (it stops it)."""
    import grpc

    server = drill["server"]
    channel, stub = _drill_stub(drill)
    with channel:
        req = request(users(drill["ids"], n=1), k=3)
        inside = stub.Predict.future(req, timeout=60, metadata=AUTH)
        _wait_for(lambda: _gauge(server, "segrec_requests_in_model") >= 1, "a request inside the model")
        server.proc.send_signal(signal.SIGTERM)
        # Draining: health is no longer SERVING, the request is still inside the model ...
        _wait_for(lambda: not health_status(server.target, tls_ca=drill["ca"]), "health to leave SERVING")
        assert _gauge(server, "segrec_requests_in_model") == 1 and not inside.done()
        # ... a new request is refused, and the one inside is answered in full.
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(req, timeout=20, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        response = inside.result()
    assert outputs(response)[F.OUT_ITEM_IDS].shape == (1, 3)
    assert server.proc.wait(30) == 0
    assert "segrec serve: stopped" in server.log_tail()


# --- unit tests (no server) -----------------------------------------------------------------------
class _Gate:
    """A fake model call that blocks while `closed` and logs every call's inputs."""

    def __init__(self, closed=True):
        self.opened = threading.Event()
        if not closed:
            self.opened.set()
        self.calls = []

    def __call__(self, loaded, signature, inputs):
        self.calls.append({k: v.copy() for k, v in inputs.items()})
        assert self.opened.wait(30), "the gate was never opened"
        hist = inputs[F.HISTORY_ITEM_IDS]
        k = inputs.get(F.K, np.ones(len(hist), np.int32))
        cols = int(np.max(k))
        ids = np.array([[f"{row}:{c}" if c < k[row] else "" for c in range(cols)] for row in range(len(hist))],
                       dtype=object)
        return {F.OUT_ITEM_IDS: ids, "n": np.array([sum(1 for x in r if x) for r in hist])}


def _task(rows=1, width=1, k=3, tag=b"x"):
    return {F.USER_TEXT: np.array([tag] * rows, dtype=object),
            F.HISTORY_ITEM_IDS: np.array([[b"h"] * width] * rows, dtype=object),
            F.K: np.full(rows, k, np.int32), F.BETA: np.zeros(rows, np.float32)}


def _until(condition, what):
    _wait_for(condition, what, timeout=10)


def test_batcher_runs_a_lone_request_at_once():
    """Idle model: a lone request runs at once, not after the (2 s) batch timeout."""
    from serving.server import batching

    for threads in (1, 2):
        gate = _Gate(closed=False)
        b = batching.Batcher(gate, max_batch_size=8, timeout_s=2.0, max_queue=4, num_threads=threads)
        start = time.monotonic()
        assert b.submit("v1", "sig", _task()).result(10)["n"].tolist() == [1]
        assert time.monotonic() - start < 1.0  # generous: far below the 2 s timeout
        b.stop()


def test_batcher_merges_what_arrives_while_the_model_is_busy():
    """Requests that arrive during a call go together into the next one: history
    padded with "", different k / beta merged, each answer cut to its own k."""
    from serving.server import batching

    gate = _Gate()
    b = batching.Batcher(gate, max_batch_size=8, timeout_s=0.0, max_queue=10)
    first = b.submit("v1", "sig", _task())
    _until(lambda: b.executing() == 1, "the first call")
    futs = [b.submit("v1", "sig", _task(rows, width, k)) for rows, width, k in ((1, 1, 2), (2, 3, 5), (1, 2, 1))]
    assert b.queued() == 3  # the model is busy: they wait, whatever the timeout
    gate.opened.set()
    first.result(10)
    got = [f.result(10) for f in futs]
    assert [len(c[F.USER_TEXT]) for c in gate.calls] == [1, 4]  # 1 alone, then 1 + 2 + 1 rows in one call
    merged = gate.calls[1]
    assert merged[F.HISTORY_ITEM_IDS].shape == (4, 3) and merged[F.K].tolist() == [2, 5, 5, 1]
    assert merged[F.HISTORY_ITEM_IDS][0].tolist() == [b"h", b"", b""]
    assert [g["n"].tolist() for g in got] == [[1], [3, 3], [2]]
    # Rows split back, item columns cut to each request's own max(k).
    assert [g[F.OUT_ITEM_IDS].shape for g in got] == [(1, 2), (2, 5), (1, 1)]
    assert got[1][F.OUT_ITEM_IDS][1].tolist() == [f"2:{c}" for c in range(5)]
    # Other versions or signatures never share a call.
    gate.calls.clear()
    gate.opened.clear()
    hold = b.submit("v1", "sig", _task())
    _until(lambda: b.executing() == 1, "the holding call")
    others = [b.submit(v, s, _task()) for v, s in (("v1", "sig"), ("v2", "sig"), ("v1", "other"), ("v1", "sig"))]
    gate.opened.set()
    hold.result(10), [f.result(10) for f in others]
    assert sorted(len(c[F.USER_TEXT]) for c in gate.calls) == [1, 1, 1, 2]
    b.stop()


def test_batcher_with_two_threads_fills_or_times_out_while_busy():
    """Model busy on one thread: the free thread runs a batch once it is full, or
    once the oldest request has waited the timeout."""
    from serving.server import batching

    gate = _Gate()
    b = batching.Batcher(gate, max_batch_size=3, timeout_s=60.0, max_queue=10, num_threads=2)
    hold = b.submit("v1", "sig", _task(tag=b"hold"))
    _until(lambda: b.executing() == 1, "the holding call")
    full = [b.submit("v1", "sig", _task()) for _ in range(3)]  # 3 rows = max_batch_size: runs now
    _until(lambda: b.executing() == 2, "the full batch on the second thread")
    assert len(gate.calls) == 2 and len(gate.calls[1][F.USER_TEXT]) == 3
    gate.opened.set()
    hold.result(10), [f.result(10) for f in full]
    b.stop()

    gate = _Gate()
    b = batching.Batcher(gate, max_batch_size=8, timeout_s=0.2, max_queue=10, num_threads=2)
    hold = b.submit("v1", "sig", _task(tag=b"hold"))
    _until(lambda: b.executing() == 1, "the holding call")
    lone = b.submit("v1", "sig", _task())
    # Not full, model busy: it runs after its 0.2 s timeout, while the first call still holds the gate.
    _until(lambda: b.executing() == 2, "the timed-out batch on the second thread")
    assert not hold.done() and len(gate.calls[1][F.USER_TEXT]) == 1
    gate.opened.set()
    hold.result(10), lone.result(10)
    b.stop()


def test_batcher_queue_is_bounded_and_stop_answers_the_queued():
    from serving.server import batching

    gate = _Gate()
    b = batching.Batcher(gate, max_batch_size=1, timeout_s=0.0, max_queue=2)
    futs = [b.submit("v", "s", _task(tag=b"0"))]
    _until(lambda: b.executing() == 1, "the first call")  # the worker holds it: the queue is empty
    futs += [b.submit("v", "s", _task(tag=t)) for t in (b"1", b"2")]
    with pytest.raises(batching.QueueFull, match="queue is full"):
        b.submit("v", "s", _task(tag=b"3"))
    gate.opened.set()
    b.stop()  # answers what was queued, then refuses new work
    assert [f.result(10)["n"].tolist() for f in futs] == [[1], [1], [1]]
    assert [c[F.USER_TEXT].tolist() for c in gate.calls] == [[b"0"], [b"1"], [b"2"]]
    with pytest.raises(batching.ShuttingDown):
        b.submit("v", "s", _task())


def test_batcher_retries_a_failed_merged_call_one_by_one():
    from serving.server import batching

    gate = _Gate()

    def run(loaded, signature, inputs):
        out = gate(loaded, signature, inputs)
        if b"bad" in inputs[F.USER_TEXT].tolist():
            raise ValueError("bad row")
        return out

    b = batching.Batcher(run, max_batch_size=8, timeout_s=0.0, max_queue=10)
    hold = b.submit("v", "s", _task())
    _until(lambda: b.executing() == 1, "the first call")
    good, bad_one = b.submit("v", "s", _task()), b.submit("v", "s", _task(tag=b"bad"))
    gate.opened.set()
    hold.result(10)
    assert good.result(10)["n"].tolist() == [1]
    with pytest.raises(ValueError, match="bad row"):
        bad_one.result(10)
    assert [len(c[F.USER_TEXT]) for c in gate.calls] == [1, 2, 1, 1]
    b.stop()


def test_model_manager_keeps_the_old_version_when_a_new_one_fails(tmp_path):
    from serving.server import model_manager as mm

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


def _fake_loader(path, version):
    from serving.server import model_manager as mm

    return mm.LoadedVersion(version, path, None, {}, {}, None)


def test_health_follows_the_loaded_versions_and_drain(tmp_path):
    """In-process server, no model: NOT_SERVING until a version loads, SERVING then
    (pushed to Watch), NOT_SERVING once stop() drains; reflection needs the token."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from serving.server import app
    from serving.server.config import ServeConfig

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    server = app.Server(ServeConfig(model_base_path=str(tmp_path), port=0, poll_seconds=3600, token="t",
                                    grace_seconds=5), loader=_fake_loader)
    port = server.start()
    stopper = threading.Thread(target=server.stop)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status  # noqa: E731
            watch = health.Watch(health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService"),
                                 timeout=30)
            assert check() == not_serving and next(watch).status == not_serving
            version = tmp_path / "segrec" / "1"
            version.mkdir(parents=True)
            (version / "saved_model.pb").write_text("ok")
            server.manager.poll_once()
            assert next(watch).status == serving and check() == serving
            reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
            ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
            with pytest.raises(grpc.RpcError) as err:
                list(reflect(iter(ask), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            (listed,) = reflect(iter(ask), timeout=10, metadata=(("authorization", "Bearer t"),))
            assert "tensorflow.serving.PredictionService" in {s.name for s in listed.list_services_response.service}
            stopper.start()
            assert next(watch).status == not_serving
            watch.cancel()
    finally:
        if stopper.ident is None:
            server.stop()
        else:
            stopper.join(30)
    assert not server.is_serving()


def test_rest_errors_auth_and_routes():
    """The REST app over a fake predictor: {"error": ...} with TF Serving's HTTP statuses."""
    import types

    from fastapi.testclient import TestClient

    from serving.server import rest_api
    from serving.server.errors import ServeError

    seen = []

    class Predictor:
        config = types.SimpleNamespace(max_message_bytes=100)
        metrics = types.SimpleNamespace(observe_request=lambda method, code, s: seen.append((method, code)))

        def status(self, request):
            if request.model_spec.name == "boom":
                raise RuntimeError("a bug")
            if request.model_spec.version.value == 3:
                raise ServeError("NOT_FOUND", "model_spec.version: no version [3]")
            return types.SimpleNamespace(model_version_status=[types.SimpleNamespace(
                version=1, state=30, status=types.SimpleNamespace(error_code=0, error_message=""))])

        def resolve(self, spec):
            raise ServeError("FAILED_PRECONDITION", f"nothing loaded for label {spec.version_label!r}")

    api = TestClient(rest_api.create_app(Predictor(), token="t"), raise_server_exceptions=False)
    auth = {"Authorization": "Bearer t"}
    cases = [("GET", "/v1/models/segrec", None, {}, 401),
             ("GET", "/v1/models/segrec", None, auth, 200),
             ("GET", "/v1/models/segrec/versions/3", None, auth, 404),
             ("GET", "/v1/models/boom", None, auth, 500),
             ("GET", "/nowhere", None, auth, 404),
             ("POST", "/v1/models/segrec", b"{}", auth, 404),
             ("GET", "/v1/models/segrec:predict", None, auth, 404),
             ("POST", "/v1/models/segrec:predict", b"[]", auth, 400),
             ("POST", "/v1/models/segrec:predict", b"x" * 101, auth, 400),
             ("POST", "/v1/models/segrec/labels/gold:predict", b'{"inputs": {}}', auth, 400)]
    for method, path, body, headers, status in cases:
        got = api.request(method, path, content=body, headers=headers)
        assert got.status_code == status, (method, path, got.text)
        if status != 200:
            assert set(got.json()) == {"error"}, (method, path, got.text)
    assert api.get("/v1/models/segrec", headers=auth).json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert "gold" in api.post("/v1/models/segrec/labels/gold:predict", content=b'{"inputs": {}}',
                              headers=auth).json()["error"]
    assert seen[:4] == [("REST GET", "UNAUTHENTICATED"), ("REST GET", "OK"), ("REST GET", "NOT_FOUND"),
                        ("REST GET", "INTERNAL")]


def test_parse_labels():
    from serving.server import config as server

    assert server.parse_labels("stable=1, canary=2") == (("stable", 1), ("canary", 2))
    assert server.parse_labels("") == ()
    with pytest.raises(ValueError, match="LABEL=VERSION"):
        server.parse_labels("stable:1")


def test_serving_exclude_requests_merge_with_their_exclusions_padded():
    """exclude_item_ids of different widths (0 included) merge like the history: right-padded with b""."""
    from serving.server import batching

    tasks = []
    for width in (0, 2, 1):
        inputs = dict(_task(rows=2, width=1), **{
            F.EXCLUDE_ITEM_IDS: np.array([[b"e"] * width] * 2, dtype=object).reshape(2, width)})
        tasks.append(batching.Task("v1", "serving_exclude", inputs, None, rows=2))
    keys = {batching._task_key("v1", "serving_exclude", t.inputs) for t in tasks}
    assert len(keys) == 1 and isinstance(next(iter(keys))[-1], bool)  # mergeable, one call
    merged = batching.merge(tasks)
    assert merged[F.EXCLUDE_ITEM_IDS].tolist() == [[b"", b""]] * 2 + [[b"e", b"e"]] * 2 + [[b"e", b""]] * 2
