"""Value coercions shared by every reader format.

A bad value gets the same dead-letter reason wherever it comes from (CSV,
JSONL, Parquet, MovieLens); see the value rules in `readers`' docstring.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
from typing import Any, Mapping, Optional

from beam_pipelines.sources import records

# One coercion per kind of field, shared by every format (`movielens`
# uses them too), so a value gets the same reason wherever it comes from.


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def required_id(name: str, value: Any) -> str:
    """An id as a string; ints (JSON/Parquet) become their decimal form."""
    if _is_empty(value):
        raise records.RowError(records.MISSING_FIELD, f"required field {name} is {_shown(value)}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise records.RowError(
            records.MALFORMED_ROW, f"field {name}={value!r} is a {type(value).__name__}, expected a string or integer"
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise records.RowError(records.MALFORMED_ROW, f"field {name}={value!r} is not an integral id")
        value = int(value)  # Parquet/pandas turn nullable int columns into floats
    return str(value).strip()


def required_text(name: str, value: Any) -> str:
    if _is_empty(value):
        raise records.RowError(records.MISSING_FIELD, f"required field {name} is {_shown(value)}")
    return str(value).strip()


def optional_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def number(name: str, value: Any) -> float:
    """A finite float; bools are refused (JSON true is not a rating)."""
    if isinstance(value, bool):
        raise records.RowError(records.BAD_NUMBER, f"field {name}={value!r} is a boolean, expected a number")
    try:
        result = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise records.RowError(records.BAD_NUMBER, f"field {name}={value!r} is not a number") from None
    if not math.isfinite(result):
        raise records.RowError(records.BAD_NUMBER, f"field {name}={value!r} is not a finite number")
    return result


def optional_number(name: str, value: Any) -> Optional[float]:
    return None if _is_empty(value) else number(name, value)


def weight(name: str, value: Any) -> float:
    """The interaction weight: 1.0 when absent, else a finite number > 0."""
    if _is_empty(value):
        return 1.0
    result = number(name, value)
    if result <= 0:
        raise records.RowError(records.BAD_NUMBER, f"field {name}={value!r} must be > 0")
    return result


@dataclasses.dataclass(frozen=True)
class TimestampRule:
    lo: int
    hi: int
    scale: float  # source units per second

    @classmethod
    @functools.lru_cache(maxsize=64)  # once per spec, not once per row
    def from_spec(cls, spec) -> "TimestampRule":
        """spec: a source_spec.SourceSpec (hashable, so the rule is built once per spec)."""
        unit = spec.option("timestamp_unit")
        if unit not in ("s", "ms"):
            raise ValueError(f"timestamp_unit must be 's' or 'ms', got {unit!r}")
        return cls(int(spec.option("min_timestamp")), int(spec.option("max_timestamp")), 1000.0 if unit == "ms" else 1.0)


def timestamp(name: str, value: Any, rule: TimestampRule) -> int:
    """Epoch seconds from a number (in the rule's unit) or an ISO-8601 string.

    Every failure is BAD_TIMESTAMP (not BAD_NUMBER): the dead-letter report
    then tells "fix your time column" apart from "fix your ratings".
    """
    if _is_empty(value):
        raise records.RowError(records.MISSING_FIELD, f"required field {name} is {_shown(value)}")
    try:
        seconds = _seconds(value, rule.scale)
    except (ValueError, OverflowError):  # e.g. a 400-digit number
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise records.RowError(
            records.BAD_TIMESTAMP, f"field {name}={value!r} is neither epoch {_UNITS[rule.scale]} nor ISO-8601"
        )
    result = int(seconds // 1)
    if not rule.lo <= result <= rule.hi:
        raise records.RowError(
            records.BAD_TIMESTAMP,
            f"field {name}={value!r} is {result} epoch seconds, outside [{rule.lo}, {rule.hi}]"
            + ("; milliseconds? pass timestamp_unit='ms'" if result > rule.hi and rule.scale == 1.0 else ""),
        )
    return result


_UNITS = {1.0: "seconds", 1000.0: "milliseconds"}


def _seconds(value: Any, scale: float) -> Optional[float]:
    if isinstance(value, datetime.datetime):  # Parquet timestamp columns
        return _aware(value).timestamp()
    if isinstance(value, datetime.date):
        return _aware(datetime.datetime.combine(value, datetime.time())).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / scale
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        # int() first: float() would round 19-digit nanosecond-ish values.
        return (int(text) if text.lstrip("-").isdigit() else float(text)) / scale
    except ValueError:
        pass
    try:
        return _aware(datetime.datetime.fromisoformat(text)).timestamp()
    except ValueError:
        return None


def _aware(value: datetime.datetime) -> datetime.datetime:
    # Naive times are taken as UTC so results do not depend on the worker's zone.
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def categories(value: Any, separator: str) -> tuple:
    """A list, or a separator-joined string, -> unique non-empty names in order."""
    if _is_empty(value):
        return ()
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value if v is not None]
    else:
        parts = str(value).split(separator)
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def attributes(values: Mapping[str, Any]) -> tuple:
    """Free-form user attributes as sorted (key, string) pairs, empties dropped."""
    out = {}
    for key, value in values.items():
        if _is_empty(value):
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = "|".join(str(v) for v in value)
        elif isinstance(value, dict):
            text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        else:
            text = str(value).strip()
        if text:
            out[str(key)] = text
    return tuple(sorted(out.items()))


def _shown(value: Any) -> str:
    return "absent" if value is None else f"empty ({value!r})"
