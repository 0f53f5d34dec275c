"""Canonical records that every reader produces and every pipeline consumes.

Readers turn a raw row (a CSV/JSONL line, a Parquet row, a MovieLens line)
into exactly one of these, or raise `RowError`; the pipeline turns a
`RowError` into a `DeadLetter`. Records are frozen, hashable and picklable so
Beam can move them between workers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Union

# Why a row was dead-lettered. The names are stable: stats.json and tests
# key on them.
BAD_NUMBER = "bad_number"  # a numeric field does not parse
MISSING_FIELD = "missing_field"  # a required field is absent or empty
UNKNOWN_ITEM = "unknown_item"  # an interaction names an item not in the catalog
UNKNOWN_USER = "unknown_user"  # reserved: users file given and user absent
BAD_ENCODING = "bad_encoding"  # bytes are not valid in the declared encoding
BAD_TIMESTAMP = "bad_timestamp"  # unparsable or outside the allowed range
MALFORMED_ROW = "malformed_row"  # wrong field count, invalid JSON, not an object
DUPLICATE_ID = "duplicate_id"  # a second catalog/user row with an id already seen

REASONS = (
    BAD_NUMBER,
    MISSING_FIELD,
    UNKNOWN_ITEM,
    UNKNOWN_USER,
    BAD_ENCODING,
    BAD_TIMESTAMP,
    MALFORMED_ROW,
    DUPLICATE_ID,
)

# Source kinds.
INTERACTIONS = "interactions"
ITEMS = "items"
USERS = "users"
TAGS = "tags"
KINDS = (INTERACTIONS, ITEMS, USERS, TAGS)


class RowError(ValueError):
    """A row that cannot become a record; carries a stable `reason`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InputError(RuntimeError):
    """An input that cannot be read at all (missing file, wrong format).

    Raised before the pipeline starts; the message names the file and what
    was expected, and the CLI prints it and exits non-zero.
    """


@dataclasses.dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    timestamp: int  # epoch seconds
    weight: float = 1.0
    rating: Optional[float] = None
    event_type: str = ""
    location: str = ""  # "path:line" of the source row, for later dead-letters


@dataclasses.dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    categories: tuple = ()  # tuple[str, ...]
    description: str = ""
    location: str = ""


@dataclasses.dataclass(frozen=True)
class User:
    user_id: str
    attributes: tuple = ()  # tuple[tuple[str, str], ...], sorted by key
    location: str = ""

    def attribute_dict(self) -> dict:
        return dict(self.attributes)


@dataclasses.dataclass(frozen=True)
class ItemTag:
    """A free-text tag on an item (MovieLens tags.csv); folded into descriptions."""

    item_id: str
    tag: str
    location: str = ""


Record = Union[Interaction, Item, User, ItemTag]  # what a reader turns one row into


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One unparsed row and where it came from.

    `payload` is the raw bytes of a text line, or a dict for a Parquet row.
    `location` is "path:line" (1-based line numbers; header is line 1) or
    "path:row N" for Parquet.
    """

    kind: str
    location: str
    payload: object


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    source: str  # a kind, e.g. "interactions"
    location: str  # "path:line"
    reason: str  # one of REASONS
    detail: str  # human-readable: which field, what value, what was expected
    raw: str  # the raw row as text (undecodable bytes escaped)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)


def raw_text(payload: object) -> str:
    """A printable form of a raw payload for the dead-letter file."""
    if isinstance(payload, bytes):
        return payload.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    if isinstance(payload, dict):
        return json.dumps(payload, default=str, ensure_ascii=False, sort_keys=True)
    return str(payload)
