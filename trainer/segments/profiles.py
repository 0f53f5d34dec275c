"""Segment profiles: what each learned user segment is, in words and numbers (segments.json's entries).

For every segment: its centroid, size and share, top categories and items of
its members' interactions (with lift over the whole population, so a segment
is described by what sets it apart, not by what everybody buys), a summary of
member attributes (the most common values, and per attribute the most
over-represented value: "student" may top every segment because it tops the
population, "retired ×3.1" says what this one is), a short generated label
made of the distinctive categories and attribute values, unique within the
document, and quality figures. Segments smaller than `min_profile_size` are
listed with their size only: profiling a handful of users would describe
individuals, not a segment.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
from typing import Mapping, Optional, Sequence

import numpy as np

from trainer.segments.document import SCHEMA_VERSION as SEGMENTS_SCHEMA_VERSION


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


# Naming rules. A category or attribute value names a segment only if it is at least
# LABEL_MIN_LIFT times as common in the segment as overall. An attribute value is
# over-represented only if at least MIN_VALUE_SUPPORT members (and MIN_VALUE_SHARE of
# them) hold it, so two users with a rare occupation do not become the segment's trait.
LABEL_MIN_LIFT = 1.25
MIN_VALUE_SUPPORT = 5
MIN_VALUE_SHARE = 0.05
LABEL_MIN_SHARE = 0.1  # an attribute value in a label: held by at least this share of the members
# A numeric attribute's standardised mean difference d ranks with a categorical value of
# lift 4**|d|: half a standard deviation away from everybody ~ twice as common.
_EFFECT_BASE = 4.0
# Extra features a colliding label may take before it falls back to "#id".
MAX_EXTRA_LABEL_FEATURES = 2


@dataclasses.dataclass(frozen=True)
class _Population:
    """Per attribute over all users: kind and overall statistics.

    kinds: name -> "numeric" | "categorical" (attributes whose values are near
    unique over the population, zip codes or names, are left out: they
    describe individuals). Decided once for the population, so an attribute is
    summarised the same way in every segment (a zip code column that happens
    to be all digits within one segment is not numeric there).
    """

    kinds: Mapping[str, str]
    counts: Mapping[str, collections.Counter]  # categorical: value -> users
    moments: Mapping[str, tuple]  # numeric: (mean, std)


def _population(values: Sequence[Mapping[str, str]]) -> _Population:
    by_name = collections.defaultdict(list)
    for attrs in values:
        for k, v in attrs.items():
            by_name[k].append(v)
    kinds, counts, moments = {}, {}, {}
    for name, vals in by_name.items():
        try:
            nums = np.array([float(v) for v in vals])
        except (TypeError, ValueError):
            nums = None
        if nums is not None and np.all(np.isfinite(nums)):
            kinds[name] = "numeric"
            moments[name] = (float(nums.mean()), float(nums.std()))
            continue
        c = collections.Counter(str(v) for v in vals)
        if len(c) > 0.5 * len(vals) and len(vals) > 10:
            continue  # near-unique values: nothing to summarise
        kinds[name], counts[name] = "categorical", c
    return _Population(kinds, counts, moments)


def _attribute_summary(values: Sequence[Mapping[str, str]], population: Optional[_Population] = None) -> dict:
    """Per attribute: numeric -> mean/median/min/max; categorical -> the 3 most common values' shares.

    population: the attribute kinds to follow (default: decided from `values`).
    """
    population = population or _population(values)
    by_name = collections.defaultdict(list)
    for attrs in values:
        for k, v in attrs.items():
            if k in population.kinds:
                by_name[k].append(v)
    out = {}
    for name, vals in sorted(by_name.items()):
        if population.kinds[name] == "numeric":
            nums = np.array([float(v) for v in vals])
            out[name] = {"mean": round(float(nums.mean()), 2), "median": float(np.median(nums)),
                         "min": float(nums.min()), "max": float(nums.max())}
            continue
        counts = collections.Counter(str(v) for v in vals)
        if len(counts) > 0.5 * len(vals) and len(vals) > 10:
            continue  # near-unique within the segment
        out[name] = {k: round(c / len(vals), 3) for k, c in counts.most_common(3)}
    return out


def _over_represented(counts: collections.Counter, overall: collections.Counter, min_support: int) -> Optional[dict]:
    """The value with the highest lift (share in segment / share overall) among those with enough support."""
    n_seg, n_all = sum(counts.values()), sum(overall.values())
    floor = max(min_support, int(np.ceil(MIN_VALUE_SHARE * n_seg)))
    rows = [((c / n_seg) / (overall[v] / n_all), c, v) for v, c in counts.items() if c >= floor and overall[v]]
    best = min(rows, key=lambda r: (-r[0], -r[1], r[2]), default=None)  # highest lift, then count, then name
    if best is None or best[0] <= 1.0:
        return None  # no value with support is more common here than overall
    lift, c, value = best
    return {"value": value, "count": c, "share": round(c / n_seg, 3), "overall_share": round(overall[value] / n_all, 3),
            "lift": round(lift, 3)}


def _attribute_contrast(values: Sequence[Mapping[str, str]], population: _Population, summary: dict,
                        min_support: int) -> dict:
    """What sets the members apart, per attribute in `summary`.

    categorical -> {"most_common": {value, share}, "over_represented": {value,
    count, share, overall_share, lift} or None}; numeric -> {"mean",
    "overall_mean", "effect_size"} (standardised mean difference, in overall
    standard deviations).
    """
    out = {}
    for name, summ in summary.items():
        vals = [attrs[name] for attrs in values if name in attrs]
        if population.kinds[name] == "numeric":
            mean_all, std_all = population.moments[name]
            mean = float(np.mean([float(v) for v in vals]))
            effect = (mean - mean_all) / std_all if std_all > 0 else 0.0
            out[name] = {"mean": round(mean, 2), "overall_mean": round(mean_all, 2), "effect_size": round(effect, 3)}
            continue
        value, share = next(iter(summ.items()))
        counts = collections.Counter(str(v) for v in vals)
        out[name] = {"most_common": {"value": value, "share": share},
                     "over_represented": _over_represented(counts, population.counts[name], min_support)}
    return out


@dataclasses.dataclass
class LabelParts:
    """A label under construction: chosen categories and attribute phrases, and spare features by distinctiveness."""

    categories: list
    attributes: list
    spare: list  # [(kind, text)], kind "category" | "attribute"; most distinctive first

    def text(self) -> str:
        parts = ([" + ".join(self.categories)] if self.categories else []) + self.attributes
        return " · ".join(parts) if parts else "mixed"

    def extend(self) -> bool:
        if not self.spare:
            return False
        kind, text = self.spare.pop(0)
        (self.categories if kind == "category" else self.attributes).append(text)
        return True


def _number(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"


def _label_parts(top_categories: list, contrast: dict) -> LabelParts:
    """Top categories by lift, then the two most distinctive attributes.

    Categories: those with lift >= LABEL_MIN_LIFT in top_categories order, two
    at most; when none is, the one with the highest lift above 1 (a segment
    whose tastes are only mildly tilted is still named by its tilt). Attribute
    values: over-represented by LABEL_MIN_LIFT and held by at least
    LABEL_MIN_SHARE of the members; a minority value carries its lift
    ("retired ×3.1") so the label does not read as if every member held it.
    """
    cats = [(c["lift"], c["category"]) for c in top_categories if c["lift"] >= LABEL_MIN_LIFT]
    if not cats:
        tilted = [(c["lift"], c["category"]) for c in top_categories if c["lift"] > 1.0]
        cats = sorted(tilted, key=lambda c: -c[0])[:1]
    attrs = []
    for name, c in contrast.items():
        if "effect_size" in c:
            attrs.append((_EFFECT_BASE ** abs(c["effect_size"]), f"{name}≈{_number(c['mean'])}"))
            continue
        over = c["over_represented"]
        if not over or over["share"] < LABEL_MIN_SHARE:
            continue
        value = over["value"]
        # A bare "M" or "3" says nothing without its attribute's name; "retired" does.
        text = value if len(value) > 2 and not value.replace(".", "").isdigit() else f"{name} {value}"
        attrs.append((over["lift"], text if over["share"] >= 0.5 else f"{text} ×{over['lift']:.1f}"))
    attrs = [a for a in sorted(attrs, key=lambda a: (-a[0], a[1])) if a[0] >= LABEL_MIN_LIFT]
    spare = sorted([(s, "category", t) for s, t in cats[2:]] + [(s, "attribute", t) for s, t in attrs[2:]],
                   key=lambda r: -r[0])
    return LabelParts([t for _, t in cats[:2]], [t for _, t in attrs[:2]], [(k, t) for _, k, t in spare])


def unique_labels(parts: Mapping[int, LabelParts], fixed: Optional[Mapping[int, str]] = None) -> dict:
    """Segment id -> label, unique across `parts` and `fixed` (labels already set, e.g. unprofiled ones).

    Colliding segments each take their next most distinctive spare feature
    (at most MAX_EXTRA_LABEL_FEATURES); a collision left after that gets a
    " #id" suffix.
    """
    fixed = fixed or {}
    parts = {i: dataclasses.replace(p, categories=list(p.categories), attributes=list(p.attributes),
                                    spare=list(p.spare)[:MAX_EXTRA_LABEL_FEATURES]) for i, p in parts.items()}

    def collisions():
        by_text = collections.defaultdict(list)
        for i, label in fixed.items():
            by_text[label].append(i)
        for i, p in parts.items():
            by_text[p.text()].append(i)
        return [ids for ids in by_text.values() if len(ids) > 1]

    while True:
        colliding = [i for ids in collisions() for i in ids if i in parts]
        if not [parts[i].extend() for i in colliding].count(True):
            break
    labels = {i: p.text() for i, p in parts.items()}
    for ids in collisions():
        for i in ids:
            if i in parts:
                labels[i] = f"{labels[i]} #{i}"
    return labels


def build_profiles(inputs: ProfileInputs, *, min_profile_size: int = 20, top: int = 5,
                   quality: Optional[dict] = None, extra: Optional[dict] = None,
                   min_attribute_support: int = MIN_VALUE_SUPPORT) -> dict:
    """The segments.json document (a dict).

    Per profiled segment: top_categories / top_items (by lift), attributes
    (numeric: mean/median/min/max; categorical: the 3 most common values'
    shares), distinctive_attributes (per attribute the most common and the
    most over-represented value with its lift, or a numeric attribute's mean
    against everybody's; see _attribute_contrast) and a label made of what
    sets the segment apart, unique within the document.
    """
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
    population = _population([inputs.attributes.get(u, {}) for u in inputs.user_ids])
    segments, label_parts = [], {}
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
        member_attrs = [inputs.attributes.get(u, {}) for u in members]
        attrs = _attribute_summary(member_attrs, population)
        contrast = _attribute_contrast(member_attrs, population, attrs, min_attribute_support)
        label_parts[seg] = _label_parts(top_cats, contrast)
        entry.update({"profiled": True, "top_categories": top_cats, "top_items": top_items,
                      "attributes": attrs, "distinctive_attributes": contrast})
        segments.append(entry)
    unique = unique_labels(label_parts, {s["id"]: s["label"] for s in segments if not s["profiled"]})
    for s in segments:
        if s["profiled"]:
            s["label"] = unique[s["id"]]
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


# What a profile adds to a segment entry; under the privacy floor none of it may stay.
PROFILE_KEYS = ("top_categories", "top_items", "attributes", "distinctive_attributes", "mean_confidence")


def drop_profile(segment: dict) -> dict:
    """Strips a segment entry to id, size, share and centroid (a segment found too small after profiling); in place."""
    for key in PROFILE_KEYS:
        segment.pop(key, None)
    segment["profiled"], segment["label"] = False, f"segment {segment['id']} (too small to profile)"
    return segment
