"""The two towers: items (id, categories, hashed bag of words) and users
(pooled text, the history read by a causal transformer or averaged, hashed
user id).

Both are Keras 3 layers that emit L2-normalised d-dim vectors, so a dot
product is a cosine. The item tower keeps each catalog item's categories and
text tokens as non-trainable weights, so an item is embedded from its id
alone (history items, the full catalog for the index) and a checkpoint holds
the catalog features the embeddings were trained with.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer.data.tf_dataset import Catalog

_TOKEN_RE = re.compile(r"[a-z0-9]+")
MAX_TEXT_TOKENS = 32  # per item; item_text is title + categories + description


def item_tokens(text: str, limit: int = MAX_TEXT_TOKENS) -> list[str]:
    """Distinct lowercase word tokens of `text`, in order of appearance."""
    seen: dict[str, None] = {}
    for tok in _TOKEN_RE.findall(text.lower()):
        seen.setdefault(tok, None)
        if len(seen) == limit:
            break
    return list(seen)


def _init(seed: Optional[int], offset: int, stddev: float = 0.05):
    return keras.initializers.RandomNormal(
        stddev=stddev, seed=None if seed is None else seed + offset
    )


def _dense_init(seed: Optional[int], offset: int):
    return keras.initializers.GlorotUniform(seed=None if seed is None else seed + offset)


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """values [B, L, D], mask [B, L] bool -> [B, D]; zero where mask is all False."""
    m = tf.cast(mask, values.dtype)[..., tf.newaxis]
    return tf.reduce_sum(values * m, axis=-2) / tf.maximum(tf.reduce_sum(m, axis=-2), 1.0)


@keras.saving.register_keras_serializable(package="segrec")
class ItemTower(keras.layers.Layer):
    """Item ids [...] string -> [..., dim] float32, unit norm.

    Row 0 of every table is the out-of-vocabulary / padding item; catalog
    item i (vocab order) is row i + 1.

    Args:
      item_ids: the catalog vocabulary (N ids).
      num_categories: size of the category vocabulary.
      max_categories: categories kept per item.
      max_text_tokens: text tokens kept per item.
      text_buckets: hash buckets of the bag-of-words text embedding.
      dim: output size d.
      id_dim, category_dim, text_dim: sizes of the three feature embeddings.
      seed: seeds the initializers.
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        num_categories: int,
        max_categories: int = 4,
        max_text_tokens: int = MAX_TEXT_TOKENS,
        text_buckets: int = 4096,
        dim: int = 32,
        id_dim: int = 32,
        category_dim: int = 16,
        text_dim: int = 32,
        seed: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.item_ids = [str(i) for i in item_ids]
        self.num_categories = int(num_categories)
        self.max_categories = max(1, int(max_categories))
        self.max_text_tokens = max(1, int(max_text_tokens))
        self.text_buckets = int(text_buckets)
        self.dim = int(dim)
        self.id_dim = int(id_dim)
        self.category_dim = int(category_dim)
        self.text_dim = int(text_dim)
        self.seed = seed
        self.num_items = len(self.item_ids)

        self.lookup = keras.layers.StringLookup(
            vocabulary=self.item_ids, num_oov_indices=1, name="item_lookup"
        )
        rows = self.num_items + 1
        self.id_embedding = keras.layers.Embedding(
            rows, self.id_dim, embeddings_initializer=_init(seed, 1), dtype=self.dtype_policy, name="id_embedding"
        )
        self.category_embedding = keras.layers.Embedding(
            self.num_categories + 1,
            self.category_dim,
            embeddings_initializer=_init(seed, 2),
            dtype=self.dtype_policy,
            name="category_embedding",
        )
        self.text_embedding = keras.layers.Embedding(
            self.text_buckets + 1,
            self.text_dim,
            embeddings_initializer=_init(seed, 3),
            dtype=self.dtype_policy,
            name="text_embedding",
        )
        self.projection = keras.layers.Dense(
            self.dim, kernel_initializer=_dense_init(seed, 4), dtype=self.dtype_policy, name="projection"
        )

    def build(self, input_shape=None):
        rows = self.num_items + 1
        # 0 pads both tables; category c is c + 1, hash bucket b is b + 1.
        self.category_table = self.add_weight(
            name="category_table",
            shape=(rows, self.max_categories),
            dtype="int32",
            initializer="zeros",
            trainable=False,
        )
        self.text_table = self.add_weight(
            name="text_table",
            shape=(rows, self.max_text_tokens),
            dtype="int32",
            initializer="zeros",
            trainable=False,
        )
        self.id_embedding.build((None,))
        self.category_embedding.build((None, self.max_categories))
        self.text_embedding.build((None, self.max_text_tokens))
        self.projection.build((None, self.id_dim + self.category_dim + self.text_dim))
        self.built = True

    @classmethod
    def from_catalog(cls, catalog: Catalog, **kwargs) -> "ItemTower":
        """An ItemTower sized for `catalog`, its feature tables filled in."""
        kwargs.setdefault(
            "max_categories", max([len(c) for c in catalog.categories] + [1])
        )
        max_tokens = kwargs.get("max_text_tokens", MAX_TEXT_TOKENS)
        kwargs["max_text_tokens"] = max(
            [len(item_tokens(t, max_tokens)) for t in catalog.texts] + [1]
        )
        tower = cls(
            item_ids=catalog.item_ids, num_categories=len(catalog.category_vocab), **kwargs
        )
        tower.set_catalog(catalog)
        return tower

    def set_catalog(self, catalog: Catalog) -> None:
        """Fills the per-item category and text-token tables from `catalog`."""
        if list(catalog.item_ids) != self.item_ids:
            raise ValueError("the catalog's item ids differ from this tower's vocabulary")
        if not self.built:
            self.build()
        rows = self.num_items + 1
        cat_index = {c: i + 1 for i, c in enumerate(catalog.category_vocab)}
        cats = np.zeros((rows, self.max_categories), np.int32)
        for i, item_cats in enumerate(catalog.categories):
            idx = [cat_index[c] for c in item_cats if c in cat_index][: self.max_categories]
            cats[i + 1, : len(idx)] = idx
        texts = np.zeros((rows, self.max_text_tokens), np.int32)
        for i, text in enumerate(catalog.texts):
            toks = item_tokens(text, self.max_text_tokens)
            if toks:
                buckets = tf.strings.to_hash_bucket_fast(toks, self.text_buckets).numpy()
                texts[i + 1, : len(toks)] = buckets + 1
        self.category_table.assign(cats)
        self.text_table.assign(texts)

    def rows(self, item_ids) -> tf.Tensor:
        """Item ids [...] string -> table rows [...] int32 (0 = unknown/pad)."""
        return tf.cast(self.lookup(item_ids), tf.int32)

    def embed_rows(self, rows: tf.Tensor, training=None) -> tf.Tensor:
        """Table rows [...] int -> [..., dim] float32, unit norm."""
        rows = tf.convert_to_tensor(rows, tf.int32)
        shape = tf.shape(rows)
        flat = tf.reshape(rows, [-1])
        cats = tf.gather(self.category_table, flat)
        toks = tf.gather(self.text_table, flat)
        parts = [
            self.id_embedding(flat),
            _masked_mean(self.category_embedding(cats), cats > 0),
            _masked_mean(self.text_embedding(toks), toks > 0),
        ]
        x = tf.concat([tf.cast(p, self.compute_dtype) for p in parts], axis=-1)
        x = tf.cast(self.projection(x), tf.float32)
        x = tf.math.l2_normalize(x, axis=-1)
        return tf.reshape(x, tf.concat([shape, [self.dim]], axis=0))

    def call(self, item_ids, training=None):
        return self.embed_rows(self.rows(item_ids), training=training)

    def catalog_embeddings(self) -> tf.Tensor:
        """[N, dim] embeddings of the whole catalog, in vocabulary order."""
        return self.embed_rows(tf.range(1, self.num_items + 1, dtype=tf.int32))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "item_ids": self.item_ids,
                "num_categories": self.num_categories,
                "max_categories": self.max_categories,
                "max_text_tokens": self.max_text_tokens,
                "text_buckets": self.text_buckets,
                "dim": self.dim,
                "id_dim": self.id_dim,
                "category_dim": self.category_dim,
                "text_dim": self.text_dim,
                "seed": self.seed,
            }
        )
        return config


HISTORY_ENCODERS = ("mean", "transformer")


def causal_mask(valid: tf.Tensor) -> tf.Tensor:
    """valid [B, H] bool (history most recent first) -> attention mask [B, H, H]:
    slot i (query) may read slot j (key) when j >= i (the same item or an
    older one) and j holds an item. Slot 0, the most recent item, reads the
    whole history; an older slot never sees what came after it."""
    h = tf.shape(valid)[1]
    older_or_same = tf.linalg.band_part(tf.ones([h, h], tf.bool), 0, -1)  # [i, j]: j >= i
    return tf.logical_and(older_or_same[None, :, :], valid[:, None, :])


@keras.saving.register_keras_serializable(package="segrec")
class HistoryTransformer(keras.layers.Layer):
    """Causal self-attention over history item embeddings (SASRec-style).

    Input: embeddings [B, H, d] (most recent first) and mask [B, H] bool.
    Output of `sequence` [B, H, d]: slot i summarises items i..H-1 (it and
    what came before it), never a later item; `call` returns slot 0, the
    representation after the most recent item, zeros for an empty history.
    Pre-LayerNorm blocks: x += MHA(LN(x)); x += FFN(LN(x)); final LN.
    Positions are learned, by recency (slot 0 = most recent).
    """

    def __init__(self, dim: int = 32, max_len: int = 50, num_layers: int = 2, num_heads: int = 2,
                 dropout: float = 0.2, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.max_len = int(max_len)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.seed = seed
        self.position = keras.layers.Embedding(self.max_len, self.dim, embeddings_initializer=_init(seed, 30),
                                               dtype=self.dtype_policy, name="position")
        self.attn = [keras.layers.MultiHeadAttention(self.num_heads, max(1, self.dim // self.num_heads),
                                                     dropout=self.dropout, kernel_initializer=_dense_init(seed, 31 + i),
                                                     dtype=self.dtype_policy, name=f"attention_{i}")
                     for i in range(self.num_layers)]
        self.ffn_in = [keras.layers.Dense(self.dim, activation="gelu", kernel_initializer=_dense_init(seed, 41 + i),
                                          dtype=self.dtype_policy, name=f"ffn_in_{i}") for i in range(self.num_layers)]
        self.ffn_out = [keras.layers.Dense(self.dim, kernel_initializer=_dense_init(seed, 51 + i),
                                           dtype=self.dtype_policy, name=f"ffn_out_{i}") for i in range(self.num_layers)]
        self.norms = [keras.layers.LayerNormalization(epsilon=1e-6, dtype=self.dtype_policy, name=f"norm_{i}")
                      for i in range(2 * self.num_layers + 1)]
        self.drop = keras.layers.Dropout(self.dropout, seed=seed)

    def build(self, input_shape=None):
        self.position.build((None,))
        for i in range(self.num_layers):
            self.attn[i].build((None, None, self.dim), (None, None, self.dim))
            self.ffn_in[i].build((None, self.dim))
            self.ffn_out[i].build((None, self.dim))
        for norm in self.norms:
            norm.build((None, self.dim))
        self.built = True

    def sequence(self, embeddings, mask, training=None) -> tf.Tensor:
        """[B, H, d], [B, H] -> [B, H, d] causal outputs (zeros at padding)."""
        x = tf.cast(embeddings, self.compute_dtype) * tf.cast(self.dim ** 0.5, self.compute_dtype)
        h = tf.shape(x)[1]
        positions = tf.minimum(tf.range(h), self.max_len - 1)
        x = x + tf.cast(self.position(positions), self.compute_dtype)[None]
        valid = tf.cast(mask, self.compute_dtype)[..., None]
        x = self.drop(x, training=training) * valid
        attention_mask = causal_mask(tf.cast(mask, tf.bool))
        for i in range(self.num_layers):
            y = self.norms[2 * i](x)
            x = x + self.attn[i](y, y, attention_mask=attention_mask, training=training)
            y = self.norms[2 * i + 1](x)
            x = x + self.drop(self.ffn_out[i](self.ffn_in[i](y)), training=training)
            x = x * valid
        return self.norms[-1](x) * valid

    def call(self, embeddings, mask, training=None):
        return self.sequence(embeddings, mask, training=training)[:, 0, :]

    def get_config(self):
        config = super().get_config()
        config.update({"dim": self.dim, "max_len": self.max_len, "num_layers": self.num_layers,
                       "num_heads": self.num_heads, "dropout": self.dropout, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package="segrec")
class UserTower(keras.layers.Layer):
    """(pooled text, history item embeddings, user id) -> [B, dim], unit norm.

    Inputs (a dict):
      "text_vector": [B, text_input_dim] float32, the pooled encoder output.
      "history_embeddings": [B, H, dim], ItemTower outputs of the history.
      "history_mask": [B, H] bool, False at padding.
      "user_id": [B] string (read only when user_id_buckets > 0).

    Args:
      dim: output size d (= the item tower's).
      text_input_dim: width of the pooled text vector.
      text_dim: the text vector's projection size.
      hidden_units: sizes of the ReLU MLP layers before the output layer.
      user_id_buckets: hash buckets of the user-id embedding; 0 turns it off.
      user_id_dim: size of the user-id embedding.
      history_encoder: "mean" (masked mean of the history embeddings) or
        "transformer" (HistoryTransformer over them, most recent first; its
        output is also added to the tower's output, a residual path that lets
        the sequence carry the query on its own).
      max_history, history_layers, history_heads, history_dropout: the
        transformer's positions, blocks, heads and dropout.
      use_text: False reads no text (zeros in its place): the ablation.
      seed: seeds the initializers.
    """

    def __init__(
        self,
        dim: int = 32,
        text_input_dim: int = 384,
        text_dim: int = 32,
        hidden_units: Sequence[int] = (64,),
        user_id_buckets: int = 0,
        user_id_dim: int = 16,
        history_encoder: str = "mean",
        max_history: int = 50,
        history_layers: int = 2,
        history_heads: int = 2,
        history_dropout: float = 0.2,
        use_text: bool = True,
        seed: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.use_text = bool(use_text)
        self.dim = int(dim)
        self.text_input_dim = int(text_input_dim)
        self.text_dim = int(text_dim)
        self.hidden_units = [int(u) for u in hidden_units]
        self.user_id_buckets = int(user_id_buckets)
        self.user_id_dim = int(user_id_dim)
        if history_encoder not in HISTORY_ENCODERS:
            raise ValueError(f"history_encoder must be one of {HISTORY_ENCODERS}, got {history_encoder!r}")
        self.history_encoder = history_encoder
        self.max_history = int(max_history)
        self.history_layers = int(history_layers)
        self.history_heads = int(history_heads)
        self.history_dropout = float(history_dropout)
        self.seed = seed
        self.sequence_encoder = None
        if history_encoder == "transformer":
            self.sequence_encoder = HistoryTransformer(
                dim=self.dim, max_len=self.max_history, num_layers=self.history_layers,
                num_heads=self.history_heads, dropout=self.history_dropout,
                seed=None if seed is None else seed + 60, dtype=self.dtype_policy, name="history_transformer")
        self.text_projection = keras.layers.Dense(
            self.text_dim,
            kernel_initializer=_dense_init(seed, 11),
            dtype=self.dtype_policy,
            name="text_projection",
        )
        if self.user_id_buckets > 0:
            self.user_hashing = keras.layers.Hashing(self.user_id_buckets, name="user_hashing")
            self.user_embedding = keras.layers.Embedding(
                self.user_id_buckets,
                self.user_id_dim,
                embeddings_initializer=_init(seed, 12),
                dtype=self.dtype_policy,
                name="user_embedding",
            )
        self.hidden = [
            keras.layers.Dense(
                u,
                activation="relu",
                kernel_initializer=_dense_init(seed, 20 + i),
                dtype=self.dtype_policy,
                name=f"hidden_{i}",
            )
            for i, u in enumerate(self.hidden_units)
        ]
        self.output_layer = keras.layers.Dense(
            self.dim, kernel_initializer=_dense_init(seed, 13), dtype=self.dtype_policy, name="output"
        )

    @property
    def concat_dim(self) -> int:
        return self.text_dim + self.dim + (self.user_id_dim if self.user_id_buckets > 0 else 0)

    def build(self, input_shape=None):
        self.text_projection.build((None, self.text_input_dim))
        if self.sequence_encoder is not None:
            self.sequence_encoder.build()
        if self.user_id_buckets > 0:
            self.user_embedding.build((None,))
        width = self.concat_dim
        for layer in self.hidden:
            layer.build((None, width))
            width = layer.units
        self.output_layer.build((None, width))
        self.built = True

    def _combine(self, history: tf.Tensor, inputs: dict) -> tf.Tensor:
        """history [B, d] or [B, H, d] (one per slot) + the user's text and id -> unit-norm output, same shape."""
        text = self.text_projection(tf.cast(inputs["text_vector"], self.compute_dtype))
        if not self.use_text:
            text = tf.zeros_like(text)
        parts = [text]
        if self.user_id_buckets > 0:
            parts.append(self.user_embedding(self.user_hashing(inputs["user_id"])))
        if history.shape.rank == 3:
            slots = tf.shape(history)[1]
            parts = [tf.tile(tf.cast(p, self.compute_dtype)[:, None, :], [1, slots, 1]) for p in parts]
        parts.insert(1, history)
        x = tf.concat([tf.cast(p, self.compute_dtype) for p in parts], axis=-1)
        for layer in self.hidden:
            x = layer(x)
        x = self.output_layer(x)
        if self.sequence_encoder is not None:
            x = x + history
        return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)

    def call(self, inputs, training=None):
        if self.sequence_encoder is not None:
            history = self.sequence_encoder(inputs["history_embeddings"], inputs["history_mask"], training=training)
        else:
            history = _masked_mean(tf.cast(inputs["history_embeddings"], tf.float32), inputs["history_mask"])
        return self._combine(tf.cast(history, self.compute_dtype), inputs)

    def sequence_outputs(self, inputs, training=None) -> tf.Tensor:
        """Transformer only: [B, H, dim] user vectors, slot i as if the user's
        history ended at history slot i (slot 0 = `call`'s output); the text
        and id are the inputs' for every slot."""
        if self.sequence_encoder is None:
            raise ValueError("sequence_outputs needs history_encoder='transformer'")
        history = self.sequence_encoder.sequence(inputs["history_embeddings"], inputs["history_mask"],
                                                 training=training)
        return self._combine(tf.cast(history, self.compute_dtype), inputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "dim": self.dim,
                "text_input_dim": self.text_input_dim,
                "text_dim": self.text_dim,
                "hidden_units": self.hidden_units,
                "user_id_buckets": self.user_id_buckets,
                "user_id_dim": self.user_id_dim,
                "history_encoder": self.history_encoder,
                "max_history": self.max_history,
                "history_layers": self.history_layers,
                "history_heads": self.history_heads,
                "history_dropout": self.history_dropout,
                "use_text": self.use_text,
                "seed": self.seed,
            }
        )
        return config
