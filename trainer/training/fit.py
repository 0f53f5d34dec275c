"""The fit loop: optional retrieval-only warm-up, k-means init of the segment
centroids, then joint training with Recall@K early stopping.

Run dirs, checkpoint files and the CLI live elsewhere; pass their callbacks in.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features
from trainer.model.segment_head import choose_k
from trainer.model.segrec_model import SegRecModel


def collect_user_embeddings(model: SegRecModel, dataset: tf.data.Dataset, max_batches: Optional[int] = None) -> np.ndarray:
    """u [N, d] for the examples of `dataset` (inference mode)."""
    fn = tf.function(lambda b: model.user_embedding(b, training=False)[0], reduce_retracing=True)
    out = []
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        out.append(fn(batch).numpy())
    if not out:
        raise ValueError("the dataset yielded no batches to collect user embeddings from")
    return np.concatenate(out, axis=0)


def recall_at_k(
    model: SegRecModel,
    dataset: tf.data.Dataset,
    k: int = 10,
    beta: float = 0.0,
    exclude_history: bool = True,
    max_batches: Optional[int] = None,
) -> float:
    """Weighted Recall@K of the positives by brute force over the catalog.

    Each query scores all N items (q . E^T); the user's history items are
    excluded (seen-item exclusion as in serving). A positive unknown to the
    catalog counts as a miss.
    """
    fn = _hits_fn(model, k, float(beta), bool(exclude_history))
    total_hits, total = 0.0, 0.0
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        h, w = fn(batch)
        total_hits += float(h)
        total += float(w)
    return total_hits / total if total else 0.0


# One traced function per (model, k, beta, exclude): building a new
# tf.function each epoch would retrace every time.
_HITS_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _hits_fn(model: SegRecModel, k: int, beta: float, exclude_history: bool):
    cache = _HITS_FNS.setdefault(model, {})
    key = (k, beta, exclude_history)
    if key in cache:
        return cache[key]

    @tf.function(reduce_retracing=True)
    def hits(batch):
        items = model.item_embeddings()  # [N, d]
        kk = tf.minimum(k, tf.shape(items)[0])
        q = model(batch, training=False, beta=beta)[features.QUERY]
        scores = tf.matmul(q, items, transpose_b=True)  # [B, N]
        if exclude_history:
            rows = model.item_tower.rows(batch[features.HISTORY_ITEM_IDS]) - 1  # [B, H]
            idx = tf.where(rows >= 0)  # [M, 2] (b, h)
            cols = tf.gather_nd(rows, idx)
            scatter = tf.stack([idx[:, 0], tf.cast(cols, tf.int64)], axis=1)
            scores = tf.tensor_scatter_nd_update(
                scores, scatter, tf.fill([tf.shape(scatter)[0]], tf.float32.min)
            )
        top = tf.math.top_k(scores, k=kk).indices  # [B, k]
        target = model.item_tower.rows(batch[features.ITEM_ID]) - 1
        hit = tf.reduce_any(tf.equal(top, target[:, None]), axis=1) & (target >= 0)
        w = tf.cast(batch.get(features.WEIGHT, tf.ones_like(target, tf.float32)), tf.float32)
        return tf.reduce_sum(tf.cast(hit, tf.float32) * w), tf.reduce_sum(w)

    cache[key] = hits
    return hits


class RecallAtK(keras.callbacks.Callback):
    """Adds `val_recall_at_{k}` to the epoch logs (for EarlyStopping/checkpoints)."""

    def __init__(self, eval_ds: tf.data.Dataset, k: int = 10, beta: float = 0.0, max_batches: Optional[int] = None):
        super().__init__()
        self.eval_ds = eval_ds
        self.k = k
        self.beta = beta
        self.max_batches = max_batches

    @property
    def monitor(self) -> str:
        return f"val_recall_at_{self.k}"

    def on_epoch_end(self, epoch, logs=None):
        value = recall_at_k(self.model, self.eval_ds, self.k, self.beta, max_batches=self.max_batches)
        if logs is not None:
            logs[self.monitor] = value


def choose_segments(
    model: SegRecModel,
    dataset: tf.data.Dataset,
    k_range: tuple[int, int] = (2, 12),
    max_batches: Optional[int] = 50,
    seed: Optional[int] = 0,
) -> tuple[int, list[tuple[int, float]]]:
    """`--num-segments auto`: (best K, [(k, silhouette)]) on the model's user
    embeddings. Follow with `model.with_num_segments(best_k)`."""
    return choose_k(collect_user_embeddings(model, dataset, max_batches), k_range, seed=seed)


def init_segments(model: SegRecModel, train_ds: tf.data.Dataset, batches: Optional[int] = 50) -> np.ndarray:
    """Sets the centroids to k-means of user embeddings from `batches` batches.

    Returns the embeddings used (for choose_k / plots).
    """
    u = collect_user_embeddings(model, train_ds, max_batches=batches)
    model.segment_head.init_centroids(u)
    return u


def fit(
    model: SegRecModel,
    train_ds: tf.data.Dataset,
    eval_ds: Optional[tf.data.Dataset] = None,
    epochs: int = 1,
    steps_per_epoch: Optional[int] = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    warmup_epochs: int = 0,
    init_batches: Optional[int] = 50,
    recall_k: Optional[int] = 10,
    patience: Optional[int] = None,
    verbose="auto",
) -> dict:
    """Trains a compiled model; returns the merged history {metric: [per epoch]}.

    1. `warmup_epochs` of retrieval only (clustering weight 0), so the
       embeddings mean something before they are clustered;
    2. centroids := k-means of the user embeddings (`init_batches` batches);
    3. `epochs` more epochs with the clustering loss at `model.alpha`,
       validating on `eval_ds`; with `recall_k` the logs get
       val_recall_at_{k}, and with `patience` training stops when it stops
       improving (best weights restored).
    """
    if model.optimizer is None:
        raise ValueError("compile the model (model.compile(optimizer)) before fit()")
    history: dict[str, list] = {}

    def merge(h):
        for key, values in h.history.items():
            history.setdefault(key, []).extend(values)

    if warmup_epochs > 0:
        model.cluster_weight.assign(0.0)
        merge(
            model.fit(
                train_ds, epochs=warmup_epochs, steps_per_epoch=steps_per_epoch, shuffle=False, verbose=verbose
            )
        )
    if init_batches != 0:
        init_segments(model, train_ds, batches=init_batches)
    model.cluster_weight.assign(model.alpha)

    cbs = []
    if eval_ds is not None and recall_k:
        recall = RecallAtK(eval_ds, k=recall_k)
        cbs.append(recall)
        if patience is not None:
            cbs.append(
                keras.callbacks.EarlyStopping(
                    monitor=recall.monitor, mode="max", patience=patience, restore_best_weights=True
                )
            )
    cbs.extend(callbacks)
    merge(
        model.fit(
            train_ds,
            validation_data=eval_ds,
            epochs=warmup_epochs + epochs,
            initial_epoch=warmup_epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=cbs,
            shuffle=False,  # tf.data shuffles; Keras would only warn
            verbose=verbose,
        )
    )
    return history
