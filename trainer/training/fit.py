"""The fit loop: optional retrieval-only warm-up, k-means init of the segment
centroids, then joint training with early stopping on the validation
split's Recall@K or NDCG@10; train-time ranking metrics and the beta grid.

Run dirs, checkpoint files and the CLI live elsewhere; pass their callbacks in.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features
from trainer.data import arrays as da
from trainer.data import candidates as candidates_lib
from trainer.data import examples as ex
from trainer.model.batched_outputs import model_outputs
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


def validation_ranks(
    model: SegRecModel,
    queries: da.RankedQueries,
    beta: float = 0.0,
    text_cache=None,
    batch_size: int = 512,
) -> np.ndarray:
    """1-based ranks of the targets of `queries`' main queries, exactly as
    `segrec evaluate` ranks them.

    Full catalog (the model's item order must be the one `queries` was built
    on), minus what the dataset's repeat rule removes from each query
    (`queries.candidates`, from trainer.data.candidates); under "exclude" the
    queries whose target the user already consumed are not ranked. Ties are
    pessimistic (trainer.data.candidates.target_ranks, which evaluate uses too).
    Returns [M] float64, M = queries.candidates.main.sum(), in query order.
    """
    main = np.flatnonzero(queries.candidates.main)
    if not main.size:
        return np.zeros(0, np.float64)
    q = model_outputs(model, queries.split, queries.rows[main], beta, text_cache, batch_size)[features.QUERY]
    items = np.asarray(model.item_embeddings(), np.float32)  # [N, d]
    item_t = np.ascontiguousarray(items.T)
    out = []
    for start in range(0, main.size, batch_size):
        rows = main[start:start + batch_size]
        scores = q[start:start + batch_size] @ item_t  # [b, N]
        mask = candidates_lib.candidate_mask([queries.candidates.exclude[r] for r in rows], items.shape[0])
        targets = queries.targets[rows]
        mask[np.arange(rows.size), targets] = True  # the target is always a candidate of its own query
        out.append(candidates_lib.target_ranks(scores, targets, mask))
    return np.concatenate(out)


def parse_selection_metric(metric: str) -> tuple:
    """("recall", K) or ("ndcg", 10) from "recall@K" / "ndcg@10": the validation
    measure that picks the epoch, beta and (in evaluate) every baseline's
    hyper-parameters. NDCG is cut at 10 only, as evaluate reports it."""
    name, _, k = str(metric).partition("@")
    if name in ("recall", "ndcg") and k.isdigit() and int(k) >= 1 and (name == "recall" or int(k) == 10):
        return name, int(k)
    raise ValueError(f"the selection metric must be recall@K (K >= 1) or ndcg@10, got {metric!r}")


def metric_from_ranks(ranks: np.ndarray, metric: str) -> float:
    """recall@K = share of ranks <= K; ndcg@K = mean(1/log2(rank+1) for ranks <= K, else 0)
    (one relevant item per query, ideal DCG 1), as `segrec evaluate` computes them. 0.0 for no ranks."""
    name, k = parse_selection_metric(metric)
    if not ranks.size:
        return 0.0
    if name == "recall":
        return float(np.mean(ranks <= k))
    return float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))


def validation_metric(
    model: SegRecModel,
    queries: da.RankedQueries,
    metric: str = "recall@10",
    beta: float = 0.0,
    text_cache=None,
    batch_size: int = 512,
) -> float:
    """`metric` (recall@K or ndcg@10) of the validation queries, ranked by
    `validation_ranks`: the number `segrec evaluate` would report for this split."""
    return metric_from_ranks(validation_ranks(model, queries, beta, text_cache, batch_size), metric)


def recall_at_k(
    model: SegRecModel,
    queries: da.RankedQueries,
    k: int = 10,
    beta: float = 0.0,
    text_cache=None,
    batch_size: int = 512,
) -> float:
    """Recall@K of the validation queries: the share of main queries whose
    target ranks in the top K (`validation_ranks`); the number `segrec
    evaluate` would report for this split. 0.0 with no main queries."""
    return validation_metric(model, queries, f"recall@{k}", beta, text_cache, batch_size)


class ValidationMetric(keras.callbacks.Callback):
    """Adds `val_recall_at_{k}` or `val_ndcg_at_10` (validation split, repeat
    rule applied) to the epoch logs, for EarlyStopping and the best checkpoint."""

    def __init__(self, queries: da.RankedQueries, metric: str = "recall@10", beta: float = 0.0, text_cache=None,
                 batch_size: int = 512):
        super().__init__()
        if queries.split_name == ex.EVAL:
            raise ValueError("train-time selection runs on the validation split, never on test (eval)")
        parse_selection_metric(metric)
        self.queries = queries
        self.metric = metric
        self.beta = beta
        self.text_cache = text_cache
        self.batch_size = batch_size

    @property
    def monitor(self) -> str:
        return "val_" + self.metric.replace("@", "_at_")

    def on_epoch_end(self, epoch, logs=None):
        value = validation_metric(self.model, self.queries, self.metric, self.beta, self.text_cache, self.batch_size)
        if logs is not None:
            logs[self.monitor] = value


class RecallAtK(ValidationMetric):
    """ValidationMetric("recall@K"): adds `val_recall_at_{k}` to the epoch logs."""

    def __init__(self, queries: da.RankedQueries, k: int = 10, beta: float = 0.0, text_cache=None,
                 batch_size: int = 512):
        super().__init__(queries, f"recall@{k}", beta, text_cache, batch_size)
        self.k = k


def choose_beta(model: SegRecModel, queries: da.RankedQueries, grid, metric: str = "recall@50", text_cache=None,
                batch_size: int = 512) -> tuple:
    """(best beta, [(beta, metric)]) over `grid` on the validation queries;
    `metric` is "recall@K" or "ndcg@10". Ties go to the smaller beta."""
    if queries.split_name == ex.EVAL:
        raise ValueError("beta is chosen on the validation split, never on test (eval)")
    curve = [(float(b), validation_metric(model, queries, metric, float(b), text_cache, batch_size))
             for b in sorted(grid)]
    best = max(curve, key=lambda bv: (bv[1], -bv[0]))[0]
    return best, curve


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
    valid_ds: Optional[tf.data.Dataset] = None,
    epochs: int = 1,
    steps_per_epoch: Optional[int] = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    warmup_epochs: int = 0,
    init_batches: Optional[int] = 50,
    recall_k: Optional[int] = 10,
    patience: Optional[int] = None,
    verbose="auto",
    valid_queries: Optional[da.RankedQueries] = None,
    text_cache=None,
    beta: float = 0.0,
    select_metric: Optional[str] = None,
) -> dict:
    """Trains a compiled model; returns the merged history {metric: [per epoch]}.

    1. `warmup_epochs` of retrieval only (clustering weight 0), so the
       embeddings mean something before they are clustered;
    2. centroids := k-means of the user embeddings (`init_batches` batches);
    3. `epochs` more epochs with the clustering loss at `model.alpha`;
       `valid_ds` (the validation split's batches) gives val_loss, and with
       `valid_queries` (da.load_queries of the validation split) and
       `recall_k` the logs get val_recall_at_{k} (or, with `select_metric`
       "ndcg@10", val_ndcg_at_10); with `patience` training stops when it
       stops improving (best weights restored).
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
    if valid_queries is not None and (recall_k or select_metric):
        recall = ValidationMetric(valid_queries, select_metric or f"recall@{recall_k}", beta=beta,
                                  text_cache=text_cache)
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
            validation_data=valid_ds,
            epochs=warmup_epochs + epochs,
            initial_epoch=warmup_epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=cbs,
            shuffle=False,  # tf.data shuffles; Keras would only warn
            verbose=verbose,
        )
    )
    return history
