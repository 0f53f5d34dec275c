"""segments.json: what each learned user segment is, in words and numbers.

For every segment: its centroid, size and share, top categories and items of
its members' interactions (with lift over the whole population, so a segment
is described by what sets it apart, not by what everybody buys), a summary of
member attributes, a short generated label, and quality figures. Segments
smaller than `min_profile_size` are listed with their size only: profiling a
handful of users would describe individuals, not a segment.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
from typing import Mapping, Optional, Sequence

import numpy as np

SEGMENTS_SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ProfileInputs:
    """Everything profiling needs, as plain arrays and dicts.

    user_ids: [U] str; labels: [U] int segment per user; probs: [U, K] or None;
    histories: user_id -> item ids the user interacted with (training period);
    attributes: user_id -> {name: value}; item_titles / item_categories:
    item_id -> title / tuple of categories.
    """

    user_ids: Sequence[str]
    labels: np.ndarray
    centroids: np.ndarray  # [K, d]
    histories: Mapping[str, Sequence[str]]
    attributes: Mapping[str, Mapping[str, str]]
    item_titles: Mapping[str, str]
    item_categories: Mapping[str, Sequence[str]]
    probs: Optional[np.ndarray] = None


def _lift_top(counts: collections.Counter, base: collections.Counter, n_seg: int, n_all: int, top: int, min_count: int = 2):
    """Top entries by lift (share in segment / share overall), ties by count."""
    rows = []
    for key, c in counts.items():
        if c < min_count:
            continue
        share = c / max(n_seg, 1)
        base_share = base[key] / max(n_all, 1)
        rows.append((key, c, share, share / base_share if base_share else 0.0))
    rows.sort(key=lambda r: (-r[3] * np.sqrt(r[1]), -r[1], str(r[0])))
    return rows[:top]


def _attribute_summary(values: Sequence[Mapping[str, str]]) -> dict:
    """Per attribute: numeric -> mean/median/min/max; categorical -> top-3 shares."""
    by_name = collections.defaultdict(list)
    for attrs in values:
        for k, v in attrs.items():
            by_name[k].append(v)
    out = {}
    for name, vals in sorted(by_name.items()):
        try:
            nums = np.array([float(v) for v in vals])
            out[name] = {"mean": round(float(nums.mean()), 2), "median": float(np.median(nums)),
                         "min": float(nums.min()), "max": float(nums.max())}
        except ValueError:
            counts = collections.Counter(vals)
            if len(counts) > 0.5 * len(vals) and len(vals) > 10:
                continue  # near-unique values (zip codes, names): nothing to summarise
            out[name] = {k: round(c / len(vals), 3) for k, c in counts.most_common(3)}
    return out


def _label(top_categories: list, attributes: dict) -> str:
    """A short human label, e.g. "outdoor + fitness · age≈31 · gold"."""
    parts = []
    cats = [c["category"] for c in top_categories[:2]]
    if cats:
        parts.append(" + ".join(cats))
    for name, summary in attributes.items():
        if "mean" in summary and name.lower() in ("age",):
            parts.append(f"{name}≈{summary['mean']:.0f}")
    for name, summary in attributes.items():
        if "mean" not in summary and summary:
            value, share = next(iter(summary.items()))
            if share >= 0.6:
                parts.append(f"{value}")
                break
    return " · ".join(parts) if parts else "mixed"


def build_profiles(inputs: ProfileInputs, *, min_profile_size: int = 20, top: int = 5,
                   quality: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """The segments.json document (a dict)."""
    labels = np.asarray(inputs.labels)
    k = inputs.centroids.shape[0]
    n_all = len(inputs.user_ids)
    all_cats, all_items = collections.Counter(), collections.Counter()
    for uid in inputs.user_ids:
        for item in inputs.histories.get(uid, ()):
            all_items[item] += 1
            for c in inputs.item_categories.get(item, ()):
                all_cats[c] += 1
    n_cat_all, n_item_all = sum(all_cats.values()), sum(all_items.values())
    segments = []
    for seg in range(k):
        members = [u for u, l in zip(inputs.user_ids, labels) if l == seg]
        entry = {"id": seg, "size": len(members), "share": round(len(members) / max(n_all, 1), 4),
                 "centroid": [round(float(x), 6) for x in inputs.centroids[seg]]}
        if inputs.probs is not None and members:
            mask = labels == seg
            entry["mean_confidence"] = round(float(inputs.probs[mask, seg].mean()), 4)
        if len(members) < min_profile_size:
            entry["profiled"] = False
            entry["label"] = f"segment {seg} (too small to profile)"
            segments.append(entry)
            continue
        cats, items = collections.Counter(), collections.Counter()
        for uid in members:
            for item in inputs.histories.get(uid, ()):
                items[item] += 1
                for c in inputs.item_categories.get(item, ()):
                    cats[c] += 1
        top_cats = [{"category": c, "count": n, "share": round(s, 4), "lift": round(l, 3)}
                    for c, n, s, l in _lift_top(cats, all_cats, sum(cats.values()), n_cat_all, top)]
        top_items = [{"item_id": i, "title": inputs.item_titles.get(i, ""), "count": n, "lift": round(l, 3)}
                     for i, n, s, l in _lift_top(items, all_items, sum(items.values()), n_item_all, top)]
        attrs = _attribute_summary([inputs.attributes.get(u, {}) for u in members])
        entry.update({"profiled": True, "top_categories": top_cats, "top_items": top_items,
                      "attributes": attrs, "label": _label(top_cats, attrs)})
        segments.append(entry)
    doc = {
        "schema_version": SEGMENTS_SCHEMA_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_segments": k,
        "num_users": n_all,
        "min_profile_size": min_profile_size,
        "quality": quality or {},
        "segments": segments,
    }
    if extra:
        doc.update(extra)
    return doc


def save(doc: dict, path: str) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def load(path: str) -> dict:
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        doc = json.load(f)
    if doc.get("schema_version") != SEGMENTS_SCHEMA_VERSION:
        raise ValueError(f"{path}: segments.json schema_version {doc.get('schema_version')} is not {SEGMENTS_SCHEMA_VERSION}")
    return doc


def centroids_of(doc: dict) -> np.ndarray:
    """[K, d] centroids from a segments.json document, by segment id."""
    segs = sorted(doc["segments"], key=lambda s: s["id"])
    return np.asarray([s["centroid"] for s in segs], dtype=np.float32)


def labels_of(doc: dict) -> list:
    return [s["label"] for s in sorted(doc["segments"], key=lambda s: s["id"])]
