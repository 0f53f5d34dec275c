"""Row readers: turn raw input files into canonical records, one row at a time.

The preprocess pipeline calls these in three steps: `check_source` before the
pipeline starts (a wrong path or format should fail in a second, not after a
Dataflow job has spun up), `files.iter_raw_rows` to stream one file's rows,
and `parse_row` per row, which either returns a record from `records` or
raises `records.RowError` so the pipeline can dead-letter the row with its
reason. This module picks per format; it builds on `source_spec` (what an
input is), `files` (format-agnostic file plumbing and checks) and
`movielens` (the MovieLens layouts), and makes the specs of the generic
formats (`generic_sources`, `infer_format`). The MovieLens spec builders are
`movielens.movielens_100k_sources` / `movielens_csv_sources` (also reachable
here, as the CLI's one entry point for every layout).

Formats: generic "csv", "jsonl" and "parquet" (column names mapped onto the
canonical fields by `SourceSpec.columns`), MovieLens "mlcsv" (the
latest/20M/25M/32M CSV layout) and "ml100k" (MovieLens 100K's u.data/u.item/
u.user; its parsers live in `movielens`).

Value rules (shared by every format, so the same bad value gets the same
reason wherever it comes from; see `values`):
- a required field that is absent, null or empty -> MISSING_FIELD;
- rating/weight that is not a finite number, or weight <= 0 -> BAD_NUMBER;
- timestamp: epoch seconds (int/float; milliseconds with option
  timestamp_unit="ms") or an ISO-8601 string (UTC when no offset). Anything
  else, and anything outside [min_timestamp, max_timestamp], -> BAD_TIMESTAMP
  (a timestamp problem is always BAD_TIMESTAMP, never BAD_NUMBER);
- bytes not decodable in the declared encoding -> BAD_ENCODING;
- wrong CSV field count, unparsable CSV quoting, invalid JSON or JSON that is
  not an object -> MALFORMED_ROW. Rows are physical lines, so a quoted CSV
  field holding a newline is MALFORMED_ROW too (no MovieLens file has one).
UNKNOWN_ITEM and DUPLICATE_ID need the whole catalog and are the pipeline's.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

from beam_pipelines.sources import files, movielens, records
from beam_pipelines.sources.source_spec import CSV_FORMATS, FIELDS, SourceSpec, make_spec
from beam_pipelines.sources.values import (
    TimestampRule,
    attributes,
    categories,
    optional_number,
    optional_text,
    required_id,
    required_text,
    timestamp,
    weight,
)

# The MovieLens spec builders, reachable beside generic_sources (defined in `movielens`).
movielens_100k_sources = movielens.movielens_100k_sources
movielens_csv_sources = movielens.movielens_csv_sources


# --------------------------------------------------------------------------- checks


def check_source(spec: SourceSpec) -> None:
    """Fail fast on an input that cannot be read at all, naming file and expectation.

    Checks every file the spec expands to. Empty files are an error unless a
    glob also matched files with data (sharded writers leave empty shards).
    """
    paths = files.expand_paths(spec)
    non_empty = [p for p in paths if not files.is_blank_file(p)]
    if not non_empty:
        raise records.InputError(
            f"{spec.kind} input {', '.join(paths)}: file is empty; "
            f"expected a {spec.format} file of {spec.kind} with columns {spec.required_columns()}"
        )
    for path in non_empty:
        if spec.format in CSV_FORMATS:
            files.check_csv(spec, path)
        elif spec.format == "jsonl":
            files.check_jsonl(spec, path)
        elif spec.format == "parquet":
            files.check_parquet(spec, path)
        else:
            movielens.check_ml100k(spec, path, files.first_line(path))


# --------------------------------------------------------------------------- parsing


def parse_row(spec: SourceSpec, row: records.RawRow, header: Optional[Sequence[str]] = None) -> records.Record:
    """One raw row -> one canonical record, or `records.RowError`.

    `header` (CSV only) spares the per-file header lookup when the caller
    already has it.
    """
    if spec.format == "ml100k":
        return movielens.parse_ml100k(spec, row)
    if spec.format == "parquet":
        values = row.payload
    elif spec.format == "jsonl":
        values = _jsonl_values(spec, row.payload)
    else:
        if header is None:
            header = files.csv_header(
                files.location_path(row.location), spec.option("delimiter"), spec.option("encoding"))
        values = _csv_values(spec, row.payload, header)
    return build_record(spec, values, row.location)


def _csv_values(spec: SourceSpec, payload: bytes, header: Sequence[str]) -> dict:
    text = files.decode(spec, payload)
    try:
        rows = list(csv.reader([text], delimiter=spec.option("delimiter"), strict=True))
    except csv.Error as e:
        raise records.RowError(records.MALFORMED_ROW, f"unparsable CSV quoting ({e})") from None
    fields = rows[0] if rows else []
    if len(fields) != len(header):
        raise records.RowError(
            records.MALFORMED_ROW,
            f"{len(fields)} fields, expected {len(header)} as in the header {list(header)}",
        )
    return dict(zip(header, fields))


def _jsonl_values(spec: SourceSpec, payload: bytes) -> dict:
    text = files.decode(spec, payload)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise records.RowError(records.MALFORMED_ROW, f"invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise records.RowError(records.MALFORMED_ROW, f"JSON {type(value).__name__} is not an object")
    return value


@functools.lru_cache(maxsize=64)
def _column_map(spec: SourceSpec) -> dict:
    return spec.column_map()  # cached: parse_row runs once per row


def build_record(spec: SourceSpec, values: Mapping[str, Any], location: str) -> records.Record:
    """A record from a source-column -> value mapping (CSV, JSONL and Parquet share it)."""
    cols = _column_map(spec)

    def get(name: str) -> Any:
        return values.get(cols[name])

    if spec.kind == records.INTERACTIONS:
        return records.Interaction(
            user_id=required_id("user_id", get("user_id")),
            item_id=required_id("item_id", get("item_id")),
            timestamp=timestamp("timestamp", get("timestamp"), TimestampRule.from_spec(spec)),
            weight=weight("weight", get("weight")),
            rating=optional_number("rating", get("rating")),
            event_type=optional_text(get("event_type")),
            location=location,
        )
    if spec.kind == records.ITEMS:
        cats = categories(get("categories"), spec.option("categories_separator"))
        if spec.format == "mlcsv":
            cats = tuple(c for c in cats if c != movielens.MLCSV_NO_GENRES)
        return records.Item(
            item_id=required_id("item_id", get("item_id")),
            title=required_text("title", get("title")),
            categories=cats,
            description=optional_text(get("description")),
            location=location,
        )
    if spec.kind == records.USERS:
        id_column = cols["user_id"]
        return records.User(
            user_id=required_id("user_id", values.get(id_column)),
            attributes=attributes({k: v for k, v in values.items() if k != id_column}),
            location=location,
        )
    item_id = required_id("item_id", get("item_id"))
    return records.ItemTag(item_id=item_id, tag=required_text("tag", get("tag")), location=location)


# --------------------------------------------------------------------------- generic sources


_EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".deflate")


def infer_format(path: str) -> str:
    """csv/jsonl/parquet from a file name (a .gz suffix is looked through)."""
    name = path.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise records.InputError(
            f"{path}: cannot tell the format from the extension {ext!r}; "
            f"name it .csv/.jsonl/.parquet or pass the format explicitly"
        )
    return _EXTENSIONS[ext]


def generic_sources(
    interactions: str,
    items: str,
    users: Optional[str] = None,
    format: Optional[str] = None,
    columns: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> list:
    """Specs for a generic interactions + items (+ users) schema.

    `columns` is either one mapping canonical -> source column applied to
    every kind (entries that are not a field of a kind are ignored for it),
    or {kind: {canonical: source}} for per-kind mappings.
    """
    specs = []
    for kind, path in ((records.INTERACTIONS, interactions), (records.ITEMS, items), (records.USERS, users)):
        if path is None:
            continue
        specs.append(make_spec(kind, path, format or infer_format(path), _columns_for(kind, columns), **options))
    return specs


def _columns_for(kind: str, columns: Optional[Mapping[str, Any]]) -> dict:
    if not columns:
        return {}
    if any(isinstance(v, Mapping) for v in columns.values()):
        return dict(columns.get(kind, {}))
    required, optional = FIELDS[kind]
    return {k: v for k, v in columns.items() if k in required + optional}
