"""MovieLens layouts: the 100K text files and the CSV releases.

MovieLens 100K predates CSV: u.data is tab-separated without a header,
u.item and u.user are "|"-separated latin-1, and u.item stores genres as 19
0/1 flags whose names live in a fourth file, u.genre. The names are read when
the specs are built (driver side) and travel inside the spec, so workers never
need u.genre. The CSV releases (latest, 20M, 25M, 32M) go through the generic
CSV reader in `readers` with MovieLens column names; only the spec building
lives here (and `MLCSV_NO_GENRES`, the genre placeholder the generic
reader drops; the MovieLens CSV column names are `source_spec.MLCSV_COLUMNS`).

This module builds on `source_spec`, `files` and `values`; `readers`
dispatches ml100k rows and checks here (`parse_ml100k`, `check_ml100k`).
"""

from __future__ import annotations

from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_pipelines.sources import files, records, source_spec, values

# File name -> (kind, fields per line, separator).
ML100K_FILES = {
    "u.data": (records.INTERACTIONS, 4, "\t"),
    "u.item": (records.ITEMS, None, "|"),  # 5 + number of genres
    "u.user": (records.USERS, 5, "|"),
}
_SEPARATORS = {kind: sep for kind, _, sep in ML100K_FILES.values()}
_ITEM_FIXED_FIELDS = 5  # id | title | release date | video release date | IMDb URL
USER_ATTRIBUTES = ("age", "gender", "occupation", "zip")
MLCSV_NO_GENRES = "(no genres listed)"  # movies.csv's genres of a movie without any


def read_genres(path: str) -> tuple:
    """Genre names from u.genre ("name|index" lines), ordered by index."""
    if not FileSystems.exists(path):
        raise records.InputError(f"{path}: missing; MovieLens 100K needs u.genre to name the genre flags of u.item")
    with FileSystems.open(path) as fh:
        text = fh.read().decode("latin-1")
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, _, index = line.rpartition("|")
        if not name or not index.strip().isdigit():
            raise records.InputError(f"{path}:{number}: expected 'name|index', found {line!r}")
        pairs.append((int(index), name))
    if [i for i, _ in sorted(pairs)] != list(range(len(pairs))):
        raise records.InputError(f"{path}: genre indices are not 0..{len(pairs) - 1}")
    return tuple(name for _, name in sorted(pairs))


def movielens_100k_sources(data_dir: str, **options: Any) -> list:
    """Specs for u.data, u.item and u.user in `data_dir` (genre names from u.genre)."""
    genres = options.pop("genres", None) or read_genres(FileSystems.join(data_dir, "u.genre"))
    specs = []
    for name, (kind, _, _) in ML100K_FILES.items():
        extra = {"genres": tuple(genres)} if kind == records.ITEMS else {}
        specs.append(source_spec.make_spec(kind, FileSystems.join(data_dir, name), "ml100k", **options, **extra))
    return specs


def movielens_csv_sources(data_dir: str, **options: Any) -> list:
    """Specs for ratings.csv, movies.csv and, when present, tags.csv in `data_dir`."""
    specs = [
        source_spec.make_spec(records.INTERACTIONS, FileSystems.join(data_dir, "ratings.csv"), "mlcsv", **options),
        source_spec.make_spec(records.ITEMS, FileSystems.join(data_dir, "movies.csv"), "mlcsv", **options),
    ]
    tags = FileSystems.join(data_dir, "tags.csv")
    if FileSystems.exists(tags):
        specs.append(source_spec.make_spec(records.TAGS, tags, "mlcsv", **options))
    return specs


def _expected_fields(spec: source_spec.SourceSpec) -> int:
    if spec.kind == records.ITEMS:
        genres = spec.option("genres")
        if not genres:
            raise ValueError(f"{spec.path}: ml100k items need the genres option (names from u.genre)")
        return _ITEM_FIXED_FIELDS + len(genres)
    if spec.kind not in _SEPARATORS:
        raise ValueError(f"{spec.path}: MovieLens 100K has no {spec.kind} file")
    return next(n for kind, n, _ in ML100K_FILES.values() if kind == spec.kind)


def check_ml100k(spec: source_spec.SourceSpec, path: str, first_line: bytes) -> None:
    """The first line must have the file's field count and separator."""
    expected = _expected_fields(spec)
    sep = _SEPARATORS[spec.kind]
    found = len(first_line.decode("latin-1").split(sep))
    if found != expected:
        raise records.InputError(
            f"{path}: first line has {found} {sep!r}-separated field(s), expected {expected} "
            f"for MovieLens 100K {spec.kind}; is this the right file (u.data/u.item/u.user)?"
        )


def parse_ml100k(spec: source_spec.SourceSpec, row: records.RawRow) -> records.Record:
    """One line of u.data/u.item/u.user -> a record, or RowError."""
    text = files.decode(spec, row.payload)
    fields = text.split(_SEPARATORS[spec.kind])
    expected = _expected_fields(spec)
    if len(fields) != expected:
        raise records.RowError(
            records.MALFORMED_ROW, f"{len(fields)} fields, expected {expected} {_SEPARATORS[spec.kind]!r}-separated"
        )
    if spec.kind == records.INTERACTIONS:
        user_id, item_id, rating, ts = fields
        return records.Interaction(
            user_id=values.required_id("user_id", user_id),
            item_id=values.required_id("item_id", item_id),
            timestamp=values.timestamp("timestamp", ts, values.TimestampRule.from_spec(spec)),
            rating=values.number("rating", rating) if rating.strip() else _missing("rating"),
            location=row.location,
        )
    if spec.kind == records.ITEMS:
        flags = fields[_ITEM_FIXED_FIELDS:]
        bad = [(g, v) for g, v in zip(spec.option("genres"), flags) if v.strip() not in ("0", "1")]
        if bad:
            raise records.RowError(records.BAD_NUMBER, f"genre flag {bad[0][0]}={bad[0][1]!r}, expected 0 or 1")
        release = fields[2].strip()
        return records.Item(
            item_id=values.required_id("item_id", fields[0]),
            title=values.required_text("title", fields[1]),
            categories=tuple(g for g, v in zip(spec.option("genres"), flags) if v.strip() == "1"),
            description=f"released {release}" if release else "",
            location=row.location,
        )
    return records.User(
        user_id=values.required_id("user_id", fields[0]),
        attributes=values.attributes(dict(zip(USER_ATTRIBUTES, fields[1:]))),
        location=row.location,
    )


def _missing(name: str) -> float:
    # u.data always carries a rating; an empty one is a broken row, not "unrated".
    raise records.RowError(records.MISSING_FIELD, f"required field {name} is empty")
