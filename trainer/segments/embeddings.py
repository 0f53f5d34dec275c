"""User embeddings with their segments, as the segment report and the refresh exchange them.

`segrec segments refresh` writes a sample of the window's user embeddings as
embeddings.npz (user_ids [U], embeddings [U, d], labels [U], previous_labels
[U]); `segrec segments report --embeddings` reads that, any .npz with
user_ids + embeddings (labels assigned from the segments.json's centroids),
or a run dir, whose user snapshot is computed with the run's model.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Optional

import numpy as np

from trainer.segments import document, drift

EMBEDDINGS_NPZ = "embeddings.npz"  # what `segrec segments refresh` writes


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
    """User embeddings with their segments.

    user_ids [U] str; embeddings [U, d]; labels [U] segment per user (the
    current segmentation); previous_labels [U] segment in the previous window
    (-1 where the user was absent) or None; source: where they came from.
    """

    user_ids: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    previous_labels: Optional[np.ndarray] = None
    source: str = ""

    def __post_init__(self):
        n = len(self.user_ids)
        if np.asarray(self.embeddings).ndim != 2 or len(self.embeddings) != n or len(self.labels) != n:
            raise ValueError(f"{self.source or 'embeddings'}: user_ids ({n}), embeddings "
                             f"{np.shape(self.embeddings)} and labels ({len(self.labels)}) disagree")
        if self.previous_labels is not None and len(self.previous_labels) != n:
            raise ValueError(f"{self.source or 'embeddings'}: previous_labels has {len(self.previous_labels)} entries, not {n}")


def save_embeddings(path: str, emb: EmbeddingSet) -> None:
    """The .npz `load_embeddings` reads (keys user_ids, embeddings, labels[, previous_labels])."""
    import tensorflow as tf

    arrays = {"user_ids": np.asarray(emb.user_ids, dtype=str), "embeddings": np.asarray(emb.embeddings, np.float32),
              "labels": np.asarray(emb.labels, np.int64)}
    if emb.previous_labels is not None:
        arrays["previous_labels"] = np.asarray(emb.previous_labels, np.int64)
    buf = io.BytesIO()  # zipfile seeks; GFile (gs://) cannot while writing
    np.savez_compressed(buf, **arrays)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buf.getvalue())


def load_embeddings(path: str, segments_doc: Optional[dict] = None) -> EmbeddingSet:
    """Embeddings from a .npz, a refresh output dir (its embeddings.npz) or a `segrec train` run dir.

    A .npz needs user_ids and embeddings; without labels (or segment_id) the
    users are assigned to the nearest centroid of `segments_doc`. A run dir's
    user snapshot (one row per user, as `segrec train` profiles them) is
    computed with the run's model - it loads TensorFlow and takes seconds.
    """
    import tensorflow as tf

    from trainer.model import run_dir as rd

    if tf.io.gfile.isdir(path):
        if tf.io.gfile.exists(rd.path(path, EMBEDDINGS_NPZ)):
            return load_embeddings(rd.path(path, EMBEDDINGS_NPZ), segments_doc)
        if tf.io.gfile.exists(rd.path(path, rd.MODEL_CONFIG)):
            return run_snapshot(path)
        raise FileNotFoundError(f"{path}: neither a refresh output ({EMBEDDINGS_NPZ}) nor a `segrec train` run dir")
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: embeddings must be an .npz file, a refresh output dir or a run dir")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
    for key in ("user_ids", "embeddings"):
        if key not in data:
            raise ValueError(f"{path}: no '{key}' array (has {sorted(data)})")
    labels = data.get("labels", data.get("segment_id"))
    if labels is None:
        if segments_doc is None:
            raise ValueError(f"{path}: no 'labels' array and no segments.json to assign users with")
        labels, _ = drift.assign(data["embeddings"], document.centroids(segments_doc))
    return EmbeddingSet(data["user_ids"].astype(str), np.asarray(data["embeddings"], np.float32),
                        np.asarray(labels, np.int64), data.get("previous_labels"), source=path)


def run_snapshot(run_dir: str) -> EmbeddingSet:
    from trainer.model import run_dir as rd
    from trainer.model.batched_outputs import user_snapshot

    run = rd.load_run(run_dir)
    user_ids, emb, seg, _, _ = user_snapshot(run.model, run.dataset_dir, run.text_cache,
                                                   float(run.train_config.get("beta", 0.0)))
    return EmbeddingSet(np.asarray(user_ids, dtype=str), emb, np.asarray(seg, np.int64), source=run_dir)
