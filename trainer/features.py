"""Every feature name, file name and shared limit of segrec, in one place.

Beam pipelines write these names, the trainer reads them and the serving
signatures expose them; nothing else spells a feature name as a literal.
Importing this module does not import TensorFlow (Beam workers that only
parse rows stay light); the `*_spec()` helpers import it when called.
"""

from __future__ import annotations

# 2: a validation split (valid-*) and the per-user event log (events-*) beside
# train-*/eval-*; metadata.json records the split policy and the repeat rule.
SCHEMA_VERSION = 2

# --- Query/positive examples (train-*, valid-*, eval-*.tfrecord.gz) ---------
USER_ID = "user_id"  # bytes, the raw user id
USER_TEXT = "user_text"  # bytes, profile + most recent item titles
HISTORY_ITEM_IDS = "history_item_ids"  # bytes list, most recent first, bounded
ITEM_ID = "item_id"  # bytes, the positive (target) item
TIMESTAMP = "timestamp"  # int64, epoch seconds of the target interaction
WEIGHT = "weight"  # float, the example weight

EXAMPLE_FEATURES = (USER_ID, USER_TEXT, HISTORY_ITEM_IDS, ITEM_ID, TIMESTAMP, WEIGHT)

# --- Per-user event log (events-*.tfrecord.gz) --------------------------------
# One tf.Example per user: every accepted event of the training and validation
# periods, oldest first, with the split it fell in (the test period's events
# are the eval-* examples' targets, and nothing else holds them, so training
# never reads a test event). What a user consumed before a query, and every
# training interaction the baselines are fitted on, come from here.
# USER_ID as above.
EVENT_ITEM_IDS = "event_item_ids"  # bytes list, the consumed items, oldest first
EVENT_TIMESTAMPS = "event_timestamps"  # int64 list, epoch seconds, same order
EVENT_SPLITS = "event_splits"  # bytes list, "train" | "valid" per event

EVENT_FEATURES = (USER_ID, EVENT_ITEM_IDS, EVENT_TIMESTAMPS, EVENT_SPLITS)

# --- Item catalog (items-*.tfrecord.gz) -------------------------------------
# ITEM_ID as above.
ITEM_TITLE = "title"  # bytes, human-readable title
ITEM_TEXT = "item_text"  # bytes, title + categories + description
ITEM_CATEGORIES = "categories"  # bytes list

ITEM_FEATURES = (ITEM_ID, ITEM_TITLE, ITEM_TEXT, ITEM_CATEGORIES)

# --- Model / serving inputs and outputs -------------------------------------
K = "k"  # int32 [B], results per row (request-time knob; batchable)
BETA = "beta"  # float32 [B], segment pull of each query (request-time knob; batchable)
EXAMPLES = "examples"  # serialized tf.Example, serving_tf_example input
# [B, E] string, "" padded: items serving_exclude never returns (besides the history), e.g. the
# user's whole consumed set; not a model input.
EXCLUDE_ITEM_IDS = "exclude_item_ids"
OUT_ITEM_IDS = "item_ids"  # [B, max(k)] string
OUT_SCORES = "scores"  # [B, max(k)] float32
EMBEDDING = "embedding"  # [B, d] float32
SEGMENT_ID = "segment_id"  # [B] int32
SEGMENT_PROBS = "segment_probs"  # [B, K] float32

# --- Limits shared by preprocessing and serving ------------------------------
MAX_HISTORY = 50  # history_item_ids kept per example (most recent first)
TEXT_HISTORY = 0  # recent item titles folded into user_text (0: the profile alone; the history
# encoder reads those items already, and a short text keeps the BERT pass short: ~20 tokens, not ~60)
PAD_ITEM_ID = ""  # padding value of history_item_ids in dense batches

# --- Dataset dir layout -------------------------------------------------------
# Splits: train (fitting), valid (everything tuned is chosen here: early
# stopping, best checkpoint, K, beta, baseline hyper-parameters) and eval (the
# test split: read once, by `segrec evaluate`; the name is kept from schema 1).
TRAIN_PREFIX = "train"
VALID_PREFIX = "valid"
EVAL_PREFIX = "eval"
ITEMS_PREFIX = "items"
EVENTS_PREFIX = "events"
TFRECORD_SUFFIX = ".tfrecord.gz"
TRAIN_PATTERN = TRAIN_PREFIX + "-*" + TFRECORD_SUFFIX
VALID_PATTERN = VALID_PREFIX + "-*" + TFRECORD_SUFFIX
EVAL_PATTERN = EVAL_PREFIX + "-*" + TFRECORD_SUFFIX
ITEMS_PATTERN = ITEMS_PREFIX + "-*" + TFRECORD_SUFFIX
EVENTS_PATTERN = EVENTS_PREFIX + "-*" + TFRECORD_SUFFIX
SPLIT_PATTERNS = {TRAIN_PREFIX: TRAIN_PATTERN, VALID_PREFIX: VALID_PATTERN, EVAL_PREFIX: EVAL_PATTERN}
USERS_FILE = "users.jsonl"  # user_id + profile attributes, for segment profiles
VOCAB_DIR = "vocab"
USER_VOCAB = "vocab/user_ids.txt"  # one id a line, by training frequency
ITEM_VOCAB = "vocab/item_ids.txt"  # one id a line: training frequency desc, then id
ITEM_COUNTS = "vocab/item_counts.tsv"  # item_id <TAB> training positives
CATEGORY_VOCAB = "vocab/categories.txt"
STATS_FILE = "stats.json"
METADATA_FILE = "metadata.json"
DEAD_LETTER_DIR = "dead_letter"


def example_feature_spec() -> dict:
    """Parsing spec of a query/positive tf.Example (history is ragged)."""
    import tensorflow as tf

    return {
        USER_ID: tf.io.FixedLenFeature([], tf.string),
        USER_TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        HISTORY_ITEM_IDS: tf.io.RaggedFeature(tf.string),
        ITEM_ID: tf.io.FixedLenFeature([], tf.string),
        TIMESTAMP: tf.io.FixedLenFeature([], tf.int64, default_value=0),
        WEIGHT: tf.io.FixedLenFeature([], tf.float32, default_value=1.0),
    }


def event_feature_spec() -> dict:
    """Parsing spec of one user's event log (events-*.tfrecord.gz)."""
    import tensorflow as tf

    return {
        USER_ID: tf.io.FixedLenFeature([], tf.string),
        EVENT_ITEM_IDS: tf.io.RaggedFeature(tf.string),
        EVENT_TIMESTAMPS: tf.io.RaggedFeature(tf.int64),
        EVENT_SPLITS: tf.io.RaggedFeature(tf.string),
    }


def item_feature_spec() -> dict:
    """Parsing spec of a catalog tf.Example."""
    import tensorflow as tf

    return {
        ITEM_ID: tf.io.FixedLenFeature([], tf.string),
        ITEM_TITLE: tf.io.FixedLenFeature([], tf.string, default_value=""),
        ITEM_TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        ITEM_CATEGORIES: tf.io.RaggedFeature(tf.string),
    }


# --- Trainer-internal batch features and model outputs -----------------------
# Not in any TFRecord. make_dataset adds USER_TEXT_VECTOR when given a
# TextCache (frozen encoder), so the model reads the cached pooled text vector
# instead of running BERT on USER_TEXT. QUERY is a SegRecModel output.
USER_TEXT_VECTOR = "user_text_vector"  # [B, hidden] float32, cached pooled text
# It is also an input of the export's serving_text_vector signature and the output of its
# encode_text signature (contracts.TEXT_VECTOR_SIGNATURES): the text-vector cache of
# `segrec serve` and batch scoring.
# user_text already tokenised (exports with --text-input token_ids: the client
# tokenises, the server needs no text ops): [B, T] int32 each, T <= the
# encoder's sequence_length; [CLS] ... [SEP] then padding (mask 0).
INPUT_IDS = "input_ids"
PADDING_MASK = "padding_mask"
QUERY = "query"  # [B, d] float32, segment-aware query normalise(u + beta * c)
