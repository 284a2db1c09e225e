"""parse(): bytes -> raw event or Rejected, checks in the contract's order, never raising."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from service.parse import Limits, Rejected, parse
from service.raw import ChatEvent, StoreEvent, SupportEvent, WebEvent
from service.settings import SettingsError, load_settings
from tests.unit._golden import EPOCH, LIMITS, NOW, dumps

pytestmark = pytest.mark.unit

SKEW = LIMITS.max_clock_skew
WEB: dict[str, Any] = {
    "event_id": "w-1",
    "type": "page_view",
    "sent_at": "2026-11-20T10:15:30.123Z",
    "anonymous_id": "anon-1",
}
CHAT: dict[str, Any] = {
    "id": "c-1",
    "conversation_id": "conv-1",
    "event": "message",
    "timestamp": 1_795_169_730_123,
    "customer": {"visitor_id": "vis-1"},
}
SUPPORT: dict[str, Any] = {
    "event_id": "s-1",
    "ticket_id": "T-1",
    "action": "created",
    "occurred_at": "2026-11-20 11:15:30+01:00",
    "requester": {"email": "ana@example.com"},
}
STORE: dict[str, Any] = {
    "txn_id": "p-1",
    "store_id": "st-1",
    "kind": "purchase",
    "time": 1_795_169_730,
    "customer_id": "cust-1",
    "amount": "10.00",
}
BASE = {"web": WEB, "chat": CHAT, "support": SUPPORT, "store": STORE}
MODEL = {"web": WebEvent, "chat": ChatEvent, "support": SupportEvent, "store": StoreEvent}
FUTURE = {
    "web": {"sent_at": "2099-01-01T00:00:00Z"},
    "chat": {"timestamp": 4_070_908_800_000},
    "support": {"occurred_at": "2099-01-01 00:00:00+00:00"},
    "store": {"time": 4_070_908_800},
}
BROKEN_SCHEMA = {
    "web": {"type": "click"},
    "chat": {"event": "typing"},
    "support": {"action": "closed"},
    "store": {"kind": "exchange"},
}


def _reason(channel: str, value: bytes | None, limits: Limits = LIMITS) -> str | None:
    result = parse(channel, value, limits, NOW)
    return result.reason if isinstance(result, Rejected) else None


@pytest.mark.parametrize("channel", BASE)
def test_valid_base_events(channel: str) -> None:
    result = parse(channel, dumps(BASE[channel]), LIMITS, NOW)
    assert isinstance(result, MODEL[channel])
    assert result.occurred_at == datetime(2026, 11, 20, 10, 15, 30, tzinfo=UTC) + timedelta(
        milliseconds=123 if channel in ("web", "chat") else 0
    )


# ---------------------------------------------------------------------------- check order


@pytest.mark.parametrize("channel", BASE)
def test_size_before_json(channel: str) -> None:
    assert _reason(channel, b"\xff" * (LIMITS.max_payload_bytes + 1)) == "payload_too_large"
    assert _reason(channel, b"[" * (LIMITS.max_payload_bytes + 1)) == "payload_too_large"


@pytest.mark.parametrize("channel", BASE)
def test_size_limit_boundary(channel: str) -> None:
    doc = dict(BASE[channel])
    plain = dumps(doc)
    pad = LIMITS.max_payload_bytes - len(plain) - len(b',"pad":""')
    exact = dumps(doc | {"pad": "x" * pad})
    assert len(exact) == LIMITS.max_payload_bytes
    assert _reason(channel, exact) is None
    over = dumps(doc | {"pad": "x" * (pad + 1)})
    assert _reason(channel, over) == "payload_too_large"


def test_size_counts_bytes_not_characters() -> None:
    limits = Limits(max_payload_bytes=256, max_clock_skew=SKEW)
    doc = WEB | {"note": "\u20ac" * 60}  # 60 characters, 180 bytes in UTF-8
    value = dumps(doc)
    assert len(value.decode()) <= 256 < len(value)
    assert _reason("web", value, limits) == "payload_too_large"


@pytest.mark.parametrize("channel", BASE)
def test_json_before_object(channel: str) -> None:
    assert _reason(channel, b"[1, 2") == "invalid_json"
    assert _reason(channel, b"[1, 2]") == "not_an_object"


@pytest.mark.parametrize("channel", BASE)
def test_object_before_schema(channel: str) -> None:
    assert _reason(channel, dumps([BASE[channel]])) == "not_an_object"
    assert _reason(channel, b"{}") == "schema_violation"


@pytest.mark.parametrize("channel", BASE)
def test_schema_before_future(channel: str) -> None:
    future = BASE[channel] | FUTURE[channel]
    assert _reason(channel, dumps(future)) == "timestamp_in_future"
    assert _reason(channel, dumps(future | BROKEN_SCHEMA[channel])) == "schema_violation"


@pytest.mark.parametrize("channel", BASE)
def test_oversized_future_event_is_too_large(channel: str) -> None:
    doc = BASE[channel] | FUTURE[channel] | {"pad": "x" * LIMITS.max_payload_bytes}
    assert _reason(channel, dumps(doc)) == "payload_too_large"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "invalid_json"),
        (b"", "invalid_json"),
        (b" ", "invalid_json"),
        (b"\n\t ", "invalid_json"),
        (b"\x00", "invalid_json"),
        (b'{"a": "\xff"}', "invalid_json"),  # invalid UTF-8
        (b'{"a": "\xc3"}', "invalid_json"),  # truncated multi-byte sequence
        (b'{"a": "\xed\xa0\x80"}', "invalid_json"),  # encoded surrogate
        (b'{"a": "\\ud800"}', "invalid_json"),  # lone surrogate escape
        (b'{"a": NaN}', "invalid_json"),
        (b'{"a": Infinity}', "invalid_json"),
        (b'{"a": -Infinity}', "invalid_json"),
        (b"NaN", "invalid_json"),
        (b"{'a': 1}", "invalid_json"),
        (b'{"a": 1,}', "invalid_json"),
        (b'{"a": 1} {"b": 2}', "invalid_json"),
        (b'{"a": 1} x', "invalid_json"),
        (b"// comment\n{}", "invalid_json"),
        (b"null", "not_an_object"),
        (b"true", "not_an_object"),
        (b"0", "not_an_object"),
        (b'"{}"', "not_an_object"),
        (b"[]", "not_an_object"),
        (b" {} ", "schema_violation"),
    ],
)
@pytest.mark.parametrize("channel", BASE)
def test_malformed_values(channel: str, value: bytes | None, reason: str) -> None:
    result = parse(channel, value, LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert result.detail


def test_not_an_object_detail_names_the_type() -> None:
    result = parse("web", b"[1]", LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert "list" in result.detail or "array" in result.detail


@pytest.mark.parametrize("channel", BASE)
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting_rejected_without_raising(channel: str, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    value = opener * 10_000 + b"1" + closer * 10_000
    result = parse(channel, value, LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason in ("invalid_json", "not_an_object")


@pytest.mark.parametrize("channel", BASE)
def test_deep_nesting_inside_an_object_rejected_or_ignored(channel: str) -> None:
    value = dumps(BASE[channel])[:-1] + b',"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    result = parse(channel, value, LIMITS, NOW)
    # Too deep for the decoder is invalid_json; anything else is an ignored unknown field.
    assert not isinstance(result, Rejected) or result.reason == "invalid_json"


def test_duplicate_keys_last_wins_or_rejected() -> None:
    value = b'{"event_id":"w-1","event_id":"w-2","type":"page_view",' + (
        b'"sent_at":"2026-11-20T10:15:30Z","anonymous_id":"a"}'
    )
    result = parse("web", value, LIMITS, NOW)
    assert isinstance(result, Rejected) or result.source_id in ("w-1", "w-2")


# ------------------------------------------------------------------------ huge integers


@pytest.mark.parametrize("number", [2**63, 2**64 - 1, 2**64, 2**64 + 1, 10**30, -(2**64)])
@pytest.mark.parametrize(
    ("channel", "doc", "field"),
    [
        ("web", WEB | {"type": "survey_response", "survey": {"kind": "nps", "score": 0}}, "score"),
        ("chat", CHAT | {"event": "rating", "rating": 0}, "rating"),
        ("support", SUPPORT | {"action": "survey", "survey": {"csat": 0}}, "csat"),
        ("store", STORE | {"nps": 0}, "nps"),
    ],
)
def test_huge_integer_score(channel: str, doc: dict[str, Any], field: str, number: int) -> None:
    text = dumps(doc).replace(f'"{field}":0'.encode(), f'"{field}":{number}'.encode())
    assert str(number).encode() in text
    result = parse(channel, text, LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == "schema_violation"
    assert field in result.detail


@pytest.mark.parametrize("number", [2**63, 2**64 - 1, 10**18])
@pytest.mark.parametrize(("channel", "field"), [("chat", "timestamp"), ("store", "time")])
def test_huge_integer_timestamp_is_in_future(channel: str, field: str, number: int) -> None:
    text = dumps(BASE[channel] | {field: number})
    result = parse(channel, text, LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == "timestamp_in_future"
    assert field in result.detail


@pytest.mark.parametrize("number", [2**64, 10**30])
@pytest.mark.parametrize(("channel", "field"), [("chat", "timestamp"), ("store", "time")])
def test_integer_beyond_u64_timestamp_is_in_future(channel: str, field: str, number: int) -> None:
    text = dumps(BASE[channel] | {field: 0}).replace(
        f'"{field}":0'.encode(), f'"{field}":{number}'.encode()
    )
    assert str(number).encode() in text
    result = parse(channel, text, LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == "timestamp_in_future"


@pytest.mark.parametrize("number", [2**64, -(2**64), 10**30])
@pytest.mark.parametrize(("channel", "field"), [("chat", "timestamp"), ("store", "time")])
def test_integer_beyond_u64_timestamp_rejected(channel: str, field: str, number: int) -> None:
    text = dumps(BASE[channel] | {field: 0}).replace(
        f'"{field}":0'.encode(), f'"{field}":{number}'.encode()
    )
    result = parse(channel, text, LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason in ("schema_violation", "timestamp_in_future")
    assert field in result.detail


# ------------------------------------------------------------------------- time bounds


@pytest.mark.parametrize(
    ("channel", "patch", "field"),
    [
        ("web", {"sent_at": "1969-12-31T23:59:59.999Z"}, "sent_at"),
        ("web", {"sent_at": "1970-01-01T00:30:00+01:00"}, "sent_at"),
        ("web", {"sent_at": "0001-01-01T00:00:00+01:00"}, "sent_at"),
        ("chat", {"timestamp": -1}, "timestamp"),
        ("support", {"occurred_at": "1969-12-31 23:59:59+00:00"}, "occurred_at"),
        ("support", {"occurred_at": "1970-01-01 00:59:59.999999+01:00"}, "occurred_at"),
        ("store", {"time": -86400}, "time"),
    ],
)
def test_pre_1970_is_schema_violation(channel: str, patch: dict[str, Any], field: str) -> None:
    result = parse(channel, dumps(BASE[channel] | patch), LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == "schema_violation"
    assert field in result.detail


@pytest.mark.parametrize(
    ("channel", "patch"),
    [
        ("web", {"sent_at": "1970-01-01T00:00:00Z"}),
        ("web", {"sent_at": "1970-01-01T01:00:00+01:00"}),
        ("web", {"sent_at": "1969-12-31T23:00:00-01:00"}),
        ("chat", {"timestamp": 0}),
        ("support", {"occurred_at": "1970-01-01 00:00:00+00:00"}),
        ("store", {"time": 0}),
    ],
)
def test_epoch_itself_and_old_events_accepted(channel: str, patch: dict[str, Any]) -> None:
    result = parse(channel, dumps(BASE[channel] | patch), LIMITS, NOW)
    assert not isinstance(result, Rejected), result
    assert result.occurred_at == EPOCH


def _at(channel: str, instant: datetime) -> dict[str, Any]:
    """The base event of a channel, timed at `instant` in that channel's own format."""
    ms = (instant - EPOCH) // timedelta(milliseconds=1)
    if channel == "web":
        local = instant.astimezone(timezone(timedelta(hours=5, minutes=45)))
        return WEB | {"sent_at": local.isoformat(timespec="milliseconds")}
    if channel == "chat":
        return CHAT | {"timestamp": ms}
    if channel == "support":
        local = instant.astimezone(timezone(timedelta(hours=-5)))
        return SUPPORT | {"occurred_at": local.isoformat(sep=" ", timespec="microseconds")}
    return STORE | {"time": ms // 1000}


@pytest.mark.parametrize("channel", ["web", "chat", "support"])
def test_clock_skew_boundary_ms(channel: str) -> None:
    edge = NOW + SKEW
    at_edge = parse(channel, dumps(_at(channel, edge)), LIMITS, NOW)
    assert not isinstance(at_edge, Rejected), at_edge
    assert at_edge.occurred_at == edge
    late = parse(channel, dumps(_at(channel, edge + timedelta(milliseconds=1))), LIMITS, NOW)
    assert isinstance(late, Rejected)
    assert late.reason == "timestamp_in_future"
    assert {"web": "sent_at", "chat": "timestamp", "support": "occurred_at"}[channel] in (
        late.detail
    )


def test_clock_skew_boundary_store_seconds() -> None:
    edge = NOW + SKEW
    assert _reason("store", dumps(_at("store", edge))) is None
    assert _reason("store", dumps(_at("store", edge + timedelta(seconds=1)))) == (
        "timestamp_in_future"
    )


def test_clock_skew_is_configurable() -> None:
    zero = Limits(max_payload_bytes=LIMITS.max_payload_bytes, max_clock_skew=timedelta(0))
    assert _reason("chat", dumps(_at("chat", NOW)), zero) is None
    late = dumps(_at("chat", NOW + timedelta(milliseconds=1)))
    assert _reason("chat", late, zero) == "timestamp_in_future"
    assert _reason("chat", late, LIMITS) is None


def test_future_check_uses_the_given_now() -> None:
    value = dumps(_at("web", NOW + timedelta(hours=1)))
    assert _reason("web", value) == "timestamp_in_future"
    later = parse("web", value, LIMITS, NOW + timedelta(hours=2))
    assert not isinstance(later, Rejected)


def test_far_future_offset_time_does_not_raise() -> None:
    """9999-12-31T23:59:59-01:00 is past datetime.max in UTC: rejected, not an exception."""
    value = dumps(WEB | {"sent_at": "9999-12-31T23:59:59.999-01:00"})
    assert _reason("web", value) == "timestamp_in_future"


def test_huge_clock_skew_never_makes_parse_raise() -> None:
    """Either the setting is refused at start, or parse() copes with it."""
    try:
        settings = load_settings(max_clock_skew="3000000d")
    except SettingsError as exc:
        refused = str(exc)
    else:
        refused = ""
        limits = Limits(settings.max_payload_bytes, settings.max_clock_skew)
        result = parse("web", dumps(WEB), limits, NOW)
        assert not isinstance(result, Rejected)
    assert not refused or "CX_MAX_CLOCK_SKEW" in refused


def test_limits_match_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CX_MAX_PAYLOAD_BYTES", raising=False)
    monkeypatch.delenv("CX_MAX_CLOCK_SKEW", raising=False)
    settings = load_settings()
    assert settings.max_payload_bytes == LIMITS.max_payload_bytes == 64 * 1024
    assert settings.max_clock_skew == LIMITS.max_clock_skew


def test_rejected_is_frozen() -> None:
    rejected = Rejected("invalid_json", "x")
    with pytest.raises(AttributeError):
        rejected.reason = "schema_violation"  # type: ignore[misc]


def test_detail_counts_further_errors_and_is_bounded() -> None:
    doc = {"event_id": 1, "type": 2, "sent_at": 3, "anonymous_id": 4}
    result = parse("web", dumps(doc), LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.detail.startswith("event_id")
    assert "3 more" in result.detail
    long_key = {"event_id": "e", "type": "page_view", "sent_at": "x" * 20_000}
    result = parse("web", dumps(long_key | {"anonymous_id": "a"}), LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert len(result.detail) <= 500
