"""Tests of the synthetic data generator (`segrec generate`).

Sizes are the `tiny` preset (50 users, 60 items, 600 interactions) except
for the planted-segment checks, which use `small` (600 users, 15k
interactions, well under a second) so that per-segment shares are stable.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pandas as pd
import pytest

from beam_pipelines.sources import synthetic
from beam_pipelines.sources.synthetic import SIZES, GenerateConfig, generate

FILES = ("interactions", "items", "users", "segments_truth", "generator")


def _read(path: str) -> pd.DataFrame:
    """Read a generated table back the way a user of the files would."""
    if path.endswith(".csv"):
        frame = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
        if "categories" in frame:
            frame["categories"] = frame["categories"].str.split(synthetic.CATEGORY_SEPARATOR)
        return frame
    if path.endswith(".jsonl"):
        # convert_dates=False: pandas would otherwise turn "timestamp" into datetimes.
        return pd.read_json(path, lines=True, convert_dates=False, dtype={"user_id": str, "item_id": str})
    frame = pd.read_parquet(path)
    if "categories" in frame:
        frame["categories"] = frame["categories"].map(list)
    return frame


def _load(summary) -> dict:
    return {name: _read(summary.files[name]) for name in ("interactions", "items", "users", "segments_truth")}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One `small` data set shared by the read-only checks below."""
    summary = generate(GenerateConfig(output_dir=str(tmp_path_factory.mktemp("small")), size="small"))
    return summary, _load(summary)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = generate(GenerateConfig(output_dir=str(tmp_path / "a"), size="tiny", seed=7))
    b = generate(GenerateConfig(output_dir=str(tmp_path / "b"), size="tiny", seed=7))
    c = generate(GenerateConfig(output_dir=str(tmp_path / "c"), size="tiny", seed=8))
    for name in FILES:
        with open(a.files[name], "rb") as fa, open(b.files[name], "rb") as fb:
            assert fa.read() == fb.read(), name
    for name in ("interactions", "items", "users", "segments_truth"):
        with open(a.files[name], "rb") as fa, open(c.files[name], "rb") as fc:
            assert fa.read() != fc.read(), name


def test_counts_ids_and_value_ranges(tmp_path):
    summary = generate(GenerateConfig(output_dir=str(tmp_path), size="tiny"))
    users_n, items_n, rows_n = SIZES["tiny"]
    assert (summary.num_users, summary.num_items, summary.num_interactions) == (users_n, items_n, rows_n)
    assert summary.num_segments == 6 and len(summary.segment_names) == 6
    assert set(summary.files) == set(FILES)
    assert all(os.path.isfile(p) for p in summary.files.values())
    data = _load(summary)
    inter, items, users, truth = data["interactions"], data["items"], data["users"], data["segments_truth"]

    assert list(inter.columns) == list(synthetic.INTERACTION_COLUMNS)
    assert list(items.columns) == list(synthetic.ITEM_COLUMNS)
    assert list(users.columns) == list(synthetic.USER_COLUMNS)
    assert (len(inter), len(items), len(users), len(truth)) == (rows_n, items_n, users_n, users_n)
    assert items["item_id"].is_unique and users["user_id"].is_unique
    assert items["item_id"].iloc[0] == "i00001" and users["user_id"].iloc[-1] == "u00050"
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert set(inter["user_id"]) == set(users["user_id"]) == set(truth["user_id"])

    assert inter["timestamp"].dtype == np.int64
    end = synthetic.START_TIMESTAMP + synthetic.SPAN_SECONDS
    assert inter["timestamp"].between(synthetic.START_TIMESTAMP, end - 1).all()
    # Each user's timeline is in order (ties allowed) and has a usable history.
    assert (inter.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()
    assert inter.groupby("user_id").size().min() >= synthetic.MIN_EVENTS_PER_USER
    assert inter["rating"].between(1.0, 5.0).all()
    assert set(inter["event_type"]) <= set(synthetic.EVENT_TYPES)

    assert items["categories"].map(len).between(1, 3).all()
    assert set(itertools.chain.from_iterable(items["categories"])) <= set(synthetic.cat.CATEGORIES)
    assert items["title"].is_unique
    assert (items["description"].str.len() > 20).all()
    assert users["age"].between(18, 85).all()
    assert set(users["membership"]) <= set(synthetic.TIERS)
    assert set(truth["segment_name"]) <= set(summary.segment_names)

    meta = json.loads(open(summary.files["generator"], encoding="utf-8").read())
    assert meta["counts"] == {"users": users_n, "items": items_n, "interactions": rows_n, "segments": 6}
    assert [s["name"] for s in meta["segments"]] == list(summary.segment_names)
    assert sum(s["num_users"] for s in meta["segments"]) == users_n


def test_overrides_replace_the_preset(tmp_path):
    summary = generate(
        GenerateConfig(
            output_dir=str(tmp_path), size="large", num_users=30, num_items=20, num_interactions=200, num_segments=14
        )
    )
    data = _load(summary)
    assert (len(data["users"]), len(data["items"]), len(data["interactions"])) == (30, 20, 200)
    # More segments than archetypes: extra ones are random mixes with distinct names.
    assert len(set(summary.segment_names)) == 14
    assert set(data["interactions"]["item_id"]) <= set(data["items"]["item_id"])


def test_planted_segments_are_visible(small):
    summary, data = small
    meta = json.loads(open(summary.files["generator"], encoding="utf-8").read())
    favourites = {s["segment"]: set(s["favourite_categories"]) for s in meta["segments"]}
    primary = data["items"].set_index("item_id")["categories"].str[0]
    frame = data["interactions"].merge(data["segments_truth"], on="user_id")
    frame["category"] = frame["item_id"].map(primary)

    dist = pd.crosstab(frame["segment"], frame["category"], normalize="index")
    overall = frame["category"].value_counts(normalize=True)
    for segment, row in dist.iterrows():
        top = row.idxmax()
        assert top in favourites[segment]
        assert row[top] > 2.5 * overall[top], (segment, top, row[top], overall[top])
    # Every pair of segments browses clearly different categories.
    for a, b in itertools.combinations(dist.index, 2):
        assert 0.5 * np.abs(dist.loc[a] - dist.loc[b]).sum() > 0.35, (a, b)

    # Most users' interactions hit their own segment's favourites more than any other's.
    hits = pd.DataFrame(
        {s: frame["category"].isin(favs).to_numpy() for s, favs in favourites.items()}, index=frame.index
    )
    per_user = hits.groupby(frame["user_id"]).mean()
    truth = data["segments_truth"].set_index("user_id")["segment"]
    best = per_user.idxmax(axis=1)
    assert (best == truth.loc[best.index]).mean() > 0.8
    own_rate = per_user.to_numpy()[np.arange(len(per_user)), truth.loc[per_user.index].to_numpy()]
    assert own_rate.mean() > 0.6


def test_ratings_and_purchases_favour_in_segment_items(small):
    summary, data = small
    meta = json.loads(open(summary.files["generator"], encoding="utf-8").read())
    favourites = {s["segment"]: set(s["favourite_categories"]) for s in meta["segments"]}
    primary = data["items"].set_index("item_id")["categories"].str[0]
    frame = data["interactions"].merge(data["segments_truth"], on="user_id")
    in_segment = np.array([primary[i] in favourites[s] for i, s in zip(frame["item_id"], frame["segment"])])
    assert frame["rating"][in_segment].mean() > frame["rating"][~in_segment].mean() + 0.5
    shares = frame["event_type"].value_counts(normalize=True)
    assert shares["view"] > shares["add_to_cart"] > shares["purchase"] > 0.03


def test_noise_only_erases_the_segments(tmp_path):
    summary = generate(
        GenerateConfig(output_dir=str(tmp_path), size="small", noise_rate=1.0, cross_segment_rate=0.0)
    )
    data = _load(summary)
    primary = data["items"].set_index("item_id")["categories"].str[0]
    frame = data["interactions"].merge(data["segments_truth"], on="user_id")
    frame["category"] = frame["item_id"].map(primary)
    dist = pd.crosstab(frame["segment"], frame["category"], normalize="index")
    for a, b in itertools.combinations(dist.index, 2):
        assert 0.5 * np.abs(dist.loc[a] - dist.loc[b]).sum() < 0.2


@pytest.mark.parametrize("chunk_rows", [None, 97])
def test_all_formats_hold_the_same_content(tmp_path, monkeypatch, chunk_rows):
    if chunk_rows is not None:
        # Many small chunks: one CSV header, several Parquet row groups, appended JSONL.
        monkeypatch.setattr(synthetic, "_CHUNK_ROWS", chunk_rows)
    loaded = {}
    for fmt in synthetic.FORMATS:
        summary = generate(GenerateConfig(output_dir=str(tmp_path / fmt), size="tiny", format=fmt))
        assert summary.files["interactions"].endswith(f"interactions.{fmt}")
        loaded[fmt] = _load(summary)
    for fmt in ("jsonl", "parquet"):
        for name, frame in loaded["csv"].items():
            other = loaded[fmt][name]
            assert len(other) == len(frame)
            pd.testing.assert_frame_equal(frame, other, check_dtype=False, obj=f"{fmt}:{name}")


def test_progress_bar_runs(tmp_path, capsys):
    generate(GenerateConfig(output_dir=str(tmp_path), size="tiny"), progress=True)
    assert "interactions" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"size": "huge"}, "unknown size"),
        ({"format": "xml"}, "unknown format"),
        ({"num_users": 0}, "num_users"),
        ({"num_items": -3}, "num_items"),
        ({"num_interactions": 2.5}, "num_interactions"),
        ({"num_segments": 0}, "num_segments"),
        ({"num_users": 10, "num_segments": 11}, "cannot exceed num_users"),
        ({"num_users": 300}, "at least 3 x num_users"),
        ({"noise_rate": 1.5}, "noise_rate"),
        ({"noise_rate": 0.6, "cross_segment_rate": 0.6}, "must not exceed 1"),
        ({"seed": -1}, "seed"),
        ({"output_dir": ""}, "output_dir"),
    ],
)
def test_bad_config_raises_value_error(tmp_path, overrides, message):
    settings = {"output_dir": str(tmp_path / "out"), "size": "tiny", **overrides}
    with pytest.raises(ValueError, match=message):
        generate(GenerateConfig(**settings))
    assert not (tmp_path / "out").exists()  # nothing is written before validation passes
