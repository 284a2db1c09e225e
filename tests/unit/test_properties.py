"""Properties: parse() never raises; valid events normalize and round-trip through JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.canonical import Touchpoint
from service.normalize import normalize
from service.parse import REASONS, Limits, Rejected, parse
from service.raw import RAW_MODELS
from tests.unit._golden import (
    CANONICAL_KIND,
    CHANNELS,
    EPOCH,
    KIND_FIELD,
    LIMITS,
    NOW,
    PII_KEY,
    REPEATABLE,
    SCHEMAS,
    SOURCE_ID_FIELD,
    source,
    valid_goldens,
)

pytestmark = pytest.mark.unit

FAST = settings(REPEATABLE, max_examples=150)
THOROUGH = settings(FAST, max_examples=250)
SMALL = Limits(max_payload_bytes=512, max_clock_skew=timedelta(minutes=5))
NOW_MS = (NOW - EPOCH) // timedelta(milliseconds=1)
TIMELINE = jsonschema.Draft202012Validator(orjson.loads((SCHEMAS / "timeline.json").read_bytes()))
VALID_DOCS = [(g.channel, g.doc()) for g in valid_goldens()]


def _check(result: object) -> None:
    """parse() returned a raw event of some channel, or a rejection with a known reason."""
    if isinstance(result, Rejected):
        assert result.reason in REASONS
        assert isinstance(result.detail, str)
        assert result.detail
    else:
        assert isinstance(result, tuple(RAW_MODELS.values()))


# ------------------------------------------------------------------------ never raises

channels = st.sampled_from(CHANNELS)


@THOROUGH
@given(channel=channels, value=st.binary(max_size=1500))
def test_any_bytes(channel: str, value: bytes) -> None:
    _check(parse(channel, value, LIMITS, NOW))
    _check(parse(channel, value, SMALL, NOW))


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
KNOWN_KEYS = sorted(
    {key for _, doc in VALID_DOCS for key in doc}
    | {"kind", "score", "comment", "url", "title", "csat", "ces", "nps", "email", "customer_id"}
)
keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=12)
jsonish = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=25,
)


def _encode(value: Any) -> bytes:
    """Any Python JSON-ish value -> bytes; NaN/Infinity become their (invalid) literals."""
    return json.dumps(value, allow_nan=True).encode()


@FAST
@given(channel=channels, value=jsonish)
def test_any_json_value(channel: str, value: Any) -> None:
    _check(parse(channel, _encode(value), LIMITS, NOW))


@FAST
@given(channel=channels, value=st.dictionaries(keys, jsonish, max_size=12))
def test_any_json_object(channel: str, value: dict[str, Any]) -> None:
    result = parse(channel, _encode(value), LIMITS, NOW)
    _check(result)
    if isinstance(result, Rejected):
        assert result.reason in ("schema_violation", "timestamp_in_future", "invalid_json")


def _mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))  # deep copy
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        target = doc
        # Sometimes go one level down into a nested object (survey, customer, requester, page).
        nested = [k for k, v in target.items() if isinstance(v, dict)]
        if nested and data.draw(st.booleans(), label="nested"):
            target = target[data.draw(st.sampled_from(sorted(nested)), label="into")]
        if not target:
            continue
        key = data.draw(st.sampled_from(sorted(target)), label="key")
        if data.draw(st.booleans(), label="drop"):
            del target[key]
        else:
            target[key] = data.draw(jsonish, label="value")
    return doc


@THOROUGH
@given(data=st.data())
def test_mutated_valid_events(data: st.DataObject) -> None:
    channel, doc = data.draw(st.sampled_from(VALID_DOCS), label="fixture")
    mutated = _mutate(doc, data)
    other = data.draw(channels, label="parsed as")
    _check(parse(channel, _encode(mutated), LIMITS, NOW))
    _check(parse(other, _encode(mutated), LIMITS, NOW))


# ------------------------------------------------------------------ valid event strategies

# Valid identifiers are printable (no control characters) and not blank.
ids = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40).filter(
    lambda s: s.strip() != ""
)
texts = st.none() | st.text(max_size=200)
instants = st.datetimes(
    min_value=datetime(1970, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
    max_value=NOW.replace(tzinfo=None),
    timezones=st.just(UTC),
)
offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timedelta(minutes=m))


def _offset_text(offset: timedelta, z: bool) -> str:
    if offset == timedelta(0) and z:
        return "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _truncated_ms(instant: datetime, digits: str) -> datetime:
    """The instant as a reader of `digits` fraction digits must see it, in whole ms."""
    micro = int(digits[:6].ljust(6, "0"))
    return instant.replace(microsecond=micro - micro % 1000)


@st.composite
def rfc3339(draw: st.DrawFn) -> tuple[str, datetime]:
    instant = draw(instants)
    offset = draw(offsets)
    local = instant.astimezone(timezone(offset))
    extra = draw(st.text("0123456789", min_size=3, max_size=3))
    digits = f"{instant.microsecond:06d}{extra}"[: draw(st.integers(0, 9))]
    sep = draw(st.sampled_from("Tt"))
    text = local.strftime(f"%Y-%m-%d{sep}%H:%M:%S")
    text += f".{digits}" if digits else ""
    text += _offset_text(offset, draw(st.booleans()))
    return text, _truncated_ms(instant, digits)


@st.composite
def helpdesk(draw: st.DrawFn) -> tuple[str, datetime]:
    instant = draw(instants)
    offset = draw(offsets)
    local = instant.astimezone(timezone(offset))
    digits = f"{instant.microsecond:06d}"[: draw(st.integers(0, 6))]
    text = local.strftime("%Y-%m-%d %H:%M:%S") + (f".{digits}" if digits else "")
    return text + _offset_text(offset, z=False), _truncated_ms(instant, digits)


scores = {"nps": st.integers(0, 10), "csat": st.integers(1, 5), "ces": st.integers(1, 7)}
emails = st.emails().filter(lambda e: len(e) <= 320) | st.just(" Ana.Perez@Example.COM ")


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


@st.composite
def web_events(draw: st.DrawFn) -> tuple[dict[str, Any], datetime]:
    kind = draw(st.sampled_from(sorted(CANONICAL_KIND["web"])))
    sent_at, expected = draw(rfc3339())
    survey = None
    if kind == "survey_response" or draw(st.booleans()):
        scale = draw(st.sampled_from(sorted(scores)))
        survey = {"kind": scale, "score": draw(scores[scale]), "comment": draw(texts)}
    doc = {
        "event_id": draw(ids),
        "type": kind,
        "sent_at": sent_at,
        "anonymous_id": draw(ids),
        "user_id": draw(optional(ids)),
        "email": draw(optional(emails)),
        "session_id": draw(optional(ids)),
        "page": draw(optional(st.fixed_dictionaries({"url": ids, "title": texts}))),
        "survey": survey,
    }
    return doc, expected


@st.composite
def chat_events(draw: st.DrawFn) -> tuple[dict[str, Any], datetime]:
    kind = draw(st.sampled_from(sorted(CANONICAL_KIND["chat"])))
    ms = draw(st.integers(0, NOW_MS))
    customer = draw(
        st.fixed_dictionaries(
            {"customer_id": optional(ids), "email": optional(emails), "visitor_id": optional(ids)}
        ).filter(lambda c: any(v is not None for v in c.values()))
    )
    rating = draw(st.integers(1, 5)) if kind == "rating" else draw(optional(st.integers(1, 5)))
    doc = {
        "id": draw(ids),
        "conversation_id": draw(ids),
        "event": kind,
        "timestamp": ms,
        "customer": customer,
        "author": draw(optional(st.sampled_from(["customer", "agent", "bot"]))),
        "text": draw(texts),
        "rating": rating,
    }
    return doc, EPOCH + timedelta(milliseconds=ms)


@st.composite
def support_events(draw: st.DrawFn) -> tuple[dict[str, Any], datetime]:
    kind = draw(st.sampled_from(sorted(CANONICAL_KIND["support"])))
    occurred_at, expected = draw(helpdesk())
    survey = None
    if kind == "survey" or draw(st.booleans()):
        survey = draw(
            st.fixed_dictionaries(
                {"csat": optional(st.integers(1, 5)), "ces": optional(st.integers(1, 7))}
            ).filter(lambda s: s["csat"] is not None or s["ces"] is not None)
        )
    doc = {
        "event_id": draw(ids),
        "ticket_id": draw(ids),
        "action": kind,
        "occurred_at": occurred_at,
        "requester": {"email": draw(emails), "customer_id": draw(optional(ids))},
        "comment": draw(texts),
        "survey": survey,
    }
    return doc, expected


amounts = st.from_regex(r"\A[0-9]{1,15}(\.[0-9]{1,6})?\Z")


@st.composite
def store_events(draw: st.DrawFn) -> tuple[dict[str, Any], datetime]:
    kind = draw(st.sampled_from(sorted(CANONICAL_KIND["store"])))
    seconds = draw(st.integers(0, NOW_MS // 1000))
    loyalty, customer = draw(
        st.tuples(optional(ids), optional(ids)).filter(lambda p: p != (None, None))
    )
    nps, csat = draw(
        st.tuples(optional(st.integers(0, 10)), optional(st.integers(1, 5))).filter(
            lambda p: kind != "kiosk_survey" or p != (None, None)
        )
    )
    doc = {
        "txn_id": draw(ids),
        "store_id": draw(ids),
        "kind": kind,
        "time": seconds,
        "loyalty_card": loyalty,
        "customer_id": customer,
        "amount": draw(amounts) if kind != "kiosk_survey" else draw(optional(amounts)),
        "currency": draw(optional(st.from_regex(r"\A[A-Z]{3}\Z"))),
        "nps": nps,
        "csat": csat,
    }
    return doc, EPOCH + timedelta(seconds=seconds)


STRATEGIES = {
    "web": web_events(),
    "chat": chat_events(),
    "support": support_events(),
    "store": store_events(),
}


@pytest.mark.parametrize("channel", CHANNELS)
def test_valid_events_round_trip(channel: str) -> None:
    @FAST
    @given(case=STRATEGIES[channel], partition=st.integers(0, 1023), offset=st.integers(0))
    def check(case: tuple[dict[str, Any], datetime], partition: int, offset: int) -> None:
        doc, occurred = case
        event = parse(channel, orjson.dumps(doc), LIMITS, NOW)
        assert not isinstance(event, Rejected), (event, doc)
        where = source(channel, partition, offset)
        touchpoint = normalize(event, where, PII_KEY).touchpoint
        assert touchpoint.event_id == f"{channel}:{doc[SOURCE_ID_FIELD[channel]]}"
        assert touchpoint.kind == CANONICAL_KIND[channel][doc[KIND_FIELD[channel]]]
        assert touchpoint.occurred_at == occurred
        assert touchpoint.source == where
        assert (touchpoint.text is None) == (touchpoint.sentiment is None)
        if touchpoint.sentiment is not None:
            assert -1.0 <= touchpoint.sentiment <= 1.0
        body = touchpoint.model_dump_json()
        back = Touchpoint.model_validate_json(body)
        assert back == touchpoint
        assert back.model_dump_json() == body
        TIMELINE.validate(orjson.loads(body))

    check()
