"""A trained SegRecModel's outputs over a dataset dir's rows, in batches.

One batched inference path for everything that needs the model's user-side
outputs offline: training's segment profiles, `segrec evaluate`, and the
segment report. Cached text vectors (the run's text_cache.npz) stand in for
the frozen encoder where they cover a batch.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features
from trainer.data import arrays as da
from trainer.model.text_encoder import TextCache

_LOG = logging.getLogger(__name__)


def model_outputs(model, split: da.SplitArrays, rows, beta: float, text_cache=None, batch_size: int = 512,
                  progress: bool = False, desc: str = "queries") -> dict:
    """SegRecModel outputs for `rows` of `split`, as numpy arrays.

    Returns {EMBEDDING [R, d], QUERY [R, d], SEGMENT_ID [R], SEGMENT_PROBS [R, K]}.
    Cached text vectors are used where the cache holds the batch's texts; a
    batch with a text the cache lacks goes through the model's own encoder
    (the cache was built over the training run's texts, an evaluation on
    other data may bring new ones).
    """
    rows = np.asarray(rows, np.int64)
    use_cache = text_cache is not None and model.finetune_layers == 0
    missing = set(text_cache.missing(split.user_texts[rows])) if use_cache else set()
    if (missing or text_cache is None) and model.text_encoder is None and model.finetune_layers == 0:
        raise ValueError(
            f"{len(missing) or len(rows)} user text(s) are not in the run's text cache and the model has no "
            "text encoder to encode them; rebuild the run's text_cache.npz over this dataset's texts"
        )
    if missing:
        _LOG.warning("%d eval user text(s) are not in the text cache; their batches run the encoder", len(missing))
    call = tf.function(lambda batch: model(batch, training=False, beta=beta), reduce_retracing=True)
    keys = (features.EMBEDDING, features.QUERY, features.SEGMENT_ID, features.SEGMENT_PROBS)
    parts: dict = {k: [] for k in keys}
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        chunk = rows[start:start + batch_size]
        batch = split.batch_dict(chunk)
        if use_cache and not any(t in missing for t in split.user_texts[chunk]):
            batch[features.USER_TEXT_VECTOR] = text_cache.lookup(batch[features.USER_TEXT])
        out = call(batch)
        for k in keys:
            parts[k].append(out[k].numpy())
    if not len(rows):
        k = model.num_segments
        d = model.embedding_dim
        return {features.EMBEDDING: np.zeros((0, d), np.float32), features.QUERY: np.zeros((0, d), np.float32),
                features.SEGMENT_ID: np.zeros(0, np.int32), features.SEGMENT_PROBS: np.zeros((0, k), np.float32)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def user_snapshot(model, dataset_dir: str, cache: Optional[TextCache], beta: float, batch: int = 512):
    """One row per user (dataset_arrays.snapshot_rows): user ids [U],
    embeddings [U, d], segment ids [U], probs [U, K], and the train split."""
    ev, train_split = da.load_split(dataset_dir, "eval"), da.load_split(dataset_dir, "train")
    user_ids, ev_rows, tr_rows = da.snapshot_rows(ev, train_split)
    outs = [model_outputs(model, split, rows, beta, cache, batch) for split, rows in ((ev, ev_rows), (train_split, tr_rows))
            if len(rows)]

    def cat(key):
        return np.concatenate([o[key] for o in outs])

    return user_ids, cat(features.EMBEDDING), cat(features.SEGMENT_ID), cat(features.SEGMENT_PROBS), train_split
