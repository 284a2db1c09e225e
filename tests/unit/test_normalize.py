"""normalize(): raw event + source -> canonical touchpoint (contract section 3) + identifiers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from service.canonical import Arrival, Normalized, Ratings, Routed, Source, Touchpoint
from service.identity import IdentityGraph, identifiers_of, provisional_key
from service.normalize import normalize
from service.parse import Rejected, parse
from service.raw import RawEvent
from tests.unit._golden import (
    CANONICAL_KIND,
    KIND_FIELD,
    LIMITS,
    NOW,
    PII_KEY,
    SOURCE_ID_FIELD,
    dumps,
    hmac_hex,
    source,
    valid_goldens,
)

pytestmark = pytest.mark.unit

WEB: dict[str, Any] = {
    "event_id": "w-1",
    "type": "page_view",
    "sent_at": "2026-11-20T11:15:30.123456+01:00",
    "anonymous_id": "anon-1",
    "session_id": "sess-1",
    "page": {"url": "https://shop.example.com/", "title": "Home"},
}
CHAT: dict[str, Any] = {
    "id": "c-1",
    "conversation_id": "conv-1",
    "event": "message",
    "timestamp": 1_795_169_730_123,
    "customer": {"visitor_id": "vis-1"},
    "author": "customer",
}
SUPPORT: dict[str, Any] = {
    "event_id": "s-1",
    "ticket_id": "T-1",
    "action": "created",
    "occurred_at": "2026-11-20 05:15:30.123999-05:00",
    "requester": {"email": "ana@example.com"},
}
STORE: dict[str, Any] = {
    "txn_id": "p-1",
    "store_id": "st-1",
    "kind": "purchase",
    "time": 1_795_169_730,
    "loyalty_card": "6012345678",
    "amount": "19.99",
    "currency": "EUR",
}
BASE = {"web": WEB, "chat": CHAT, "support": SUPPORT, "store": STORE}
# Extra fields a kind needs to be valid.
NEEDS: dict[tuple[str, str], dict[str, Any]] = {
    ("web", "survey_response"): {"survey": {"kind": "nps", "score": 9}},
    ("chat", "rating"): {"rating": 4},
    ("support", "survey"): {"survey": {"csat": 5}},
    ("store", "kiosk_survey"): {"amount": None, "currency": None, "nps": 10},
}
OCCURRED = datetime(2026, 11, 20, 10, 15, 30, 123000, tzinfo=UTC)


def _event(channel: str, **patch: Any) -> RawEvent:
    result = parse(channel, dumps(BASE[channel] | patch), LIMITS, NOW)
    assert not isinstance(result, Rejected), result
    return result


def _norm(channel: str, **patch: Any) -> Normalized:
    return normalize(_event(channel, **patch), source(channel), PII_KEY)


def _tp(channel: str, **patch: Any) -> Touchpoint:
    return _norm(channel, **patch).touchpoint


KIND_CASES = [
    (channel, raw_kind, canonical)
    for channel, kinds in CANONICAL_KIND.items()
    for raw_kind, canonical in kinds.items()
]


@pytest.mark.parametrize(("channel", "raw_kind", "canonical"), KIND_CASES)
def test_kind_mapping(channel: str, raw_kind: str, canonical: str) -> None:
    patch = {KIND_FIELD[channel]: raw_kind} | NEEDS.get((channel, raw_kind), {})
    assert _tp(channel, **patch).kind == canonical


@pytest.mark.parametrize(
    ("channel", "raw_kind"),
    [("chat", "rating"), ("support", "survey"), ("store", "kiosk_survey")],
)
def test_surveys_become_survey_response(channel: str, raw_kind: str) -> None:
    patch = {KIND_FIELD[channel]: raw_kind} | NEEDS[(channel, raw_kind)]
    assert _tp(channel, **patch).kind == "survey_response"


def test_support_solved_is_ticket_solved() -> None:
    assert _tp("support", action="solved").kind == "ticket_solved"
    assert _tp("support", action="reopened").kind == "ticket_reopened"
    assert _tp("support", action="created").kind == "ticket_created"


@pytest.mark.parametrize(
    ("channel", "patch", "thread"),
    [
        ("web", {}, "sess-1"),
        ("web", {"session_id": None}, None),
        ("chat", {}, "conv-1"),
        ("support", {}, "T-1"),
        ("store", {}, "p-1"),
    ],
)
def test_thread_id(channel: str, patch: dict[str, Any], thread: str | None) -> None:
    assert _tp(channel, **patch).thread_id == thread


@pytest.mark.parametrize(
    ("channel", "patch", "ratings"),
    [
        ("web", {}, (None, None, None)),
        (
            "web",
            {"type": "survey_response", "survey": {"kind": "nps", "score": 0}},
            (0, None, None),
        ),
        (
            "web",
            {"type": "survey_response", "survey": {"kind": "csat", "score": 5}},
            (None, 5, None),
        ),
        (
            "web",
            {"type": "survey_response", "survey": {"kind": "ces", "score": 7}},
            (None, None, 7),
        ),
        ("chat", {}, (None, None, None)),
        ("chat", {"event": "rating", "rating": 2}, (None, 2, None)),
        ("support", {}, (None, None, None)),
        ("support", {"action": "survey", "survey": {"csat": 1, "ces": 7}}, (None, 1, 7)),
        ("support", {"action": "survey", "survey": {"ces": 3}}, (None, None, 3)),
        ("store", {}, (None, None, None)),
        ("store", {"kind": "kiosk_survey", "amount": None, "nps": 6, "csat": 4}, (6, 4, None)),
        ("store", {"kind": "kiosk_survey", "amount": None, "csat": 3}, (None, 3, None)),
    ],
)
def test_ratings(
    channel: str, patch: dict[str, Any], ratings: tuple[int | None, int | None, int | None]
) -> None:
    nps, csat, ces = ratings
    assert _tp(channel, **patch).ratings == Ratings(nps=nps, csat=csat, ces=ces)


def test_amount_and_currency() -> None:
    purchase = _tp("store")
    assert (purchase.amount, purchase.currency) == ("19.99", "EUR")
    refund = _tp("store", kind="return", amount="5", currency=None)
    assert (refund.amount, refund.currency) == ("5", None)
    for channel in ("web", "chat", "support"):
        other = _tp(channel)
        assert (other.amount, other.currency) == (None, None)


@pytest.mark.parametrize(
    ("channel", "patch"),
    [
        (
            "web",
            {
                "type": "survey_response",
                "survey": {"kind": "csat", "score": 1, "comment": "{text}"},
            },
        ),
        ("chat", {"text": "{text}"}),
        ("support", {"comment": "{text}"}),
    ],
)
def test_text_redacted_and_scored(channel: str, patch: dict[str, Any]) -> None:
    raw_text = "Awful, terrible service. Mail ana.perez@example.com or call +44 20 7946 0958."
    filled = orjson.loads(dumps(patch).replace(b"{text}", raw_text.encode()))
    tp = _tp(channel, **filled)
    assert tp.text == "Awful, terrible service. Mail [email] or call [phone]."
    assert tp.sentiment is not None
    assert -1.0 <= tp.sentiment < 0


@pytest.mark.parametrize(
    ("channel", "patch"),
    [
        ("web", {}),
        ("web", {"type": "survey_response", "survey": {"kind": "nps", "score": 9}}),
        ("chat", {"text": None}),
        ("support", {"comment": None}),
        ("store", {}),
    ],
)
def test_no_text_no_sentiment(channel: str, patch: dict[str, Any]) -> None:
    tp = _tp(channel, **patch)
    assert tp.text is None
    assert tp.sentiment is None


def test_sentiment_polarity() -> None:
    happy = _tp("chat", text="Great service, thanks a lot! I love it.").sentiment
    sad = _tp("chat", text="Terrible experience, worst website ever. Awful.").sentiment
    assert happy is not None
    assert sad is not None
    assert 0 < happy <= 1
    assert -1 <= sad < 0


@pytest.mark.parametrize("channel", ["web", "chat", "support", "store"])
def test_occurred_at_is_utc_millis(channel: str) -> None:
    tp = _tp(channel)
    expected = OCCURRED if channel != "store" else OCCURRED.replace(microsecond=0)
    assert tp.occurred_at == expected
    assert tp.occurred_at.utcoffset() is not None
    assert tp.occurred_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    dumped = orjson.loads(tp.model_dump_json())["occurred_at"]
    assert (
        dumped == expected.strftime("%Y-%m-%dT%H:%M:%S.") + f"{expected.microsecond // 1000:03d}Z"
    )


def test_occurred_at_truncates_not_rounds() -> None:
    tp = _tp("web", sent_at="2025-12-31T23:59:59.9999999Z")
    assert orjson.loads(tp.model_dump_json())["occurred_at"] == "2025-12-31T23:59:59.999Z"


@pytest.mark.parametrize(
    ("channel", "source_id"),
    [("web", "w-1"), ("chat", "c-1"), ("support", "s-1"), ("store", "p-1")],
)
def test_event_id_and_channel(channel: str, source_id: str) -> None:
    tp = _tp(channel)
    assert tp.event_id == f"{channel}:{source_id}"
    assert tp.channel == channel


def test_source_block() -> None:
    where = Source(topic="acme.raw.chat", partition=7, offset=123_456_789)
    tp = normalize(_event("chat"), where, PII_KEY).touchpoint
    assert tp.source == where
    assert orjson.loads(tp.model_dump_json())["source"] == {
        "topic": "acme.raw.chat",
        "partition": 7,
        "offset": 123_456_789,
    }


def test_touchpoint_json_has_exactly_the_contract_fields() -> None:
    body = orjson.loads(_tp("store").model_dump_json())
    assert set(body) == {
        "event_id",
        "channel",
        "kind",
        "occurred_at",
        "customer_key",
        "thread_id",
        "ratings",
        "text",
        "sentiment",
        "amount",
        "currency",
        "source",
    }
    assert set(body["ratings"]) == {"nps", "csat", "ces"}


# ----------------------------------------------------------------------------- identifiers


def _ids(normalized: Normalized) -> dict[str, str]:
    return {i.kind: i.value for i in normalized.identifiers}


def test_web_identifiers() -> None:
    got = _ids(_norm("web", user_id="cust-9", email=" Ana@Example.COM "))
    assert got == {
        "customer_id": "cust-9",
        "email": hmac_hex("email", "ana@example.com"),
        "anonymous_id": hmac_hex("anonymous_id", "anon-1"),
    }


def test_chat_identifiers() -> None:
    customer = {"customer_id": "cust-9", "email": "LUIS@example.org", "visitor_id": "vis-9"}
    assert _ids(_norm("chat", customer=customer)) == {
        "customer_id": "cust-9",
        "email": hmac_hex("email", "luis@example.org"),
        "visitor_id": hmac_hex("visitor_id", "vis-9"),
    }


def test_support_identifiers() -> None:
    requester = {"email": "Maria@Example.org ", "customer_id": "cust-3"}
    assert _ids(_norm("support", requester=requester)) == {
        "customer_id": "cust-3",
        "email": hmac_hex("email", "maria@example.org"),
    }


def test_store_identifiers() -> None:
    assert _ids(_norm("store", customer_id="cust-4")) == {
        "customer_id": "cust-4",
        "loyalty_card": hmac_hex("loyalty_card", "6012345678"),
    }


def test_absent_identifiers_are_left_out() -> None:
    assert _ids(_norm("web")) == {"anonymous_id": hmac_hex("anonymous_id", "anon-1")}
    assert _ids(_norm("store", loyalty_card=None, customer_id="c")) == {"customer_id": "c"}


def test_email_normalized_before_hashing() -> None:
    a = _ids(_norm("support", requester={"email": " A@B.com "}))["email"]
    b = _ids(_norm("support", requester={"email": "a@b.com"}))["email"]
    assert a == b == hmac_hex("email", "a@b.com")


def test_identifier_hash_depends_on_key() -> None:
    event = _event("web")
    a, dropped_a = identifiers_of(event, PII_KEY)
    b, dropped_b = identifiers_of(event, b"another-key-0123456789")
    assert a != b
    assert dropped_a == dropped_b == 0


def test_identifiers_of_matches_normalized() -> None:
    event = _event("web", user_id="cust-9", email="null")
    identifiers, dropped = identifiers_of(event, PII_KEY)
    normalized = normalize(event, source("web"), PII_KEY)
    assert identifiers == normalized.identifiers
    assert dropped == normalized.placeholders == 1
    assert {i.kind for i in identifiers} == {"customer_id", "anonymous_id"}


# ------------------------------------------------------------------------ provisional key


def _anon(*pairs: tuple[str, str]) -> str:
    """The anonymous key rule, computed here: 'anon-' + the smallest hash, 32 chars."""
    return "anon-" + min(hmac_hex(kind, value) for kind, value in pairs)[:32]


@pytest.mark.parametrize(
    ("channel", "patch", "key"),
    [
        ("web", {"user_id": "cust-1", "email": "a@b.co"}, "cust-1"),
        ("web", {"email": "A@B.co"}, _anon(("email", "a@b.co"), ("anonymous_id", "anon-1"))),
        ("web", {}, _anon(("anonymous_id", "anon-1"))),
        ("chat", {}, _anon(("visitor_id", "vis-1"))),
        (
            "chat",
            {"customer": {"email": "x@y.io", "visitor_id": "v"}},
            _anon(("email", "x@y.io"), ("visitor_id", "v")),
        ),
        ("chat", {"customer": {"customer_id": "cust-2", "visitor_id": "v"}}, "cust-2"),
        ("support", {}, _anon(("email", "ana@example.com"))),
        ("support", {"requester": {"email": "a@b.co", "customer_id": "cust-3"}}, "cust-3"),
        ("store", {}, _anon(("loyalty_card", "6012345678"))),
        ("store", {"customer_id": "cust-4"}, "cust-4"),
    ],
)
def test_provisional_customer_key(channel: str, patch: dict[str, Any], key: str) -> None:
    normalized = _norm(channel, **patch)
    assert normalized.touchpoint.customer_key == key
    assert provisional_key(normalized.identifiers) == key
    assert normalized.placeholders == 0


def test_same_person_same_anonymous_key_across_channels() -> None:
    support = _norm("support")
    chat = _norm("chat", customer={"email": " ana@example.com"})
    assert support.touchpoint.customer_key == chat.touchpoint.customer_key
    assert support.touchpoint.customer_key == _anon(("email", "ana@example.com"))
    # Linked through the identity graph, the web visit that shows the e-mail joins them.
    web = _norm("web", email="Ana@Example.com")
    graph = IdentityGraph({})
    for n in (support, chat):
        graph.link(n.identifiers, n.touchpoint.event_id)
    final = graph.link(web.identifiers, web.touchpoint.event_id).key
    expected = _anon(("email", "ana@example.com"), ("anonymous_id", "anon-1"))
    assert final == expected
    assert graph.surviving(support.touchpoint.customer_key) == expected


def test_provisional_key_of_no_identifier_is_none() -> None:
    assert provisional_key(()) is None


# --------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize(
    ("channel", "patch", "kept", "dropped"),
    [
        ("web", {"user_id": "null", "email": "test@example.com"}, {"anonymous_id"}, 2),
        ("web", {"user_id": "Guest", "email": " ana@example.com "}, {"email", "anonymous_id"}, 1),
        ("web", {"user_id": "0", "email": "noreply@shop.org"}, {"anonymous_id"}, 2),
        (
            "chat",
            {"customer": {"customer_id": "undefined", "visitor_id": "vis-1"}},
            {"visitor_id"},
            1,
        ),
        (
            "support",
            {"requester": {"email": "ana@example.com", "customer_id": "none"}},
            {"email"},
            1,
        ),
        ("store", {"customer_id": "unknown"}, {"loyalty_card"}, 1),
        ("store", {"customer_id": "C000123"}, {"customer_id", "loyalty_card"}, 0),
    ],
)
def test_placeholder_identifiers_are_dropped_and_counted(
    channel: str, patch: dict[str, Any], kept: set[str], dropped: int
) -> None:
    normalized = _norm(channel, **patch)
    assert {i.kind for i in normalized.identifiers} == kept
    assert normalized.placeholders == dropped


def test_placeholder_never_becomes_the_key() -> None:
    # 'null' as user_id must not become the customer key: the anonymous id gives it.
    normalized = _norm("web", user_id="null")
    assert normalized.touchpoint.customer_key == "anon-" + hmac_hex("anonymous_id", "anon-1")[:32]


@pytest.mark.parametrize(
    ("channel", "patch"),
    [
        ("web", {"anonymous_id": "undefined"}),
        ("chat", {"customer": {"visitor_id": "guest", "email": "test@example.com"}}),
        ("store", {"loyalty_card": "0", "customer_id": None}),
    ],
)
def test_event_with_only_placeholders_gets_a_key_of_its_own(
    channel: str, patch: dict[str, Any]
) -> None:
    normalized = _norm(channel, **patch)
    assert normalized.identifiers == ()
    assert normalized.placeholders >= 1
    event_id = normalized.touchpoint.event_id
    assert normalized.touchpoint.customer_key == "anon-" + hmac_hex("event", event_id)[:32]
    # Two such events are not the same customer.
    other = _norm(channel, **patch, **{SOURCE_ID_FIELD[channel]: "other-id"})
    assert other.touchpoint.customer_key != normalized.touchpoint.customer_key


# ---------------------------------------------------------------------------- no raw PII


PII = ("ana.perez@example.com", "Ana.Perez@Example.COM", "7946 0958", "6012345678", "415-555-0132")


@pytest.mark.parametrize(
    ("channel", "patch"),
    [
        (
            "web",
            {
                "type": "survey_response",
                "email": "Ana.Perez@Example.COM",
                "survey": {
                    "kind": "nps",
                    "score": 3,
                    "comment": "ana.perez@example.com, +44 20 7946 0958, card 6012345678",
                },
            },
        ),
        (
            "chat",
            {
                "customer": {"email": "ana.perez@example.com", "visitor_id": "v"},
                "text": "call 415-555-0132 or ana.perez@example.com",
            },
        ),
        (
            "support",
            {
                "requester": {"email": "Ana.Perez@Example.COM"},
                "comment": "My loyalty card 6012345678; phone (415) 555-0132",
            },
        ),
        ("store", {"loyalty_card": "6012345678"}),
    ],
)
def test_no_raw_pii_in_output(channel: str, patch: dict[str, Any]) -> None:
    normalized = _norm(channel, **patch)
    for text in (normalized.touchpoint.model_dump_json(), normalized.model_dump_json()):
        lowered = text.lower()
        for secret in PII:
            assert secret.lower() not in lowered
        assert "@" not in text


@pytest.mark.parametrize("golden", valid_goldens(), ids=lambda g: g.id)
def test_no_raw_pii_in_golden_outputs(golden: Any) -> None:
    doc = golden.doc()
    event = parse(golden.channel, golden.data(), LIMITS, NOW)
    assert not isinstance(event, Rejected)
    normalized = normalize(event, source(golden.channel), PII_KEY)
    text = normalized.model_dump_json()
    found = [
        value
        for value in (
            doc.get("email"),
            doc.get("loyalty_card"),
            (doc.get("customer") or {}).get("email"),
            (doc.get("requester") or {}).get("email"),
        )
        if value
    ]
    for value in found:
        assert value not in text
        assert value.strip().lower() not in text
    assert "@" not in text


@pytest.mark.parametrize("golden", valid_goldens(), ids=lambda g: g.id)
def test_the_identity_stage_reads_what_the_accept_stage_wrote(golden: Any) -> None:
    """The identity stage passes the touchpoint on as the JSON it read: that JSON is the one
    a validated touchpoint dumps, and the identifiers read back as they were."""
    event = parse(golden.channel, golden.data(), LIMITS, NOW)
    assert not isinstance(event, Rejected)
    normalized = normalize(event, source(golden.channel), PII_KEY).model_copy(
        update={"received_at_ms": 1_764_000_000_000}
    )
    routed = Routed.model_validate(orjson.loads(normalized.model_dump_json()), strict=False)
    assert routed.touchpoint == normalized.touchpoint.model_dump(mode="json")
    assert Touchpoint.model_validate(routed.touchpoint, strict=False) == normalized.touchpoint
    assert routed.identifiers == normalized.identifiers
    assert routed.received_at_ms == 1_764_000_000_000


@pytest.mark.parametrize("golden", valid_goldens(), ids=lambda g: g.id)
def test_the_accept_stage_reads_what_the_ingest_stage_wrote(golden: Any) -> None:
    """The accept stage reads only what dedup needs of the envelope: the same values a
    validated envelope holds."""
    event = parse(golden.channel, golden.data(), LIMITS, NOW)
    assert not isinstance(event, Rejected)
    normalized = normalize(event, source(golden.channel), PII_KEY)
    arrival = Arrival.model_validate_json(normalized.model_dump_json())
    touchpoint = normalized.touchpoint
    assert (arrival.touchpoint.event_id, arrival.touchpoint.channel) == (
        touchpoint.event_id,
        touchpoint.channel,
    )
    assert arrival.touchpoint.occurred_at == touchpoint.occurred_at
    assert arrival.touchpoint.source == touchpoint.source
    assert arrival.placeholders == normalized.placeholders


def test_the_accept_stage_refuses_an_envelope_without_what_dedup_needs() -> None:
    origin = {"topic": "cx.raw.web", "partition": 0, "offset": 1}
    at = "2026-03-01T12:00:00.000+01:00"
    envelope = {"touchpoint": {"event_id": "web:1", "channel": "web", "occurred_at": at,
                               "source": origin}}  # fmt: skip
    with pytest.raises(ValidationError, match="must be UTC"):
        Arrival.model_validate_json(orjson.dumps(envelope))
    del envelope["touchpoint"]["source"]
    with pytest.raises(ValidationError, match="source"):
        Arrival.model_validate_json(orjson.dumps(envelope))
