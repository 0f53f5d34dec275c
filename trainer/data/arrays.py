"""A dataset dir's splits as plain numpy arrays, for evaluation and profiling.

Full-catalog evaluation, the baselines and segment profiles work on integer
indices; this module reads the TFRecords once and maps string ids onto the
catalog's item order (trainer.data.tf_dataset.Catalog) and a user index.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401
from trainer import features


@dataclasses.dataclass(frozen=True)
class SplitArrays:
    """One split: Q examples.

    user_ids [Q] str; item_ids [Q] str (targets); timestamps [Q] int64;
    histories: list of Q lists of item ids (most recent first); user_texts [Q] str.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    histories: list
    user_texts: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)

    def batch_dict(self, rows: Sequence[int], max_history: int = features.MAX_HISTORY) -> dict:
        """A model input batch for `rows` (history padded with PAD_ITEM_ID)."""
        rows = list(rows)
        hist = np.full((len(rows), max_history), features.PAD_ITEM_ID, dtype=object)
        for i, r in enumerate(rows):
            h = self.histories[r][:max_history]
            hist[i, : len(h)] = h
        return {
            features.USER_ID: tf.constant(self.user_ids[rows].astype(str)),
            features.USER_TEXT: tf.constant(self.user_texts[rows].astype(str)),
            features.HISTORY_ITEM_IDS: tf.constant(hist.astype(str)),
            features.ITEM_ID: tf.constant(self.item_ids[rows].astype(str)),
        }


def load_split(dataset_dir: str, split: str, batch_size: int = 4096) -> SplitArrays:
    pattern = {"train": features.TRAIN_PATTERN, "eval": features.EVAL_PATTERN}[split]
    files = sorted(tf.io.gfile.glob(dataset_dir.rstrip("/") + "/" + pattern))
    if not files:
        raise FileNotFoundError(f"{dataset_dir}: no {pattern} files; run `segrec preprocess` first")
    users, items, times, hists, texts = [], [], [], [], []
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size)
    spec = features.example_feature_spec()
    for raw in ds:
        p = tf.io.parse_example(raw, spec)
        users.append(p[features.USER_ID].numpy())
        items.append(p[features.ITEM_ID].numpy())
        times.append(p[features.TIMESTAMP].numpy())
        texts.append(p[features.USER_TEXT].numpy())
        hists += [[h.decode() for h in row] for row in p[features.HISTORY_ITEM_IDS].to_list()]
    dec = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])

    def cat(parts, dtype=None):
        return np.concatenate(parts) if parts else np.array([], dtype=dtype or object)

    u, i, t, x = cat(users), cat(items), cat(times, np.int64), cat(texts)
    # Sort for determinism: shards come back in whatever order the runner wrote them.
    order = np.lexsort((dec(i) if len(i) else i, t, dec(u) if len(u) else u)) if len(u) else np.array([], dtype=int)
    return SplitArrays(
        user_ids=(dec(u) if len(u) else u)[order],
        item_ids=(dec(i) if len(i) else i)[order],
        timestamps=t[order].astype(np.int64),
        histories=[hists[k] for k in order],
        user_texts=(dec(x) if len(x) else x)[order],
    )


def load_users(dataset_dir: str) -> dict:
    """user_id -> {attribute: value} from users.jsonl (empty when absent)."""
    path = dataset_dir.rstrip("/") + "/" + features.USERS_FILE
    if not tf.io.gfile.exists(path):
        return {}
    out = {}
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                uid = row.pop("user_id")
                out[uid] = {k: str(v) for k, v in row.items()}
    return out


def item_index(item_ids: Sequence[str]) -> dict:
    return {item: i for i, item in enumerate(item_ids)}


def train_items_by_user(train: SplitArrays) -> dict:
    """user_id -> set of item ids the user interacted with in the training period."""
    out: dict = {}
    for u, i, h in zip(train.user_ids, train.item_ids, train.histories):
        s = out.setdefault(u, set())
        s.add(i)
        s.update(h)
    return out


def latest_per_user(split: SplitArrays) -> np.ndarray:
    """Row of each user's latest example in `split` (ties: the later row)."""
    last = {}
    for r, (u, t) in enumerate(zip(split.user_ids, split.timestamps)):
        if u not in last or t >= split.timestamps[last[u]]:
            last[u] = r
    return np.array(sorted(last.values()), dtype=np.int64)


def snapshot_rows(eval_split: SplitArrays, train_split: SplitArrays) -> tuple:
    """One row per user: the latest eval example, else the latest train example.

    The eval example's query carries the user's whole training history, so it
    is the user "as of now". Returns (user_ids [U], eval_rows, train_rows),
    the users of eval_rows first.
    """
    ev_rows = latest_per_user(eval_split)
    have = set(eval_split.user_ids[ev_rows])
    tr_rows = np.array([r for r in latest_per_user(train_split) if train_split.user_ids[r] not in have], np.int64)
    users = np.concatenate([eval_split.user_ids[ev_rows], train_split.user_ids[tr_rows]])
    return np.asarray(users, object), ev_rows, tr_rows


def load_truth(path: str) -> dict:
    """user_id -> planted segment from a generator's segments_truth.csv."""
    import csv

    with tf.io.gfile.GFile(path) as f:
        return {row["user_id"]: int(row["segment"]) for row in csv.DictReader(f)}


def truth_path_for(dataset_dir: str) -> Optional[str]:
    """segments_truth.csv beside the raw interactions the dataset came from, if any."""
    meta_path = dataset_dir.rstrip("/") + "/" + features.METADATA_FILE
    if not tf.io.gfile.exists(meta_path):
        return None
    with tf.io.gfile.GFile(meta_path) as f:
        meta = json.load(f)
    for src in meta.get("source", {}).get("inputs", []):
        if src.get("kind") == "interactions":
            candidate = src["path"].rsplit("/", 1)[0] + "/segments_truth.csv"
            if tf.io.gfile.exists(candidate):
                return candidate
    return None
