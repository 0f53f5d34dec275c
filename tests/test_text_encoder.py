import numpy as np
import pytest
import tensorflow as tf
from model_fixtures import clear_keras_session, dataset_dir, tiny_encoder, user_texts  # noqa: F401

import trainer  # noqa: F401
from trainer.model.text_encoder import RESERVED_TOKENS, TextCache, TextEncoder

pytestmark = pytest.mark.usefixtures("clear_keras_session")

TEXTS = [
    "age 34, loves hiking and camping. recent: Trail Boots; Tent",
    "age 21, plays guitar in a band. recent: Violin",
    "age 50, cooks dinner every day. recent: ",
]


def test_tiny_encoder_shapes_and_unit_norm():
    enc = tiny_encoder(TEXTS * 3)
    assert enc.vocabulary[: len(RESERVED_TOKENS)] == list(RESERVED_TOKENS)
    out = enc(tf.constant(TEXTS)).numpy()
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Different texts, different vectors.
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_tiny_encoder_is_seeded():
    a = tiny_encoder(TEXTS)(tf.constant(TEXTS)).numpy()
    b = tiny_encoder(TEXTS)(tf.constant(TEXTS)).numpy()
    np.testing.assert_array_equal(a, b)


def test_set_trainable_layers_splits_top_n():
    enc = tiny_encoder(TEXTS)
    assert enc.trainable_weights == []  # default: frozen
    enc.set_trainable_layers(1)
    paths = {w.path for w in enc.trainable_weights}
    assert paths and all(p.startswith("transformer_layer_1/") for p in paths)
    # All of layer 1's weights: 4 attention kernels+biases, 2 layer norms, 2 dense.
    assert len(paths) == 16
    enc.set_trainable_layers(2)
    assert {p.split("/")[0] for p in (w.path for w in enc.trainable_weights)} == {
        "transformer_layer_0",
        "transformer_layer_1",
    }
    enc.set_trainable_layers(0)
    assert enc.trainable_weights == []
    with pytest.raises(ValueError, match="trainable_layers"):
        enc.set_trainable_layers(3)


def test_get_config_round_trip():
    enc = tiny_encoder(TEXTS, trainable_layers=1)
    config = enc.get_config()
    clone = TextEncoder.from_config(config)
    assert clone.get_config() == config
    assert len(clone.trainable_weights) == len(enc.trainable_weights)
    np.testing.assert_array_equal(clone(tf.constant(TEXTS)).numpy(), enc(tf.constant(TEXTS)).numpy())


def test_text_cache_matches_encoder_and_round_trips(tmp_path):
    enc = tiny_encoder(TEXTS)
    cache = TextCache.build(enc, TEXTS + TEXTS[:1], batch_size=2, progress=False)
    assert len(cache) == 3 and cache.dim == 16
    expected = enc(tf.constant(TEXTS), training=False).numpy()
    np.testing.assert_allclose(cache.lookup(tf.constant(TEXTS)).numpy(), expected, atol=1e-6)
    path = str(tmp_path / "cache.npz")
    cache.save(path)
    loaded = TextCache.load(path)
    assert loaded.texts == cache.texts
    np.testing.assert_array_equal(loaded.vectors, cache.vectors)


def test_text_cache_reports_missing_texts():
    cache = TextCache(["a", "b"], np.eye(2, dtype=np.float32))
    assert cache.missing(["a", "c", "d", "c"]) == ["c", "d"]
    with pytest.raises(ValueError, match="2 text"):
        cache.require(["a", "c", "d"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in the TextCache"):
        cache.lookup(tf.constant(["a", "zzz"]))


@pytest.mark.pretrained
def test_pretrained_minilm_ranks_paraphrase_above_unrelated():
    enc = TextEncoder.pretrained(sequence_length=32)
    assert enc.hidden_dim == 384 and enc.num_layers == 6
    v = enc(tf.constant([
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
    ])).numpy()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
