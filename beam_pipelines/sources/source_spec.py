"""What one input is: `SourceSpec` (kind, path, format, column mapping, options).

Every reader takes a spec: `files` streams its rows, `readers` (generic CSV,
JSONL, Parquet) and `movielens` (ml100k) parse them. The spec knows every
format's name, the canonical fields of every kind (`FIELDS`) and the default
column names of MovieLens CSV (`MLCSV_COLUMNS`), so a typo in a kind, format,
column or option name fails where the spec is built, not on the first row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from beam_pipelines.sources import records

FORMATS = ("csv", "jsonl", "parquet", "ml100k", "mlcsv")
CSV_FORMATS = ("csv", "mlcsv")

# Canonical fields per kind: (required, optional). Users take every other
# column as a free-form attribute.
FIELDS = {
    records.INTERACTIONS: (("user_id", "item_id", "timestamp"), ("rating", "weight", "event_type")),
    records.ITEMS: (("item_id", "title"), ("categories", "description")),
    records.USERS: (("user_id",), ()),
    records.TAGS: (("item_id", "tag"), ("user_id", "timestamp")),
}

# MovieLens CSV column names (ratings.csv, movies.csv, tags.csv).
MLCSV_COLUMNS = {"user_id": "userId", "item_id": "movieId", "categories": "genres"}

DEFAULT_OPTIONS = {
    "delimiter": ",",
    "categories_separator": "|",
    "encoding": "utf-8",
    "min_timestamp": 1,
    # 2100-01-01T00:00:00Z: later values are almost surely milliseconds.
    "max_timestamp": 4102444800,
    "timestamp_unit": "s",
    "genres": (),
}
_FORMAT_OPTIONS = {"ml100k": {"encoding": "latin-1"}}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One input: which kind of record, where, in which format, how to map it.

    Frozen and made of tuples so it is hashable and pickles to Beam workers.
    `columns` is ((canonical_name, source_column), ...) overriding the
    format's defaults; `options` is ((key, value), ...) overriding
    DEFAULT_OPTIONS (see `option`).
    """

    kind: str
    path: str
    format: str
    columns: tuple = ()
    options: tuple = ()

    def __post_init__(self) -> None:
        # A typo in a kind/format/column name is a programming or flag error;
        # catch it where the spec is built, not on the first row.
        if self.kind not in records.KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}; expected one of {records.KINDS}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r} for {self.path}; expected one of {FORMATS}")
        required, optional = FIELDS[self.kind]
        for canonical, _ in self.columns:
            if canonical not in required + optional:
                raise ValueError(
                    f"column mapping names {canonical!r}, which is not a {self.kind} field; "
                    f"expected one of {required + optional}"
                )
        for key, _ in self.options:
            if key not in DEFAULT_OPTIONS:
                raise ValueError(f"unknown reader option {key!r}; expected one of {tuple(DEFAULT_OPTIONS)}")
        try:
            hash(self)  # Beam and the per-spec caches need hashable specs
        except TypeError:
            raise ValueError(f"{self.path}: columns/options must hold tuples, not lists (use make_spec)") from None

    def option(self, key: str) -> Any:
        """The effective option value: spec, else format default, else global default."""
        for k, v in self.options:
            if k == key:
                return v
        return _FORMAT_OPTIONS.get(self.format, {}).get(key, DEFAULT_OPTIONS[key])

    def column_map(self) -> dict:
        """canonical field -> source column name, defaults merged with overrides."""
        required, optional = FIELDS[self.kind]
        mapping = {name: name for name in required + optional}
        if self.format == "mlcsv":
            mapping.update({k: v for k, v in MLCSV_COLUMNS.items() if k in mapping})
        mapping.update(dict(self.columns))
        return mapping

    def required_columns(self) -> list:
        """The source column names of the kind's required fields, in FIELDS order."""
        mapping = self.column_map()
        return [mapping[name] for name in FIELDS[self.kind][0]]


def make_spec(kind: str, path: str, format: str, columns: Optional[Mapping[str, str]] = None, **options: Any) -> SourceSpec:
    """Build a SourceSpec from plain dicts/kwargs (sorted, so equal inputs give equal specs)."""
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if v is not None}
    return SourceSpec(
        kind=kind,
        path=path,
        format=format,
        columns=tuple(sorted((columns or {}).items())),
        options=tuple(sorted(opts.items())),
    )
