"""A tiny dataset dir with planted user segments, for the model tests.

Three user groups, each buying from its own category of 8 items; the user
text names the group's hobby, so text, history and target all carry the
segment. Everything is seeded; writing takes well under a second.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter

import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features

GROUPS = {
    "outdoor": ["Trail Boots", "Camping Stove", "Tent", "Backpack", "Headlamp", "Rain Jacket", "Compass", "Sleeping Bag"],
    "music": ["Acoustic Guitar", "Drum Kit", "Piano Book", "Violin", "Guitar Strings", "Metronome", "Ukulele", "Microphone"],
    "kitchen": ["Chef Knife", "Frying Pan", "Stock Pot", "Cutting Board", "Spatula", "Blender", "Kettle", "Whisk"],
}
FIXTURE_TEXT_HISTORY = 5  # titles folded into these fixtures' user texts (preprocess --text-history 5)
PROFILES = {
    "outdoor": "loves hiking and camping",
    "music": "plays guitar in a band",
    "kitchen": "cooks dinner every day",
}


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))


def example(user_id, user_text, history, item_id, timestamp=0, weight=1.0) -> tf.train.Example:
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                features.USER_ID: _bytes([user_id]),
                features.USER_TEXT: _bytes([user_text]),
                features.HISTORY_ITEM_IDS: _bytes(history),
                features.ITEM_ID: _bytes([item_id]),
                features.TIMESTAMP: tf.train.Feature(int64_list=tf.train.Int64List(value=[timestamp])),
                features.WEIGHT: tf.train.Feature(float_list=tf.train.FloatList(value=[weight])),
            }
        )
    )


def event_log(user_id, item_ids, timestamps, splits) -> tf.train.Example:
    """One user's events-* record (features.EVENT_FEATURES)."""
    return tf.train.Example(features=tf.train.Features(feature={
        features.USER_ID: _bytes([user_id]),
        features.EVENT_ITEM_IDS: _bytes(item_ids),
        features.EVENT_TIMESTAMPS: tf.train.Feature(int64_list=tf.train.Int64List(value=list(timestamps))),
        features.EVENT_SPLITS: _bytes(splits),
    }))


def write_events(root: str, users, name: str = "00000-of-00001") -> None:
    """Writes events-<name>.tfrecord.gz: users = [(user_id, item_ids, timestamps, splits)]."""
    path = os.path.join(root, f"{features.EVENTS_PREFIX}-{name}{features.TFRECORD_SUFFIX}")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for row in users:
            w.write(event_log(*row).SerializeToString())


def catalog_items() -> list[tuple[str, str, list[str]]]:
    """(item_id, title, categories) for the 24 items."""
    items = []
    for g, titles in GROUPS.items():
        for j, title in enumerate(titles):
            items.append((f"{g[0]}{j}", title, [g] + (["gift"] if j % 4 == 0 else [])))
    return items


def user_group(user_index: int) -> str:
    return list(GROUPS)[user_index % len(GROUPS)]


def write_dataset(root: str, users: int = 30, per_user: int = 5, seed: int = 0, shards: int = 2,
                  valid: bool = False, repeats: str = "exclude") -> str:
    """Writes a dataset dir under `root`; returns its path.

    Per user: `per_user` train examples then one eval example; the first
    train example of every user has an empty history (cold start). With
    `valid`, a validation example between them (the eval query then sees it
    too, as preprocess builds it), the event log (events-*) and a
    metadata.json naming the `repeats` rule - the schema-2 layout training and
    evaluation need.
    """
    rng = random.Random(seed)
    items = catalog_items()
    title = {i: t for i, t, _ in items}
    by_group = {g: [i for i, _, c in items if c[0] == g] for g in GROUPS}
    train, valids, evals, events = [], [], [], []
    for u in range(users):
        g = user_group(u)
        uid = f"u{u}"
        # Distinct items: a repeat of a history item would be excluded at eval.
        seq = rng.sample(by_group[g], per_user + 1 + int(valid))
        age = 20 + rng.randrange(40)
        for t, target in enumerate(seq):
            history = list(reversed(seq[:t]))[: features.MAX_HISTORY]
            recent = "; ".join(title[i] for i in history[:FIXTURE_TEXT_HISTORY])
            text = f"age {age}, {PROFILES[g]}. recent: {recent}"
            ex = example(uid, text, history, target, timestamp=1000 + t, weight=1.0 + (t % 2))
            split = "train" if t < per_user else ("valid" if valid and t == per_user else "eval")
            {"train": train, "valid": valids, "eval": evals}[split].append((target, ex))
        if valid:
            events.append((uid, seq[:-1], [1000 + t for t in range(len(seq) - 1)],
                           ["train"] * per_user + ["valid"]))

    os.makedirs(os.path.join(root, features.VOCAB_DIR), exist_ok=True)
    if valid:
        write_events(root, events)
        with open(os.path.join(root, features.METADATA_FILE), "w") as f:
            json.dump({"schema_version": features.SCHEMA_VERSION, "repeats": repeats,
                       "source": {"name": "model_fixtures", "inputs": []}}, f)
    for prefix, rows in ((features.TRAIN_PREFIX, train), (features.VALID_PREFIX, valids),
                         (features.EVAL_PREFIX, evals)):
        if not rows:
            continue
        for s in range(shards):
            path = os.path.join(root, f"{prefix}-{s:05d}-of-{shards:05d}{features.TFRECORD_SUFFIX}")
            with tf.io.TFRecordWriter(path, options="GZIP") as w:
                for _, ex in rows[s::shards]:
                    w.write(ex.SerializeToString())
    items_path = os.path.join(root, f"{features.ITEMS_PREFIX}-00000-of-00001{features.TFRECORD_SUFFIX}")
    with tf.io.TFRecordWriter(items_path, options="GZIP") as w:
        for item_id, t, cats in items:
            ex = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        features.ITEM_ID: _bytes([item_id]),
                        features.ITEM_TITLE: _bytes([t]),
                        features.ITEM_TEXT: _bytes([f"{t}. {' '.join(cats)}"]),
                        features.ITEM_CATEGORIES: _bytes(cats),
                    }
                )
            )
            w.write(ex.SerializeToString())

    counts = Counter(target for target, _ in train)
    vocab = sorted((i for i, _, _ in items), key=lambda i: (-counts[i], i))
    with open(os.path.join(root, features.ITEM_VOCAB), "w") as f:
        f.writelines(f"{i}\n" for i in vocab)
    with open(os.path.join(root, features.ITEM_COUNTS), "w") as f:
        f.writelines(f"{i}\t{counts[i]}\n" for i in vocab)
    with open(os.path.join(root, features.USER_VOCAB), "w") as f:
        f.writelines(f"u{u}\n" for u in range(users))
    with open(os.path.join(root, features.CATEGORY_VOCAB), "w") as f:
        f.writelines(f"{c}\n" for c in sorted({c for _, _, cs in items for c in cs}))
    return root


def all_user_texts(root: str) -> list[str]:
    from trainer.data import tf_dataset as data

    return data.distinct_user_texts(root)


# --- pytest fixtures (import them into a test module to use them) -----------
import pytest  # noqa: E402


@pytest.fixture(autouse=False)
def clear_keras_session():
    """Fresh Keras 3 and tf-keras global state around each test."""
    import keras

    keras.backend.clear_session()
    tf.keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()
    tf.keras.backend.clear_session()


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("dataset")))


@pytest.fixture(scope="session")
def valid_dataset_dir(tmp_path_factory):
    """30 users (the same groups, their own item sequences) with a validation example each between
    their training and test examples, the event log and metadata.json (the schema-2 layout)."""
    return write_dataset(str(tmp_path_factory.mktemp("dataset_valid")), valid=True)


@pytest.fixture(scope="session")
def user_texts(dataset_dir):
    return all_user_texts(dataset_dir)


def tiny_encoder(texts, trainable_layers: int = 0):
    from trainer.model.text_encoder import TextEncoder

    return TextEncoder.tiny(
        texts, vocab_size=120, hidden=16, layers=2, heads=2, sequence_length=24, seed=0,
        trainable_layers=trainable_layers,
    )


TINY_MODEL = dict(
    embedding_dim=8,
    item_id_dim=8,
    category_dim=4,
    item_text_dim=8,
    text_buckets=64,
    user_text_dim=8,
    user_hidden_units=[16],
    user_id_buckets=16,
    user_id_dim=4,
    num_segments=3,
    seed=0,
)
