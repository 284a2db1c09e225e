"""Dead-letter headers: exactly the six of contract section 7, as UTF-8 bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from service.deadletter import DeadLetterHeaders, deadletter_headers, read_headers
from service.parse import Rejected, parse
from tests.unit._golden import LIMITS, NOW, Golden, goldens

pytestmark = pytest.mark.unit

CONTRACT_REASONS = (
    "invalid_json",
    "not_an_object",
    "schema_violation",
    "timestamp_in_future",
    "payload_too_large",
)
NAMES = (
    "cx.error.reason",
    "cx.error.detail",
    "cx.source.topic",
    "cx.source.partition",
    "cx.source.offset",
    "cx.failed_at",
)
FAILED_AT = datetime(2026, 11, 20, 12, 0, 1, 234567, tzinfo=UTC)


@pytest.mark.parametrize("reason", CONTRACT_REASONS)
def test_six_utf8_headers(reason: str) -> None:
    detail = "survey.score: a csat score must be 1..5 (récupéré, 日本)"
    headers = deadletter_headers(
        Rejected(reason, detail),
        "cx.raw.web",
        3,
        9_876_543_210,
        FAILED_AT,  # type: ignore[arg-type]
    )
    assert [name for name, _ in headers] == list(NAMES)
    assert all(isinstance(name, str) and isinstance(value, bytes) for name, value in headers)
    decoded = {name: value.decode("utf-8") for name, value in headers}  # strict UTF-8
    assert decoded == {
        "cx.error.reason": reason,
        "cx.error.detail": detail,
        "cx.source.topic": "cx.raw.web",
        "cx.source.partition": "3",
        "cx.source.offset": "9876543210",
        "cx.failed_at": "2026-11-20T12:00:01.234Z",
    }
    model = DeadLetterHeaders.model_validate(read_headers(headers), by_alias=True)
    assert model.reason == reason
    assert model.detail == detail
    assert model.source_topic == "cx.raw.web"
    assert (model.source_partition, model.source_offset) == ("3", "9876543210")
    assert model.failed_at == "2026-11-20T12:00:01.234Z"
    assert model.model_dump(by_alias=True) == decoded


def test_failed_at_is_converted_to_utc() -> None:
    local = datetime(2026, 11, 20, 13, 0, 1, 999999, tzinfo=timezone(timedelta(hours=1)))
    headers = dict(deadletter_headers(Rejected("invalid_json", "x"), "t", 0, 0, local))
    assert headers["cx.failed_at"] == b"2026-11-20T12:00:01.999Z"


def test_read_headers_later_duplicates_win() -> None:
    headers = [("cx.error.reason", b"invalid_json"), ("cx.error.reason", b"schema_violation")]
    assert read_headers(headers) == {"cx.error.reason": "schema_violation"}
    assert read_headers(tuple(headers)) == {"cx.error.reason": "schema_violation"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("cx.error.reason", "exploded"),
        ("cx.source.partition", "-1"),
        ("cx.source.offset", "ten"),
        ("cx.failed_at", "2026-11-20T12:00:01Z"),
        ("cx.failed_at", "2026-11-20T13:00:01.000+01:00"),
    ],
)
def test_model_rejects_bad_values(name: str, value: str) -> None:
    good = read_headers(deadletter_headers(Rejected("invalid_json", "x"), "t", 0, 0, FAILED_AT))
    DeadLetterHeaders.model_validate(good, by_alias=True)
    with pytest.raises(ValidationError):
        DeadLetterHeaders.model_validate(good | {name: value}, by_alias=True)


def test_model_rejects_missing_and_extra_headers() -> None:
    good = read_headers(deadletter_headers(Rejected("invalid_json", "x"), "t", 0, 0, FAILED_AT))
    for name in NAMES:
        with pytest.raises(ValidationError):
            DeadLetterHeaders.model_validate(
                {k: v for k, v in good.items() if k != name}, by_alias=True
            )
    with pytest.raises(ValidationError):
        DeadLetterHeaders.model_validate(good | {"cx.extra": "1"}, by_alias=True)


@pytest.mark.parametrize(
    "golden", [g for g in goldens() if g.outcome != "valid"], ids=lambda g: g.id
)
def test_real_rejections_make_valid_headers(golden: Golden) -> None:
    rejected = parse(golden.channel, golden.data(), LIMITS, NOW)
    assert isinstance(rejected, Rejected)
    topic = f"cx.raw.{golden.channel}"
    headers = deadletter_headers(rejected, topic, 5, 77, NOW)
    model = DeadLetterHeaders.model_validate(read_headers(headers), by_alias=True)
    assert model.reason == golden.outcome
    assert model.reason in CONTRACT_REASONS
    assert model.source_topic == topic
    assert model.detail == rejected.detail
    for _, value in headers:
        value.decode("utf-8")
