"""The traffic simulator: deterministic, contract-shaped, with journeys, re-sends and bad input."""

from __future__ import annotations

import asyncio
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

import aiokafka
import orjson
import pytest

from service.settings import Settings
from service.simulate import SOURCE_ID_FIELD, SimMessage, generate, publish, topic_for

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SPAN = timedelta(days=3)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_PAYLOAD = 64 * 1024

RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}(Z|[+-]\d{2}:\d{2})$")
HELPDESK = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}[+-]\d{2}:\d{2}$")
DECIMAL = re.compile(r"^\d+\.\d{2}$")
SCALES = {"nps": range(11), "csat": range(1, 6), "ces": range(1, 8)}


@pytest.fixture(scope="module")
def stream() -> list[SimMessage]:
    return list(generate(5000, now=NOW, span=SPAN, seed=7))


def _valid(stream: list[SimMessage]) -> list[tuple[SimMessage, dict[str, Any]]]:
    return [(m, orjson.loads(m.value)) for m in stream if m.kind == "valid"]


def _event_time(channel: str, event: dict[str, Any]) -> datetime:
    """A raw event -> its UTC time, read the way its channel's format says."""
    if channel == "web":
        return datetime.fromisoformat(event["sent_at"]).astimezone(UTC)
    if channel == "chat":
        return EPOCH + timedelta(milliseconds=event["timestamp"])
    if channel == "support":
        return datetime.fromisoformat(event["occurred_at"]).astimezone(UTC)
    return EPOCH + timedelta(seconds=event["time"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_web(event: dict[str, Any]) -> None:
    assert isinstance(event["event_id"], str)
    assert isinstance(event["anonymous_id"], str)
    assert event["type"] in {
        "page_view",
        "sign_in",
        "form_submit",
        "survey_response",
        "account_closed",
    }
    assert RFC3339_MS.match(event["sent_at"])
    if event["type"] == "survey_response":
        survey = event["survey"]
        assert _is_int(survey["score"])
        assert survey["score"] in SCALES[survey["kind"]]


def _check_chat(event: dict[str, Any]) -> None:
    assert isinstance(event["id"], str)
    assert isinstance(event["conversation_id"], str)
    assert event["event"] in {
        "conversation_started",
        "message",
        "handoff",
        "conversation_closed",
        "rating",
    }
    assert _is_int(event["timestamp"])
    assert any(event["customer"].get(k) for k in ("customer_id", "email", "visitor_id"))
    assert event.get("author") in {"customer", "agent", "bot", None}
    if event["event"] == "rating":
        assert _is_int(event["rating"])
        assert event["rating"] in SCALES["csat"]


def _check_support(event: dict[str, Any]) -> None:
    assert isinstance(event["event_id"], str)
    assert isinstance(event["ticket_id"], str)
    assert event["action"] in {
        "created",
        "agent_reply",
        "customer_reply",
        "solved",
        "reopened",
        "survey",
    }
    assert HELPDESK.match(event["occurred_at"])
    assert isinstance(event["requester"]["email"], str)
    if event["action"] == "survey":
        survey = event["survey"]
        assert survey["csat"] is not None or survey["ces"] is not None
        assert survey["csat"] is None or survey["csat"] in SCALES["csat"]
        assert survey["ces"] is None or survey["ces"] in SCALES["ces"]


def _check_store(event: dict[str, Any]) -> None:
    assert isinstance(event["txn_id"], str)
    assert isinstance(event["store_id"], str)
    assert event["kind"] in {"purchase", "return", "kiosk_survey"}
    assert _is_int(event["time"])
    assert event.get("loyalty_card") or event.get("customer_id")
    if event["kind"] in {"purchase", "return"}:
        assert DECIMAL.match(event["amount"])
        assert Decimal(event["amount"]) > 0
        assert event["currency"] in {"EUR", "USD"}
    else:
        assert event.get("nps") is not None or event.get("csat") is not None
        assert event.get("nps") is None or event["nps"] in SCALES["nps"]
        assert event.get("csat") is None or event["csat"] in SCALES["csat"]


CHECKS = {"web": _check_web, "chat": _check_chat, "support": _check_support, "store": _check_store}


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = list(generate(500, now=NOW, seed=1))
    again = list(generate(500, now=NOW, seed=1))
    other = list(generate(500, now=NOW, seed=2))
    assert first == again
    assert [m.value for m in first] != [m.value for m in other]


@pytest.mark.parametrize("count", [0, 1, 7, 1234])
def test_yields_exactly_count(count: int) -> None:
    assert sum(1 for _ in generate(count, now=NOW, customers=50)) == count


def test_shares_of_duplicates_and_bad_as_asked(stream: list[SimMessage]) -> None:
    kinds = Counter(m.kind for m in stream)
    assert 70 <= kinds["duplicate"] <= 135  # 2 % of 5000
    assert 30 <= kinds["bad"] <= 75  # 1 % of 5000
    none = list(generate(2000, now=NOW, dup_share=0, bad_share=0))
    assert {m.kind for m in none} == {"valid"}


def test_all_four_channels_carry_traffic(stream: list[SimMessage]) -> None:
    shares = Counter(m.channel for m in stream)
    assert all(shares[channel] > 150 for channel in SOURCE_ID_FIELD)


def test_duplicates_repeat_an_earlier_valid_message_byte_for_byte(
    stream: list[SimMessage],
) -> None:
    seen: dict[str, SimMessage] = {}
    for message in stream:
        if message.kind == "valid":
            assert message.event_id is not None
            assert message.event_id not in seen, "source ids are unique per channel"
            seen[message.event_id] = message
        elif message.kind == "duplicate":
            assert message.event_id in seen
            original = seen[message.event_id]
            assert message.value == original.value
            assert message.channel == original.channel
    assert any(
        m.kind == "duplicate" and m.event_id is not None and m.key != seen[m.event_id].key
        for m in stream
    ), "some re-sends carry another key"


def test_valid_messages_follow_their_channel_format(stream: list[SimMessage]) -> None:
    for message, event in _valid(stream):
        assert isinstance(event, dict)
        CHECKS[message.channel](event)
        assert message.event_id == f"{message.channel}:{event[SOURCE_ID_FIELD[message.channel]]}"
        assert len(message.value) < MAX_PAYLOAD


def test_web_times_mix_z_and_offsets(stream: list[SimMessage]) -> None:
    sent_at = [event["sent_at"] for m, event in _valid(stream) if m.channel == "web"]
    assert any(s.endswith("Z") for s in sent_at)
    assert any(re.search(r"[+-]\d{2}:\d{2}$", s) for s in sent_at)


def test_event_times_stay_in_range_and_rise(stream: list[SimMessage]) -> None:
    times = [_event_time(m.channel, event) for m, event in _valid(stream)]
    assert all(NOW - SPAN <= t <= NOW for t in times)
    tenth = len(times) // 10
    assert max(times[:tenth]) < min(times[-tenth:]), "journeys unfold over time"
    assert max(times) > NOW - timedelta(hours=1)
    assert min(times) < NOW - SPAN + timedelta(hours=1)


def test_content_is_realistic(stream: list[SimMessage]) -> None:
    events = _valid(stream)
    nps = [e["survey"]["score"] for _, e in events if (e.get("survey") or {}).get("kind") == "nps"]
    nps += [e["nps"] for m, e in events if m.channel == "store" and e.get("nps") is not None]
    assert len(nps) > 50
    promoters = sum(s >= 9 for s in nps) / len(nps)
    detractors = sum(s <= 6 for s in nps) / len(nps)
    assert 0.3 < promoters < 0.6
    assert 0.1 < detractors < 0.4
    texts = [
        text
        for _, e in events
        for text in (e.get("text"), e.get("comment"), (e.get("survey") or {}).get("comment"))
        if text
    ]
    assert any("@" in text for text in texts), "some free text leaks an e-mail address"
    assert any(re.search(r"\d{3}[- ]\d{4}", text) for text in texts), "and some a phone number"
    emails = [e["requester"]["email"] for m, e in events if m.channel == "support"]
    assert any(email != email.strip().lower() for email in emails)
    kinds = Counter(
        e.get("type") or e.get("event") or e.get("action") or e["kind"] for _, e in events
    )
    for kind in ("sign_in", "handoff", "reopened", "purchase", "return", "kiosk_survey", "rating"):
        assert kinds[kind] > 0, kind
    assert any(set(e) - _known_fields(m.channel) for m, e in events), "unknown extra fields"
    keys = Counter(m.key is None for m in stream)
    assert 0.05 < keys[True] / len(stream) < 0.2


def _known_fields(channel: str) -> set[str]:
    return {
        "web": {"event_id", "type", "sent_at", "anonymous_id", "user_id", "email", "session_id"}
        | {"page", "survey"},
        "chat": {"id", "conversation_id", "event", "timestamp", "customer", "author", "text"}
        | {"rating"},
        "support": {"event_id", "ticket_id", "action", "occurred_at", "requester", "comment"}
        | {"survey"},
        "store": {"txn_id", "store_id", "kind", "time", "loyalty_card", "customer_id", "amount"}
        | {"currency", "nps", "csat"},
    }[channel]


def _identifiers(channel: str, event: dict[str, Any]) -> set[str]:
    """A raw event -> its identifiers, typed so that equal values mean the same person."""
    found: set[tuple[str, str | None]] = set()
    if channel == "web":
        found |= {("anon", event["anonymous_id"]), ("cid", event.get("user_id"))}
        found.add(("email", event.get("email")))
    elif channel == "chat":
        customer = event["customer"]
        found |= {("cid", customer.get("customer_id")), ("visitor", customer.get("visitor_id"))}
        found.add(("email", customer.get("email")))
    elif channel == "support":
        requester = event["requester"]
        found |= {("email", requester["email"]), ("cid", requester.get("customer_id"))}
    else:
        found |= {("card", event.get("loyalty_card")), ("cid", event.get("customer_id"))}
    return {
        f"{kind}:{value.strip().lower() if kind == 'email' else value}"
        for kind, value in found
        if value
    }


def test_people_appear_on_several_channels_with_shared_identifiers(
    stream: list[SimMessage],
) -> None:
    parent: dict[str, str] = {}

    def root(item: str) -> str:
        parent.setdefault(item, item)
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    tagged = [(m.channel, _identifiers(m.channel, e)) for m, e in _valid(stream)]
    for _, ids in tagged:
        first, *rest = sorted(ids)
        for other in rest:
            parent[root(other)] = root(first)
    channels: defaultdict[str, set[str]] = defaultdict(set)
    for channel, ids in tagged:
        channels[root(next(iter(ids)))].add(channel)
    spread = Counter(len(used) for used in channels.values())
    assert spread[3] + spread[4] >= 20
    assert spread[4] >= 1


def _bad_class(message: SimMessage) -> str:
    """A bad message -> which listed class it belongs to, judged from its bytes alone."""
    if len(message.value) > MAX_PAYLOAD:
        return "payload_too_large"
    try:
        event = orjson.loads(message.value)
    except orjson.JSONDecodeError:
        return "invalid_json"
    if not isinstance(event, dict):
        return "not_an_object"
    try:
        if _event_time(message.channel, event) > NOW + timedelta(hours=12):
            return "timestamp_in_future"
        CHECKS[message.channel](event)
    except KeyError:
        return "missing_field"
    except AssertionError:
        return "score_out_of_range"
    return "looks_valid"


def test_bad_messages_cover_every_class(stream: list[SimMessage]) -> None:
    bad = [m for m in stream if m.kind == "bad"]
    assert all(m.event_id is None for m in bad)
    classes = Counter(_bad_class(m) for m in bad)
    assert set(classes) == {
        "invalid_json",
        "not_an_object",
        "missing_field",
        "score_out_of_range",
        "timestamp_in_future",
        "payload_too_large",
    }
    reasons = {
        "missing_field": "schema_violation",
        "score_out_of_range": "schema_violation",
    }
    assert all(m.reason == reasons.get(_bad_class(m), _bad_class(m)) for m in bad)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="share"):
        generate(10, now=NOW, dup_share=0.7, bad_share=0.5)
    with pytest.raises(ValueError, match="aware"):
        generate(10, now=datetime(2026, 11, 20))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="count"):
        generate(-1, now=NOW)


def test_short_span_keeps_store_seconds_in_range() -> None:
    now = datetime(2026, 11, 20, 12, 0, 0, 250_000, tzinfo=UTC)
    span = timedelta(minutes=5)
    for message in generate(300, now=now, span=span, bad_share=0):
        if message.kind == "valid":
            t = _event_time(message.channel, orjson.loads(message.value))
            assert now - span <= t <= now


def test_topic_names() -> None:
    assert topic_for("cx", "web") == "cx.raw.web"
    assert topic_for("acme.prod", "store") == "acme.prod.raw.store"


class FakeProducer:
    """Stands in for aiokafka's producer: records sends, can fail on demand."""

    instances: ClassVar[list[FakeProducer]] = []
    fail_after: ClassVar[int | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.calls: list[str] = []
        FakeProducer.instances.append(self)

    async def start(self) -> None:
        self.calls.append("start")

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None
    ) -> asyncio.Future[None]:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise RuntimeError("broker went away")
        self.sent.append((topic, value, key))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def flush(self) -> None:
        self.calls.append("flush")

    async def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    FakeProducer.instances = []
    FakeProducer.fail_after = None
    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", FakeProducer)
    return FakeProducer


async def test_publish_sends_every_message_to_its_raw_topic(
    fake_producer: type[FakeProducer],
) -> None:
    messages = list(generate(2500, now=NOW, customers=100))
    totals: list[int] = []
    settings = Settings(topic_prefix="acme", kafka_bootstrap_servers="broker:9092")
    assert await publish(settings, messages, progress=totals.append) == 2500
    (producer,) = fake_producer.instances
    assert producer.options["acks"] == "all"
    assert producer.options["linger_ms"] == 5
    assert producer.options["bootstrap_servers"] == "broker:9092"
    assert producer.sent == [(f"acme.raw.{m.channel}", m.value, m.key) for m in messages]
    assert totals[-1] == 2500
    assert totals == sorted(totals)
    assert producer.calls == ["start", "flush", "stop"]


async def test_publish_paces_to_the_rate(fake_producer: type[FakeProducer]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    count = await publish(Settings(), generate(20, now=NOW), rate=100.0)
    assert count == 20
    assert loop.time() - started >= 0.18  # 20 messages at 100/s: the last one is due at 0.19 s


async def test_publish_stops_the_producer_on_error(fake_producer: type[FakeProducer]) -> None:
    fake_producer.fail_after = 10
    with pytest.raises(RuntimeError, match="broker went away"):
        await publish(Settings(), generate(50, now=NOW))
    assert fake_producer.instances[0].calls[-1] == "stop"
