"""`segrec generate`: a seeded e-commerce-like data set with PLANTED user segments.

Why it exists: the model clusters users into segments, and the only way to
check that it finds real structure is data whose segments we know. Each user
belongs to one hidden segment with favourite categories; the items they touch,
their ratings and (moderately) their profile follow from it. The truth goes
to `segments_truth.csv`, which preprocessing never reads.

Everything per interaction is vectorised numpy, drawn and written chunk by
chunk (about `_CHUNK_ROWS` rows each), so 10 million interactions stay well
under 4 GB. The same config gives byte-identical files: independent random
streams per part (catalog, users, interactions) are spawned from the seed,
and nothing time- or path-dependent is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import pandas as pd

from beam_pipelines.sources import synthetic_catalog as cat
from trainer import features

# Preset -> (users, items, interactions).
SIZES: dict = {
    "tiny": (50, 60, 600),
    "small": (600, 400, 15_000),
    "medium": (5_000, 2_000, 200_000),
    "large": (25_000, 10_000, 1_000_000),
    "10m": (200_000, 50_000, 10_000_000),
}
FORMATS = ("csv", "jsonl", "parquet")

# Column names of the generic input format (what preprocess's generic reader expects).
INTERACTION_COLUMNS = (features.USER_ID, features.ITEM_ID, features.TIMESTAMP, "rating", "event_type")
ITEM_COLUMNS = (features.ITEM_ID, features.ITEM_TITLE, features.ITEM_CATEGORIES, "description")
USER_COLUMNS = (features.USER_ID, "age", "gender", "country", "membership", "signup_year")
TRUTH_COLUMNS = (features.USER_ID, "segment", "segment_name")
TRUTH_FILE = "segments_truth.csv"
GENERATOR_FILE = "generator.json"
DRIFT_TRUTH_FILE = "drift_truth.csv"  # periods=2 only: user_id, segment_before, segment_after, moved
_DRIFT_FIELDS = ("periods", "drift_share", "drift_from", "drift_to")
CATEGORY_SEPARATOR = "|"  # joins an item's categories in CSV

START_TIMESTAMP = 1_704_067_200  # 2024-01-01T00:00:00Z
SPAN_SECONDS = 366 * 24 * 3600  # 2024 is a leap year: timestamps stay inside it
MIN_EVENTS_PER_USER = 3  # enough for a history plus a held-out target
EVENT_TYPES = ("view", "add_to_cart", "purchase")

_CHUNK_ROWS = 1_000_000
_FAVOURITE_WEIGHTS = (0.5, 0.3, 0.2)  # within a segment's favourites, first is strongest
_FAVOURITE_MASS = 0.85  # rest of a segment's taste is spread over all categories
_USER_CONCENTRATION = 25.0  # Dirichlet spread of a user's taste around their segment's
_SEGMENT_FLOOR = 0.5  # no segment below half of an equal share of users
_SESSION_START_PROB = 0.2  # ~5 events per session
_SESSION_GAP_MEAN_S = 2.5 * 24 * 3600
_IN_SESSION_GAP_MEAN_S = 80.0  # rounding to whole seconds yields some equal timestamps
# Event-type mix for items in / out of the user's segment favourites, and noise.
_EVENT_PROBS = {"in": (0.70, 0.17, 0.13), "out": (0.80, 0.13, 0.07), "noise": (0.90, 0.07, 0.03)}
GENDERS = ("female", "male", "non-binary")
_NON_BINARY_SHARE = 0.03
COUNTRIES = ("US", "GB", "DE", "FR", "CA", "AU", "IN", "BR", "JP", "ES", "IT", "NL")
_COUNTRY_PROBS = (0.30, 0.12, 0.10, 0.08, 0.07, 0.05, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02)
TIERS = ("basic", "silver", "gold", "platinum")
_TIER_PROBS = (0.50, 0.27, 0.16, 0.07)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Settings of one `segrec generate` run; counts left None come from the `size` preset."""

    output_dir: str
    size: str = "small"  # tiny|small|medium|large|10m
    num_users: Optional[int] = None
    num_items: Optional[int] = None
    num_interactions: Optional[int] = None
    num_segments: int = 6
    seed: int = 42
    format: str = "csv"
    cross_segment_rate: float = 0.12
    noise_rate: float = 0.05
    # Planted drift (for `segrec segments refresh` tests and demos): periods=2
    # adds a second year of interactions of the same users, in which a
    # `drift_share` of segment `drift_from`'s users behave like segment
    # `drift_to`. Who moved goes to drift_truth.csv. periods=1 writes exactly
    # what it wrote before these fields existed.
    periods: int = 1
    drift_share: float = 0.0
    drift_from: int = 0
    drift_to: int = 1


@dataclasses.dataclass(frozen=True)
class GenerateSummary:
    """What a run wrote, for the CLI's closing summary and for tests."""

    output_dir: str
    files: dict  # logical name -> path
    num_users: int
    num_items: int
    num_interactions: int
    num_segments: int
    segment_names: tuple


def resolve_counts(config: GenerateConfig) -> tuple:
    """(users, items, interactions) after presets and overrides; ValueError if unusable."""
    if not isinstance(config.output_dir, str) or not config.output_dir:
        raise ValueError("output_dir must be a non-empty path")
    if config.size not in SIZES:
        raise ValueError(f"unknown size {config.size!r}; choose one of {', '.join(SIZES)}")
    if str(config.format).lower() not in FORMATS:
        raise ValueError(f"unknown format {config.format!r}; choose one of {', '.join(FORMATS)}")
    preset = SIZES[config.size]
    counts = []
    for name, default in zip(("num_users", "num_items", "num_interactions"), preset):
        value = getattr(config, name)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        counts.append(int(value))
    users, items, interactions = counts
    k = config.num_segments
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"num_segments must be a positive integer, got {k!r}")
    if k > users:
        raise ValueError(f"num_segments ({k}) cannot exceed num_users ({users}): every segment needs a user")
    if isinstance(config.seed, bool) or not isinstance(config.seed, (int, np.integer)) or config.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {config.seed!r}")
    for name in ("cross_segment_rate", "noise_rate"):
        rate = getattr(config, name)
        if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
    if config.cross_segment_rate + config.noise_rate > 1.0:
        raise ValueError("cross_segment_rate + noise_rate must not exceed 1")
    _check_drift(config, k)
    if interactions < MIN_EVENTS_PER_USER * users:
        raise ValueError(
            f"num_interactions ({interactions}) must be at least {MIN_EVENTS_PER_USER} x num_users "
            f"({MIN_EVENTS_PER_USER * users}); raise num_interactions or lower num_users"
        )
    return users, items, interactions


def _check_drift(config: GenerateConfig, k: int) -> None:
    if config.periods not in (1, 2) or isinstance(config.periods, bool):
        raise ValueError(f"periods must be 1 or 2, got {config.periods!r}")
    rate = config.drift_share
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"drift_share must be in [0, 1], got {rate!r}")
    if rate > 0 and config.periods != 2:
        raise ValueError("drift_share needs periods=2 (drift happens in the second period)")
    for name in ("drift_from", "drift_to"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < k:
            raise ValueError(f"{name} must be a segment id in 0..{k - 1}, got {value!r}")
    if rate > 0 and config.drift_from == config.drift_to:
        raise ValueError("drift_from and drift_to must differ")


def _ids(prefix: str, n: int) -> np.ndarray:
    """'u00001'..; zero-padded to the count's width (at least 5) so ids sort like numbers."""
    width = max(5, len(str(n)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(1, n + 1)], dtype=object)


def _sample_rows(cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of `cdf` `[n, k]` (rows end at 1) -> `[n]` int."""
    u = rng.random(cdf.shape[0])[:, None]
    return np.minimum((u >= cdf).sum(axis=1), cdf.shape[1] - 1)


def _segment_preferences(archetypes: list, nonempty: np.ndarray) -> np.ndarray:
    """`[K, C]` planted category distribution of each segment (empty categories zeroed)."""
    index = {c: i for i, c in enumerate(cat.CATEGORIES)}
    uniform = nonempty / nonempty.sum()
    prefs = np.zeros((len(archetypes), len(cat.CATEGORIES)))
    for s, arch in enumerate(archetypes):
        fav = np.zeros(len(cat.CATEGORIES))
        for weight, name in zip(_FAVOURITE_WEIGHTS, arch.favourites):
            fav[index[name]] = weight
        prefs[s] = _FAVOURITE_MASS * fav / fav.sum() + (1 - _FAVOURITE_MASS) * uniform
    prefs *= nonempty
    return prefs / prefs.sum(axis=1, keepdims=True)


def _segment_sizes(num_users: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Unequal user counts per segment (Dirichlet, floored), each at least one, summing to num_users."""
    share = rng.dirichlet(np.full(k, 2.0))
    share = np.maximum(share, _SEGMENT_FLOOR / k)
    sizes = np.maximum(1, np.floor(share / share.sum() * num_users).astype(np.int64))
    while sizes.sum() != num_users:  # a few steps at most: fix rounding on the biggest
        sizes[np.argmax(sizes)] += 1 if sizes.sum() < num_users else -1
    return sizes


def _users(num_users: int, archetypes: list, rng: np.random.Generator) -> dict:
    """Hidden segments and profiles; attributes lean toward the segment, never decide it."""
    k = len(archetypes)
    segment = rng.permutation(np.repeat(np.arange(k), _segment_sizes(num_users, k, rng)))
    age_mean = np.array([a.age_mean for a in archetypes])[segment]
    age = np.clip(np.rint(rng.normal(0.55 * age_mean + 0.45 * 40.0, 11.0)), 18, 85).astype(np.int64)
    female = np.array([a.female_share for a in archetypes])[segment]
    g = rng.random(num_users)
    gender = np.where(g < _NON_BINARY_SHARE, 2, np.where(g < _NON_BINARY_SHARE + (1 - _NON_BINARY_SHARE) * female, 0, 1))
    country_p = np.array(_COUNTRY_PROBS) * rng.lognormal(0.0, 0.5, size=(k, len(COUNTRIES)))
    country = _sample_rows(np.cumsum(country_p / country_p.sum(1, keepdims=True), axis=1)[segment], rng)
    bias = np.array([a.tier_bias for a in archetypes])
    tier_p = np.array(_TIER_PROBS) * np.exp(bias[:, None] * np.arange(len(TIERS)))
    tier = _sample_rows(np.cumsum(tier_p / tier_p.sum(1, keepdims=True), axis=1)[segment], rng)
    # Long-standing customers hold higher tiers and are a little older.
    years_ago = np.minimum(rng.poisson(1.5 + 0.8 * tier + 0.02 * (age - 18)), 10)
    return {
        "segment": segment,
        "columns": {
            "age": age,
            "gender": np.array(GENDERS, dtype=object)[gender],
            "country": np.array(COUNTRIES, dtype=object)[country],
            "membership": np.array(TIERS, dtype=object)[tier],
            "signup_year": (2024 - years_ago).astype(np.int64),
        },
    }


class _TableWriter:
    """Appends column chunks to one CSV / JSONL / Parquet file."""

    def __init__(self, path: str, fmt: str, list_columns: tuple = ()):
        self.path, self.fmt, self.list_columns = path, fmt, list_columns
        self._first = True
        self._parquet = None
        self._fh = None if fmt == "parquet" else open(path, "w", encoding="utf-8", newline="")

    def write(self, columns: dict) -> None:
        if self.fmt == "parquet":
            # Imported here so CSV/JSONL runs do not pay pyarrow's import time.
            import pyarrow as pa
            import pyarrow.parquet as pq

            arrays = {
                name: pa.array([list(v) for v in values], type=pa.list_(pa.string()))
                if name in self.list_columns
                else pa.array(values)
                for name, values in columns.items()
            }
            table = pa.table(arrays)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, table.schema)
            self._parquet.write_table(table)
            return
        frame = pd.DataFrame(columns)
        if self.fmt == "csv":
            for name in self.list_columns:
                frame[name] = [CATEGORY_SEPARATOR.join(v) for v in frame[name]]
            frame.to_csv(self._fh, header=self._first, index=False, lineterminator="\n")
        else:
            for name in self.list_columns:
                frame[name] = [list(v) for v in frame[name]]
            text = frame.to_json(orient="records", lines=True, force_ascii=False)
            self._fh.write(text if text.endswith("\n") else text + "\n")
        self._first = False

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._fh is not None:
            self._fh.close()


def _write_table(path: str, fmt: str, columns: dict, list_columns: tuple = ()) -> None:
    writer = _TableWriter(path, fmt, list_columns)
    try:
        writer.write(columns)
    finally:
        writer.close()


def _interaction_chunks(counts: np.ndarray) -> list:
    """User ranges [a, b) holding about `_CHUNK_ROWS` interactions each."""
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(_CHUNK_ROWS, int(ends[-1]), _CHUNK_ROWS), side="left") + 1
    bounds = np.unique(np.concatenate([[0], cuts, [counts.size]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _draw_interactions(a: int, b: int, ctx: dict, rng: np.random.Generator) -> dict:
    """Interactions of users [a, b), sorted by user then time; arrays `[rows]`."""
    cnt = ctx["counts"][a:b]
    n = int(cnt.sum())
    user = np.repeat(np.arange(a, b), cnt)
    u = rng.random(n)
    noise = u < ctx["noise_rate"]
    cross = ~noise & (u < ctx["noise_rate"] + ctx["cross_rate"])
    own = ~noise & ~cross

    category = np.zeros(n, dtype=np.int64)
    category[own] = _sample_rows(ctx["user_cdf"][user[own]], rng)
    category[cross] = _sample_rows(ctx["segment_cdf"][ctx["secondary"][user[cross]]], rng)
    item = ctx["item_flat"][np.searchsorted(ctx["item_keys"], category + rng.random(n), side="right")]
    item[noise] = rng.integers(0, ctx["num_items"], size=int(noise.sum()))

    # Session-like timelines: short gaps inside a session, days between sessions,
    # squeezed into the year for heavy users and placed at a random start.
    first = np.cumsum(cnt) - cnt
    gaps = np.where(
        rng.random(n) < _SESSION_START_PROB,
        3600.0 + rng.exponential(_SESSION_GAP_MEAN_S, n),
        rng.exponential(_IN_SESSION_GAP_MEAN_S, n),
    )
    gaps[first] = 0.0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first], cnt)
    span = elapsed[first + cnt - 1]
    target = np.minimum(span, SPAN_SECONDS - 1)
    scale = np.divide(target, span, out=np.ones_like(span), where=span > 0)
    start = ctx.get("start", START_TIMESTAMP) + np.floor(rng.random(b - a) * (SPAN_SECONDS - 1 - target))
    timestamp = (np.repeat(start, cnt) + np.floor(elapsed * np.repeat(scale, cnt))).astype(np.int64)

    in_segment = ctx["favourite"][ctx["segment"][user], ctx["primary"][item]]
    kind = np.where(noise, 2, np.where(in_segment, 0, 1))
    event = _sample_rows(ctx["event_cdf"][kind], rng)
    rating = (
        3.2
        + 0.9 * in_segment
        - 0.4 * noise
        + ctx["quality"][item]
        + ctx["user_bias"][user]
        + rng.normal(0.0, 0.7, n)
    )
    rating = np.clip(np.rint(rating * 2.0) / 2.0, 1.0, 5.0)
    return {
        features.USER_ID: ctx["user_ids"][user],
        features.ITEM_ID: ctx["item_ids"][item],
        features.TIMESTAMP: timestamp,
        "rating": rating,
        "event_type": np.array(EVENT_TYPES, dtype=object)[event],
    }


def generate(config: GenerateConfig, progress: bool = False) -> GenerateSummary:
    """Write interactions, items, users, segments_truth.csv and generator.json to `config.output_dir`."""
    num_users, num_items, num_interactions = resolve_counts(config)
    fmt = config.format.lower()
    k = int(config.num_segments)
    catalog_rng, segment_rng, user_rng, event_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(config.seed)).spawn(4)
    )

    catalog = cat.build_catalog(num_items, catalog_rng)
    item_keys, item_flat, nonempty = cat.category_samplers(catalog, catalog_rng)
    archetypes = cat.segment_archetypes(k, segment_rng)
    seg_pref = _segment_preferences(archetypes, nonempty)

    users = _users(num_users, archetypes, user_rng)
    segment = users["segment"]
    gamma = user_rng.gamma(_USER_CONCENTRATION * seg_pref[segment])
    user_pref = gamma / gamma.sum(axis=1, keepdims=True)
    # Cross-segment browsing goes to one other segment per user (a side interest).
    secondary = user_rng.integers(0, max(k - 1, 1), size=num_users)
    secondary = np.where(k > 1, secondary + (secondary >= segment), segment)
    weights = user_rng.lognormal(0.0, 1.1, size=num_users)
    counts = MIN_EVENTS_PER_USER + user_rng.multinomial(
        num_interactions - MIN_EVENTS_PER_USER * num_users, weights / weights.sum()
    )
    cat_index = {c: i for i, c in enumerate(cat.CATEGORIES)}
    favourite = np.zeros((k, len(cat.CATEGORIES)), dtype=bool)
    for s, arch in enumerate(archetypes):
        favourite[s, [cat_index[c] for c in arch.favourites]] = True

    ctx = {
        "counts": counts,
        "segment": segment,
        "secondary": secondary,
        "user_cdf": np.cumsum(user_pref, axis=1).astype(np.float32),
        "segment_cdf": np.cumsum(seg_pref, axis=1),
        "item_keys": item_keys,
        "item_flat": item_flat,
        "num_items": num_items,
        "noise_rate": float(config.noise_rate),
        "cross_rate": float(config.cross_segment_rate),
        "favourite": favourite,
        "primary": np.array([cat_index[c[0]] for c in catalog.categories]),
        "quality": catalog.quality,
        "user_bias": user_rng.normal(0.0, 0.3, size=num_users),
        "event_cdf": np.cumsum([_EVENT_PROBS["in"], _EVENT_PROBS["out"], _EVENT_PROBS["noise"]], axis=1),
        "user_ids": _ids("u", num_users),
        "item_ids": _ids("i", num_items),
    }
    # float32 cumulative sums can stop short of 1; the last column must be exact.
    ctx["user_cdf"][:, -1] = 1.0
    ctx["segment_cdf"][:, -1] = 1.0
    ctx["event_cdf"][:, -1] = 1.0

    drift = _second_period(config, ctx, seg_pref, user_rng_weights=weights) if config.periods == 2 else None

    os.makedirs(config.output_dir, exist_ok=True)
    names = {
        "interactions": f"interactions.{fmt}",
        "items": f"items.{fmt}",
        "users": f"users.{fmt}",
        "segments_truth": TRUTH_FILE,
        "generator": GENERATOR_FILE,
    }
    if drift is not None:
        names["drift_truth"] = DRIFT_TRUTH_FILE
    files = {key: os.path.join(config.output_dir, name) for key, name in names.items()}

    _write_table(
        files["items"],
        fmt,
        {
            features.ITEM_ID: ctx["item_ids"],
            features.ITEM_TITLE: catalog.titles,
            features.ITEM_CATEGORIES: catalog.categories,
            "description": catalog.descriptions,
        },
        list_columns=(features.ITEM_CATEGORIES,),
    )
    _write_table(files["users"], fmt, {features.USER_ID: ctx["user_ids"], **users["columns"]})
    segment_names = tuple(a.name for a in archetypes)
    _write_table(
        files["segments_truth"],
        "csv",
        {
            features.USER_ID: ctx["user_ids"],
            "segment": segment.astype(np.int64),
            "segment_name": np.array(segment_names, dtype=object)[segment],
        },
    )

    if drift is not None:
        _write_table(
            files["drift_truth"],
            "csv",
            {
                features.USER_ID: ctx["user_ids"],
                "segment_before": segment.astype(np.int64),
                "segment_after": drift["ctx"]["segment"].astype(np.int64),
                "moved": drift["moved"].astype(np.int64),
            },
        )

    # Period 2 goes after period 1 in the same file, drawn from its own stream,
    # so period 1's rows are the same bytes as a one-period run's.
    periods = [(ctx, event_rng)] + ([(drift["ctx"], drift["rng"])] if drift is not None else [])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_interactions * len(periods), unit="rows", desc="interactions")
    writer = _TableWriter(files["interactions"], fmt)
    try:
        for period_ctx, period_rng in periods:
            for a, b in _interaction_chunks(period_ctx["counts"]):
                rows = _draw_interactions(a, b, period_ctx, period_rng)
                writer.write(rows)
                if bar is not None:
                    bar.update(len(rows[features.TIMESTAMP]))
    finally:
        writer.close()
        if bar is not None:
            bar.close()

    sizes = np.bincount(segment, minlength=k)
    meta = {
        "generator": "segrec.synthetic",
        "version": 1,
        # output_dir is left out so the same config writes the same bytes anywhere;
        # the drift fields only when a second period was drawn.
        "config": {key: v for key, v in dataclasses.asdict(config).items()
                   if key != "output_dir" and (drift is not None or key not in _DRIFT_FIELDS)},
        "counts": {"users": num_users, "items": num_items, "interactions": num_interactions, "segments": k},
        "format": fmt,
        "files": names,
        "time_range": {"start": START_TIMESTAMP, "end": START_TIMESTAMP + config.periods * SPAN_SECONDS},
        "categories": list(cat.CATEGORIES),
        "segments": [
            {
                "segment": s,
                "name": arch.name,
                "favourite_categories": list(arch.favourites),
                "num_users": int(sizes[s]),
                "category_preferences": {c: round(float(p), 6) for c, p in zip(cat.CATEGORIES, seg_pref[s])},
            }
            for s, arch in enumerate(archetypes)
        ],
    }
    if drift is not None:
        meta["drift"] = {
            "period_2_start": START_TIMESTAMP + SPAN_SECONDS,
            "from": int(config.drift_from),
            "to": int(config.drift_to),
            "share": float(config.drift_share),
            "moved_users": int(drift["moved"].sum()),
            "interactions_per_period": num_interactions,
        }
    with open(files["generator"], "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        fh.write("\n")

    return GenerateSummary(
        output_dir=config.output_dir,
        files=files,
        num_users=num_users,
        num_items=num_items,
        num_interactions=num_interactions * config.periods,
        num_segments=k,
        segment_names=segment_names,
    )


def _second_period(config: GenerateConfig, ctx: dict, seg_pref: np.ndarray, user_rng_weights: np.ndarray) -> dict:
    """Context of period 2: same users and catalog, a year later; movers take `drift_to`'s taste.

    Drawn from a fifth random stream (spawn key 4), so period 1 is untouched.
    Returns {"ctx": period-2 context, "rng": its event stream, "moved": [U] bool}.
    """
    drift_rng, event_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(config.seed), spawn_key=(4,)).spawn(2))
    segment = ctx["segment"]
    moved = (segment == config.drift_from) & (drift_rng.random(segment.size) < config.drift_share)
    new_segment = np.where(moved, config.drift_to, segment)
    gamma = drift_rng.gamma(_USER_CONCENTRATION * seg_pref[new_segment])
    moved_cdf = np.cumsum(gamma / gamma.sum(axis=1, keepdims=True), axis=1).astype(np.float32)
    moved_cdf[:, -1] = 1.0
    secondary = np.where(moved & (ctx["secondary"] == config.drift_to), config.drift_from, ctx["secondary"])
    n_users = segment.size
    total = int(ctx["counts"].sum())
    counts = MIN_EVENTS_PER_USER + drift_rng.multinomial(total - MIN_EVENTS_PER_USER * n_users,
                                                        user_rng_weights / user_rng_weights.sum())
    ctx2 = dict(ctx, counts=counts, segment=new_segment, secondary=secondary,
                user_cdf=np.where(moved[:, None], moved_cdf, ctx["user_cdf"]), start=START_TIMESTAMP + SPAN_SECONDS)
    return {"ctx": ctx2, "rng": event_rng, "moved": moved}
