"""`segrec export --encoder-precision`: a smaller BERT user tower, checked
against float32 on held-out queries before it is published.

Precisions (the weights of the text encoder's backbone; the towers, the
segment head and the index stay float32):

  float32  as trained.
  float16  every float weight of the backbone stored as float16 and cast to
           float32 where it is read (a Keras dtype policy with float16
           variables and float32 compute): half the encoder's bytes, the
           same float32 arithmetic. Computing in float16 is not offered: TF's
           CPU kernels emulate half precision (~30x slower than float32 here).
  int8     weight-only dynamic-range quantisation: every kernel and embedding
           table of the backbone as int8 with one float32 scale per output
           channel (embedding row), symmetric abs-max (Keras' own int8
           quantizer, `layer.quantize` with no activation quantizer); the
           graph multiplies float32 activations by the int8 weights cast to
           float and rescales (Cast, MatMul/Einsum, RealDiv: stock ops).
           A quarter of the encoder's bytes. Why weight-only: Keras' default
           int8 mode also quantises activations per token and multiplies in
           int8 (BatchMatMulV3 int8 x int8 -> int32, also a stock op), but on
           stock TF CPU kernels that was no faster here and it lost more
           accuracy (pooled-vector cosine to float32 0.9955 vs 0.9988 on
           MovieLens profiles), and TFLite-style hybrid kernels are not in
           TF Serving. Both modes need no custom op.

Either way the export measures, on held-out (eval split) queries, the top-10
overlap between the quantised and the float32 model's brute-force results
and both models' Recall@10/@50 of the held-out positives (history excluded,
as serving excludes it); an overlap below `min_overlap` fails the export
(`OverlapTooLow`) and nothing is published.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import keras
import numpy as np

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features

FLOAT32, FLOAT16, INT8 = "float32", "float16", "int8"
PRECISIONS = (FLOAT32, FLOAT16, INT8)
OVERLAP_K = 10
RECALL_KS = (10, 50)
METHODS = {
    FLOAT32: "float32 weights",
    FLOAT16: "float16 weights cast to float32 where read; float32 compute",
    INT8: "int8 weights with per-output-channel abs-max scales, dequantised in the graph; float32 compute",
}


class OverlapTooLow(ValueError):
    """The quantised encoder's top-k drifts too far from float32's."""


class Float16Weights(keras.DTypePolicy):
    """float16 variables, float32 compute: Keras casts each weight where a layer reads it."""

    def _parse_name(self, name):
        return FLOAT32, FLOAT16


def encoder_with_precision(encoder, precision: str):
    """A copy of TextEncoder `encoder` whose backbone weights are `precision`
    (the encoder itself for float32). Tokenizer and pooling are unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"--encoder-precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == FLOAT32:
        return encoder
    config = dict(encoder.get_config(), load_preset_weights=False)
    if precision == FLOAT16:
        config["dtype"] = Float16Weights(FLOAT32)
    clone = type(encoder).from_config(config)
    clone.set_weights(encoder.get_weights())  # float32 values; float16 variables cast on assign
    if precision == INT8:
        with warnings.catch_warnings():  # "Layer X does not have a `quantize` method": norms, dropout, ...
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            clone.backbone.quantize(config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
    return clone


def model_with_precision(model, precision: str):
    """SegRecModel `model` with its text encoder at `precision` (a copy; `model` for float32)."""
    if precision == FLOAT32:
        return model
    return model.with_text_encoder(encoder_with_precision(model.text_encoder, precision))


def weight_bytes(layer) -> int:
    """Bytes of a layer's weights as stored (int8 1, float16 2, float32 4 per value)."""
    return int(sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in layer.weights))


@dataclasses.dataclass
class QualityCheck:
    """How the quantised model's retrieval compares with float32's on held-out queries."""

    precision: str
    queries: int
    overlap_at_10: float  # mean |top10(float32) & top10(quantised)| / 10
    recall_float32: dict  # {"recall_at_10": r, "recall_at_50": r} of the held-out positives
    recall: dict  # the same for the quantised model
    encoder_bytes_float32: int
    encoder_bytes: int

    @property
    def recall_at_50_change(self) -> Optional[float]:
        """Relative change of Recall@50 against float32 (None when float32's is 0)."""
        base = self.recall_float32["recall_at_50"]
        return None if base == 0 else (self.recall["recall_at_50"] - base) / base

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["recall_at_50_change"] = self.recall_at_50_change
        out["method"] = METHODS[self.precision]
        return out


def _queries(model, batches: list) -> np.ndarray:
    return np.concatenate([model(b, training=False, beta=beta)[features.QUERY].numpy() for b, beta in batches])


def compare(reference, candidate, batches: list, precision: str) -> QualityCheck:
    """Brute-force top-k of `reference` (float32) vs `candidate` on `batches`.

    batches: [(batch dict with USER_TEXT, HISTORY_ITEM_IDS, ITEM_ID, and
    optionally the reference's cached USER_TEXT_VECTOR; beta)]. The candidate
    always encodes USER_TEXT itself. Both share the item tower, so one
    catalog [N, d] scores both query sets [Q, d].
    """
    items = reference.item_embeddings().numpy()
    q_ref = _queries(reference, batches)
    q_new = _queries(candidate, [({k: v for k, v in b.items() if k != features.USER_TEXT_VECTOR}, beta)
                                 for b, beta in batches])
    history = np.concatenate([reference.item_tower.rows(b[features.HISTORY_ITEM_IDS]).numpy() for b, _ in batches])
    positives = np.concatenate([reference.item_tower.rows(b[features.ITEM_ID]).numpy() for b, _ in batches]) - 1
    depth = min(max(RECALL_KS + (OVERLAP_K,)), len(items))
    tops = [_top(q, items, history, depth) for q in (q_ref, q_new)]
    overlap = np.mean([len(set(a[:OVERLAP_K]) & set(b[:OVERLAP_K])) / min(OVERLAP_K, len(items))
                       for a, b in zip(*tops)])

    def recall(top: np.ndarray) -> dict:
        return {f"recall_at_{k}": float(np.mean([p >= 0 and p in row[:k] for p, row in zip(positives, top)]))
                for k in RECALL_KS}

    return QualityCheck(
        precision=precision, queries=len(q_ref), overlap_at_10=float(overlap),
        recall_float32=recall(tops[0]), recall=recall(tops[1]),
        encoder_bytes_float32=weight_bytes(reference.text_encoder), encoder_bytes=weight_bytes(candidate.text_encoder),
    )


def _top(queries: np.ndarray, items: np.ndarray, history: np.ndarray, depth: int, chunk: int = 64) -> np.ndarray:
    """[Q, depth] catalog indices, best first, the row's history items excluded
    (scored `chunk` queries at a time: [chunk, N] floats, whatever the catalog)."""
    if len(queries) > chunk:
        return np.concatenate([_top(queries[s : s + chunk], items, history[s : s + chunk], depth, chunk)
                               for s in range(0, len(queries), chunk)])
    scores = queries @ items.T
    rows = np.repeat(np.arange(len(history)), history.shape[1])
    cols = history.reshape(-1) - 1  # table row -> catalog index; pad/unknown -> -1
    keep = cols >= 0
    scores[rows[keep], cols[keep]] = -np.inf
    part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def check(quality: QualityCheck, min_overlap: float) -> None:
    """Raises OverlapTooLow when the top-10 overlap is below `min_overlap`."""
    if quality.overlap_at_10 < min_overlap:
        raise OverlapTooLow(
            f"the {quality.precision} encoder's top-{OVERLAP_K} overlap with float32 is {quality.overlap_at_10:.4f} "
            f"on {quality.queries} held-out queries, below --min-overlap {min_overlap}; nothing was published "
            "(export with --encoder-precision float16 or float32, or lower --min-overlap)"
        )


def describe(quality: Optional[QualityCheck], precision: str) -> list:
    """Model card lines for the encoder's precision."""
    lines = [f"- Precision: {precision} ({METHODS[precision]})"]
    if quality is None:
        return lines
    change = quality.recall_at_50_change
    lines += [
        f"- Encoder weights: {_size(quality.encoder_bytes)} (float32: {_size(quality.encoder_bytes_float32)})",
        f"- Top-{OVERLAP_K} overlap with float32: {quality.overlap_at_10:.4f} on {quality.queries} held-out "
        "(eval split) queries, brute force, history excluded",
        "- Recall@10 / @50 of the held-out positives: "
        f"{quality.recall['recall_at_10']:.4f} / {quality.recall['recall_at_50']:.4f} "
        f"(float32: {quality.recall_float32['recall_at_10']:.4f} / {quality.recall_float32['recall_at_50']:.4f}"
        + (f"; Recall@50 change {100 * change:+.2f}% relative)" if change is not None else ")"),
    ]
    return lines


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
