"""A trained SegRecModel's outputs over a dataset dir's rows, in batches.

One batched inference path for everything that needs the model's user-side
outputs offline: training's segment profiles, `segrec evaluate`, and the
segment report. Cached text vectors (the run's text_cache.npz) stand in for
the frozen encoder where they cover a batch.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features
from trainer.data import arrays as da
from trainer.model.text_encoder import TextCache

_LOG = logging.getLogger(__name__)


# One traced inference function per model, beta a scalar tensor input:
# train-time recall calls model_outputs every epoch and for every beta of the grid.
_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _inference_fn(model):
    if model not in _CALLS:
        _CALLS[model] = tf.function(lambda batch, beta: model(batch, training=False, beta=beta), reduce_retracing=True)
    return _CALLS[model]


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
        # Expected for test queries: `segrec train` caches the train and valid texts only, it never reads test.
        _LOG.info("%d user text(s) are not in the run's text cache; their batches run the encoder", len(missing))
    fn, beta_t = _inference_fn(model), tf.constant(float(beta), tf.float32)
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
        out = fn(batch, beta_t)
        for k in keys:
            parts[k].append(out[k].numpy())
    if not len(rows):
        k = model.num_segments
        d = model.embedding_dim
        return {features.EMBEDDING: np.zeros((0, d), np.float32), features.QUERY: np.zeros((0, d), np.float32),
                features.SEGMENT_ID: np.zeros(0, np.int32), features.SEGMENT_PROBS: np.zeros((0, k), np.float32)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def user_snapshot(model, dataset_dir: str, cache: Optional[TextCache], beta: float, batch: int = 512,
                  splits=(features.EVAL_PREFIX, features.VALID_PREFIX, features.TRAIN_PREFIX)):
    """One row per user (arrays.snapshot_rows over `splits`, newest period
    first; a split the dataset dir lacks is skipped): user ids [U],
    embeddings [U, d], segment ids [U], probs [U, K], and the train split.
    `segrec train` passes (valid, train): it never reads the test split."""
    present = [s for s in splits
               if s == features.TRAIN_PREFIX or tf.io.gfile.glob(dataset_dir.rstrip("/") + "/" + features.SPLIT_PATTERNS[s])]
    loaded = {s: da.load_split(dataset_dir, s) for s in present}
    train_split = loaded[features.TRAIN_PREFIX] if features.TRAIN_PREFIX in loaded else \
        da.load_split(dataset_dir, features.TRAIN_PREFIX)
    user_ids, rows = da.snapshot_rows(*(loaded[s] for s in present))
    outs = [model_outputs(model, loaded[s], r, beta, cache, batch) for s, r in zip(present, rows) if len(r)]

    def cat(key):
        return np.concatenate([o[key] for o in outs])

    return user_ids, cat(features.EMBEDDING), cat(features.SEGMENT_ID), cat(features.SEGMENT_PROBS), train_split
