"""A source's files, format-agnostic: find them, open them, stream their rows, check them.

`expand_paths` turns a spec's path (a glob allowed; local or gs://) into
sorted files; `iter_raw_rows` streams one file's data rows as
`records.RawRow` (text lines as raw bytes, so a decoding error becomes a
BAD_ENCODING dead letter in the parser rather than killing the read; Parquet
rows as dicts); `decode` is that per-row decoding. The fail-fast checks of
the generic formats (`check_csv`, `check_jsonl`, `check_parquet`) live here
too; `readers.check_source` picks the one for a spec's format. A .gz/.bz2
suffix is decompressed transparently.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from typing import Iterator

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.sources import records
from beam_pipelines.sources.source_spec import CSV_FORMATS, SourceSpec

PARQUET_MAGIC = b"PAR1"


def is_local(path: str) -> bool:
    return "://" not in path


def expand_paths(spec: SourceSpec) -> list:
    """The files `spec.path` names (a glob expands to many), sorted for determinism."""
    try:
        metadata = FileSystems.match([spec.path])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError for unreadable patterns
        raise records.InputError(f"{spec.kind} input {spec.path}: cannot list files ({e})") from e
    paths = sorted(m.path for m in metadata if not (is_local(m.path) and os.path.isdir(m.path)))
    if not paths:
        raise records.InputError(
            f"{spec.kind} input {spec.path}: no file matches this path; check the path "
            f"(globs such as part-*.csv are allowed) or pass the right file"
        )
    return paths


def open_file(path: str):
    """A binary stream of `path`; AUTO: a .gz/.bz2 suffix is decompressed transparently."""
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO)


def text_lines(path: str) -> Iterator[tuple]:
    """(1-based line number, line bytes without newline) for every physical line."""
    with open_file(path) as fh:
        for number, line in enumerate(iter(fh.readline, b""), start=1):
            line = line.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # UTF-8 byte-order mark (Excel exports)
            yield number, line


def first_line(path: str) -> bytes:
    """The first non-blank line of a text file (b"" when there is none)."""
    for _, line in text_lines(path):
        if line.strip():
            return line
    return b""


def iter_raw_rows(spec: SourceSpec, path: str) -> Iterator[records.RawRow]:
    """Stream the data rows of one file (header and blank lines skipped).

    Text rows carry raw bytes so that decoding errors become BAD_ENCODING
    dead-letters in the parser instead of killing the read.
    """
    if spec.format == "parquet":
        yield from _iter_parquet(spec, path)
        return
    header_seen = spec.format not in CSV_FORMATS
    for number, line in text_lines(path):
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


def location_path(location: str) -> str:
    """The file of a RawRow location ("path:line" / "path:row N")."""
    return location.rsplit(":", 1)[0]


@functools.lru_cache(maxsize=256)
def csv_header(path: str, delimiter: str, encoding: str) -> tuple:
    """The header of a CSV file, read once per file per process.

    The row parser only gets a row, so it re-reads the header of the row's
    file; the cache makes that one read per file per worker.
    """
    for _, line in text_lines(path):
        if line.strip():
            try:
                text = line.decode(encoding)
            except UnicodeDecodeError as e:
                raise records.InputError(f"{path}: header is not valid {encoding} ({e})") from e
            return tuple(name.strip() for name in next(csv.reader([text], delimiter=delimiter)))
    raise records.InputError(f"{path}: file is empty; expected a CSV header line")


def decode(spec: SourceSpec, payload: bytes) -> str:
    """A text row's bytes in the spec's encoding, or RowError BAD_ENCODING naming the bytes."""
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


# --------------------------------------------------------------------------- checks


def is_blank_file(path: str) -> bool:
    """An empty file, or a text file holding whitespace alone (Parquet is never blank)."""
    if is_local(path) and os.path.getsize(path) == 0:
        return True
    with open_file(path) as fh:
        head = fh.read(4096)
    # Parquet is binary; only text is "blank" when it holds whitespace alone.
    return not head.strip() if head[:4] != PARQUET_MAGIC else False


def check_csv(spec: SourceSpec, path: str) -> None:
    """The CSV header must hold the kind's required columns (after the spec's mapping)."""
    header = csv_header(path, spec.option("delimiter"), spec.option("encoding"))
    expected = spec.required_columns()
    missing = [c for c in expected if c not in header]
    if missing:
        raise records.InputError(
            f"{path}: CSV header lacks required column(s) {missing} for {spec.kind}; "
            f"expected {expected} (delimiter {spec.option('delimiter')!r}), found {list(header)}. "
            f"Map your column names with the column-mapping flags (e.g. user_id=uid)."
        )


def check_jsonl(spec: SourceSpec, path: str) -> None:
    """The first line must be a JSON object."""
    line = first_line(path)
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


def check_parquet(spec: SourceSpec, path: str) -> None:
    """Parquet magic bytes at both ends, and a schema with the kind's required columns."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        head = fh.read(4)
        try:
            fh.seek(-4, os.SEEK_END)
            tail = fh.read(4)
        except OSError:  # shorter than 4 bytes
            tail = b""
        if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
            raise records.InputError(
                f"{path}: not a Parquet file (magic bytes {head!r}...{tail!r}, expected b'PAR1'); "
                f"pass the right file or the right --format"
            )
        import pyarrow.parquet as pq

        fh.seek(0)
        names = pq.ParquetFile(fh).schema_arrow.names
    expected = spec.required_columns()
    missing = [c for c in expected if c not in names]
    if missing:
        raise records.InputError(
            f"{path}: Parquet schema lacks required column(s) {missing} for {spec.kind}; "
            f"expected {expected}, found {names}. Map your column names with the column-mapping flags."
        )
