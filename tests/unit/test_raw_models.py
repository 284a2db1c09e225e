"""Raw models against the golden fixtures in tests/fixtures/{channel}/.

A fixture's file name says what must become of it: `valid_*`, or the dead-letter reason
(`schema_violation__<category>_<field.path>[__<variant>]`, `timestamp_in_future`, ...).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.normalize import normalize
from service.parse import Rejected, parse
from service.raw import RAW_MODELS
from tests.unit._golden import (
    CANONICAL_KIND,
    CHANNELS,
    FIXTURES,
    KIND_FIELD,
    LIMITS,
    NOW,
    PII_KEY,
    SOURCE_ID_FIELD,
    Golden,
    dumps,
    goldens,
    source,
    valid_goldens,
)

pytestmark = pytest.mark.unit

GOLDENS = goldens()
REQUIRED_OUTCOMES = (
    "valid",
    "invalid_json",
    "not_an_object",
    "schema_violation",
    "timestamp_in_future",
    "payload_too_large",
)
REQUIRED_CATEGORIES = ("missing", "wrong_type", "unknown_enum", "out_of_range", "conditional")
RAW_KINDS = {channel: tuple(kinds) for channel, kinds in CANONICAL_KIND.items()}


def _base(channel: str) -> dict[str, Any]:
    """A valid fixture of the channel, as a dict to mutate."""
    name = {
        "web": "valid_page_view",
        "chat": "valid_message",
        "support": "valid_created",
        "store": "valid_purchase",
    }[channel]
    return orjson.loads((FIXTURES / channel / f"{name}.json").read_bytes())


# ------------------------------------------------------------------------------ coverage


@pytest.mark.parametrize("channel", CHANNELS)
def test_fixture_set_is_complete(channel: str) -> None:
    mine = [g for g in GOLDENS if g.channel == channel]
    outcomes = {g.outcome for g in mine}
    assert set(REQUIRED_OUTCOMES) <= outcomes
    categories = {g.category for g in mine if g.category}
    assert set(REQUIRED_CATEGORIES) <= categories
    kinds = {g.doc()[KIND_FIELD[channel]] for g in mine if g.outcome == "valid"}
    assert kinds == set(RAW_KINDS[channel]), "one valid fixture per event type"
    assert any(g.path.suffix != ".json" for g in mine if g.outcome == "invalid_json")


@pytest.mark.parametrize(
    ("channel", "field"),
    [("web", "survey"), ("chat", "rating"), ("support", "survey"), ("store", "amount")],
)
def test_conditional_fixtures_present(channel: str, field: str) -> None:
    assert any(
        g.channel == channel and g.category == "conditional" and g.field == field for g in GOLDENS
    )


def test_both_identifier_conditionals_present() -> None:
    conditional = {(g.channel, g.field) for g in GOLDENS if g.category == "conditional"}
    assert ("store", "loyalty_card") in conditional
    assert ("chat", "customer") in conditional


# -------------------------------------------------------------------------------- outcome


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda g: g.id)
def test_golden(golden: Golden) -> None:
    result = parse(golden.channel, golden.data(), LIMITS, NOW)
    if golden.outcome == "valid":
        assert not isinstance(result, Rejected), result
        assert isinstance(result, RAW_MODELS[golden.channel])
        doc = golden.doc()
        touchpoint = normalize(result, source(golden.channel), PII_KEY).touchpoint
        sid = doc[SOURCE_ID_FIELD[golden.channel]]
        assert touchpoint.event_id == f"{golden.channel}:{sid}"
        assert touchpoint.channel == golden.channel
        raw_kind = doc[KIND_FIELD[golden.channel]]
        assert touchpoint.kind == CANONICAL_KIND[golden.channel][raw_kind]
        return
    assert isinstance(result, Rejected), f"{golden.id} was accepted"
    assert result.reason == golden.outcome, result.detail
    assert result.detail.strip()
    if golden.field is not None:
        assert golden.field in result.detail, result.detail
    if golden.outcome == "payload_too_large":
        assert str(LIMITS.max_payload_bytes) in result.detail
        assert str(len(golden.data())) in result.detail


@pytest.mark.parametrize("golden", [g for g in GOLDENS if g.outcome != "valid"], ids=lambda g: g.id)
def test_rejection_detail_is_short_one_line(golden: Golden) -> None:
    result = parse(golden.channel, golden.data(), LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert len(result.detail) <= 500
    assert "\n" not in result.detail


@pytest.mark.parametrize("golden", valid_goldens(), ids=lambda g: g.id)
def test_valid_goldens_accepted_when_sent_compact(golden: Golden) -> None:
    """Re-serialised without indentation the event is still valid (whitespace is not meaning)."""
    assert not isinstance(parse(golden.channel, dumps(golden.doc()), LIMITS, NOW), Rejected)


# ----------------------------------------------------------------------- tolerant reader


@pytest.mark.parametrize("channel", CHANNELS)
def test_unknown_fields_ignored(channel: str) -> None:
    doc = _base(channel) | {
        "sdk_version": "4.12.1",
        "schema_rev": 3,
        "_meta": {"nested": [1, 2, {"deep": None}]},
        "Event_Id": 5,  # differs only by case from a known field
    }
    plain = parse(channel, dumps(_base(channel)), LIMITS, NOW)
    extra = parse(channel, dumps(doc), LIMITS, NOW)
    assert not isinstance(extra, Rejected), extra
    assert extra == plain


@pytest.mark.parametrize(
    ("channel", "field"),
    [
        ("web", "user_id"),
        ("web", "email"),
        ("web", "session_id"),
        ("web", "page"),
        ("web", "survey"),
        ("chat", "author"),
        ("chat", "text"),
        ("chat", "rating"),
        ("support", "comment"),
        ("support", "survey"),
        ("store", "currency"),
        ("store", "nps"),
        ("store", "csat"),
    ],
)
def test_absent_means_null(channel: str, field: str) -> None:
    with_null = _base(channel) | {field: None}
    absent = {k: v for k, v in with_null.items() if k != field}
    a = parse(channel, dumps(with_null), LIMITS, NOW)
    b = parse(channel, dumps(absent), LIMITS, NOW)
    assert not isinstance(a, Rejected), a
    assert a == b
    assert getattr(b, field) is None


# -------------------------------------------------------------------------------- strict


STRICTNESS = [
    # (channel, field path, bad value): no coercion of any kind.
    ("web", ("survey", "score"), "9"),
    ("web", ("survey", "score"), True),
    ("web", ("survey", "score"), 9.0),
    ("web", ("event_id",), 123),
    ("web", ("anonymous_id",), True),
    ("web", ("sent_at",), 1795169730),
    ("web", ("page",), "https://shop.example.com/"),
    ("chat", ("timestamp",), "1795169730123"),
    ("chat", ("timestamp",), True),
    ("chat", ("timestamp",), 1795169730123.0),
    ("chat", ("rating",), "5"),
    ("chat", ("rating",), True),
    ("chat", ("rating",), 5.0),
    ("chat", ("customer",), "cust-1"),
    ("chat", ("customer", "customer_id"), 1),
    ("support", ("survey", "csat"), "4"),
    ("support", ("survey", "ces"), 6.0),
    ("support", ("survey", "ces"), False),
    ("support", ("requester", "email"), None),
    ("support", ("occurred_at",), 1795169730),
    ("store", ("time",), "1795169730"),
    ("store", ("time",), False),
    ("store", ("time",), 1795169730.0),
    ("store", ("nps",), "9"),
    ("store", ("nps",), True),
    ("store", ("csat",), 4.0),
    ("store", ("amount",), 19.99),
    ("store", ("amount",), 1999),
    ("store", ("txn_id",), ["pos-1"]),
]


@pytest.mark.parametrize(("channel", "path", "value"), STRICTNESS)
def test_no_coercion(channel: str, path: tuple[str, ...], value: Any) -> None:
    doc = _base(channel)
    if channel == "web" and path[0] == "survey":
        doc |= {"type": "survey_response", "survey": {"kind": "nps", "score": 9}}
    if channel == "chat" and path == ("rating",):
        doc |= {"event": "rating", "rating": 5}
    if channel == "support" and path[0] == "survey":
        doc |= {"action": "survey", "survey": {"csat": 4, "ces": 6}}
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    result = parse(channel, dumps(doc), LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == "schema_violation"
    assert ".".join(path) in result.detail


@pytest.mark.parametrize(
    ("channel", "patch", "field"),
    [
        ("web", {"event_id": ""}, "event_id"),
        ("web", {"anonymous_id": "a" * 257}, "anonymous_id"),
        ("chat", {"conversation_id": ""}, "conversation_id"),
        ("store", {"currency": "eur"}, "currency"),
        ("store", {"amount": "-5.00"}, "amount"),
        ("store", {"amount": "1e3"}, "amount"),
        ("store", {"amount": ".5"}, "amount"),
        ("store", {"amount": "19.9999999"}, "amount"),
    ],
)
def test_constraints(channel: str, patch: dict[str, Any], field: str) -> None:
    result = parse(channel, dumps(_base(channel) | patch), LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == "schema_violation"
    assert field in result.detail


@pytest.mark.parametrize(("kind", "low", "high"), [("nps", 0, 10), ("csat", 1, 5), ("ces", 1, 7)])
def test_web_score_scales(kind: str, low: int, high: int) -> None:
    base = _base("web") | {"type": "survey_response"}
    for score in range(-1, 12):
        doc = base | {"survey": {"kind": kind, "score": score}}
        result = parse("web", dumps(doc), LIMITS, NOW)
        if low <= score <= high:
            assert not isinstance(result, Rejected), (score, result)
        else:
            assert isinstance(result, Rejected), score
            assert result.reason == "schema_violation"
            assert "survey" in result.detail


@pytest.mark.parametrize(
    ("channel", "field", "low", "high", "patch"),
    [
        ("chat", "rating", 1, 5, {"event": "rating"}),
        ("store", "nps", 0, 10, {"kind": "kiosk_survey"}),
        ("store", "csat", 1, 5, {"kind": "kiosk_survey"}),
    ],
)
def test_flat_score_ranges(
    channel: str, field: str, low: int, high: int, patch: dict[str, Any]
) -> None:
    for score in range(-1, 12):
        doc = _base(channel) | patch | {field: score}
        result = parse(channel, dumps(doc), LIMITS, NOW)
        if low <= score <= high:
            assert not isinstance(result, Rejected), (score, result)
        else:
            assert isinstance(result, Rejected), score
            assert result.reason == "schema_violation"
            assert field in result.detail


@pytest.mark.parametrize(("field", "low", "high"), [("csat", 1, 5), ("ces", 1, 7)])
def test_support_survey_ranges(field: str, low: int, high: int) -> None:
    for score in range(-1, 10):
        doc = _base("support") | {"action": "survey", "survey": {field: score}}
        result = parse("support", dumps(doc), LIMITS, NOW)
        if low <= score <= high:
            assert not isinstance(result, Rejected), (score, result)
        else:
            assert isinstance(result, Rejected), score
            assert f"survey.{field}" in result.detail


@pytest.mark.parametrize(
    "customer", [{"customer_id": "c"}, {"email": "a@b.co"}, {"visitor_id": "v"}]
)
def test_chat_any_one_customer_identifier_is_enough(customer: dict[str, str]) -> None:
    result = parse("chat", dumps(_base("chat") | {"customer": customer}), LIMITS, NOW)
    assert not isinstance(result, Rejected), result


@pytest.mark.parametrize(
    "ids",
    [{"loyalty_card": "LC-1", "customer_id": None}, {"customer_id": "c", "loyalty_card": None}],
)
def test_store_either_identifier_is_enough(ids: dict[str, str | None]) -> None:
    result = parse("store", dumps(_base("store") | ids), LIMITS, NOW)
    assert not isinstance(result, Rejected), result


def test_store_kiosk_survey_needs_no_amount() -> None:
    doc = _base("store") | {"kind": "kiosk_survey", "amount": None, "nps": 8}
    assert not isinstance(parse("store", dumps(doc), LIMITS, NOW), Rejected)


def test_store_amount_ascii_digits_only() -> None:
    doc = _base("store") | {"amount": "\uff11\uff19.\uff19\uff19"}
    result = parse("store", dumps(doc), LIMITS, NOW)
    assert isinstance(result, Rejected)
    assert result.reason == "schema_violation"
    assert "amount" in result.detail


@pytest.mark.parametrize(
    ("channel", "patch"),
    [
        ("chat", {"customer": {"visitor_id": "  "}}),
        ("chat", {"customer": {"email": " "}}),
        ("web", {"anonymous_id": " ", "user_id": None, "email": None}),
        ("store", {"loyalty_card": "\t", "customer_id": None}),
        ("support", {"requester": {"email": "   "}}),
    ],
)
def test_accepted_event_always_normalizes(channel: str, patch: dict[str, Any]) -> None:
    """Whatever parse() accepts, normalize() must handle (or parse() must reject it)."""
    result = parse(channel, dumps(_base(channel) | patch), LIMITS, NOW)
    if isinstance(result, Rejected):
        assert result.reason == "schema_violation"
        return
    touchpoint = normalize(result, source(channel), PII_KEY).touchpoint
    assert touchpoint.customer_key.strip()


@pytest.mark.parametrize(
    ("channel", "patch"),
    [
        ("web", {"event_id": "w-1\n"}),
        ("chat", {"id": "c\n1"}),
        ("support", {"event_id": "\n"}),
        ("store", {"txn_id": "pos-1\n"}),
    ],
)
def test_source_id_with_line_break(channel: str, patch: dict[str, Any]) -> None:
    result = parse(channel, dumps(_base(channel) | patch), LIMITS, NOW)
    if isinstance(result, Rejected):
        assert result.reason == "schema_violation"
        return
    touchpoint = normalize(result, source(channel), PII_KEY).touchpoint
    assert touchpoint.event_id.endswith(next(iter(patch.values())))
