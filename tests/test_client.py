"""RecommenderClient against an in-process `segrec serve` (token required) and
a fake PredictionService (retries): typed results, padding dropped, labels,
the model's default beta, deadlines and retries, `segrec recommend`."""

from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time

import grpc
import numpy as np
import pytest
from test_server import build_tiny_export, copy_base, direct_call, item_ids, users

from trainer import features as F

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_generated):
    from serving.server import app as srv
    from serving.server.config import ServeConfig

    export_dir = build_tiny_export(tmp_path_factory, tiny_generated)
    base = copy_base(export_dir, tmp_path_factory.mktemp("client_base"))
    config = ServeConfig(model_base_path=base, port=0, token=TOKEN, batch_timeout_ms=20, poll_seconds=30)
    s = srv.Server(config)
    port = s.start()
    yield {"target": f"127.0.0.1:{port}", "export": export_dir, "ids": item_ids(export_dir), "server": s}
    s.stop()


@pytest.fixture()
def client(server):
    from serving.client import RecommenderClient

    with RecommenderClient(server["target"], timeout=10, token=TOKEN) as c:
        yield c


def test_whole_catalog_drops_padding_and_history(client, server):
    segments = json.load(open(f"{server['export']}/segments.json"))
    history = server["ids"][:3]
    rec = client.recommend("loves hiking and camping", history, k=len(server["ids"]), beta=0.5)
    got = [i.item_id for i in rec.items]
    # 60 items, 3 seen: 57 real ones, the 3 padding slots ("" / -inf) are dropped.
    assert sorted(got) == sorted(set(server["ids"]) - set(history))
    assert all(math.isfinite(i.score) for i in rec.items)
    assert [i.score for i in rec.items] == sorted((i.score for i in rec.items), reverse=True)
    assert rec.model_version == 1 and rec.segment_probs and abs(sum(rec.segment_probs) - 1) < 1e-4
    assert rec.segment_label == segments["segments"][rec.segment_id]["label"]


def test_beta_none_is_the_models_default(client, server):
    from serving.export import layout

    default_beta = float(layout.read_export_info(server["export"])["beta"])
    explicit = client.recommend("plays guitar", [], k=5, beta=default_beta)  # the export's default beta
    assert client.recommend("plays guitar", [], k=5) == explicit
    # Without the server's segrec metadata (TF Serving), recommend_defaults answers.
    client._info = lambda *a: {}
    fallback = client.recommend("plays guitar", [], k=5)
    assert fallback.items == explicit.items and fallback.segment_label == f"segment {explicit.segment_id}"
    from serving.client import RecommendError

    with pytest.raises(RecommendError, match="default k"):
        client.recommend("plays guitar", [], k=11)


def test_concurrent_requests_with_different_knobs_share_a_call_and_answer_as_alone(client, server):
    """8 users, each with its own k and beta: the first call holds the model until
    the other 7 (sent once it is inside) are queued, and those 7 then run as ONE
    merged call (k and beta concatenated per row); every answer equals the user's
    own call alone."""
    batch = users(server["ids"], n=8, seed=3)
    knobs = [(2 + i, (0.0, 0.25, 1.0)[i % 3]) for i in range(8)]
    want = [direct_call(server["export"], [u], k, b) for u, (k, b) in zip(batch, knobs)]
    batcher = server["server"].predictor.batcher
    run, sizes, first = batcher._run, [], threading.Event()

    def gated(loaded, signature, inputs):
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 20
            while batcher.queued() < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
        return run(loaded, signature, inputs)

    batcher._run, batcher._on_batch = gated, lambda rows, requests: sizes.append(requests)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ask = lambda i: pool.submit(client.recommend, *batch[i], k=knobs[i][0], beta=knobs[i][1])  # noqa: E731
            # The first user alone holds the model; only then come the other 7 (sent together they
            # could race the first into its call and leave the gate waiting for a 7th queued one).
            futures = [ask(0)]
            assert first.wait(10), "the first request never reached the model"
            futures += [ask(i) for i in range(1, 8)]
            got = [f.result() for f in futures]
    finally:
        batcher._run, batcher._on_batch = run, None
    assert sizes == [1, 7]
    for rec, w, (k, _) in zip(got, want, knobs):
        assert len(rec.items) == k
        assert [i.item_id for i in rec.items] == [x.decode() for x in w[F.OUT_ITEM_IDS][0] if x]
        np.testing.assert_allclose([i.score for i in rec.items], w[F.OUT_SCORES][0][:k], atol=1e-5)
        assert rec.segment_id == w[F.SEGMENT_ID][0]


def test_exclusions_use_serving_exclude_and_only_when_given(client, server):
    """exclude= drops those items (the rest is the plain ranking, one further down), via
    serving_exclude; without exclusions the request is serving_default's, as before."""
    signatures = []
    predict = client._stub.Predict

    def spy(request, **kw):
        signatures.append(request.model_spec.signature_name)
        return predict(request, **kw)

    client._stub.Predict = spy
    history = server["ids"][:2]
    plain = client.recommend("loves hiking and camping", history, k=8, beta=0.5)
    top = [i.item_id for i in plain.items]
    rec = client.recommend("loves hiking and camping", history, k=6, beta=0.5, exclude=top[:2])
    assert [i.item_id for i in rec.items] == top[2:8]
    np.testing.assert_allclose([i.score for i in rec.items], [i.score for i in plain.items[2:8]], atol=1e-5)
    assert signatures == ["serving_default", "serving_exclude"]
    # A batch mixing users with and without exclusions: one serving_exclude call, each row its own.
    many = client.recommend_many([("loves hiking and camping", history, top[:1]),
                                  ("loves hiking and camping", history)], k=5, beta=0.5)
    assert [i.item_id for i in many[0].items] == top[1:6] and [i.item_id for i in many[1].items] == top[:5]
    assert signatures[-1] == "serving_exclude"
    # beta=None: the server's published default beta works for exclusions too ...
    default = client._info(None, None)["default_beta"]
    assert client.recommend("loves hiking and camping", history, k=6, exclude=top[:2]) == client.recommend(
        "loves hiking and camping", history, k=6, beta=default, exclude=top[:2])
    # ... but without one (TF Serving) there is no defaults signature to fall back on.
    client._info = lambda *a: {}
    with pytest.raises(ValueError, match="pass beta"):
        client.recommend("loves hiking and camping", history, k=6, exclude=top[:2])


def test_token_is_required_and_bad_requests_are_not_retried(server):
    from serving.client import RecommenderClient, RecommendError

    with RecommenderClient(server["target"], timeout=5) as anonymous:
        with pytest.raises(RecommendError) as err:
            anonymous.recommend("x", [], k=3, beta=0.0)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with RecommenderClient(server["target"], timeout=5, token=TOKEN) as c:
        with pytest.raises(RecommendError) as err:
            c.recommend("x", [], k=0, beta=0.0)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "inputs.k" in err.value.details
        with pytest.raises(RecommendError) as err:
            c.recommend("x", [], k=3, beta=0.0, version_label="canary")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_segments_file_and_titles(server, tmp_path):
    from serving.client import RecommenderClient

    seg = json.load(open(f"{server['export']}/segments.json"))
    for s in seg["segments"]:
        s["label"] = f"custom {s['id']}"
    path = tmp_path / "segments.json"
    path.write_text(json.dumps(seg))
    titles = {i: f"Title of {i}" for i in server["ids"]}
    with RecommenderClient(server["target"], token=TOKEN, segments_path=str(path), titles=titles) as c:
        rec = c.recommend("cooks dinner", [], k=3, beta=0.0)
    assert rec.segment_label == f"custom {rec.segment_id}"
    assert all(i.title == f"Title of {i.item_id}" for i in rec.items)


class _Flaky:
    """A PredictionService that is UNAVAILABLE `failures` times, then answers."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.calls, self.requests = failures, code, 0, []

    def servicer(self):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        outer = self

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                outer.calls += 1
                outer.requests.append(request)
                if outer.calls <= outer.failures:
                    context.abort(outer.code, "not now")
                r = predict_pb2.PredictResponse()
                r.model_spec.version.value = 7
                # Wider than k=1 asks for, as a TF Serving batch merged with a bigger k would answer.
                r.outputs[F.OUT_ITEM_IDS].CopyFrom(tf.make_tensor_proto(np.array([[b"a", b"b", b""]], dtype=object)))
                r.outputs[F.OUT_SCORES].CopyFrom(tf.make_tensor_proto(np.array([[0.5, 0.4, -np.inf]], np.float32)))
                r.outputs[F.SEGMENT_ID].CopyFrom(tf.make_tensor_proto(np.array([1], np.int32)))
                r.outputs[F.SEGMENT_PROBS].CopyFrom(tf.make_tensor_proto(np.array([[0.2, 0.8]], np.float32)))
                return r

        return Servicer()


@pytest.mark.parametrize("failures,code,calls,ok", [
    (2, grpc.StatusCode.UNAVAILABLE, 3, True),  # retried twice, then answered
    (9, grpc.StatusCode.UNAVAILABLE, 4, False),  # 1 + retries=3 attempts, then given up
    (1, grpc.StatusCode.INTERNAL, 1, False),  # never retried
])
def test_retries_on_unavailable_only(failures, code, calls, ok, tmp_path):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving.client import RecommenderClient, RecommendError

    fake = _Flaky(failures, code)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(fake.servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=2, retries=3, backoff=0.01, default_beta=0.0) as c:
            if ok:
                rec = c.recommend("x", [], k=1)
                assert [(i.item_id, i.score) for i in rec.items] == [("a", 0.5)] and rec.model_version == 7
                # The knobs have the batch dimension: one k and one beta for the one user.
                sent = {name: tf.make_ndarray(t) for name, t in fake.requests[-1].inputs.items()}
                assert sent[F.K].tolist() == [1] and sent[F.BETA].tolist() == [0.0]
                assert sent[F.K].dtype == np.int32 and sent[F.BETA].dtype == np.float32
                assert rec.segment_label == "segment 1"  # the fake has no segrec metadata
            else:
                with pytest.raises(RecommendError) as err:
                    c.recommend("x", [], k=2)
                assert err.value.code == code
    finally:
        server.stop(0)
    assert fake.calls == calls


def test_deadline_against_nothing_listening():
    from test_server import free_port

    from serving.client import RecommenderClient, RecommendError

    start = time.time()
    with RecommenderClient(f"127.0.0.1:{free_port()}", timeout=0.5, retries=1, backoff=0.01,
                           default_beta=0.0) as c:
        with pytest.raises(RecommendError) as err:
            c.recommend("x", [], k=2)
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.time() - start < 5


def test_cli_recommend_prints_a_table(server, monkeypatch, capsys):
    from trainer.cli import main as cli

    monkeypatch.setenv("SEGREC_TOKEN", TOKEN)
    code = cli.main(["recommend", "--target", server["target"], "--user-text", "loves hiking",
                     "--history", ",".join(server["ids"][:2]), "--k", "4", "--beta", "0.5",
                     "--token-env", "SEGREC_TOKEN"])
    out = capsys.readouterr().out
    assert code == 0 and "model version 1" in out and "rank" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 4
    assert cli.main(["recommend", "--target", server["target"], "--user-text", "x", "--k", "0",
                     "--token-env", "SEGREC_TOKEN"]) == 2
