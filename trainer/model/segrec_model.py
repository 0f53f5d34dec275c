"""SegRecModel: two towers + segment head, trained with TFRS's retrieval loss.

A Keras 3 model (keras-hub's BERT is Keras 3; a Keras 3 layer inside a
tf-keras model would silently not train). `tfrs.tasks.Retrieval` is a
tf-keras layer used here only as a loss computer; it is called from a
`tf.function` with autograph on, because its `len(tf.shape(...))` fails when
called straight from a Keras 3 train step.

Loss = retrieval + alpha * (DEC KL + balance). The retrieval loss is either

`loss="full"`: a softmax over the whole catalog, embedded once per step
(history slots are gathered from the same [N+1, d] table instead of running
the item tower per slot); under the exclude repeat rule the user's history
items are masked out of the softmax, as they are at ranking time; or

`loss="sampled"`: for catalogs too big to embed every step, a softmax over a
mixed pool (Yang et al., 2020, "Mixed Negative Sampling"): the batch's
positives plus `sampled_negatives` items drawn uniformly from the catalog,
each logit corrected by log of the candidate's expected count in the pool
(B * p(item) + M / N: logQ for the mixture), the positive's duplicates
masked; or

`loss="in_batch"`: Retrieval(u, item(positive)), an in-batch softmax over
scaled cosines with
  * logQ correction: logits - log p(item), p = the item's share of training
    positives (Catalog.sampling_probabilities, kept as a non-trainable weight
    so checkpoints carry it), which undoes the popularity bias of in-batch
    negatives (Yi et al., 2019);
  * accidental hits removed: a batch negative with the positive's id is
    masked out;
  * example weights (features.WEIGHT).

Item prior (`item_prior`): the score of item i for a user is
  u . v_i / tau + b_i            ("global": a learned item bias)
  u . v_i / tau + b_i + p . B_i  ("segment": plus a per-segment bias, p the
                                   user's segment probabilities, stop-gradient)
and it is served from the one ANN index by appending coordinates: QUERY is
[q, tau, tau * p] and each item vector [v_i, b_i, B_i], so QUERY . item =
tau * logit and the index ranks exactly as training scored. The segment
prior is a popular-in-segment signal a personal vector cannot carry; with
p fixed it can only move items the segment favours, it never rotates q.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features
from trainer.data.tf_dataset import Catalog
from trainer.model.segment_head import SegmentHead
from trainer.model.text_encoder import TextEncoder
from trainer.model.towers import MAX_TEXT_TOKENS, ItemTower, UserTower, item_tokens

LOSSES = ("in_batch", "full", "sampled")
ITEM_PRIORS = ("none", "global", "segment")
COLD_QUERIES = ("centroid", "user")
POSITIONS = ("last", "all")


@tf.function(autograph=True)
def _retrieval_loss(task, query, candidates, sample_weight, sampling_probability, candidate_ids):
    """Mean over the (per-replica) batch of the weighted in-batch softmax loss.

    The task reduces with NONE: tf-keras refuses SUM_OVER_BATCH_SIZE inside a
    tf.distribute strategy, and the mean is taken here instead (the
    gradient's 1/replicas scaling happens in train_step).
    """
    per_example = task(
        query,
        candidates,
        sample_weight=sample_weight,
        candidate_sampling_probability=sampling_probability,
        candidate_ids=candidate_ids,
        compute_metrics=False,
        compute_batch_metrics=False,
    )
    batch = tf.cast(tf.shape(query)[0], per_example.dtype)
    return tf.reduce_sum(per_example) / tf.maximum(batch, 1.0)


class _Untracked:
    """Holds the tf-keras Retrieval task out of Keras 3's / tf's tracking."""

    def __init__(self, value):
        self.value = value


def compute_policy(mixed_precision: bool) -> str:
    """"mixed_float16" only when asked for and a GPU is present."""
    if mixed_precision and tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "float32"


@keras.saving.register_keras_serializable(package="segrec")
class SegRecModel(keras.Model):
    """The segrec two-tower model.

    Batches are dicts as made by `trainer.data.tf_dataset.make_dataset`: USER_ID,
    USER_TEXT, HISTORY_ITEM_IDS [B, H] (PAD_ITEM_ID padded), ITEM_ID, WEIGHT,
    and USER_TEXT_VECTOR [B, text_input_dim] when the encoder is frozen and
    its outputs are cached.

    Args:
      item_ids, num_categories, max_categories, max_text_tokens, text_buckets:
        catalog shape (see ItemTower); `from_catalog` fills them.
      embedding_dim: d of u, q and item embeddings.
      item_id_dim, category_dim, item_text_dim: item tower feature sizes.
      text_input_dim: width of the pooled text vector (the encoder's hidden).
      user_text_dim, user_hidden_units, user_id_buckets, user_id_dim: user
        tower (user_id_buckets=0: no user-id embedding).
      num_segments, segment_temperature, balance_weight: SegmentHead.
      alpha: weight of the clustering loss.
      retrieval_temperature: softmax temperature over cosines.
      remove_accidental_hits, logq_correction: retrieval loss options.
      history_encoder, max_history, history_layers, history_heads,
        history_dropout: the user tower's history reader (see UserTower).
      empty_history_rate: in training, the share of examples whose query
        reads no history (text, id and prior only), so the tower also learns
        to serve a brand-new user; the loss still ranks without what they
        consumed. Not applied to positions="all"'s every-slot loss.
      loss: "full" (catalog softmax) or "in_batch" (see the module doc).
      exclude_seen: full softmax only: mask the history items out of each
        example's softmax (the exclude repeat rule).
      positions: full softmax with the transformer only: "all" trains every
        history slot to predict the item that followed it (as SASRec does:
        one example gives up to H+1 signals, each ranked without what was
        consumed before it); "last" only the example's target. "all" assumes
        user_text holds nothing the history's later items determine (a
        profile; not the titles of recent items, which would leak a slot's
        target into its input).
      use_text: False: the user tower ignores user_text (an ablation).
      sampled_negatives: loss "sampled": uniform negatives per step.
      item_prior: "none", "global" or "segment" (see the module doc).
      cold_query: a user with no known history item is served from their
        segment's centroid ("centroid") or from their own vector, text and
        prior included ("user").
      finetune_layers: top encoder layers trained (needs `text_encoder`);
        0 = frozen encoder (cached vectors are used when the batch has them).
      text_encoder: optional TextEncoder; needed for fine-tuning and for
        encoding raw USER_TEXT (serving).
      mixed_precision: compute in float16 on GPU (losses stay float32).
      seed: seeds initializers.
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        num_categories: int,
        max_categories: int = 4,
        max_text_tokens: int = MAX_TEXT_TOKENS,
        text_buckets: int = 4096,
        embedding_dim: int = 32,
        item_id_dim: int = 32,
        category_dim: int = 16,
        item_text_dim: int = 32,
        text_input_dim: int = 384,
        user_text_dim: int = 32,
        user_hidden_units: Sequence[int] = (64,),
        user_id_buckets: int = 0,
        user_id_dim: int = 16,
        num_segments: int = 8,
        segment_temperature: float = 0.1,
        balance_weight: float = 0.1,
        alpha: float = 0.1,
        retrieval_temperature: float = 0.05,
        remove_accidental_hits: bool = True,
        logq_correction: bool = True,
        history_encoder: str = "mean",
        max_history: int = 50,
        history_layers: int = 2,
        history_heads: int = 2,
        history_dropout: float = 0.2,
        empty_history_rate: float = 0.0,
        loss: str = "in_batch",
        exclude_seen: bool = True,
        item_prior: str = "none",
        cold_query: str = "centroid",
        positions: str = "last",
        use_text: bool = True,
        sampled_negatives: int = 1024,
        finetune_layers: int = 0,
        text_encoder: Optional[TextEncoder] = None,
        mixed_precision: bool = False,
        seed: Optional[int] = None,
        **kwargs,
    ):
        policy = compute_policy(mixed_precision)
        # The policy follows mixed_precision and the machine, never a config
        # saved on another machine. Only the towers compute in float16: the
        # model itself stays float32 so Keras does not autocast the inputs
        # (weights) or the segment centroids inside its call scope.
        kwargs.pop("dtype", None)
        super().__init__(dtype="float32", **kwargs)
        self._policy = policy
        self._allow_non_tensor_positional_args = True
        if text_encoder is not None:
            text_input_dim = text_encoder.hidden_dim
            text_encoder.set_trainable_layers(finetune_layers)
        elif finetune_layers:
            raise ValueError("finetune_layers > 0 needs a text_encoder")
        self.item_ids = [str(i) for i in item_ids]
        self.num_categories = int(num_categories)
        self.max_categories = int(max_categories)
        self.max_text_tokens = int(max_text_tokens)
        self.text_buckets = int(text_buckets)
        self.embedding_dim = int(embedding_dim)
        self.item_id_dim = int(item_id_dim)
        self.category_dim = int(category_dim)
        self.item_text_dim = int(item_text_dim)
        self.text_input_dim = int(text_input_dim)
        self.user_text_dim = int(user_text_dim)
        self.user_hidden_units = [int(u) for u in user_hidden_units]
        self.user_id_buckets = int(user_id_buckets)
        self.user_id_dim = int(user_id_dim)
        self.num_segments = int(num_segments)
        self.segment_temperature = float(segment_temperature)
        self.balance_weight = float(balance_weight)
        self.alpha = float(alpha)
        self.retrieval_temperature = float(retrieval_temperature)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.logq_correction = bool(logq_correction)
        for name, value, allowed in (("loss", loss, LOSSES), ("item_prior", item_prior, ITEM_PRIORS),
                                     ("cold_query", cold_query, COLD_QUERIES), ("positions", positions, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.history_encoder = history_encoder
        self.max_history = int(max_history)
        self.history_layers = int(history_layers)
        self.history_heads = int(history_heads)
        self.history_dropout = float(history_dropout)
        self.empty_history_rate = float(empty_history_rate)
        if not 0.0 <= self.empty_history_rate < 1.0:
            raise ValueError(f"empty_history_rate must be in [0, 1), got {empty_history_rate}")
        self.loss_kind = loss
        self.exclude_seen = bool(exclude_seen)
        self.item_prior = item_prior
        self.cold_query = cold_query
        self.positions = positions
        self.use_text = bool(use_text)
        self.sampled_negatives = int(sampled_negatives)
        if self.sampled_negatives < 1:
            raise ValueError(f"sampled_negatives must be >= 1, got {sampled_negatives}")
        self.finetune_layers = int(finetune_layers)
        self.mixed_precision = bool(mixed_precision)
        self.seed = seed

        self.text_encoder = text_encoder
        self.item_tower = ItemTower(
            item_ids=self.item_ids,
            num_categories=self.num_categories,
            max_categories=self.max_categories,
            max_text_tokens=self.max_text_tokens,
            text_buckets=self.text_buckets,
            dim=self.embedding_dim,
            id_dim=self.item_id_dim,
            category_dim=self.category_dim,
            text_dim=self.item_text_dim,
            seed=seed,
            dtype=policy,
            name="item_tower",
        )
        self.user_tower = UserTower(
            dim=self.embedding_dim,
            text_input_dim=self.text_input_dim,
            text_dim=self.user_text_dim,
            hidden_units=self.user_hidden_units,
            user_id_buckets=self.user_id_buckets,
            user_id_dim=self.user_id_dim,
            history_encoder=self.history_encoder,
            max_history=self.max_history,
            history_layers=self.history_layers,
            history_heads=self.history_heads,
            history_dropout=self.history_dropout,
            use_text=self.use_text,
            seed=None if seed is None else seed + 100,
            dtype=policy,
            name="user_tower",
        )
        self.segment_head = SegmentHead(
            num_segments=self.num_segments,
            dim=self.embedding_dim,
            temperature=self.segment_temperature,
            balance_weight=self.balance_weight,
            seed=None if seed is None else seed + 200,
            dtype="float32",
            name="segment_head",
        )
        self._task = _Untracked(
            tfrs.tasks.Retrieval(
                loss=tf.keras.losses.CategoricalCrossentropy(
                    from_logits=True, reduction=tf.keras.losses.Reduction.NONE
                ),
                temperature=self.retrieval_temperature,
                remove_accidental_hits=self.remove_accidental_hits,
            )
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.retrieval_tracker = keras.metrics.Mean(name="retrieval_loss")
        self.cluster_tracker = keras.metrics.Mean(name="cluster_loss")
        self.balance_tracker = keras.metrics.Mean(name="balance")
        self.build()

    def build(self, input_shape=None):
        self.item_tower.build()
        self.user_tower.build()
        self.segment_head.build()
        # p(item) for logQ, row 0 = unknown item; uniform until set_catalog.
        n = len(self.item_ids) + 1
        self.sampling_probability = self.add_weight(
            name="sampling_probability",
            shape=(n,),
            initializer=keras.initializers.Constant(1.0 / n),
            trainable=False,
            dtype="float32",
        )
        # alpha as a variable so training can switch clustering on after a
        # warm-up without retracing.
        self.cluster_weight = self.add_weight(
            name="cluster_weight",
            shape=(),
            initializer=keras.initializers.Constant(self.alpha),
            trainable=False,
            dtype="float32",
        )
        if self.item_prior != "none":
            self.item_bias = self.add_weight(name="item_bias", shape=(n,), initializer="zeros", dtype="float32")
        if self.item_prior == "segment":
            self.segment_bias = self.add_weight(name="segment_bias", shape=(n, self.num_segments),
                                                initializer="zeros", dtype="float32")
        self.built = True

    @property
    def prior_dim(self) -> int:
        """Coordinates the item prior appends to QUERY and item vectors."""
        return {"none": 0, "global": 1, "segment": 1 + self.num_segments}[self.item_prior]

    @property
    def query_dim(self) -> int:
        """Width of QUERY and of item_embeddings(): embedding_dim + prior_dim."""
        return self.embedding_dim + self.prior_dim

    def _query_with_prior(self, q: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
        """q [B, d], segment probs [B, K] -> [B, d + prior_dim] ([q, tau, tau * p])."""
        if self.item_prior == "none":
            return q
        tau = tf.fill([tf.shape(q)[0], 1], tf.constant(self.retrieval_temperature, tf.float32))
        parts = [tf.cast(q, tf.float32), tau]
        if self.item_prior == "segment":
            parts.append(self.retrieval_temperature * tf.cast(probs, tf.float32))
        return tf.concat(parts, axis=-1)

    def _items_with_prior(self, v: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """item vectors v [..., d] of table `rows` [...] -> [..., d + prior_dim] ([v, b, B])."""
        if self.item_prior == "none":
            return v
        parts = [tf.cast(v, tf.float32), tf.gather(tf.convert_to_tensor(self.item_bias), rows)[..., None]]
        if self.item_prior == "segment":
            parts.append(tf.gather(tf.convert_to_tensor(self.segment_bias), rows))
        return tf.concat(parts, axis=-1)

    # --- construction from a dataset -----------------------------------------
    @classmethod
    def from_catalog(cls, catalog: Catalog, **kwargs) -> "SegRecModel":
        """A model sized for `catalog`, its item tables and logQ filled in."""
        max_tokens = kwargs.pop("max_text_tokens", MAX_TEXT_TOKENS)
        model = cls(
            item_ids=catalog.item_ids,
            num_categories=len(catalog.category_vocab),
            max_categories=kwargs.pop(
                "max_categories", max([len(c) for c in catalog.categories] + [1])
            ),
            max_text_tokens=max([len(item_tokens(t, max_tokens)) for t in catalog.texts] + [1]),
            **kwargs,
        )
        model.set_catalog(catalog)
        return model

    def set_catalog(self, catalog: Catalog) -> None:
        self.item_tower.set_catalog(catalog)
        probs = catalog.sampling_probabilities
        self.sampling_probability.assign(
            np.concatenate([[probs.min()], probs]).astype(np.float32)
        )

    def compile(self, optimizer="adam", jit_compile=False, **kwargs):
        # String lookups and WordPiece ops have no XLA kernels.
        optimizer = keras.optimizers.get(optimizer)
        if self._policy == "mixed_float16" and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    # --- forward ---------------------------------------------------------------
    def text_vectors(self, batch: dict, training=None) -> tf.Tensor:
        """Pooled user-text vectors [B, text_input_dim] float32."""
        if features.INPUT_IDS in batch:  # tokenised by the client (token-id exports)
            return self.text_encoder.embed_token_ids(
                batch[features.INPUT_IDS], batch[features.PADDING_MASK], training=training
            )
        if self.finetune_layers > 0:
            return self.text_encoder(batch[features.USER_TEXT], training=training)
        if features.USER_TEXT_VECTOR in batch:
            return tf.cast(batch[features.USER_TEXT_VECTOR], tf.float32)
        if self.text_encoder is not None:
            return self.text_encoder(batch[features.USER_TEXT], training=False)
        raise ValueError(
            f"the batch has no {features.USER_TEXT_VECTOR!r} and the model has no "
            "text_encoder: pass a TextCache to make_dataset or give the model an encoder"
        )

    def user_embedding(self, batch: dict, training=None, item_table: Optional[tf.Tensor] = None
                       ) -> tuple[tf.Tensor, tf.Tensor]:
        """-> (u [B, d] float32 unit norm, cold [B] bool: no known history item).

        item_table: the catalog's [N+1, d] item vectors when the caller has
        embedded them already (the full-softmax step): history slots are
        gathered from it instead of running the item tower per slot."""
        rows = self.item_tower.rows(batch[features.HISTORY_ITEM_IDS])
        mask = rows > 0  # PAD_ITEM_ID and unknown ids map to row 0
        if training is True and self.empty_history_rate > 0:  # new users, as training sees them
            keep = tf.random.uniform([tf.shape(rows)[0], 1]) >= self.empty_history_rate
            mask = tf.logical_and(mask, keep)
        if item_table is not None:
            history = tf.gather(item_table, rows)
        else:
            history = self.item_tower.embed_rows(rows, training=training)
        inputs = {
            "text_vector": self.text_vectors(batch, training=training),
            "history_embeddings": history,
            "history_mask": mask,
        }
        if self.user_id_buckets > 0:
            inputs["user_id"] = batch[features.USER_ID]
        u = self.user_tower(inputs, training=training)
        return u, tf.logical_not(tf.reduce_any(mask, axis=-1))

    def call(self, inputs, training=None, beta=0.0):
        """inputs: a batch dict -> {EMBEDDING: u [B, d], QUERY: q [B, d],
        SEGMENT_PROBS: [B, K], SEGMENT_ID: [B] int32}."""
        u, cold = self.user_embedding(inputs, training=training)
        probs, seg = self.segment_head(u)
        q = self.segment_head.query(u, beta, cold=cold if self.cold_query == "centroid" else None)
        q = self._query_with_prior(q, probs)
        return {
            features.EMBEDDING: u,
            features.QUERY: q,
            features.SEGMENT_PROBS: probs,
            features.SEGMENT_ID: seg,
        }

    def user_outputs(self, batch: dict, beta: float = 0.0) -> dict:
        """Inference outputs for one batch (see `call`)."""
        return self(batch, training=False, beta=beta)

    def item_embeddings(self) -> tf.Tensor:
        """[N, query_dim] vectors of the whole catalog, in `item_ids` order:
        what QUERY is scored against (the item tower's [N, d], plus the item
        prior's coordinates when the model has one)."""
        rows = tf.range(1, len(self.item_ids) + 1, dtype=tf.int32)
        return self._items_with_prior(self.item_tower.catalog_embeddings(), rows)

    # --- losses and steps ---------------------------------------------------------
    def compute_losses(self, batch: dict, training=None) -> dict:
        """float32 scalars: loss, retrieval_loss, cluster_loss, balance."""
        weights = batch.get(features.WEIGHT)
        weights = None if weights is None else tf.cast(weights, tf.float32)
        rows = self.item_tower.rows(batch[features.ITEM_ID])
        if self.loss_kind == "full":
            # The catalog, embedded once for the step: softmax columns and history slots.
            table = tf.cast(self.item_tower.embed_rows(
                tf.range(len(self.item_ids) + 1, dtype=tf.int32), training=training), tf.float32)
            history_rows = self.item_tower.rows(batch[features.HISTORY_ITEM_IDS])
            if self.positions == "all" and self.history_encoder == "transformer":
                u, retrieval = self._every_position_loss(batch, table, rows, history_rows, weights, training)
            else:
                u, _ = self.user_embedding(batch, training=training, item_table=table)
                retrieval = self._full_softmax_loss(u, table, rows, history_rows, weights)
        elif self.loss_kind == "sampled":
            u, _ = self.user_embedding(batch, training=training)
            negatives = tf.random.uniform([self.sampled_negatives], 1, len(self.item_ids) + 1, dtype=tf.int32)
            retrieval = self._sampled_softmax_loss(u, rows, negatives, weights, training)
        else:
            u, _ = self.user_embedding(batch, training=training)
            candidates = self.item_tower.embed_rows(rows, training=training)
            query = u
            if self.item_prior != "none":
                query = self._query_with_prior(u, tf.stop_gradient(self.segment_head(u)[0]))
                candidates = self._items_with_prior(candidates, rows)
            probs = tf.gather(self.sampling_probability, rows) if self.logq_correction else None
            retrieval = tf.cast(
                _retrieval_loss(self._task.value, query, candidates, weights, probs, rows), tf.float32
            )
        clustering = self.segment_head.clustering_loss(u, sample_weight=weights)
        total = retrieval + tf.convert_to_tensor(self.cluster_weight) * clustering["loss"]
        return {
            "loss": total,
            "retrieval_loss": retrieval,
            "cluster_loss": clustering["kl"],
            "balance": clustering["balance"],
        }

    def _full_softmax_loss(self, u, table, target_rows, history_rows, weights) -> tf.Tensor:
        """Mean weighted cross-entropy of the target over the whole catalog.

        logits [B, N] = QUERY . item vectors / tau (prior included); targets
        outside the vocabulary (row 0) get weight 0; with exclude_seen the
        history items (other than the target) are masked out."""
        logits = self._catalog_logits(u, table, target_rows, history_rows)
        known = tf.cast(target_rows > 0, tf.float32)
        w = known if weights is None else known * weights
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(target_rows - 1, 0), logits=logits)
        return tf.reduce_sum(ce * w) / tf.maximum(tf.cast(tf.shape(u)[0], tf.float32), 1.0)

    def _catalog_logits(self, users, table, targets, consumed) -> tf.Tensor:
        """users [M, d] -> logits [M, N] = QUERY . item vectors / tau over the catalog (prior
        included); with exclude_seen the table rows in `consumed` [M, H] (0: nothing) other than the
        row's own target are masked out, as ranking removes them."""
        n = len(self.item_ids)
        query = self._query_with_prior(users, tf.stop_gradient(self.segment_head(users)[0]))
        items = self._items_with_prior(table[1:], tf.range(1, n + 1, dtype=tf.int32))
        logits = tf.matmul(query, items, transpose_b=True) / self.retrieval_temperature
        if self.exclude_seen:
            pos = tf.where(tf.logical_and(consumed > 0, consumed != targets[:, None]))  # [K, 2]: (row, slot)
            idx = tf.stack([tf.cast(pos[:, 0], tf.int32), tf.gather_nd(consumed, pos) - 1], axis=1)
            logits = tf.tensor_scatter_nd_update(logits, idx, tf.fill([tf.shape(idx)[0]], -1e9))
        return logits

    def _sampled_softmax_loss(self, u, target_rows, negative_rows, weights, training) -> tf.Tensor:
        """Mixed-pool softmax: candidates = the batch's positives + `negative_rows` (uniform);
        logits - log(B * p(item) + M / N); a positive's duplicates elsewhere in the pool masked."""
        b = tf.shape(u)[0]
        pool = tf.concat([target_rows, negative_rows], axis=0)  # [B + M]
        vectors = self._items_with_prior(self.item_tower.embed_rows(pool, training=training), pool)
        query = self._query_with_prior(u, tf.stop_gradient(self.segment_head(u)[0]))
        logits = tf.matmul(query, vectors, transpose_b=True) / self.retrieval_temperature  # [B, B + M]
        expected = (tf.cast(b, tf.float32) * tf.gather(self.sampling_probability, pool)
                    + float(self.sampled_negatives) / float(len(self.item_ids)))
        logits = logits - tf.math.log(expected)[None, :]
        own = tf.one_hot(tf.range(b), tf.shape(pool)[0], on_value=True, off_value=False)
        duplicate = tf.logical_and(tf.equal(target_rows[:, None], pool[None, :]), tf.logical_not(own))
        logits = tf.where(duplicate, tf.constant(-1e9, logits.dtype), logits)
        known = tf.cast(target_rows > 0, tf.float32)
        w = known if weights is None else known * weights
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.range(b), logits=logits)
        return tf.reduce_sum(ce * w) / tf.maximum(tf.cast(b, tf.float32), 1.0)

    def _every_position_loss(self, batch, table, target_rows, history_rows, weights, training):
        """(u [B, d] of slot 0, loss): the full-softmax loss of every slot.

        Slot 0 predicts the example's target, slot i >= 1 the item at slot
        i - 1 (the one consumed right after it), each from the user vector of
        the history as it stood (slots i.., the transformer is causal) and
        ranked without the items consumed before it (exclude_seen)."""
        mask = history_rows > 0
        inputs = {
            "text_vector": self.text_vectors(batch, training=training),
            "history_embeddings": tf.gather(table, history_rows),
            "history_mask": mask,
        }
        if self.user_id_buckets > 0:
            inputs["user_id"] = batch[features.USER_ID]
        users = self.user_tower.sequence_outputs(inputs, training=training)  # [B, H, d]
        slot_targets = tf.concat([target_rows[:, None], history_rows[:, :-1]], axis=1)  # [B, H]
        # Slot 0 trains whenever the target is known (an empty history: the text-only user).
        valid = tf.concat([target_rows[:, None] > 0, tf.logical_and(mask[:, 1:], slot_targets[:, 1:] > 0)], axis=1)
        where = tf.where(valid)  # [M, 2]: (example, slot)
        ex_index, slot = tf.cast(where[:, 0], tf.int32), tf.cast(where[:, 1], tf.int32)
        flat_users = tf.gather_nd(users, where)
        flat_targets = tf.gather_nd(slot_targets, where)
        hist = tf.gather(history_rows, ex_index)  # [M, H]
        before = tf.range(tf.shape(hist)[1])[None, :] >= slot[:, None]  # consumed before the slot's target
        logits = self._catalog_logits(flat_users, table, flat_targets, tf.where(before, hist, tf.zeros_like(hist)))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=flat_targets - 1, logits=logits)
        if weights is not None:
            ce = ce * tf.gather(weights, ex_index)
        loss = tf.reduce_sum(ce) / tf.maximum(tf.cast(tf.shape(ce)[0], tf.float32), 1.0)
        return users[:, 0, :], loss

    @property
    def metrics(self):
        return [self.loss_tracker, self.retrieval_tracker, self.cluster_tracker, self.balance_tracker]

    def _track(self, losses: dict) -> dict:
        self.loss_tracker.update_state(losses["loss"])
        self.retrieval_tracker.update_state(losses["retrieval_loss"])
        self.cluster_tracker.update_state(losses["cluster_loss"])
        self.balance_tracker.update_state(losses["balance"])
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        # fit() yields the batch dict itself; train_on_batch packs it as (x,).
        data, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            losses = self.compute_losses(data, training=True)
            # Replicas' gradients are summed: each contributes its mean / replicas.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(losses["loss"] / float(replicas))
        grads = tape.gradient(scaled, variables)
        # The user-id embedding or the unused BERT pooler get no gradient.
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        self.optimizer.apply_gradients(pairs)
        self.segment_head.renormalize()
        return self._track(losses)

    def test_step(self, data):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._track(self.compute_losses(data, training=False))

    # --- segments --------------------------------------------------------------------
    def with_num_segments(self, num_segments: int) -> "SegRecModel":
        """A copy with K = num_segments and the same tower/encoder weights
        (for `--num-segments auto`: warm up, choose_k, then continue)."""
        config = self.get_config()
        config["num_segments"] = int(num_segments)
        clone = type(self).from_config(config)
        clone.item_tower.set_weights(self.item_tower.get_weights())
        clone.user_tower.set_weights(self.user_tower.get_weights())
        if self.text_encoder is not None:
            clone.text_encoder.set_weights(self.text_encoder.get_weights())
        clone.sampling_probability.assign(self.sampling_probability)
        if self.item_prior != "none":
            clone.item_bias.assign(self.item_bias)
        return clone

    def with_text_encoder(self, encoder: TextEncoder) -> "SegRecModel":
        """A copy that reads user_text through `encoder` (e.g. a quantised copy
        of this model's, for export) and shares nothing else: towers, segment
        head and logQ table hold copies of this model's weights."""
        config = self.get_config()
        config["text_encoder"] = encoder
        clone = type(self).from_config(config)
        for part in ("item_tower", "user_tower", "segment_head"):
            getattr(clone, part).set_weights(getattr(self, part).get_weights())
        clone.sampling_probability.assign(self.sampling_probability)
        if self.item_prior != "none":
            clone.item_bias.assign(self.item_bias)
        if self.item_prior == "segment":
            clone.segment_bias.assign(self.segment_bias)
        clone.cluster_weight.assign(self.cluster_weight)
        return clone

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "item_ids": self.item_ids,
                "num_categories": self.num_categories,
                "max_categories": self.max_categories,
                "max_text_tokens": self.max_text_tokens,
                "text_buckets": self.text_buckets,
                "embedding_dim": self.embedding_dim,
                "item_id_dim": self.item_id_dim,
                "category_dim": self.category_dim,
                "item_text_dim": self.item_text_dim,
                "text_input_dim": self.text_input_dim,
                "user_text_dim": self.user_text_dim,
                "user_hidden_units": self.user_hidden_units,
                "user_id_buckets": self.user_id_buckets,
                "user_id_dim": self.user_id_dim,
                "num_segments": self.num_segments,
                "segment_temperature": self.segment_temperature,
                "balance_weight": self.balance_weight,
                "alpha": self.alpha,
                "retrieval_temperature": self.retrieval_temperature,
                "remove_accidental_hits": self.remove_accidental_hits,
                "logq_correction": self.logq_correction,
                "history_encoder": self.history_encoder,
                "max_history": self.max_history,
                "history_layers": self.history_layers,
                "history_heads": self.history_heads,
                "history_dropout": self.history_dropout,
                "empty_history_rate": self.empty_history_rate,
                "loss": self.loss_kind,
                "exclude_seen": self.exclude_seen,
                "item_prior": self.item_prior,
                "cold_query": self.cold_query,
                "positions": self.positions,
                "use_text": self.use_text,
                "sampled_negatives": self.sampled_negatives,
                "finetune_layers": self.finetune_layers,
                "text_encoder": (
                    None
                    if self.text_encoder is None
                    else keras.saving.serialize_keras_object(self.text_encoder)
                ),
                "mixed_precision": self.mixed_precision,
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("text_encoder") is not None and isinstance(config["text_encoder"], dict):
            # safe_mode=False: the pretrained encoder's tokenizer reads its
            # vocabulary from the installed package (or a preset dir the user
            # named), which Keras' safe mode refuses as "outside the archive".
            config["text_encoder"] = keras.saving.deserialize_keras_object(config["text_encoder"], safe_mode=False)
        return cls(**config)
