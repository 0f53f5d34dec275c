"""The run dir `segrec train` writes and every later step reads.

    <run_dir>/
      train_config.json     the TrainConfig of the run
      model_config.json     SegRecModel.get_config() (architecture + item ids)
      model.weights.h5      the trained (best) weights
      text_cache.npz        frozen-encoder outputs per distinct user_text
      checkpoints/          per-phase backups for resume after interruption
      tensorboard/          TensorBoard logs
      metrics.json          per-epoch history, final eval metrics, throughput
      segments.json         centroids and per-segment profiles
      model_card.md         what was trained on what, and how well it did

All I/O goes through tf.io.gfile so a run dir can live on gs://.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Optional

import tensorflow as tf

import trainer  # noqa: F401
from trainer.contracts import MODEL_CARD, SEGMENTS_FILE  # noqa: F401  (run-dir names)

TRAIN_CONFIG = "train_config.json"
MODEL_CONFIG = "model_config.json"
WEIGHTS = "model.weights.h5"
TEXT_CACHE = "text_cache.npz"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
METRICS = "metrics.json"
SEGMENTS = SEGMENTS_FILE  # written by trainer/segments/document.py
SEGMENT_SWEEP = "segment_sweep.json"


def path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, name) if "://" not in run_dir else run_dir.rstrip("/") + "/" + name


def write_json(file_path: str, obj) -> None:
    tf.io.gfile.makedirs(os.path.dirname(file_path) or ".")
    with tf.io.gfile.GFile(file_path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(file_path: str):
    with tf.io.gfile.GFile(file_path) as f:
        return json.load(f)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_weights(model, file_path: str) -> None:
    """Keras 3 writes .weights.h5 to local files only; stage gs:// through a temp file."""
    if "://" not in file_path:
        tf.io.gfile.makedirs(os.path.dirname(file_path) or ".")
        model.save_weights(file_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(file_path))
        model.save_weights(local)
        tf.io.gfile.copy(local, file_path, overwrite=True)


def load_weights(model, file_path: str) -> None:
    if "://" not in file_path:
        model.load_weights(file_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(file_path))
        tf.io.gfile.copy(file_path, local, overwrite=True)
        model.load_weights(local)


def save_model(run_dir: str, model) -> None:
    """model_config.json + model.weights.h5."""
    write_json(path(run_dir, MODEL_CONFIG), model.get_config())
    save_weights(model, path(run_dir, WEIGHTS))


@dataclasses.dataclass
class TrainedRun:
    """A trained model and what it was trained with, loaded from a run dir."""

    run_dir: str
    model: object  # trainer.model.segrec_model.SegRecModel
    train_config: dict
    text_cache: Optional[object]  # trainer.model.text_encoder.TextCache or None
    segments: Optional[dict]

    @property
    def dataset_dir(self) -> str:
        return self.train_config["dataset_dir"]


def load_model(run_dir: str, weights: Optional[str] = None):
    """SegRecModel rebuilt from model_config.json with the run's weights."""
    from trainer.model.segrec_model import SegRecModel

    cfg_path = path(run_dir, MODEL_CONFIG)
    if not tf.io.gfile.exists(cfg_path):
        raise FileNotFoundError(f"{run_dir}: no {MODEL_CONFIG}; is this a `segrec train` run dir?")
    model = SegRecModel.from_config(read_json(cfg_path))
    load_weights(model, weights or path(run_dir, WEIGHTS))
    return model


def load_run(run_dir: str) -> TrainedRun:
    """Everything evaluate/export need from a finished run."""
    from trainer.model.text_encoder import TextCache

    if not tf.io.gfile.exists(path(run_dir, WEIGHTS)):
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS}; the run has not finished training")
    model = load_model(run_dir)
    cache_path = path(run_dir, TEXT_CACHE)
    cache = TextCache.load(cache_path) if tf.io.gfile.exists(cache_path) else None
    seg_path = path(run_dir, SEGMENTS)
    segments = read_json(seg_path) if tf.io.gfile.exists(seg_path) else None
    return TrainedRun(run_dir, model, read_json(path(run_dir, TRAIN_CONFIG)), cache, segments)
