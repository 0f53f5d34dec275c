"""The text-vector cache (serving/server/text_cache.py) over the tiny export:
the split signatures (encode_text + serving_text_vector) answer as
serving_default; the cache key never maps texts that encode differently
together; the LRU is bounded and thread-safe; `segrec serve` answers
through it as without it, reports hits, empties it on a version swap and
still refuses bad requests; batch scoring's handler answers as
serving_default with one encoding per distinct text."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
import unicodedata
import urllib.request

import numpy as np
import pytest
from test_server import build_tiny_export, direct_call, item_ids, request, users

from serving.server import text_cache as tc
from trainer import contracts
from trainer import features as F

K, BETA = 5, 0.5


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_generated):
    return build_tiny_export(tmp_path_factory, tiny_generated)


@pytest.fixture(scope="module")
def loaded(export_dir):
    from serving.export import layout

    return layout.load_exported(export_dir)


def _encode(loaded, texts) -> np.ndarray:
    import tensorflow as tf

    fn = loaded.signatures[contracts.ENCODE_TEXT]
    return fn(user_text=tf.constant(np.array(texts, dtype=object)))[F.USER_TEXT_VECTOR].numpy()


def _same(got: dict, want: dict, atol: float = 1e-6) -> None:
    np.testing.assert_array_equal(got[F.OUT_ITEM_IDS], want[F.OUT_ITEM_IDS])
    np.testing.assert_array_equal(got[F.SEGMENT_ID], want[F.SEGMENT_ID])
    np.testing.assert_allclose(got[F.OUT_SCORES], want[F.OUT_SCORES], atol=atol, rtol=0)
    np.testing.assert_allclose(got[F.SEGMENT_PROBS], want[F.SEGMENT_PROBS], atol=atol, rtol=0)


# --- keys and the LRU (no model) ------------------------------------------------------------------
def test_text_key_strips_ascii_whitespace_and_nothing_else():
    key = tc.text_key
    assert key(b"  loves hiking\t\n") == key("loves hiking") == key(b"loves hiking") == b"loves hiking"
    assert key(" \r\f\vx y\v") == b"x y"  # inner whitespace is kept
    assert key("Loves Hiking") != key("loves hiking")  # no lower-casing
    nfd, nfc = "cafe\u0301", unicodedata.normalize("NFC", "cafe\u0301")
    assert nfd != nfc and key(nfd) != key(nfc)  # no Unicode normalisation
    assert key("a\u00a0") != key("a")  # NO-BREAK SPACE is no tokenizer split: kept
    assert key(b"\xff ") == b"\xff "  # not UTF-8: exactly as sent
    assert key("x\ud800") == "x\ud800"  # cannot be a tf.string: itself (and never equal to a bytes key)


def test_lru_is_bounded_evicts_the_least_recently_used_and_counts():
    cache = tc.TextVectorCache(3)
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], np.float32)

    vectors, hits, misses = cache.vectors(["a", "bb", " a ", "ccc"], encode)
    assert calls == [["a", "bb", "ccc"]]  # one call, each distinct miss once (" a " is "a")
    assert (hits, misses) == (0, 4) and len(cache) == 3
    np.testing.assert_array_equal(vectors[0], vectors[2])
    cache.vectors(["a"], encode)  # "a" is now the most recently used
    _, hits, misses = cache.vectors(["dddd"], encode)  # evicts "bb", the least recently used
    assert (hits, misses) == (0, 1) and len(cache) == 3 and cache.evictions == 1
    assert "bb" not in cache and "a" in cache and "ccc" in cache and "dddd" in cache
    _, hits, misses = cache.vectors(["a", "ccc", "dddd"], encode)
    assert (hits, misses) == (3, 0) and len(calls) == 2
    assert (cache.hits, cache.misses) == (4, 5)
    stored = cache.vectors(["a"], encode)[0]
    stored[0, 0] = -1  # the caller's copy: the cached vector is unchanged
    assert cache.vectors(["a"], encode)[0][0, 0] == 1
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        tc.TextVectorCache(0)


def test_lru_shared_by_threads_stays_bounded_and_consistent():
    cache = tc.TextVectorCache(50)

    def encode(texts):
        return np.array([[float(t.split("-")[1])] * 4 for t in texts], np.float32)

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            texts = [f"t-{n}" for n in rng.integers(0, 120, size=8)]
            vectors, hits, misses = cache.vectors(texts, encode)
            assert hits + misses == len(texts)
            np.testing.assert_array_equal(vectors[:, 0], [float(t.split("-")[1]) for t in texts])
            assert len(cache) <= 50

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert len(cache) == 50 and cache.hits + cache.misses == 8 * 200 * 8 and cache.hits > 0


def test_recommend_encodes_only_the_misses_and_fills_the_defaults():
    calls = []

    def call(signature, inputs):
        calls.append((signature, {k: np.asarray(v).tolist() for k, v in inputs.items()}))
        if signature == contracts.ENCODE_TEXT:
            return {F.USER_TEXT_VECTOR: np.ones((len(inputs[F.USER_TEXT]), 2), np.float32)}
        return {"rows": np.arange(len(inputs[F.USER_TEXT_VECTOR]))}

    cache = tc.TextVectorCache(10)
    inputs = {F.USER_TEXT: np.array([b"x", b"y", b"x"], dtype=object),
              F.HISTORY_ITEM_IDS: np.array([[b""]] * 3, dtype=object)}
    out, hits, misses = tc.recommend(call, cache, contracts.RECOMMEND_DEFAULTS, inputs, 7, 0.25)
    assert (hits, misses) == (0, 3) and out["rows"].tolist() == [0, 1, 2]
    assert [c[0] for c in calls] == [contracts.ENCODE_TEXT, contracts.SERVING_TEXT_VECTOR]
    assert calls[0][1][F.USER_TEXT] == [b"x", b"y"]
    split = calls[1][1]
    assert F.USER_TEXT not in split and split[F.K] == [7, 7, 7] and split[F.BETA] == [0.25] * 3
    calls.clear()
    tc.recommend(call, cache, contracts.RECOMMEND_DEFAULTS, inputs, 7, 0.25)
    assert [c[0] for c in calls] == [contracts.SERVING_TEXT_VECTOR]  # every row hit
    names = [contracts.SERVING_DEFAULT, contracts.ENCODE_TEXT, contracts.SERVING_TEXT_VECTOR]
    assert tc.usable(names, contracts.SERVING_DEFAULT)
    assert not tc.usable(names, contracts.RECOMMEND_DEFAULTS)  # without the export's defaults
    assert not tc.usable(names, contracts.USER_EMBEDDING)
    assert not tc.usable([contracts.SERVING_DEFAULT], contracts.SERVING_DEFAULT)


# --- the export's split signatures ----------------------------------------------------------------
def test_split_signatures_answer_as_serving_default(export_dir, loaded):
    import tensorflow as tf

    sigs = loaded.signatures
    assert set(contracts.TEXT_VECTOR_SIGNATURES) <= set(sigs)
    dim = sigs[contracts.ENCODE_TEXT].structured_outputs[F.USER_TEXT_VECTOR].shape[1]
    assert dim and dim > 1
    enc_in = sigs[contracts.ENCODE_TEXT].structured_input_signature[1]
    assert {k: (v.dtype, v.shape.as_list()) for k, v in enc_in.items()} == {F.USER_TEXT: (tf.string, [None])}
    enc_out = sigs[contracts.ENCODE_TEXT].structured_outputs
    assert {k: (v.dtype, v.shape.as_list()) for k, v in enc_out.items()} == {
        F.USER_TEXT_VECTOR: (tf.float32, [None, dim])}
    split_in = sigs[contracts.SERVING_TEXT_VECTOR].structured_input_signature[1]
    assert {k: (v.dtype, v.shape.as_list()) for k, v in split_in.items()} == {
        F.USER_TEXT_VECTOR: (tf.float32, [None, dim]), F.HISTORY_ITEM_IDS: (tf.string, [None, None]),
        F.K: (tf.int32, [None]), F.BETA: (tf.float32, [None]), F.EXCLUDE_ITEM_IDS: (tf.string, [None, None])}
    assert set(sigs[contracts.SERVING_TEXT_VECTOR].structured_outputs) == set(sigs["serving_default"].structured_outputs)

    batch = users(item_ids(export_dir), n=6)
    k, beta = [3, 5, 7, 5, 1, 2], [0.0, 0.5, 1.0, 0.5, 0.2, 0.9]
    want = direct_call(export_dir, batch, k, beta)
    # The encoder's vector is SegRecModel.text_vectors: the model's own encoder, text by text.
    vectors = _encode(loaded, [t for t, _ in batch])
    from serving.export import layout
    from trainer.model import run_dir as rd

    run = rd.load_run(layout.read_export_info(export_dir)["run_dir"])
    np.testing.assert_allclose(vectors, run.model.text_encoder(tf.constant([t for t, _ in batch])).numpy(),
                               atol=1e-6)
    width = max(1, max(len(h) for _, h in batch))
    got = sigs[contracts.SERVING_TEXT_VECTOR](
        user_text_vector=tf.constant(vectors),
        history_item_ids=tf.constant([h + [""] * (width - len(h)) for _, h in batch]),
        k=tf.constant(k, tf.int32), beta=tf.constant(beta, tf.float32),
        exclude_item_ids=tf.fill([len(batch), 0], ""))
    _same({n: v.numpy() for n, v in got.items()}, want)


def test_a_fine_tuned_model_splits_the_same_way(export_dir):
    """finetune_layers > 0: text_vectors would re-encode user_text; serving_text_vector reads the vector."""
    import tensorflow as tf

    from serving.export import exporter, layout
    from serving.export import index as ix
    from serving.export import signatures as sig
    from trainer.model import run_dir as rd
    from trainer.model.segrec_model import SegRecModel

    run = rd.load_run(layout.read_export_info(export_dir)["run_dir"])
    config = run.model.get_config()
    config.update(finetune_layers=1, text_encoder=run.model.text_encoder)
    tuned = SegRecModel.from_config(config)
    for part in ("item_tower", "user_tower", "segment_head"):
        getattr(tuned, part).set_weights(getattr(run.model, part).get_weights())
    assert tuned.finetune_layers == 1
    module = sig.ServingModule(tuned, ix.build_index("brute_force", tuned.item_embeddings().numpy(), k_max=20),
                               k_max=20, default_k=5, default_beta=BETA)
    inputs = exporter.warmup_inputs(run, 5, BETA)
    expected = module.serving_default(inputs)
    sig.check_text_vector_path(module, inputs, expected, atol=1e-6)  # raises when they differ
    assert tuned.finetune_layers == 1  # restored after the trace
    vectors = module.encode_text({F.USER_TEXT: inputs[F.USER_TEXT]})[F.USER_TEXT_VECTOR]
    np.testing.assert_allclose(vectors.numpy(), tuned.text_encoder(inputs[F.USER_TEXT]).numpy(), atol=1e-6)
    with pytest.raises(RuntimeError, match="unlike serving_default"):
        sig.check_text_vector_path(module, {**inputs, F.USER_TEXT: tf.constant(["x"] * len(inputs[F.K]))},
                                   expected)


def test_stripping_never_changes_the_encoding_but_normalising_would(loaded):
    """Why the key strips ASCII whitespace only: the tokenizer drops it, but NFC can change the tokens."""
    for text in ["loves hiking and camping", "plays guitar, in a band!", "日本語 text"]:
        padded = " \t" + text + "\n\r\f\v "
        assert tc.text_key(padded) == tc.text_key(text)
        np.testing.assert_array_equal(_encode(loaded, [padded]), _encode(loaded, [text]))
    # U+1FEF GREEK VARIA is canonically "`": NFC turns one word into a punctuation split.
    varia = "hiking\u1fefcamping"
    nfc = unicodedata.normalize("NFC", varia)
    assert nfc == "hiking`camping" and tc.text_key(varia) != tc.text_key(nfc)
    assert not np.array_equal(_encode(loaded, [varia]), _encode(loaded, [nfc]))


# --- `segrec serve` (in process) --------------------------------------------------------------------
def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.config.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture()
def server(export_dir, tmp_path):
    from serving.server import app
    from serving.server.config import ServeConfig
    from serving.server.launch import free_port

    (tmp_path / "segrec").mkdir()
    shutil.copytree(export_dir, tmp_path / "segrec" / "1")
    srv = app.Server(ServeConfig(model_base_path=str(tmp_path), port=0, metrics_port=free_port(), poll_seconds=3600,
                                 max_batch_size=16, text_cache_size=4, grace_seconds=5))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def stub(server):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _outputs(response) -> dict:
    import tensorflow as tf

    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def test_server_answers_through_the_cache_as_without_it(server, stub, export_dir, loaded):
    import tensorflow as tf

    batch = users(item_ids(export_dir), n=5)  # 5 distinct texts, "" among them
    want = direct_call(export_dir, batch, K, BETA)
    version = server.manager.resolve()
    assert version.text_cache is not None and len(version.text_cache) == 0
    first = _outputs(stub.Predict(request(batch[:3], K, BETA), timeout=30))
    _same(first, {n: v[:3] for n, v in want.items()})
    assert len(version.text_cache) == 3 and _metric(server, "segrec_text_cache_misses_total") == 3
    again = _outputs(stub.Predict(request(batch[:3], K, BETA), timeout=30))  # every row from the cache
    _same(again, first, atol=0)
    assert _metric(server, "segrec_text_cache_hits_total") == 3
    assert _metric(server, "segrec_text_cache_entries") == 3
    whole = _outputs(stub.Predict(request(batch, K, BETA), timeout=30))  # 3 hits, 2 misses, 1 eviction
    _same(whole, want)
    assert len(version.text_cache) == 4 and version.text_cache.evictions == 1  # bounded by --text-cache-size
    assert _metric(server, "segrec_text_cache_hits_total") == 6
    assert _metric(server, "segrec_text_cache_misses_total") == 5

    # recommend_defaults: the export's k and beta, baked in as before.
    defaults = loaded.signatures["recommend_defaults"]
    width = max(1, max(len(h) for _, h in batch))
    plain = defaults(user_text=tf.constant([t for t, _ in batch]),
                     history_item_ids=tf.constant([h + [""] * (width - len(h)) for _, h in batch]))
    got = _outputs(stub.Predict(request(batch, signature="recommend_defaults"), timeout=30))
    _same(got, {n: v.numpy() for n, v in plain.items()})


def test_server_answers_serving_exclude_through_the_cache_as_without_it(server, stub, export_dir, loaded):
    import tensorflow as tf

    batch = users(item_ids(export_dir), n=3)
    width = max(1, max(len(h) for _, h in batch))
    history = [h + [""] * (width - len(h)) for _, h in batch]
    exclude = np.array([[i, ""] for i in item_ids(export_dir)[:3]], dtype=object)
    plain = loaded.signatures[contracts.SERVING_EXCLUDE](
        user_text=tf.constant([t for t, _ in batch]), history_item_ids=tf.constant(history),
        k=tf.constant([K] * 3, tf.int32), beta=tf.constant([BETA] * 3, tf.float32),
        exclude_item_ids=tf.constant(exclude.astype(str)))
    req = request(batch, K, BETA)
    req.model_spec.signature_name = contracts.SERVING_EXCLUDE
    req.inputs[F.EXCLUDE_ITEM_IDS].CopyFrom(tf.make_tensor_proto(exclude.astype(str)))
    version = server.manager.resolve()
    hits = version.text_cache.hits
    first = _outputs(stub.Predict(req, timeout=30))
    _same(first, {n: v.numpy() for n, v in plain.items()})
    again = _outputs(stub.Predict(req, timeout=30))
    _same(again, first, atol=0)
    assert version.text_cache.hits >= hits + 3  # the second call read every row's vector from the cache
    for row, item in enumerate(exclude[:, 0]):
        assert item.encode() not in first[F.OUT_ITEM_IDS][row].tolist()


def test_server_refuses_bad_requests_and_keeps_serving(server, stub, export_dir):
    import grpc
    import tensorflow as tf

    batch = users(item_ids(export_dir), n=2)
    cases = []
    bad_k = request(batch, K, BETA)
    bad_k.inputs[F.K].CopyFrom(tf.make_tensor_proto(np.array([0, 3], np.int32)))
    cases.append((bad_k, "inputs.k"))
    # serving_text_vector itself: a vector of the wrong width, and a NaN.
    dim = server.manager.resolve().inputs[contracts.SERVING_TEXT_VECTOR][F.USER_TEXT_VECTOR].dims[1]
    for vectors, field in ((np.zeros((2, dim + 1), np.float32), "user_text_vector"),
                           (np.full((2, dim), np.nan, np.float32), "finite")):
        req = request(batch, K, BETA)
        req.model_spec.signature_name = contracts.SERVING_TEXT_VECTOR
        del req.inputs[F.USER_TEXT]
        req.inputs[F.USER_TEXT_VECTOR].CopyFrom(tf.make_tensor_proto(vectors))
        req.inputs[F.EXCLUDE_ITEM_IDS].CopyFrom(tf.make_tensor_proto(np.zeros((2, 0), object), dtype=tf.string))
        cases.append((req, field))
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), field
    # A client may call the split signatures itself, and the server still answers the usual way.
    enc = request(batch, signature=contracts.ENCODE_TEXT)
    del enc.inputs[F.HISTORY_ITEM_IDS]
    vectors = _outputs(stub.Predict(enc, timeout=30))[F.USER_TEXT_VECTOR]
    split = request(batch, K, BETA)
    split.model_spec.signature_name = contracts.SERVING_TEXT_VECTOR
    del split.inputs[F.USER_TEXT]
    split.inputs[F.USER_TEXT_VECTOR].CopyFrom(tf.make_tensor_proto(vectors))
    split.inputs[F.EXCLUDE_ITEM_IDS].CopyFrom(tf.make_tensor_proto(np.zeros((2, 0), object), dtype=tf.string))
    want = direct_call(export_dir, batch, K, BETA)
    _same(_outputs(stub.Predict(split, timeout=30)), want)
    _same(_outputs(stub.Predict(request(batch, K, BETA), timeout=30)), want)


def test_version_swap_starts_an_empty_cache(server, stub, export_dir, tmp_path):
    batch = users(item_ids(export_dir), n=3)
    stub.Predict(request(batch, K, BETA), timeout=30)
    old = server.manager.resolve()
    assert old.version == 1 and len(old.text_cache) == 3
    shutil.copytree(tmp_path / "segrec" / "1", tmp_path / "segrec" / ".tmp-2")
    (tmp_path / "segrec" / ".tmp-2").rename(tmp_path / "segrec" / "2")
    server.manager.poll_once()
    new = server.manager.resolve()
    assert new.version == 2 and new.text_cache is not None and new.text_cache is not old.text_cache
    assert len(new.text_cache) == 0 and len(old.text_cache) == 0  # v1 unloaded: its cache emptied
    assert _metric(server, "segrec_text_cache_entries") == 0
    response = stub.Predict(request(batch, K, BETA), timeout=30)
    assert response.model_spec.version.value == 2 and len(new.text_cache) == 3
    _same(_outputs(response), direct_call(export_dir, batch, K, BETA))


def test_no_cache_when_off_or_refused_by_the_cli(export_dir, tmp_path):
    from serving.server import model_manager as mm
    from trainer.cli import main as cli

    off = mm.ModelManager(str(tmp_path), text_cache_size=0)
    on = mm.ModelManager(str(tmp_path), text_cache_size=2)
    version = mm.load_version(export_dir, 1)
    off._attach_text_cache(version)
    assert version.text_cache is None
    on._attach_text_cache(version)
    assert version.text_cache.max_entries == 2
    assert cli.main(["serve", "--model-base-path", str(tmp_path), "--text-cache-size", "-1"]) != 0


# --- batch scoring ----------------------------------------------------------------------------------
def test_scoring_handler_encodes_each_distinct_text_once_and_answers_as_serving_default(export_dir, loaded,
                                                                                       monkeypatch):
    from beam_pipelines.inference import model_handler as mh
    from beam_pipelines.inference.user_queries import UserQuery

    ids = item_ids(export_dir)
    rng = np.random.default_rng(3)
    texts = ["loves hiking and camping", "plays guitar in a band", "cooks dinner every day", ""]
    queries = [UserQuery(f"u{i}", texts[i % len(texts)], tuple(rng.choice(ids, size=int(rng.integers(0, 4)),
                                                                          replace=False)))
               for i in range(10)]
    encoded = []
    call = mh._call

    def counting(model, signature, inputs):
        if signature == contracts.ENCODE_TEXT:
            encoded.extend(inputs[F.USER_TEXT])
        return call(model, signature, inputs)

    monkeypatch.setattr(mh, "_call", counting)
    plain = mh.SignatureCall(contracts.SERVING_DEFAULT, K, BETA, text_cache_size=0)(loaded, queries, None)
    assert encoded == []
    cached_fn = mh.SignatureCall(contracts.SERVING_DEFAULT, K, BETA, text_cache_size=100)
    first = cached_fn(loaded, queries, None)
    again = cached_fn(loaded, queries[:5], None)
    assert sorted(encoded) == sorted(texts)  # one encoding per distinct text, none for the repeat
    assert mh.text_cache_for(loaded, contracts.SERVING_DEFAULT, 100).hits >= 5
    for got, want in zip(first + again, plain + plain[:5]):
        assert got.example == want.example
        assert list(got.inference[F.OUT_ITEM_IDS]) == list(want.inference[F.OUT_ITEM_IDS])
        np.testing.assert_allclose(got.inference[F.OUT_SCORES], want.inference[F.OUT_SCORES], atol=1e-6, rtol=0)
        assert int(got.inference[F.SEGMENT_ID]) == int(want.inference[F.SEGMENT_ID])
        np.testing.assert_allclose(got.inference[F.SEGMENT_PROBS], want.inference[F.SEGMENT_PROBS], atol=1e-6)
    # Other signatures, and size 0, never cache.
    assert mh.text_cache_for(loaded, contracts.USER_EMBEDDING, 100) is None
    assert mh.text_cache_for(loaded, contracts.SERVING_DEFAULT, 0) is None


def test_threads_share_one_cache_per_loaded_model(loaded):
    from beam_pipelines.inference import model_handler as mh

    found = []
    barrier = threading.Barrier(4)

    def get():
        barrier.wait()
        found.append(mh.text_cache_for(loaded, contracts.SERVING_DEFAULT, 7))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in found}) == 1
