"""A dataset dir's splits as plain numpy arrays, for evaluation and profiling.

Full-catalog evaluation, the baselines and segment profiles work on integer
indices; this module reads the TFRecords once and maps string ids onto the
catalog's item order (trainer.data.tf_dataset.Catalog) and a user index.

`load_queries` builds the ranked queries of a split - targets in catalog
order, and what the repeat rule removes from each query's candidates - for
train-time recall and `segrec evaluate` alike.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401
from trainer import features
from trainer.data import candidates as cand
from trainer.data import examples as ex


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
    """One split ("train", "valid" or "eval" - the test split), sorted by (user, timestamp, item)."""
    if split not in features.SPLIT_PATTERNS:
        raise ValueError(f"split must be one of {sorted(features.SPLIT_PATTERNS)}, got {split!r}")
    pattern = features.SPLIT_PATTERNS[split]
    files = sorted(tf.io.gfile.glob(dataset_dir.rstrip("/") + "/" + pattern))
    if not files:
        if split == features.VALID_PREFIX:
            raise FileNotFoundError(missing_validation_message(dataset_dir))
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


def latest_per_user(split: SplitArrays) -> np.ndarray:
    """Row of each user's latest example in `split` (ties: the later row)."""
    last = {}
    for r, (u, t) in enumerate(zip(split.user_ids, split.timestamps)):
        if u not in last or t >= split.timestamps[last[u]]:
            last[u] = r
    return np.array(sorted(last.values()), dtype=np.int64)


def snapshot_rows(*splits: SplitArrays) -> tuple:
    """One row per user: their latest example in the first split that has one.

    Pass the splits newest period first, e.g. (eval, valid, train): a later
    period's query carries the user's history up to it, so it is the user "as
    of now" (`segrec train` passes (valid, train): it never reads test).
    Returns (user_ids [U], [rows of each split]), the first split's users first.
    """
    have: set = set()
    users, out = [], []
    for split in splits:
        rows = np.array([r for r in latest_per_user(split) if split.user_ids[r] not in have], np.int64)
        have.update(split.user_ids[rows])
        users.append(split.user_ids[rows])
        out.append(rows)
    return np.asarray(np.concatenate(users) if users else np.array([], object), object), out


def missing_validation_message(dataset_dir: str) -> str:
    return (f"{dataset_dir} has no validation split ({features.VALID_PATTERN}) or no event log "
            f"({features.EVENTS_PATTERN}): it was written by an older `segrec preprocess` (dataset schema 1). "
            "Training and evaluation choose everything they tune on the validation split, never on test; "
            "re-run `segrec preprocess` to write them")


def require_validation(dataset_dir: str) -> None:
    """Raises a FileNotFoundError saying what to do when the dataset dir lacks
    the validation split or the event log (a schema-1 dataset dir)."""
    for pattern in (features.VALID_PATTERN, features.EVENTS_PATTERN):
        if not tf.io.gfile.glob(dataset_dir.rstrip("/") + "/" + pattern):
            raise FileNotFoundError(missing_validation_message(dataset_dir))


def metadata(dataset_dir: str) -> dict:
    """metadata.json of a dataset dir ({} when absent)."""
    path = dataset_dir.rstrip("/") + "/" + features.METADATA_FILE
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def repeat_rule(dataset_dir: str) -> str:
    """The dataset's repeat rule (`segrec preprocess --repeats`): "exclude" or
    "allow"; the default ("exclude") when metadata.json records none."""
    rule = metadata(dataset_dir).get("repeats", ex.DEFAULT_REPEATS)
    if rule not in ex.REPEAT_RULES:
        raise ValueError(f"{dataset_dir}: metadata.json names repeat rule {rule!r}; expected one of {ex.REPEAT_RULES}")
    return rule


@dataclasses.dataclass(frozen=True)
class EventLog:
    """Every user's accepted events of the training and validation periods
    (events-*.tfrecord.gz), oldest first; the test period is not in it.

    user_ids, item_ids [E] str; timestamps [E] int64; splits [E] str
    ("train", "valid"); the rows of one user are contiguous.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    splits: np.ndarray
    bounds: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.user_ids)

    def labelled(self, user_id: str) -> list:
        """[(split, examples.Event)] of one user, oldest first ([] for an unknown user)."""
        lo, hi = self.bounds.get(user_id, (0, 0))
        return [(str(self.splits[r]), ex.Event(str(self.item_ids[r]), int(self.timestamps[r])))
                for r in range(lo, hi)]

    def pairs(self, splits: Sequence[str]) -> tuple:
        """(user_ids, item_ids, timestamps) of the events in `splits`, in log order."""
        keep = np.isin(self.splits, list(splits))
        return self.user_ids[keep], self.item_ids[keep], self.timestamps[keep]


def load_events(dataset_dir: str, batch_size: int = 1024) -> EventLog:
    """The event log of a dataset dir (see features.EVENT_FEATURES)."""
    files = sorted(tf.io.gfile.glob(dataset_dir.rstrip("/") + "/" + features.EVENTS_PATTERN))
    if not files:
        raise FileNotFoundError(missing_validation_message(dataset_dir))
    records = []
    spec = features.event_feature_spec()
    for raw in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size):
        p = tf.io.parse_example(raw, spec)
        for u, items, ts, sp in zip(p[features.USER_ID].numpy(), p[features.EVENT_ITEM_IDS].to_list(),
                                    p[features.EVENT_TIMESTAMPS].to_list(), p[features.EVENT_SPLITS].to_list()):
            records.append((u.decode(), [i.decode() for i in items], ts, [s.decode() for s in sp]))
    records.sort(key=lambda r: r[0])  # shards come back in whatever order the runner wrote them
    users, items, times, splits, bounds = [], [], [], [], {}
    for u, its, ts, sp in records:
        if not len(its) == len(ts) == len(sp):
            raise ValueError(f"{dataset_dir}: the event log of user {u!r} has lists of different lengths")
        bounds[u] = (len(users), len(users) + len(its))
        users += [u] * len(its)
        items += its
        times += ts
        splits += sp
    return EventLog(np.array(users, object), np.array(items, object), np.array(times, np.int64),
                    np.array(splits, object), bounds)


def consumed_items(events: EventLog, split: SplitArrays, rows, split_name: str) -> list:
    """Per row of `split` (a `split_name` split): everything the user consumed
    before the query - the events such a query may see
    (examples.VISIBLE_SPLITS) strictly earlier than its target
    (examples.consumed_before), then any item of the query's own history not
    among them - most recent first."""
    out, visible = [], {}
    for r in rows:
        u = split.user_ids[r]
        if u not in visible:
            visible = {u: ex.sort_events(ex.visible_events(events.labelled(u), split_name))}  # rows come by user
        items = ex.consumed_before(visible[u], int(split.timestamps[r]))
        have = set(items)
        out.append(items + [h for h in split.histories[r] if h and h not in have])
    return out


@dataclasses.dataclass(frozen=True)
class RankedQueries:
    """A split's queries as every model is ranked on them (train-time recall,
    `segrec evaluate`): the whole catalog, the repeat rule, the same rows.

    split: the split's arrays; rows [Q]: its rows whose target is in the
    catalog; targets [Q]: catalog index of each row's target; candidates:
    the repeat rule per row (what each is ranked without, which targets are
    repeats); unknown_target: rows left out, their target not in the catalog.
    """

    split_name: str
    split: SplitArrays
    rows: np.ndarray
    targets: np.ndarray
    candidates: cand.Candidates
    unknown_target: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def rule(self) -> str:
        return self.candidates.rule


def load_queries(dataset_dir: str, split_name: str, item_ids: Sequence[str], rule: Optional[str] = None,
                 split: Optional[SplitArrays] = None, events: Optional[EventLog] = None) -> RankedQueries:
    """The ranked queries of one split over the catalog `item_ids` (in that order).

    rule: the repeat rule (default: the dataset's, `repeat_rule`); split,
    events: this dataset dir's arrays when already loaded.
    """
    rule = repeat_rule(dataset_dir) if rule is None else rule
    split = load_split(dataset_dir, split_name) if split is None else split
    events = load_events(dataset_dir) if events is None else events
    index = item_index(item_ids)
    known = np.array([i in index for i in split.item_ids], bool)
    rows = np.flatnonzero(known)
    consumed = consumed_items(events, split, rows, split_name)
    candidates = cand.query_candidates(consumed, list(split.item_ids[rows]), index, rule)
    targets = np.array([index[i] for i in split.item_ids[rows]], np.int64)
    return RankedQueries(split_name, split, rows, targets, candidates, int((~known).sum()))


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
