"""Row readers: turn raw input files into canonical records, one row at a time.

The preprocess pipeline calls these in three steps: `check_source` before the
pipeline starts (a wrong path or format should fail in a second, not after a
Dataflow job has spun up), `iter_raw_rows` to stream one file's rows, and
`parse_row` per row, which either returns a record from `records` or raises
`records.RowError` so the pipeline can dead-letter the row with its reason.

Formats: generic "csv", "jsonl" and "parquet" (column names mapped onto the
canonical fields by `SourceSpec.columns`), MovieLens "mlcsv" (the
latest/20M/25M/32M CSV layout) and "ml100k" (MovieLens 100K's u.data/u.item/
u.user; its parsers live in `readers_movielens`).

Value rules (shared by every format, so the same bad value gets the same
reason wherever it comes from):
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
import dataclasses
import functools
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

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
MLCSV_NO_GENRES = "(no genres listed)"

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

Record = Union[records.Interaction, records.Item, records.User, records.ItemTag]


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


# --------------------------------------------------------------------------- files


def _is_local(path: str) -> bool:
    return "://" not in path


def expand_paths(spec: SourceSpec) -> list:
    """The files `spec.path` names (a glob expands to many), sorted for determinism."""
    try:
        metadata = FileSystems.match([spec.path])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError for unreadable patterns
        raise records.InputError(f"{spec.kind} input {spec.path}: cannot list files ({e})") from e
    paths = sorted(m.path for m in metadata if not (_is_local(m.path) and os.path.isdir(m.path)))
    if not paths:
        raise records.InputError(
            f"{spec.kind} input {spec.path}: no file matches this path; check the path "
            f"(globs such as part-*.csv are allowed) or pass the right file"
        )
    return paths


def _open(path: str):
    # AUTO: a .gz/.bz2 suffix is decompressed transparently while streaming.
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO)


def _text_lines(path: str) -> Iterator[tuple]:
    """(1-based line number, line bytes without newline) for every physical line."""
    with _open(path) as fh:
        for number, line in enumerate(iter(fh.readline, b""), start=1):
            line = line.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # UTF-8 byte-order mark (Excel exports)
            yield number, line


def iter_raw_rows(spec: SourceSpec, path: str) -> Iterator[records.RawRow]:
    """Stream the data rows of one file (header and blank lines skipped).

    Text rows carry raw bytes so that decoding errors become BAD_ENCODING
    dead-letters in `parse_row` instead of killing the read.
    """
    if spec.format == "parquet":
        yield from _iter_parquet(spec, path)
        return
    header_seen = spec.format not in CSV_FORMATS
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        if not header_seen:
            header_seen = True
            continue
        yield records.RawRow(kind=spec.kind, location=f"{path}:{number}", payload=line)


def _iter_parquet(spec: SourceSpec, path: str) -> Iterator[records.RawRow]:
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        number = 0
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096):
            for payload in batch.to_pylist():
                number += 1
                yield records.RawRow(kind=spec.kind, location=f"{path}:row {number}", payload=payload)


@functools.lru_cache(maxsize=256)
def _csv_header(path: str, delimiter: str, encoding: str) -> tuple:
    """The header of a CSV file, read once per file per process.

    parse_row only gets a row, so it re-reads the header of the row's file;
    the cache makes that one read per file per worker.
    """
    for _, line in _text_lines(path):
        if line.strip():
            try:
                text = line.decode(encoding)
            except UnicodeDecodeError as e:
                raise records.InputError(f"{path}: header is not valid {encoding} ({e})") from e
            return tuple(name.strip() for name in next(csv.reader([text], delimiter=delimiter)))
    raise records.InputError(f"{path}: file is empty; expected a CSV header line")


def _location_path(location: str) -> str:
    return location.rsplit(":", 1)[0]


# --------------------------------------------------------------------------- checks


def check_source(spec: SourceSpec) -> None:
    """Fail fast on an input that cannot be read at all, naming file and expectation.

    Checks every file the spec expands to. Empty files are an error unless a
    glob also matched files with data (sharded writers leave empty shards).
    """
    paths = expand_paths(spec)
    non_empty = [p for p in paths if not _is_blank_file(p)]
    if not non_empty:
        raise records.InputError(
            f"{spec.kind} input {', '.join(paths)}: file is empty; expected {_expected(spec)}"
        )
    for path in non_empty:
        if spec.format in CSV_FORMATS:
            _check_csv(spec, path)
        elif spec.format == "jsonl":
            _check_jsonl(spec, path)
        elif spec.format == "parquet":
            _check_parquet(spec, path)
        else:
            from beam_pipelines.sources import (
                movielens as readers_movielens,  # builds on this module
            )

            readers_movielens.check_ml100k(spec, path, _first_line(path))


def _expected(spec: SourceSpec) -> str:
    required = [spec.column_map()[name] for name in FIELDS[spec.kind][0]]
    return f"a {spec.format} file of {spec.kind} with columns {required}"


def _first_line(path: str) -> bytes:
    for _, line in _text_lines(path):
        if line.strip():
            return line
    return b""


def _is_blank_file(path: str) -> bool:
    if _is_local(path) and os.path.getsize(path) == 0:
        return True
    with _open(path) as fh:
        head = fh.read(4096)
    # Parquet is binary; only text is "blank" when it holds whitespace alone.
    return not head.strip() if head[:4] != b"PAR1" else False


def _check_csv(spec: SourceSpec, path: str) -> None:
    header = _csv_header(path, spec.option("delimiter"), spec.option("encoding"))
    mapping = spec.column_map()
    expected = [mapping[name] for name in FIELDS[spec.kind][0]]
    missing = [c for c in expected if c not in header]
    if missing:
        raise records.InputError(
            f"{path}: CSV header lacks required column(s) {missing} for {spec.kind}; "
            f"expected {expected} (delimiter {spec.option('delimiter')!r}), found {list(header)}. "
            f"Map your column names with the column-mapping flags (e.g. user_id=uid)."
        )


def _check_jsonl(spec: SourceSpec, path: str) -> None:
    line = _first_line(path)
    try:
        value = json.loads(line.decode(spec.option("encoding")))
    except (UnicodeDecodeError, ValueError) as e:
        raise records.InputError(
            f"{path}: first line is not JSON ({e}); expected JSON Lines, one object per line, "
            f"e.g. {{\"user_id\": \"u1\", ...}}"
        ) from e
    if not isinstance(value, dict):
        raise records.InputError(
            f"{path}: first line is JSON {type(value).__name__}, not an object; "
            f"expected JSON Lines with one object per line"
        )


def _check_parquet(spec: SourceSpec, path: str) -> None:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        head = fh.read(4)
        try:
            fh.seek(-4, os.SEEK_END)
            tail = fh.read(4)
        except OSError:  # shorter than 4 bytes
            tail = b""
        if head != b"PAR1" or tail != b"PAR1":
            raise records.InputError(
                f"{path}: not a Parquet file (magic bytes {head!r}...{tail!r}, expected b'PAR1'); "
                f"pass the right file or the right --format"
            )
        import pyarrow.parquet as pq

        fh.seek(0)
        names = pq.ParquetFile(fh).schema_arrow.names
    expected = [spec.column_map()[name] for name in FIELDS[spec.kind][0]]
    missing = [c for c in expected if c not in names]
    if missing:
        raise records.InputError(
            f"{path}: Parquet schema lacks required column(s) {missing} for {spec.kind}; "
            f"expected {expected}, found {names}. Map your column names with the column-mapping flags."
        )


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

# --------------------------------------------------------------------------- parsing


def parse_row(spec: SourceSpec, row: records.RawRow, header: Optional[Sequence[str]] = None) -> Record:
    """One raw row -> one canonical record, or `records.RowError`.

    `header` (CSV only) spares the per-file header lookup when the caller
    already has it.
    """
    if spec.format == "ml100k":
        from beam_pipelines.sources import (
            movielens as readers_movielens,  # builds on this module
        )

        return readers_movielens.parse_ml100k(spec, row)
    if spec.format == "parquet":
        values = row.payload
    elif spec.format == "jsonl":
        values = _jsonl_values(spec, row.payload)
    else:
        if header is None:
            header = _csv_header(_location_path(row.location), spec.option("delimiter"), spec.option("encoding"))
        values = _csv_values(spec, row.payload, header)
    return build_record(spec, values, row.location)


def decode(spec: SourceSpec, payload: bytes) -> str:
    encoding = spec.option("encoding")
    try:
        return payload.decode(encoding)
    except UnicodeDecodeError as e:
        bad = payload[e.start : e.end]
        raise records.RowError(
            records.BAD_ENCODING,
            f"bytes {bad!r} at offset {e.start} are not valid {encoding}; "
            f"re-encode the file or pass the right encoding option",
        ) from None


def _csv_values(spec: SourceSpec, payload: bytes, header: Sequence[str]) -> dict:
    text = decode(spec, payload)
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
    text = decode(spec, payload)
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


def build_record(spec: SourceSpec, values: Mapping[str, Any], location: str) -> Record:
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
            cats = tuple(c for c in cats if c != MLCSV_NO_GENRES)
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


# --------------------------------------------------------------------------- sources


def movielens_100k_sources(data_dir: str, **options: Any) -> list:
    """Specs for MovieLens 100K's u.data, u.item and u.user (genres from u.genre)."""
    from beam_pipelines.sources import (
        movielens as readers_movielens,  # builds on this module
    )

    return readers_movielens.movielens_100k_sources(data_dir, **options)


def movielens_csv_sources(data_dir: str, **options: Any) -> list:
    """Specs for ratings.csv, movies.csv and (when present) tags.csv."""
    from beam_pipelines.sources import (
        movielens as readers_movielens,  # builds on this module
    )

    return readers_movielens.movielens_csv_sources(data_dir, **options)


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
