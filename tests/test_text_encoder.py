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


# --- length-aware padding ---------------------------------------------------------
WORDS = ("loves hiking and camping in the mountains plays guitar cooks dinner for the family reads science "
         "fiction collects vintage vinyl records builds furniture").split()


def _texts_of_many_lengths(max_words: int = 80) -> list:
    """"" and texts of 1..max_words words (some longer than the encoder's sequence_length)."""
    return [""] + [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n)) for i, n in
                   enumerate((1, 2, 3, 5, 6, 9, 13, 14, 20, 29, 31, 40, 57, 80)) if n <= max_words]


def _fixed_twin(enc: TextEncoder) -> TextEncoder:
    """The same encoder padding every batch to sequence_length (the old path)."""
    fixed = TextEncoder.from_config({**enc.get_config(), "pad_to_max": True})
    fixed.set_weights(enc.get_weights())
    return fixed


def _tiny_long(seq: int = 64) -> TextEncoder:
    return TextEncoder.tiny(TEXTS + [" ".join(WORDS)] * 3, vocab_size=120, hidden=16, sequence_length=seq, seed=0)


def test_bucket_widths_and_the_width_of_each_length():
    from trainer.model import padding

    assert padding.bucket_widths(128) == (8, 16, 24, 32, 48, 64, 96, 128)
    assert padding.bucket_widths(100) == (8, 16, 24, 32, 48, 64, 96, 100)
    assert padding.bucket_widths(8) == (8,) and padding.bucket_widths(5) == (5,)
    widths = padding.bucket_widths(128)
    mask = np.zeros((1, 128), bool)
    for length in range(0, 129):
        mask[:] = False
        mask[0, :length] = True
        ids, m = padding.trim(tf.zeros([1, 128], tf.int32), tf.constant(mask), widths)
        want = padding.bucket_for(length, widths)
        assert ids.shape == (1, want) and m.shape == (1, want) and int(m.numpy().sum()) == length
        assert want >= length and (length <= 16 or want <= 1.5 * length)
    empty = padding.trim(tf.zeros([0, 128], tf.int32), tf.zeros([0, 128], tf.bool), widths)[0]
    assert empty.shape == (0, 8)


def test_length_aware_padding_equals_fixed_padding_on_many_lengths():
    enc = _tiny_long()
    fixed = _fixed_twin(enc)
    texts = _texts_of_many_lengths()
    widths = {int(enc.tokenize(tf.constant([t]))[0].shape[1]) for t in texts}
    assert widths == set(enc.bucket_widths)  # the lengths cover every bucket, and only buckets occur
    assert fixed.tokenize(tf.constant(texts[:1]))[0].shape[1] == 64
    for t in texts:  # one text per batch: the narrowest widths
        np.testing.assert_allclose(enc(tf.constant([t])).numpy(), fixed(tf.constant([t])).numpy(), atol=1e-5)
    np.testing.assert_allclose(enc(tf.constant(texts)).numpy(), fixed(tf.constant(texts)).numpy(), atol=1e-5)


def test_a_batch_mixing_short_and_long_texts_answers_each_row_as_if_alone():
    enc = _tiny_long()
    texts = _texts_of_many_lengths()
    rng = np.random.default_rng(0)
    mixed = [texts[i] for i in rng.permutation(len(texts))]
    together = enc(tf.constant(mixed)).numpy()
    for i, t in enumerate(mixed):
        np.testing.assert_allclose(together[i], enc(tf.constant([t])).numpy()[0], atol=1e-5)
    # encode() batches by length and puts rows back in input order.
    np.testing.assert_allclose(enc.encode(mixed, batch_size=4), together, atol=1e-5)


def test_one_trace_serves_every_width():
    enc = _tiny_long()
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def embed(texts):
        traces.append(1)
        return enc(texts)

    for t in _texts_of_many_lengths():
        embed(tf.constant([t, t[: len(t) // 2]]))
    assert len(traces) == 1
    assert embed.get_concrete_function().structured_outputs.shape.as_list() == [None, 16]


def test_padding_mode_round_trips_in_the_config():
    enc = _tiny_long()
    assert enc.get_config()["pad_to_max"] is False
    assert TextEncoder.from_config(_fixed_twin(enc).get_config()).pad_to_max is True


@pytest.mark.pretrained
def test_pretrained_minilm_length_aware_equals_fixed_padding():
    enc = TextEncoder.pretrained(sequence_length=128)
    fixed = _fixed_twin(enc)
    texts = _texts_of_many_lengths() + [
        "user: age 24, gender m, occupation technician, zip 85711. recent: Toy Story (1995); GoldenEye (1995); "
        "Four Rooms (1995); Get Shorty (1995); Copycat (1995).", " ".join(WORDS * 8)]
    for t in texts[::2]:
        np.testing.assert_allclose(enc(tf.constant([t])).numpy(), fixed(tf.constant([t])).numpy(), atol=1e-5)
    np.testing.assert_allclose(enc(tf.constant(texts[:-1])).numpy(), fixed(tf.constant(texts[:-1])).numpy(),
                               atol=1e-5)


# --- client-side token ids (token-id exports) ------------------------------------------------------
def _client_tokens(enc: TextEncoder, fixed_width: bool):
    from trainer.model.token_ids import TokenIds

    return TokenIds(enc.tokenizer.get_vocabulary(), enc.tokenizer.lowercase, enc.sequence_length,
                    fixed_width=fixed_width)


def test_client_token_ids_reproduce_the_encoder():
    enc = _tiny_long()
    texts = _texts_of_many_lengths()
    want = enc(tf.constant(texts)).numpy()
    enc_ids, enc_mask = enc.tokenize(tf.constant(texts))
    for fixed in (True, False):
        ids, mask = _client_tokens(enc, fixed)(texts)
        assert ids.dtype == mask.dtype == np.int32
        assert ids.shape[1] == (64 if fixed else enc_ids.shape[1])
        np.testing.assert_array_equal(ids[:, : enc_ids.shape[1]], enc_ids.numpy())
        np.testing.assert_array_equal(mask[:, : enc_ids.shape[1]], enc_mask.numpy())
        # Whatever width the client pads to, the encoder trims to the bucket and answers alike.
        np.testing.assert_allclose(enc.embed_token_ids(ids, mask).numpy(), want, atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="at most 64 tokens"):
        enc.embed_token_ids(tf.zeros([1, 65], tf.int32), tf.ones([1, 65], tf.int32))


@pytest.mark.pretrained
def test_client_token_ids_reproduce_minilm_tokenisation():
    enc = TextEncoder.pretrained(sequence_length=128)
    texts = _texts_of_many_lengths() + ["Ünïcode, CAPITALS & punctuation!? e-mail: a.b@c.de — 3.14"]
    ids, mask = _client_tokens(enc, fixed_width=False)(texts)
    enc_ids, enc_mask = enc.tokenize(tf.constant(texts))
    np.testing.assert_array_equal(ids, enc_ids.numpy())
    np.testing.assert_array_equal(mask, enc_mask.numpy())
