"""serving/export/quantize.py on the tiny encoder: float16 / int8 copies, their size, the overlap check."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from model_fixtures import clear_keras_session, tiny_encoder  # noqa: F401

import trainer  # noqa: F401
from serving.export import quantize

pytestmark = pytest.mark.usefixtures("clear_keras_session")

TEXTS = ["loves hiking and camping in the mountains", "plays guitar in a band on weekends",
         "cooks dinner for the family every day", "reads science fiction and fantasy novels"] * 3


def test_float16_and_int8_copies_shrink_the_encoder_and_stay_close():
    enc = tiny_encoder(TEXTS)
    ref = enc(tf.constant(TEXTS)).numpy()
    assert quantize.encoder_with_precision(enc, "float32") is enc
    f16 = quantize.encoder_with_precision(enc, "float16")
    assert {w.dtype for w in f16.backbone.weights} == {"float16"}
    assert quantize.weight_bytes(f16) == quantize.weight_bytes(enc) // 2
    i8 = quantize.encoder_with_precision(enc, "int8")
    kernels = [w for w in i8.backbone.weights if w.path.endswith(("kernel", "embeddings")) and len(w.shape) >= 2]
    assert kernels and all(w.dtype == "int8" for w in kernels if "position" not in w.path)
    assert quantize.weight_bytes(i8) < 0.4 * quantize.weight_bytes(enc)
    for copy, tol in ((f16, 1e-2), (i8, 5e-2)):
        out = copy(tf.constant(TEXTS)).numpy()
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=tol)
    np.testing.assert_array_equal(enc(tf.constant(TEXTS)).numpy(), ref)  # the original is untouched
    with pytest.raises(ValueError, match="--encoder-precision"):
        quantize.encoder_with_precision(enc, "int4")


def test_top_excludes_history_and_chunks_like_one_pass():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(130, 8)).astype(np.float32)
    history = np.zeros((130, 3), np.int32)
    history[:, 0] = 1 + np.argmax(queries @ items.T, axis=1)  # each row's best item (table row = index + 1)
    top = quantize._top(queries, items, history, 10, chunk=16)
    assert top.shape == (130, 10)
    assert not np.any(top == (history[:, :1] - 1))
    np.testing.assert_array_equal(top, quantize._top(queries, items, history, 10, chunk=1000))


def test_the_overlap_gate():
    q = quantize.QualityCheck("int8", 100, 0.94, {"recall_at_10": 0.1, "recall_at_50": 0.4},
                              {"recall_at_10": 0.1, "recall_at_50": 0.39}, 4000, 1000)
    assert q.recall_at_50_change == pytest.approx(-0.025)
    with pytest.raises(quantize.OverlapTooLow, match="below --min-overlap 0.95"):
        quantize.check(q, 0.95)
    quantize.check(q, 0.9)
    assert any("Recall@50 change -2.50% relative" in line for line in quantize.describe(q, "int8"))
