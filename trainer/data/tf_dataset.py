"""tf.data input: the item catalog and batches of (query, positive) examples.

Reads the dataset dir written by `segrec preprocess` (see ARCHITECTURE.md,
"Dataset dir"). Paths go through `tf.io.gfile`, so `gs://` dirs work too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features
from trainer.data.arrays import missing_validation_message

if TYPE_CHECKING:  # pragma: no cover
    from trainer.model.text_encoder import TextCache

SPLIT_PATTERNS = features.SPLIT_PATTERNS  # "train", "valid", "eval" (the test split)


def _join(*parts: str) -> str:
    # os.path.join keeps gs:// intact; tf.io.gfile understands the result.
    return os.path.join(*parts)


def _read_lines(path: str) -> list[str]:
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} is missing; is this a dataset dir written by `segrec preprocess`?"
        )
    with tf.io.gfile.GFile(path, "r") as f:
        return [line.rstrip("\n") for line in f if line.rstrip("\n")]


def _glob(dataset_dir: str, pattern: str) -> list[str]:
    files = sorted(tf.io.gfile.glob(_join(dataset_dir, pattern)))
    if not files:
        raise FileNotFoundError(
            f"no files match {_join(dataset_dir, pattern)}; run `segrec preprocess` "
            "first or point to the right dataset dir"
        )
    return files


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The item catalog in vocabulary order (row i describes item_ids[i]).

    Attributes:
      item_ids: ids in `vocab/item_ids.txt` order (training frequency first).
      titles, texts: per item, "" where the catalog lacks the item.
      categories: per item, a tuple of category names.
      category_vocab: `vocab/categories.txt`.
      counts: [N] int64, training positives per item (`vocab/item_counts.tsv`).
    """

    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    texts: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]
    category_vocab: tuple[str, ...]
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def sampling_probabilities(self) -> np.ndarray:
        """[N] float32 probability that an item is a positive in the stream.

        In-batch negatives are the batch's positives, so an item shows up as a
        negative with probability proportional to its count: the logQ
        correction subtracts log of this. Counts are floored at 1 so items
        never seen in training do not get log(0).
        """
        c = np.maximum(self.counts.astype(np.float64), 1.0)
        return (c / c.sum()).astype(np.float32)


def load_catalog(dataset_dir: str) -> Catalog:
    """Reads vocab/ and items-*.tfrecord.gz into a Catalog.

    The item vocabulary is authoritative for order; catalog records for ids
    not in the vocabulary are appended (count 0), vocabulary ids without a
    record get empty text.
    """
    item_ids = _read_lines(_join(dataset_dir, features.ITEM_VOCAB))
    category_vocab = _read_lines(_join(dataset_dir, features.CATEGORY_VOCAB))
    counts_by_id: dict[str, int] = {}
    for line in _read_lines(_join(dataset_dir, features.ITEM_COUNTS)):
        item_id, _, count = line.partition("\t")
        counts_by_id[item_id] = int(count or 0)

    records: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    files = _glob(dataset_dir, features.ITEMS_PATTERN)
    spec = features.item_feature_spec()
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096)
    for serialized in ds:
        parsed = tf.io.parse_example(serialized, spec)
        ids = parsed[features.ITEM_ID].numpy()
        titles = parsed[features.ITEM_TITLE].numpy()
        texts = parsed[features.ITEM_TEXT].numpy()
        cats = parsed[features.ITEM_CATEGORIES].to_list()
        for i, raw_id in enumerate(ids):
            records[raw_id.decode()] = (
                titles[i].decode(),
                texts[i].decode(),
                tuple(c.decode() for c in cats[i]),
            )

    known = set(item_ids)
    item_ids = item_ids + sorted(i for i in records if i not in known)
    empty = ("", "", ())
    rows = [records.get(i, empty) for i in item_ids]
    return Catalog(
        item_ids=tuple(item_ids),
        titles=tuple(r[0] for r in rows),
        texts=tuple(r[1] for r in rows),
        categories=tuple(r[2] for r in rows),
        category_vocab=tuple(category_vocab),
        counts=np.array([counts_by_id.get(i, 0) for i in item_ids], dtype=np.int64),
    )


def parse_examples(serialized: tf.Tensor, max_history: int = features.MAX_HISTORY) -> dict:
    """Parses a [B] batch of serialized query examples into dense tensors.

    Returns: USER_ID, USER_TEXT, ITEM_ID [B] string; HISTORY_ITEM_IDS
    [B, max_history] string padded with PAD_ITEM_ID (truncated, most recent
    kept); TIMESTAMP [B] int64; WEIGHT [B] float32.
    """
    parsed = tf.io.parse_example(serialized, features.example_feature_spec())
    history = parsed[features.HISTORY_ITEM_IDS]
    parsed[features.HISTORY_ITEM_IDS] = history.to_tensor(
        default_value=features.PAD_ITEM_ID, shape=[None, max_history]
    )
    return parsed


def make_dataset(
    dataset_dir: str,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    seed: Optional[int] = None,
    repeat: bool = False,
    text_cache: Optional["TextCache"] = None,
    shuffle_buffer: int = 10_000,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of query/positive examples of `split` ("train", "valid" or "eval").

    Each element is a dict (see `parse_examples`); with a `text_cache` it also
    holds USER_TEXT_VECTOR [B, hidden] float32, the cached pooled encoder
    output for USER_TEXT. Files are read with a parallel interleave; with a
    seed the order is deterministic.
    """
    if split not in SPLIT_PATTERNS:
        raise ValueError(f"split must be one of {sorted(SPLIT_PATTERNS)}, got {split!r}")
    files = _split_files(dataset_dir, split)
    deterministic = seed is not None or not shuffle
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(parse_examples, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if text_cache is not None:
        def add_vector(batch):
            batch = dict(batch)
            batch[features.USER_TEXT_VECTOR] = text_cache.lookup(batch[features.USER_TEXT])
            return batch

        ds = ds.map(add_vector, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Preprocessing often writes fewer shards than there are workers; shard
    # by element, not by file, under a multi-worker strategy.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _split_files(dataset_dir: str, split: str) -> list[str]:
    if split == features.VALID_PREFIX and not tf.io.gfile.glob(_join(dataset_dir, SPLIT_PATTERNS[split])):
        raise FileNotFoundError(missing_validation_message(dataset_dir))
    return _glob(dataset_dir, SPLIT_PATTERNS[split])


def distinct_user_texts(dataset_dir: str, splits: Optional[Sequence[str]] = None) -> list[str]:
    """Every distinct USER_TEXT of the given splits, sorted (for TextCache).

    splits: None = every split the dataset dir has. `segrec train` passes
    ("train", "valid"): it never reads the test split.
    """
    texts: set[str] = set()
    spec = {features.USER_TEXT: features.example_feature_spec()[features.USER_TEXT]}
    if splits is None:
        splits = [s for s, pat in SPLIT_PATTERNS.items() if tf.io.gfile.glob(_join(dataset_dir, pat))]
    for split in splits:
        files = _split_files(dataset_dir, split)
        ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096)
        for serialized in ds:
            parsed = tf.io.parse_example(serialized, spec)
            texts.update(t.decode() for t in parsed[features.USER_TEXT].numpy())
    return sorted(texts)
