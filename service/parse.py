"""Parse: raw message bytes -> a validated raw event, or a rejection with its reason.

Checks run in the contract's order: size, JSON, object, schema, future timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, get_args

import orjson
from pydantic import ValidationError

from service.raw import RAW_MODELS, RawEvent

Reason = Literal[
    "invalid_json",
    "not_an_object",
    "schema_violation",
    "timestamp_in_future",
    "payload_too_large",
    "processing_error",
]
REASONS: tuple[Reason, ...] = get_args(Reason)
_MAX_DETAIL = 500


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a message cannot be accepted: a reason code and a detail that names the field."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int
    max_clock_skew: timedelta


def describe_validation_error(exc: ValidationError) -> str:
    """Pydantic error -> 'field.path: what is wrong' for its first error (+ how many more)."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    path = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    text = f"{path}: {message}" if path else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return text[:_MAX_DETAIL]


def parse(channel: str, value: bytes | None, limits: Limits, now: datetime) -> RawEvent | Rejected:
    """(channel, message bytes, limits, wall clock) -> raw event or rejection; never raises."""
    if value is not None and len(value) > limits.max_payload_bytes:
        return Rejected(
            "payload_too_large", f"{len(value)} bytes > {limits.max_payload_bytes} byte limit"
        )
    if not value:
        return Rejected("invalid_json", "empty message (no value)")
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejected("invalid_json", str(exc)[:_MAX_DETAIL])
    if not isinstance(document, dict):
        return Rejected(
            "not_an_object", f"top-level JSON is {type(document).__name__}, not an object"
        )
    try:
        event = RAW_MODELS[channel].model_validate(document)
    except ValidationError as exc:
        return Rejected("schema_violation", describe_validation_error(exc))
    if event.occurred_at > now + limits.max_clock_skew:
        return Rejected(
            "timestamp_in_future",
            f"{event.time_field}: {event.occurred_at.isoformat()} is more than "
            f"{limits.max_clock_skew} ahead of the wall clock",
        )
    return event
