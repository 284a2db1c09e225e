"""Shared pieces of the raw models: a tolerant base, bounded strings, each channel's time format."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    WithJsonSchema,
)


class RawModel(BaseModel):
    """Tolerant reader: unknown fields are ignored, known ones are typed strictly (no coercion)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


# Bounds keep one hostile message from costing much memory; 64 KiB payloads fit well inside.
# An identifier: printable, not blank (a blank id would link nothing and key nothing).
_PRINTABLE_NOT_BLANK = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=_PRINTABLE_NOT_BLANK)]
ShortText = Annotated[str, StringConstraints(max_length=1024)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Text = Annotated[str, StringConstraints(max_length=32_768)]
# E-mail addresses are trimmed before use (contract 5), so surrounding white space is fine.
Email = Annotated[str, StringConstraints(min_length=1, max_length=320, pattern=r"\S")]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Larger-than-representable epoch values are "in the future" rather than malformed; this stands
# for them so that the future-timestamp check, not the schema, rejects them.
FAR_FUTURE = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)

_DATE_TIME = r"([0-9]{4})-([0-9]{2})-([0-9]{2})%s([0-9]{2}):([0-9]{2}):([0-9]{2})"
_RFC3339 = re.compile(
    "^" + _DATE_TIME % "[Tt]" + r"(?:\.([0-9]{1,9}))?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_HELPDESK = re.compile("^" + _DATE_TIME % " " + r"(?:\.([0-9]{1,6}))?([+-][0-9]{2}:[0-9]{2})$")


def _offset(text: str) -> timezone:
    if text in ("Z", "z"):
        return UTC
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(f"invalid UTC offset {text!r}")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if text[0] == "-" else delta)


def _from_match(match: re.Match[str]) -> datetime:
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction = (match.group(7) or "").ljust(6, "0")[:6]
    return datetime(
        year, month, day, hour, minute, second, int(fraction), tzinfo=_offset(match.group(8))
    )


def parse_rfc3339(value: Any) -> datetime:
    """'2026-11-20T10:15:30.123Z' | '...+02:00' -> aware datetime; anything else -> ValueError."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 string")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("must be RFC 3339 with an offset or Z, e.g. 2026-11-20T10:15:30.123Z")
    return _from_match(match)


def parse_helpdesk_time(value: Any) -> datetime:
    """'2026-11-20 10:15:30.123456+01:00' -> aware datetime; anything else -> ValueError."""
    if not isinstance(value, str):
        raise ValueError("must be a string 'YYYY-MM-DD HH:MM:SS[.ffffff]+HH:MM'")
    match = _HELPDESK.fullmatch(value)
    if match is None:
        raise ValueError("must be 'YYYY-MM-DD HH:MM:SS[.ffffff]+HH:MM' (space, offset required)")
    return _from_match(match)


def _epoch(value: Any, unit_ms: int) -> datetime:
    if isinstance(value, float) and value >= 2**63 and value.is_integer():
        # orjson reads integer literals beyond 64 bits as floats: still "in the future".
        return FAR_FUTURE
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("must be an integer")
    if value < 0:
        raise ValueError("must not be before 1970-01-01 (negative epoch)")
    try:
        return EPOCH + timedelta(milliseconds=value * unit_ms)
    except OverflowError:
        return FAR_FUTURE


def parse_epoch_ms(value: Any) -> datetime:
    """Epoch milliseconds (int) -> aware UTC datetime."""
    return _epoch(value, 1)


def parse_epoch_s(value: Any) -> datetime:
    """Epoch seconds (int) -> aware UTC datetime."""
    return _epoch(value, 1000)


def _not_before_epoch(value: datetime) -> datetime:
    if value < EPOCH:
        raise ValueError("must not be before 1970-01-01")
    return value


Rfc3339Time = Annotated[
    datetime,
    BeforeValidator(parse_rfc3339),
    AfterValidator(_not_before_epoch),
    WithJsonSchema({"type": "string", "pattern": _RFC3339.pattern}),
]
HelpdeskTime = Annotated[
    datetime,
    BeforeValidator(parse_helpdesk_time),
    AfterValidator(_not_before_epoch),
    WithJsonSchema({"type": "string", "pattern": _HELPDESK.pattern}),
]
EpochMillis = Annotated[
    datetime, BeforeValidator(parse_epoch_ms), WithJsonSchema({"type": "integer", "minimum": 0})
]
EpochSeconds = Annotated[
    datetime, BeforeValidator(parse_epoch_s), WithJsonSchema({"type": "integer", "minimum": 0})
]
