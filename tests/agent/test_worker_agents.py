"""Agent tier: the Faust agents of `service.worker` under `agent.test_context()`, no broker.

Messages go in through the test wrapper's channel with explicit source coordinates; what the
agents publish is captured by replacing `send` on the output topics.

Stages: ingest (raw -> accepted | deadletter), accept (dedup -> identity stream), identity
(one partition: identity graph -> customer commands, cx.identity), customers (records ->
cx.timeline, cx.profiles).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import orjson
import pytest
from aiokafka.structs import RecordMetadata, TopicPartition
from faust.types.tuples import Message
from prometheus_client import CollectorRegistry

import service.worker
from service import storage
from service.canonical import (
    Identifier,
    Normalized,
    Ratings,
    Source,
    Touchpoint,
    format_utc_millis,
)
from service.deadletter import (
    HEADER_DETAIL,
    HEADER_FAILED_AT,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    read_headers,
)
from service.fence import Fenced
from service.forget import FORGET_KEY, forget_command
from service.identity import IdentityGraph, is_placeholder, provisional_key
from service.metrics import Derived
from service.outbox import Done
from service.profile import Profile
from service.rolling import MinuteAgg
from service.simulate import SimMessage, generate
from service.worker import StrKeys, Worker, build_worker, faust_worker_for
from tests.agent._settings import offline_settings

pytestmark = pytest.mark.agent

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
PARTITIONS = 4
ACCEPTED = "cx.internal.accepted"
IDENTITY_STREAM = "cx.internal.identity"
CUSTOMER_STREAM = "cx.internal.customers"
DEADLETTER_HEADERS = [
    HEADER_REASON,
    HEADER_DETAIL,
    HEADER_TOPIC,
    HEADER_PARTITION,
    HEADER_OFFSET,
    HEADER_FAILED_AT,
]


# --- capturing what the agents send ------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass
class Capture:
    """Stands in for the worker's send to one topic (partition 0): records each call, and
    tells it delivered at the next offset."""

    topic: str = "captured"
    sent: list[Sent] = field(default_factory=list)

    async def send(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        done: Done,
    ) -> None:
        await asyncio.sleep(0)  # a real send suspends too; the feeding helper must cope
        self.sent.append(Sent(key, value, list(headers or [])))
        done(_metadata(self.topic, 0, len(self.sent) - 1), 0, None)


def _metadata(topic: str, partition: int, offset: int) -> RecordMetadata:
    return RecordMetadata(topic, partition, TopicPartition(topic, partition), offset, -1, 0, 0)


@dataclass
class ChangelogCapture:
    """Stands in for the worker's changelog send: records (topic, partition, key, value) and
    tells it delivered at the next offset of that partition."""

    sent: list[tuple[str, int, bytes, bytes | None]] = field(default_factory=list)
    ends: Counter[tuple[str, int]] = field(default_factory=Counter)

    async def send(
        self, topic: str, partition: int, key: bytes, value: bytes | None, done: Done
    ) -> None:
        await asyncio.sleep(0)
        self.sent.append((topic, partition, key, value))
        offset = self.ends[topic, partition]
        self.ends[topic, partition] += 1
        done(_metadata(topic, partition, offset), 0, None)


@dataclass
class Harness:
    worker: Worker
    registry: CollectorRegistry
    accepted: Capture
    identity: Capture  # the internal identity stream (accept -> identity)
    customers: Capture  # the internal customer stream (identity, customers -> customers)
    timeline: Capture
    deadletter: Capture
    announced: Capture  # cx.identity
    profiles: Capture
    alerts: Capture
    metrics: Capture  # the internal metrics stream (customers -> metrics partitions)
    partials: Capture  # minute aggregates (metrics partitions -> merger)
    snapshots: Capture  # cx.metrics
    fatal: list[tuple[str, BaseException]]
    changelog: ChangelogCapture

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def total(self, name: str) -> float:
        """Sum of one counter over all its label values."""
        return sum(
            sample.value
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name
        )

    @property
    def graph(self) -> IdentityGraph:
        return IdentityGraph(StrKeys(self.worker.identity_table))

    def record(self, key: str) -> dict[str, Any] | None:
        value = self.worker.customers_table.get(key)
        return None if value is None else dict(value)

    def records(self) -> dict[str, dict[str, Any]]:
        return {
            key.decode() if isinstance(key, bytes) else key: dict(value)
            for key, value in self.worker.customers_table.items()
        }


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """This tier has no broker: any attempt to connect anywhere fails the test."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"agent tier opened a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def make_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    """A fresh worker (memory tables, fixed clock) whose output topics are captured."""
    settings = offline_settings(tmp_path, monkeypatch, partitions=PARTITIONS)
    registry = CollectorRegistry()
    fatal: list[tuple[str, BaseException]] = []
    worker = build_worker(
        settings,
        registry=registry,
        clock=lambda: NOW,
        on_fatal=lambda stage, exc: fatal.append((stage, exc)),
    )
    worker.app.finalize()
    worker.app.conf.store = "memory://"
    topics = (
        worker.accepted_topic,
        worker.identity_stream,
        worker.customer_stream,
        worker.timeline_topic,
        worker.deadletter_topic,
        worker.identity_out,
        worker.profiles_topic,
        worker.alerts_topic,
        worker.metrics_stream,
        worker.partials_stream,
        worker.metrics_topic,
    )
    captures = [Capture(topic.get_topic_name()) for topic in topics]
    by_topic = {id(topic): capture for topic, capture in zip(topics, captures, strict=True)}

    async def send(
        topic: Any, key: bytes | None, value: bytes | None, headers: Any, done: Done
    ) -> None:
        await by_topic[id(topic)].send(key, value, headers, done)

    worker.send = send
    changelog = ChangelogCapture()
    worker.send_changelog = changelog.send
    return Harness(worker, registry, *captures, fatal, changelog)


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return make_harness(tmp_path, monkeypatch)


# --- driving the agents ------------------------------------------------------------------


def build_message(
    agent: Any, topic: str, key: bytes | None, value: bytes | None, partition: int, offset: int
) -> Message:
    """A consumed Kafka message with these exact coordinates."""
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=time.time(),
        timestamp_type=0,
        headers=[],
        key=key,
        value=value,
        checksum=None,
        generation_id=agent.app.consumer_generation_id,  # else the stream skips it
    )


async def put_message(agent: Any, message: Message) -> None:
    """Put one message into the test agent and wait until the agent is done with it.

    This is `AgentTestWrapper.put` with a caller-built message: `put` names the topic after the
    agent's channel ("cx.raw.web,cx.raw.chat,..." for the multi-topic ingest agent) and numbers
    offsets itself, so it cannot stand for a message read from one raw topic."""
    channel = agent.stream().channel
    event = await channel.decode(message)
    async with agent.new_value_processed:
        await channel.put(event)
        # The wrapper's recorder is a stream processor: it fires as the agent *receives* the
        # value, before the agent body has run.
        await agent.new_value_processed.wait()
    stream = agent.stream()
    for _ in range(1000):  # the body is done once the stream has cleared its current event
        if stream.current_event is None and channel.queue.empty():
            break
        await asyncio.sleep(0)
    else:
        raise AssertionError("the agent did not finish the message")
    if agent._crash_reason is not None:
        raise agent._crash_reason


async def feed(
    agent: Any, topic: str, key: bytes | None, value: bytes | None, partition: int, offset: int
) -> None:
    await put_message(agent, build_message(agent, topic, key, value, partition, offset))


async def put_and_wait_fatal(harness: Harness, agent: Any, message: Message) -> None:
    """Hand one message to an agent and wait for its on_fatal."""
    channel = agent.stream().channel
    await channel.put(await channel.decode(message))
    for _ in range(2000):
        if harness.fatal:
            break
        await asyncio.sleep(0)
    assert harness.fatal, "no on_fatal: the failing event would have been acked"


async def put_until_fatal(harness: Harness, agent: Any, message: Message) -> None:
    """Hand one message to an agent and wait for its on_fatal; it must stay unacked."""
    await put_and_wait_fatal(harness, agent, message)
    assert not message.acked, "acked: at-least-once would commit past the failed event"


def key_partition(key: bytes) -> int:
    """A stable key -> partition map (any will do: equal keys must meet in one partition)."""
    return zlib.crc32(key) % PARTITIONS


async def feed_accepted(agent: Any, sent: Sent, offset: int) -> None:
    assert sent.key is not None
    await feed(agent, ACCEPTED, sent.key, sent.value, key_partition(sent.key), offset)


async def feed_identity(agent: Any, key: bytes | None, value: bytes | None, offset: int) -> None:
    """The identity stream has one partition: every event and forget request meets there."""
    await feed(agent, IDENTITY_STREAM, key, value, 0, offset)


async def feed_customer(agent: Any, key: str, command: dict[str, Any], offset: int) -> None:
    raw_key = key.encode()
    await feed(
        agent, CUSTOMER_STREAM, raw_key, orjson.dumps(command), key_partition(raw_key), offset
    )


def commands(capture: Capture) -> list[tuple[str, dict[str, Any]]]:
    """Customer-stream sends -> (customer key, command)."""
    out = []
    for sent in capture.sent:
        assert sent.key is not None
        assert sent.value is not None
        out.append((sent.key.decode(), orjson.loads(sent.value)))
    return out


# --- raw input ---------------------------------------------------------------------------


def raw_event(channel: str, source_id: str, at: datetime = NOW) -> bytes:
    """One valid event in `channel`'s upstream format (contract section 2.1)."""
    payloads: dict[str, dict[str, Any]] = {
        "web": {
            "event_id": source_id,
            "type": "survey_response",
            "sent_at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "anonymous_id": "anon-1",
            "user_id": "C000042",
            "survey": {"kind": "nps", "score": 9, "comment": "Great, mail me at a@b.example"},
        },
        "chat": {
            "id": source_id,
            "conversation_id": "conv-1",
            "event": "rating",
            "timestamp": int(at.timestamp() * 1000),
            "customer": {"customer_id": None, "email": "A@B.example", "visitor_id": "v_1"},
            "rating": 4,
        },
        "support": {
            "event_id": source_id,
            "ticket_id": "T-1",
            "action": "created",
            "occurred_at": at.isoformat(sep=" ", timespec="microseconds"),
            "requester": {"email": "a@b.example", "customer_id": None},
            "comment": "Where is my order?",
        },
        "store": {
            "txn_id": source_id,
            "store_id": "S001",
            "kind": "purchase",
            "time": int(at.timestamp()),
            "loyalty_card": "LC0000000001",
            "amount": "19.99",
            "currency": "EUR",
        },
    }
    return orjson.dumps(payloads[channel])


def touchpoint_of(sent: Sent) -> Touchpoint:
    assert sent.value is not None
    return Touchpoint.model_validate_json(sent.value)


def ident(kind: str, value: str) -> Identifier:
    return Identifier.model_validate({"kind": kind, "value": value})


CUSTOMER_42 = (ident("customer_id", "C000042"),)


def touchpoint(
    event_id: str,
    at: datetime,
    offset: int,
    customer_key: str = "C000042",
    topic: str = "cx.raw.web",
    partition: int = 0,
) -> Touchpoint:
    return Touchpoint(
        event_id=event_id,
        channel=event_id.partition(":")[0],
        kind="page_view",
        occurred_at=at,
        customer_key=customer_key,
        thread_id=None,
        ratings=Ratings(nps=None, csat=None, ces=None),
        text=None,
        sentiment=None,
        amount=None,
        currency=None,
        source=Source(topic=topic, partition=partition, offset=offset),
    )


def normalized(
    event_id: str,
    at: datetime,
    offset: int,
    topic: str = "cx.raw.web",
    partition: int = 0,
    identifiers: tuple[Identifier, ...] = CUSTOMER_42,
) -> bytes:
    """An internal accepted-topic value, as the ingest agent would have produced it."""
    key = provisional_key(identifiers) or "anon-solo"
    event = touchpoint(event_id, at, offset, key, topic, partition)
    return Normalized(touchpoint=event, identifiers=identifiers).model_dump_json().encode()


# --- ingest ------------------------------------------------------------------------------


async def test_every_stage_reads_keys_and_values_as_the_bytes_sent(harness: Harness) -> None:
    """The stages' topics decode a record without Faust's codec registry, to the event
    Faust's own raw decoding gives: the message's own key and value (None as None)."""
    app = harness.worker.app
    faust_decode = faust.Schema(key_serializer="raw", value_serializer="raw").compile(app)
    for stage, topic in (("ingest", "cx.raw.web"), ("customers", "cx.internal.customers")):
        agent = harness.worker.agents[stage]
        for key, value in ((b"k-1", b'{"a": 1}'), (None, None)):
            message = build_message(agent, topic, key, value, 0, 7)
            message.headers = [("h", b"1")]
            event, expected = await agent.channel.decode(message), await faust_decode(message)
            assert (event.key, event.value, event.message) == (key, value, message)
            assert (type(event), event.app) == (type(expected), expected.app)
            assert (event.key, event.value, event.headers) == (
                expected.key, expected.value, expected.headers
            )  # fmt: skip


@pytest.mark.parametrize("channel", ["web", "chat", "support", "store"])
async def test_ingest_valid_message_goes_to_accepted_topic(harness: Harness, channel: str) -> None:
    topic = f"cx.raw.{channel}"
    async with harness.worker.agents["ingest"].test_context() as agent:
        await feed(agent, topic, b"some-key", raw_event(channel, "src-1"), partition=3, offset=17)

    assert harness.deadletter.sent == []
    assert harness.identity.sent == []
    [sent] = harness.accepted.sent
    assert sent.key == f"{channel}:src-1".encode()
    assert sent.value is not None
    event = Normalized.model_validate_json(sent.value)
    assert event.touchpoint.event_id == f"{channel}:src-1"
    assert event.touchpoint.channel == channel
    assert event.touchpoint.source == Source(topic=topic, partition=3, offset=17)
    assert b"a@b.example" not in sent.value.lower()
    assert b"LC0000000001" not in sent.value
    for other in ("web", "chat", "support", "store"):
        expected = 1.0 if other == channel else 0.0
        assert harness.count("cxpulse_messages_consumed_total", channel=other) == expected
    assert harness.total("cxpulse_deadletters_total") == 0


_WEB = orjson.loads(raw_event("web", "bad-1"))
_NO_ANONYMOUS_ID = {name: value for name, value in _WEB.items() if name != "anonymous_id"}
REJECTIONS: dict[str, tuple[bytes | None, str | None]] = {
    # reason -> (value, a field name the detail must contain)
    "invalid_json": (b'{"event_id": "x", ', None),
    "not_an_object": (b'["an", "array"]', None),
    "schema_violation": (orjson.dumps(_NO_ANONYMOUS_ID), "anonymous_id"),
    "timestamp_in_future": (raw_event("web", "bad-2", NOW + timedelta(minutes=6)), "sent_at"),
    "payload_too_large": (orjson.dumps({**_WEB, "padding": "x" * 70_000}), None),
}


@pytest.mark.parametrize(
    ("reason", "key"),
    [*((reason, b"\x00raw key \xff") for reason in REJECTIONS), ("invalid_json", None)],
)
async def test_ingest_rejection_goes_to_deadletter_unchanged(
    harness: Harness, reason: str, key: bytes | None
) -> None:
    value, named_field = REJECTIONS[reason]
    async with harness.worker.agents["ingest"].test_context() as agent:
        await feed(agent, "cx.raw.web", key, value, partition=2, offset=41)

    assert harness.accepted.sent == []
    [sent] = harness.deadletter.sent
    assert sent.key == key
    assert sent.value == value
    assert [name for name, _ in sent.headers] == DEADLETTER_HEADERS
    headers = read_headers(sent.headers)
    assert headers[HEADER_REASON] == reason
    assert headers[HEADER_DETAIL]
    if named_field is not None:
        assert named_field in headers[HEADER_DETAIL]
    assert headers[HEADER_TOPIC] == "cx.raw.web"
    assert headers[HEADER_PARTITION] == "2"
    assert headers[HEADER_OFFSET] == "41"
    assert headers[HEADER_FAILED_AT] == format_utc_millis(NOW)
    assert harness.count("cxpulse_deadletters_total", channel="web", reason=reason) == 1
    assert harness.total("cxpulse_deadletters_total") == 1
    assert harness.count("cxpulse_messages_consumed_total", channel="web") == 1


async def test_ingest_processing_error_is_dead_lettered_and_agent_continues(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_normalize = service.worker.normalize

    def flaky_normalize(event: Any, source: Source, pii_key: bytes) -> Normalized:
        if source.offset == 0:
            raise RuntimeError("boom")
        return real_normalize(event, source, pii_key)

    monkeypatch.setattr(service.worker, "normalize", flaky_normalize)
    first, second = raw_event("store", "t-1"), raw_event("store", "t-2")
    async with harness.worker.agents["ingest"].test_context() as agent:
        await feed(agent, "cx.raw.store", b"k1", first, partition=1, offset=0)
        await feed(agent, "cx.raw.store", b"k2", second, partition=1, offset=1)

    [dead] = harness.deadletter.sent
    assert (dead.key, dead.value) == (b"k1", first)
    headers = read_headers(dead.headers)
    assert headers[HEADER_REASON] == "processing_error"
    assert (headers[HEADER_TOPIC], headers[HEADER_OFFSET]) == ("cx.raw.store", "0")
    assert "boom" not in headers[HEADER_DETAIL]  # exception text may carry raw input
    [accepted] = harness.accepted.sent
    assert accepted.key == b"store:t-2"
    assert harness.count("cxpulse_deadletters_total", channel="store", reason="processing_error")
    assert harness.count("cxpulse_messages_consumed_total", channel="store") == 2


# --- accept ------------------------------------------------------------------------------


def event_ids(capture: Capture) -> list[str]:
    """Identity-stream sends -> their event ids."""
    return [
        Normalized.model_validate_json(sent.value or b"").touchpoint.event_id
        for sent in capture.sent
    ]


async def test_accept_new_duplicate_and_replay(harness: Harness) -> None:
    at = NOW - timedelta(hours=1)
    original = normalized("web:e-1", at, offset=5)
    async with harness.worker.agents["accept"].test_context() as agent:
        await feed(agent, ACCEPTED, b"web:e-1", original, partition=2, offset=0)
        [first] = harness.identity.sent
        assert (first.key, first.value) == (b"web:e-1", original)  # forwarded unchanged
        assert harness.count("cxpulse_events_accepted_total", channel="web") == 1

        resent = normalized("web:e-1", at, offset=6)  # same id, another source offset
        await feed(agent, ACCEPTED, b"web:e-1", resent, partition=2, offset=1)
        assert len(harness.identity.sent) == 1
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 1

        await feed(agent, ACCEPTED, b"web:e-1", original, partition=2, offset=2)  # a replay
        assert len(harness.identity.sent) == 2
        assert harness.identity.sent[1] == first
        assert harness.count("cxpulse_events_replayed_total", channel="web") == 1
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 1
        assert harness.count("cxpulse_events_accepted_total", channel="web") == 1
    assert harness.timeline.sent == []  # the accept stage files nothing on customers itself
    assert harness.customers.sent == []


async def test_accept_failure_is_fatal_and_never_acks_the_message(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error stops the worker (on_fatal) before the message can be acked."""

    def failing_classify(*_: Any) -> str:
        raise RuntimeError("dedup store unavailable")

    monkeypatch.setattr(service.worker, "classify", failing_classify)
    async with harness.worker.agents["accept"].test_context() as agent:
        value = normalized("web:e-1", NOW, 0)
        await put_until_fatal(
            harness, agent, build_message(agent, ACCEPTED, b"web:e-1", value, 0, 0)
        )
        [(stage, exc)] = harness.fatal
        assert stage == "accept"
        assert isinstance(exc, RuntimeError)
        assert "dedup store unavailable" in str(exc)
    assert harness.identity.sent == []


@pytest.mark.parametrize(
    ("gap", "evicted"), [(timedelta(hours=24, seconds=1), True), (timedelta(hours=23), False)]
)
async def test_accept_dedup_horizon(harness: Harness, gap: timedelta, evicted: bool) -> None:
    start = NOW - timedelta(days=3)
    async with harness.worker.agents["accept"].test_context() as agent:
        await feed(agent, ACCEPTED, b"web:old", normalized("web:old", start, 0), 1, 0)
        later = normalized("web:later", start + gap, 1)  # moves partition 1's watermark
        await feed(agent, ACCEPTED, b"web:later", later, 1, 1)
        again = normalized("web:old", start, 2)  # same id, new source offset
        await feed(agent, ACCEPTED, b"web:old", again, 1, 2)

    forwarded = event_ids(harness.identity)
    horizon_evictions = harness.count("cxpulse_dedup_evictions_total", reason="horizon")
    if evicted:
        assert forwarded == ["web:old", "web:later", "web:old"]
        assert horizon_evictions == 1
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 0
        assert harness.count("cxpulse_events_accepted_total", channel="web") == 3
    else:
        assert forwarded == ["web:old", "web:later"]
        assert horizon_evictions == 0
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 1


# --- identity ----------------------------------------------------------------------------
# Identifier values here are short opaque strings (real ones are keyed hashes), so the key of
# an anonymous customer is "anon-" + the smallest value among its identifiers.


def linking(event_id: str, at: datetime, offset: int, *identifiers: Identifier) -> bytes:
    return normalized(event_id, at, offset, identifiers=identifiers)


def announcements(harness: Harness) -> list[tuple[str, dict[str, Any]]]:
    return [
        ((sent.key or b"").decode(), orjson.loads(sent.value or b""))
        for sent in harness.announced.sent
    ]


def event_command(sent: tuple[str, dict[str, Any]]) -> tuple[str, Touchpoint]:
    key, command = sent
    assert command["t"] == "event"
    assert set(command) == {"t", "tp", "rx"}  # rx: when the raw message was read (latency)
    assert isinstance(command["rx"], int)
    return key, Touchpoint.model_validate_json(orjson.dumps(command["tp"]))


async def test_identity_files_event_under_its_resolved_key(harness: Harness) -> None:
    both = (ident("email", "e-2"), ident("anonymous_id", "a-5"))
    async with harness.worker.agents["identity"].test_context() as agent:
        await feed_identity(agent, b"web:1", linking("web:1", NOW, 0, *both), 0)
        # Seen alone this e-mail would be "anon-e-2"; the graph knows it belongs to a-5.
        email_only = linking("chat:2", NOW, 1, ident("email", "e-2"))
        assert Normalized.model_validate_json(email_only).touchpoint.customer_key == "anon-e-2"
        await feed_identity(agent, b"chat:2", email_only, 1)

    sends = commands(harness.customers)
    assert len(sends) == 2
    key, first = event_command(sends[0])
    assert key == first.customer_key == "anon-a-5"
    assert (first.event_id, first.channel) == ("web:1", "web")
    key, second = event_command(sends[1])
    assert key == second.customer_key == "anon-a-5"
    assert second.event_id == "chat:2"
    assert harness.announced.sent == []
    assert harness.graph.component("anon-a-5") == {
        "members": ["i|anonymous_id|a-5", "i|email|e-2"],
        "cid": None,
        "aliases": [],
    }
    assert harness.total("cxpulse_identity_merges_total") == 0


async def setup_link(agent: Any) -> bytes:
    """Two anonymous customers (anon-b-1, anon-c-1), then an event showing both identifiers.
    -> the linking event's value."""
    await feed_identity(agent, b"web:1", linking("web:1", NOW, 0, ident("anonymous_id", "b-1")), 0)
    await feed_identity(agent, b"chat:2", linking("chat:2", NOW, 1, ident("visitor_id", "c-1")), 1)
    at = NOW + timedelta(seconds=1)
    link = linking("chat:3", at, 2, ident("visitor_id", "c-1"), ident("anonymous_id", "b-1"))
    await feed_identity(agent, b"chat:3", link, 2)
    return link


async def test_identity_changelog_rebuilds_the_graph_exactly(harness: Harness) -> None:
    """Table writes reach the changelog after each message, one record per key (the last
    value, None for a delete): replayed in order, the records give the table back, merged
    customers' deletes included."""
    async with harness.worker.agents["identity"].test_context() as agent:
        await setup_link(agent)
        per_message = [len(harness.changelog.sent)]
        await feed_identity(agent, b"chat:4", linking("chat:4", NOW, 3, ident("email", "x")), 3)
        per_message.append(len(harness.changelog.sent))
    rebuilt: dict[str, Any] = {}
    changelog = harness.worker.identity_table.changelog_topic.get_topic_name()
    for topic, partition, key, value in harness.changelog.sent:
        assert (topic, partition) == (changelog, 0)
        rebuilt[orjson.loads(key)] = None if value is None else orjson.loads(value)
    table = {key: value for key, value in rebuilt.items() if value is not None}
    assert table == dict(StrKeys(harness.worker.identity_table).items())
    assert rebuilt["c|anon-c-1"] is None  # merged away: deleted, then its alias written
    assert rebuilt["a|anon-c-1"] == {"to": "anon-b-1", "by": "chat:3"}
    last = [
        orjson.loads(k) for _, _, k, _ in harness.changelog.sent[per_message[0] : per_message[1]]
    ]
    assert sorted(last) == ["c|anon-x", "e|3", "i|email|x"]  # a new customer, nothing else


async def test_identity_link_merges_two_anonymous_customers(harness: Harness) -> None:
    async with harness.worker.agents["identity"].test_context() as agent:
        await setup_link(agent)
        later = linking("chat:4", NOW, 3, ident("visitor_id", "c-1"))
        await feed_identity(agent, b"chat:4", later, 3)

    sends = commands(harness.customers)
    assert [key for key, _ in sends] == ["anon-b-1", "anon-c-1", "anon-c-1", "anon-b-1", "anon-b-1"]
    assert sends[2] == ("anon-c-1", {"t": "merge", "into": "anon-b-1"})
    key, linked = event_command(sends[3])
    assert (key, linked.event_id, linked.customer_key) == ("anon-b-1", "chat:3", "anon-b-1")
    key, after = event_command(sends[4])  # later events use the surviving key
    assert (key, after.event_id, after.customer_key) == ("anon-b-1", "chat:4", "anon-b-1")
    merged_at = format_utc_millis(NOW + timedelta(seconds=1))
    assert announcements(harness) == [
        ("anon-c-1", {"alias": "anon-c-1", "customer_key": "anon-b-1", "merged_at": merged_at})
    ]
    assert harness.total("cxpulse_identity_merges_total") == 1
    assert harness.graph.surviving("anon-c-1") == "anon-b-1"
    assert harness.graph.component("anon-c-1") is None


async def test_identity_sign_in_rekeys_anonymous_customer(harness: Harness) -> None:
    async with harness.worker.agents["identity"].test_context() as agent:
        anonymous = linking("web:1", NOW, 0, ident("anonymous_id", "a-9"))
        await feed_identity(agent, b"web:1", anonymous, 0)
        sign_in = linking(
            "web:2", NOW, 1, ident("anonymous_id", "a-9"), ident("customer_id", "C000007")
        )
        await feed_identity(agent, b"web:2", sign_in, 1)

    sends = commands(harness.customers)
    assert sends[0][0] == "anon-a-9"
    assert sends[1] == ("anon-a-9", {"t": "merge", "into": "C000007"})
    key, signed_in = event_command(sends[2])
    assert (key, signed_in.customer_key) == ("C000007", "C000007")
    assert len(sends) == 3
    [(alias, announcement)] = announcements(harness)
    assert (alias, announcement["customer_key"]) == ("anon-a-9", "C000007")
    assert harness.graph.surviving("anon-a-9") == "C000007"
    assert harness.graph.component("C000007") == {
        "members": ["i|anonymous_id|a-9", "i|customer_id|C000007"],
        "cid": "C000007",
        "aliases": ["anon-a-9"],
    }


async def test_identity_replay_of_linking_event_resends_its_merge(harness: Harness) -> None:
    async with harness.worker.agents["identity"].test_context() as agent:
        link = await setup_link(agent)
        before = len(harness.customers.sent)
        await feed_identity(agent, b"chat:3", link, 3)  # the same event, read again
        replayed = commands(harness.customers)[before:]
        first = linking("web:1", NOW, 0, ident("anonymous_id", "b-1"))
        await feed_identity(agent, b"web:1", first, 4)  # a replay that linked nothing
        plain = commands(harness.customers)[before + len(replayed) :]

    assert replayed[0] == ("anon-c-1", {"t": "merge", "into": "anon-b-1"})
    assert [event_command(sent)[1].event_id for sent in replayed[1:]] == ["chat:3"]
    assert len(announcements(harness)) == 2
    assert announcements(harness)[0] == announcements(harness)[1]
    assert [(key, command["t"]) for key, command in plain] == [("anon-b-1", "event")]


async def test_identity_replayed_merge_is_not_counted_twice(harness: Harness) -> None:
    async with harness.worker.agents["identity"].test_context() as agent:
        link = await setup_link(agent)
        await feed_identity(agent, b"chat:3", link, 3)
    assert len(announcements(harness)) == 2  # re-sent, as it should be
    assert harness.total("cxpulse_identity_merges_total") == 1, "one merge, counted twice"


async def test_identity_never_merges_two_customer_ids(harness: Harness) -> None:
    async with harness.worker.agents["identity"].test_context() as agent:
        first = linking("web:1", NOW, 0, ident("customer_id", "C000001"), ident("email", "e-1"))
        await feed_identity(agent, b"web:1", first, 0)
        other = linking("web:2", NOW, 1, ident("customer_id", "C000002"), ident("email", "e-1"))
        await feed_identity(agent, b"web:2", other, 1)

    sends = commands(harness.customers)
    assert [(key, command["t"]) for key, command in sends] == [
        ("C000001", "event"),
        ("C000002", "event"),
    ]
    assert event_command(sends[1])[1].customer_key == "C000002"
    assert harness.announced.sent == []
    assert harness.total("cxpulse_identity_merges_refused_total") == 1
    assert harness.total("cxpulse_identity_merges_total") == 0
    graph = harness.graph
    assert graph.store.get("i|email|e-1") == "C000001"  # the shared e-mail stays where it was
    assert graph.surviving("C000001") == "C000001"
    assert graph.surviving("C000002") == "C000002"


@pytest.mark.parametrize("requested", ["anon-b-1", "anon-c-1"])
async def test_identity_forget_removes_customer_and_aliases(
    harness: Harness, requested: str
) -> None:
    async with harness.worker.agents["identity"].test_context() as agent:
        await setup_link(agent)
        other = linking("web:9", NOW, 3, ident("anonymous_id", "z-1"))
        await feed_identity(agent, b"web:9", other, 3)
        before = len(harness.customers.sent)
        await feed_identity(agent, FORGET_KEY, forget_command(requested), 4)
        forgets = commands(harness.customers)[before:]
        await feed_identity(agent, FORGET_KEY, forget_command("anon-unknown"), 5)
        unknown = commands(harness.customers)[before + len(forgets) :]

    assert forgets == [("anon-b-1", {"t": "forget"}), ("anon-c-1", {"t": "forget"})]
    assert unknown == [("anon-unknown", {"t": "forget"})]
    assert harness.count("cxpulse_customers_forgotten_total") == 2
    graph = harness.graph
    # Only the other one is left: its identifier, its component, the key web:9 was filed under;
    # the forgotten customer's events keep their ids, without a key.
    assert sorted(graph.store) == ["c|anon-z-1", "e|0", "e|1", "e|2", "e|3", "i|anonymous_id|z-1"]
    assert graph.store["e|3"] == {"id": "web:9", "key": "anon-z-1", "n": 3}
    assert [graph.store[f"e|{n}"]["key"] for n in range(3)] == [None, None, None]
    assert graph.surviving("anon-b-1") is None
    assert graph.surviving("anon-c-1") is None


async def test_identity_drops_a_forgotten_event_read_again(harness: Harness) -> None:
    """After a crash, a stage before the identity stage sends again what it had not committed:
    a copy of a forgotten customer's event must not bring the customer back."""
    async with harness.worker.agents["identity"].test_context() as agent:
        link = await setup_link(agent)
        await feed_identity(agent, FORGET_KEY, forget_command("anon-b-1"), 3)
        before = len(harness.customers.sent)
        await feed_identity(agent, b"chat:3", link, 4)  # a copy from before the forget
        first = linking("web:1", NOW, 0, ident("anonymous_id", "b-1"))
        await feed_identity(agent, b"web:1", first, 5)
        dropped = commands(harness.customers)[before:]
        fresh = linking("web:5", NOW, 6, ident("anonymous_id", "b-1"))
        await feed_identity(agent, b"web:5", fresh, 6)  # a new event of the same person
        after = commands(harness.customers)[before:]

    assert dropped == []
    assert harness.count("cxpulse_forgotten_events_dropped_total") == 2
    assert len(harness.announced.sent) == 1, "no merge announced again"
    key, event = event_command(after[0])
    assert (len(after), key, event.event_id) == (1, "anon-b-1", "web:5")  # a new customer
    graph = harness.graph
    assert graph.component("anon-b-1") == {
        "members": ["i|anonymous_id|b-1"], "cid": None, "aliases": []
    }  # fmt: skip
    assert graph.surviving("anon-c-1") is None


async def test_identity_failure_is_fatal_and_never_acks_the_message(harness: Harness) -> None:
    async with harness.worker.agents["identity"].test_context() as agent:
        message = build_message(agent, IDENTITY_STREAM, b"web:1", b"{not json", 0, 0)
        await put_until_fatal(harness, agent, message)
        [(stage, _)] = harness.fatal
        assert stage == "identity"
    assert harness.customers.sent == []


async def test_a_changelog_record_not_delivered_is_fatal(harness: Harness) -> None:
    """The broker refuses a table's changelog record: the worker stops (on_fatal) rather than
    commit past a message whose state change no rebuild would see."""

    async def refused(
        topic: str, partition: int, key: bytes, value: bytes | None, done: Done
    ) -> None:
        done(None, 0, RuntimeError("changelog write refused"))

    harness.worker.send_changelog = refused
    async with harness.worker.agents["accept"].test_context() as agent:
        message = build_message(agent, ACCEPTED, b"web:e-1", normalized("web:e-1", NOW, 0), 0, 0)
        # A delivery is known after the stage has moved on (as for outputs): what holds the
        # offset back is the commit, which flushes the producer first; on_fatal ends the
        # process as soon as the record fails, before the commit resumes.
        await put_and_wait_fatal(harness, agent, message)
    [(stage, exc)] = harness.fatal
    assert stage == "publish"
    assert "changelog write refused" in str(exc)
    assert harness.count("cxpulse_processing_errors_total", stage="publish") == 1


@dataclass
class OffsetStore:
    """Stands for a RocksDB store: the partitions whose databases are open, what was written."""

    _dbs: dict[int, object]
    written: list[tuple[int, int]] = field(default_factory=list)

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.written.append((tp.partition, offset))


async def test_delivered_changelog_offsets_are_written_once_per_loop_turn(
    harness: Harness,
) -> None:
    """The newest delivered offset of each partition, once the loop turns; a partition
    revoked meanwhile (its database closed) is left alone: writing would open it again."""
    table = harness.worker.customers_table
    store = OffsetStore({0: object(), 1: object()})
    table._data = store
    for partition, offset in ((0, 5), (1, 3), (0, 7), (2, 9)):
        table.delivered(partition, offset)
    assert store.written == []
    await asyncio.sleep(0)
    assert sorted(store.written) == [(0, 7), (1, 3)]
    table.delivered(0, 8)
    await asyncio.sleep(0)
    assert store.written[2:] == [(0, 8)]


# --- customers ---------------------------------------------------------------------------


def tp_json(event_id: str, at: datetime, key: str, offset: int = 0) -> dict[str, Any]:
    return touchpoint(event_id, at, offset, key).model_dump(mode="json")


def profile_sends(harness: Harness, key: str) -> list[Profile | None]:
    return [
        None if sent.value is None else Profile.model_validate_json(sent.value)
        for sent in harness.profiles.sent
        if sent.key == key.encode()
    ]


async def test_customers_alert_once_per_poor_answer_never_on_replay(harness: Harness) -> None:
    key = "C-9"
    poor = touchpoint("support:s-1", NOW, 0, key).model_copy(
        update={"ratings": Ratings(nps=None, csat=1, ces=2)}
    )
    fine = touchpoint("web:w-1", NOW, 1, key).model_copy(
        update={"ratings": Ratings(nps=9, csat=None, ces=None)}
    )
    async with harness.worker.agents["customers"].test_context() as agent:
        await feed_customer(agent, key, {"t": "event", "tp": poor.model_dump(mode="json")}, 0)
        await feed_customer(agent, key, {"t": "event", "tp": fine.model_dump(mode="json")}, 1)
        # The identity stage re-sends after a crash: a replay must not alert again.
        await feed_customer(agent, key, {"t": "event", "tp": poor.model_dump(mode="json")}, 2)
    alerts = [(sent.key, orjson.loads(sent.value or b"")) for sent in harness.alerts.sent]
    assert [(k, a["type"], a["score"], a["event_id"]) for k, a in alerts] == [
        (b"C-9", "low_csat", 1, "support:s-1"),
        (b"C-9", "high_effort", 2, "support:s-1"),
    ]
    assert all(a["customer_key"] == "C-9" for _, a in alerts)
    assert harness.count("cxpulse_alerts_total", type="low_csat") == 1
    assert harness.count("cxpulse_alerts_total", type="detractor") == 0


async def test_customers_event_record_timeline_and_profile(harness: Harness) -> None:
    key = "anon-a-1"
    tp = tp_json("web:1", NOW, "anon-provisional")
    async with harness.worker.agents["customers"].test_context() as agent:
        await feed_customer(agent, key, {"t": "event", "tp": tp}, 0)
        stored = harness.record(key)
        assert stored is not None
        assert [entry["event_id"] for entry in stored["timeline"]] == ["web:1"]
        assert (stored["aliases"], stored["absorbed"]) == (0, [])
        assert stored["profile"]["counts"] == {"web": 1}

        [sent] = harness.timeline.sent
        assert sent.key == key.encode()
        filed = touchpoint_of(sent)
        assert filed.customer_key == key
        assert filed == touchpoint("web:1", NOW, 0, customer_key=key)
        [view] = profile_sends(harness, key)
        assert view is not None
        assert (view.customer_key, view.aliases) == (key, 0)
        assert view.event_counts == {"web": 1, "chat": 0, "support": 0, "store": 0}
        assert view.first_seen == view.last_seen == NOW

        await feed_customer(agent, key, {"t": "event", "tp": tp}, 1)  # a replay
    assert len(harness.timeline.sent) == 2
    assert harness.timeline.sent[1] == sent
    assert len(harness.profiles.sent) == 1  # nothing counted twice: no new profile
    assert harness.record(key) == stored
    assert harness.customers.sent == []


ALIAS, SURVIVOR = "anon-c-1", "anon-b-1"
EARLIER = NOW - timedelta(hours=2)


async def merge_setup(agent: Any, harness: Harness) -> dict[str, Any]:
    """ALIAS and SURVIVOR each with one event, then ALIAS merged into SURVIVOR.
    -> the absorb command the merge sent (not yet delivered)."""
    await feed_customer(agent, ALIAS, {"t": "event", "tp": tp_json("chat:1", EARLIER, ALIAS)}, 0)
    await feed_customer(agent, SURVIVOR, {"t": "event", "tp": tp_json("web:2", NOW, SURVIVOR)}, 1)
    alias_record = harness.record(ALIAS)
    await feed_customer(agent, ALIAS, {"t": "merge", "into": SURVIVOR}, 2)
    [(key, command)] = commands(harness.customers)
    assert key == SURVIVOR
    assert command == {"t": "absorb", "from": ALIAS, "record": alias_record}
    return command


async def test_customers_merge_then_absorb(harness: Harness) -> None:
    async with harness.worker.agents["customers"].test_context() as agent:
        absorb = await merge_setup(agent, harness)
        assert [entry["event_id"] for entry in absorb["record"]["timeline"]] == ["chat:1"]
        assert harness.record(ALIAS) == {"alias_of": SURVIVOR}
        assert harness.profiles.sent[-1] == Sent(ALIAS.encode(), None, [])  # tombstone

        await feed_customer(agent, SURVIVOR, absorb, 3)
        merged = harness.record(SURVIVOR)
        assert merged is not None
        assert [entry["event_id"] for entry in merged["timeline"]] == ["web:2", "chat:1"]
        assert merged["profile"]["counts"] == {"web": 1, "chat": 1}
        assert (merged["aliases"], merged["absorbed"]) == (1, [ALIAS])
        view = profile_sends(harness, SURVIVOR)[-1]
        assert view is not None
        assert view.aliases == 1
        assert view.event_counts == {"web": 1, "chat": 1, "support": 0, "store": 0}
        assert (view.first_seen, view.last_seen) == (EARLIER, NOW)

        await feed_customer(agent, SURVIVOR, absorb, 4)  # a replayed absorb changes nothing
        assert harness.record(SURVIVOR) == merged
        await feed_customer(agent, ALIAS, {"t": "merge", "into": SURVIVOR}, 5)  # replayed merge
        assert len(harness.customers.sent) == 1  # an alias has nothing left to hand over
        assert harness.record(ALIAS) == {"alias_of": SURVIVOR}
    assert len(harness.timeline.sent) == 2  # a merge files nothing anew on the timeline


@pytest.mark.parametrize("kind", ["event", "absorb"])
async def test_customers_command_for_an_alias_goes_to_the_survivor(
    harness: Harness, kind: str
) -> None:
    async with harness.worker.agents["customers"].test_context() as agent:
        await merge_setup(agent, harness)
        profiles_before = len(harness.profiles.sent)
        late: dict[str, Any]
        if kind == "event":
            late = {"t": "event", "tp": tp_json("web:3", NOW, ALIAS)}
        else:  # a third customer's record, handed over to ALIAS before ALIAS merged away
            other = {"timeline": [], "profile": {}, "absorbed": [], "aliases": 0}
            late = {"t": "absorb", "from": "anon-x-1", "record": other}
        await feed_customer(agent, ALIAS, late, 3)

    assert commands(harness.customers)[1:] == [(SURVIVOR, late)]
    assert harness.record(ALIAS) == {"alias_of": SURVIVOR}
    assert len(harness.timeline.sent) == 2  # only the two events before the merge
    assert len(harness.profiles.sent) == profiles_before


async def test_customers_forget(harness: Harness) -> None:
    harness.worker.holdings.count([])
    async with harness.worker.agents["customers"].test_context() as agent:
        await merge_setup(agent, harness)
        assert (harness.worker.holdings.customers, harness.worker.holdings.entries) == (1, 1)
        await feed_customer(agent, SURVIVOR, {"t": "forget"}, 3)
        await feed_customer(agent, ALIAS, {"t": "forget"}, 4)
        await feed_customer(agent, "anon-never-seen", {"t": "forget"}, 5)

    assert harness.records() == {}
    assert (harness.worker.holdings.customers, harness.worker.holdings.entries) == (0, 0)
    assert harness.profiles.sent[-3:] == [
        Sent(SURVIVOR.encode(), None, []),
        Sent(ALIAS.encode(), None, []),
        Sent(b"anon-never-seen", None, []),
    ]


async def test_customers_forget_is_not_undone_by_an_absorb_in_flight(harness: Harness) -> None:
    """The identity stage sent merge(ALIAS -> SURVIVOR) and, later, forget for both keys. The
    two keys are on different partitions, so SURVIVOR's partition may carry out its forget
    before ALIAS's partition reaches the merge; the absorb that merge hands over then arrives
    at a customer who no longer exists."""
    async with harness.worker.agents["customers"].test_context() as agent:
        await feed_customer(agent, ALIAS, {"t": "event", "tp": tp_json("chat:1", NOW, ALIAS)}, 0)
        await feed_customer(agent, SURVIVOR, {"t": "event", "tp": tp_json("web:2", NOW, "x")}, 1)
        await feed_customer(agent, SURVIVOR, {"t": "forget"}, 2)  # SURVIVOR's partition ahead
        await feed_customer(agent, ALIAS, {"t": "merge", "into": SURVIVOR}, 3)
        await feed_customer(agent, ALIAS, {"t": "forget"}, 4)
        # The absorb, then the forget ALIAS's partition passes on after it, in that order.
        handed_over = commands(harness.customers)
        assert [command["t"] for _, command in handed_over] == ["absorb", "forget"]
        for offset, (key, command) in enumerate(handed_over, start=5):
            assert key == SURVIVOR
            await feed_customer(agent, key, command, offset)

    assert harness.records() == {}, "forgotten personal data is back"
    assert harness.profiles.sent[-1].value is None, "a profile published after its tombstone"


# --- the whole chain ---------------------------------------------------------------------


def raw_coordinates(messages: list[Any]) -> Iterator[tuple[str, int, int]]:
    """Simulated messages -> (topic, partition, offset) as a keyed producer would place them."""
    next_offset: Counter[tuple[str, int]] = Counter()
    for message in messages:
        topic = f"cx.raw.{message.channel}"
        partition = 0 if message.key is None else zlib.crc32(message.key) % PARTITIONS
        yield topic, partition, next_offset[topic, partition]
        next_offset[topic, partition] += 1


async def ingest_and_accept(harness: Harness, messages: list[SimMessage]) -> None:
    coordinates = list(raw_coordinates(messages))
    async with harness.worker.agents["ingest"].test_context() as ingest:
        for message, (topic, partition, offset) in zip(messages, coordinates, strict=True):
            await feed(ingest, topic, message.key, message.value, partition, offset)
    async with harness.worker.agents["accept"].test_context() as accept:
        for offset, sent in enumerate(harness.accepted.sent):
            await feed_accepted(accept, sent, offset)


def assert_accounting(harness: Harness, messages: list[SimMessage]) -> None:
    kinds = Counter(message.kind for message in messages)
    assert kinds["duplicate"] > 0  # the sample exercises every path
    assert kinds["bad"] > 0
    consumed = harness.total("cxpulse_messages_consumed_total")
    accepted = harness.total("cxpulse_events_accepted_total")
    duplicates = harness.total("cxpulse_events_duplicate_total")
    deadletters = harness.total("cxpulse_deadletters_total")
    assert consumed == len(messages)
    assert consumed == accepted + duplicates + deadletters
    assert (accepted, duplicates, deadletters) == (kinds["valid"], kinds["duplicate"], kinds["bad"])


async def test_ingest_and_accept_account_for_every_message(harness: Harness) -> None:
    messages = list(generate(300, seed=3, now=NOW, dup_share=0.05, bad_share=0.05))
    await ingest_and_accept(harness, messages)
    assert_accounting(harness, messages)

    valid_ids = [message.event_id for message in messages if message.kind == "valid"]
    assert sorted(event_ids(harness.identity)) == sorted(valid_ids)  # each exactly once

    coordinates = list(raw_coordinates(messages))
    expected_reasons = {
        coordinate: message.reason
        for message, coordinate in zip(messages, coordinates, strict=True)
        if message.kind == "bad"
    }
    got_reasons = {}
    for dead in harness.deadletter.sent:
        headers = read_headers(dead.headers)
        coordinate = (
            headers[HEADER_TOPIC],
            int(headers[HEADER_PARTITION]),
            int(headers[HEADER_OFFSET]),
        )
        got_reasons[coordinate] = headers[HEADER_REASON]
    assert got_reasons == expected_reasons


def raw_identifiers(channel: str, payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """Contract section 5, read straight from the upstream JSON."""
    if channel == "web":
        pairs = [("user_id", "customer_id"), ("email", "email"), ("anonymous_id", "anonymous_id")]
        return [(kind, payload.get(name)) for name, kind in pairs]
    if channel == "chat":
        customer = payload["customer"]
        return [(kind, customer.get(kind)) for kind in ("customer_id", "email", "visitor_id")]
    if channel == "support":
        requester = payload["requester"]
        return [(kind, requester.get(kind)) for kind in ("customer_id", "email")]
    return [
        ("customer_id", payload.get("customer_id")),
        ("loyalty_card", payload.get("loyalty_card")),
    ]


def expected_customers(messages: list[SimMessage]) -> list[tuple[frozenset[str], set[str]]]:
    """Valid messages -> for each customer (a connected component of identifier values): its
    event ids and the customer_ids it shows. Union-find over (kind, normalized value)."""
    parent: dict[Any, Any] = {}

    def find(node: Any) -> Any:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for message in messages:
        if message.kind != "valid":
            continue
        event = ("event", message.event_id)
        find(event)
        for kind, value in raw_identifiers(message.channel, orjson.loads(message.value)):
            if value is None:
                continue
            if kind == "email":
                value = value.strip().lower()
            if is_placeholder(kind, value):  # the service's list of "nobody" values
                continue
            parent[find(event)] = find((kind, value))
    events: dict[Any, set[str]] = {}
    customer_ids: dict[Any, set[str]] = {}
    for node in list(parent):
        root = find(node)
        if node[0] == "event":
            events.setdefault(root, set()).add(node[1])
        elif node[0] == "customer_id":
            customer_ids.setdefault(root, set()).add(node[1])
    return [(frozenset(ids), customer_ids.get(root, set())) for root, ids in events.items()]


@pytest.mark.parametrize("schedule", ["round_robin", "drain_one_partition_at_a_time"])
async def test_end_to_end_customers_hold_exactly_their_connected_events(
    harness: Harness, schedule: str
) -> None:
    messages = list(generate(400, customers=20, seed=4, now=NOW, dup_share=0.05, bad_share=0.05))
    await ingest_and_accept(harness, messages)
    async with harness.worker.agents["identity"].test_context() as identity:
        for offset, sent in enumerate(harness.identity.sent):
            await feed_identity(identity, sent.key, sent.value, offset)
    harness.worker.holdings.count([])  # known from the start: every write must keep it
    async with harness.worker.agents["customers"].test_context() as customers:
        # Each partition keeps its order; partitions progress independently, either taking
        # turns (one message each) or one running far ahead of the others. The agent's own
        # re-sends (absorb, re-routed commands) join the queue of their key's partition.
        queues: dict[int, deque[Sent]] = {partition: deque() for partition in range(PARTITIONS)}
        offsets: Counter[int] = Counter()
        routed = 0
        while True:
            for sent in harness.customers.sent[routed:]:
                assert sent.key is not None
                queues[key_partition(sent.key)].append(sent)
            routed = len(harness.customers.sent)
            busy = [partition for partition, queue in queues.items() if queue]
            if not busy:
                break
            turn = busy if schedule == "round_robin" else busy[-1:]
            for partition in turn:
                sent = queues[partition].popleft()
                offset = offsets[partition]
                offsets[partition] += 1
                await feed(customers, CUSTOMER_STREAM, sent.key, sent.value, partition, offset)
    assert harness.fatal == []
    assert_accounting(harness, messages)

    valid_ids = [message.event_id for message in messages if message.kind == "valid"]
    assert sorted(touchpoint_of(sent).event_id for sent in harness.timeline.sent) == sorted(
        valid_ids
    )
    for sent in harness.timeline.sent:
        assert touchpoint_of(sent).customer_key.encode() == sent.key

    expected = expected_customers(messages)
    assert [cids for _, cids in expected if len(cids) > 1] == []  # no customer_id conflicts
    assert harness.total("cxpulse_identity_merges_refused_total") == 0
    assert harness.total("cxpulse_identity_merges_total") > 0  # the sample exercises merges

    records = harness.records()
    surviving = {key: record for key, record in records.items() if "alias_of" not in record}
    aliases = {key: record for key, record in records.items() if "alias_of" in record}
    got = {
        frozenset(entry["event_id"] for entry in record["timeline"]): key
        for key, record in surviving.items()
    }
    assert len(got) == len(surviving)
    assert sorted(map(sorted, got)) == sorted(sorted(ids) for ids, _ in expected)
    for ids, cids in expected:
        key = got[ids]
        if cids:
            assert key == next(iter(cids))
        else:
            assert key.startswith("anon-")

    def survivor(key: str) -> str:
        while "alias_of" in records[key]:
            key = records[key]["alias_of"]
        return key

    for key, record in aliases.items():
        assert record == {"alias_of": record["alias_of"]}  # no timeline, nothing else
        assert survivor(key) in surviving
    alias_counts = Counter(survivor(key) for key in aliases)
    for key, record in surviving.items():
        assert record["aliases"] == alias_counts[key]
    assert {alias for alias, _ in announcements(harness)} == set(aliases)
    holdings = harness.worker.holdings
    assert (holdings.customers, holdings.entries) == (
        len(surviving), sum(len(record["timeline"]) for record in surviving.values())
    )  # fmt: skip

    latest: dict[bytes, bytes | None] = {}
    for sent in harness.profiles.sent:  # what the compacted topic keeps
        assert sent.key is not None
        latest[sent.key] = sent.value
    assert {key.decode() for key in latest} == set(records)
    for key, record in surviving.items():
        view = Profile.model_validate_json(latest[key.encode()] or b"")
        assert sum(view.event_counts.values()) == len(record["timeline"])
        assert view.aliases == record["aliases"]
    for key in aliases:
        assert latest[key.encode()] is None


# --- metrics --------------------------------------------------------------------------------


async def test_customers_send_filed_events_to_the_metrics_partitions(harness: Harness) -> None:
    tp = tp_json("web:m-1", NOW, "x")
    async with harness.worker.agents["customers"].test_context() as agent:
        await feed_customer(agent, "C-7", {"t": "event", "tp": tp}, 0)
    [sent] = harness.metrics.sent
    assert sent.key == b"web:m-1"  # no thread: keyed by the event itself
    assert touchpoint_of(sent).customer_key == "C-7"


async def test_metrics_partition_counts_each_event_once_and_merger_sums(harness: Harness) -> None:
    state = harness.worker.metrics_state
    first = touchpoint("web:m-1", NOW, 0, "C-1").model_dump_json().encode()
    second = touchpoint("web:m-2", NOW, 1, "C-2").model_dump_json().encode()
    async with harness.worker.agents["metrics"].test_context() as agent:
        await feed(agent, "cx.internal.metrics", b"web:m-1", first, 2, 0)
        await feed(agent, "cx.internal.metrics", b"web:m-1", first, 2, 1)  # a re-send
        await feed(agent, "cx.internal.metrics", b"web:m-2", second, 2, 2)
    minute = int(NOW.timestamp() // 60)
    assert list(state.parts[2].minutes) == [("web", minute)]  # "all" is the merger's sum
    bucket = state.parts[2].minutes[("web", minute)]
    assert (bucket.events, len(bucket.customers)) == (2, 2)
    table = harness.worker.app.tables["metrics"]
    # One record per event: a minute's record written whole per event was quadratic.
    assert sorted(StrKeys(table)) == [f"2|{minute}|web:m-1", f"2|{minute}|web:m-2"]
    assert table[f"2|{minute}|web:m-2"] == {**orjson.loads(second), "_offset": 2}
    assert state.versions[2] == 2  # the aggregates count every event up to offset 2

    partial = {
        "p": 2, "scope": "web", "minute": minute, "agg": bucket.to_json(),
        "wm": int(NOW.timestamp() * 1000),
    }  # fmt: skip
    async with harness.worker.agents["merger"].test_context() as agent:
        for offset in range(2):  # the same partial twice replaces, never adds
            key = f"2|web|{minute}".encode()
            await feed(agent, "cx.internal.partials", key, orjson.dumps(partial), 0, offset)
    assert state.merger is not None
    snapshots = {s.key: s for s in state.merger.snapshots(30, NOW)}
    assert snapshots["web/1h"].events == 2
    assert snapshots["all/1h"].events == 2  # summed from the channels
    assert snapshots["chat/1h"].events == 0


async def test_metrics_partition_restores_events_and_0_1_0_minute_records(
    harness: Harness,
) -> None:
    """After an assignment a partition's aggregates are rebuilt from its table, which may
    still hold 0.1.0's records of a whole minute ({id: event}) beside per-event records."""
    minute = int(NOW.timestamp() // 60)
    old = touchpoint("web:m-1", NOW, 0, "C-1").model_dump(mode="json")
    new = touchpoint("web:m-2", NOW, 1, "C-2").model_dump_json().encode()
    table = harness.worker.app.tables["metrics"]
    table.data[f"2|{minute}"] = {"web:m-1": old}  # as recovered from the changelog
    async with harness.worker.agents["metrics"].test_context() as agent:
        await feed(agent, "cx.internal.metrics", b"web:m-2", new, 2, 0)
        harness.worker.metrics_state.parts.clear()  # as after a rebalance: rebuilt from the table
        await feed(agent, "cx.internal.metrics", b"web:m-1", orjson.dumps(old), 2, 1)  # again
    bucket = harness.worker.metrics_state.parts[2].minutes[("web", minute)]
    assert (bucket.events, len(bucket.customers)) == (2, 2)


async def test_metrics_partition_version_is_restored_from_its_table(harness: Harness) -> None:
    """A partition's partials carry the last offset it applied; rebuilt from the table after
    a rebalance, it starts from the newest record's offset."""
    state = harness.worker.metrics_state
    events = [touchpoint(f"web:v-{n}", NOW, n, f"C-{n}").model_dump_json().encode() for n in (0, 1)]
    async with harness.worker.agents["metrics"].test_context() as agent:
        await feed(agent, "cx.internal.metrics", b"web:v-0", events[0], 1, 7)
        await feed(agent, "cx.internal.metrics", b"web:v-1", events[1], 1, 9)
        await feed(agent, "cx.internal.metrics", b"web:v-1", events[1], 1, 12)  # a copy
        assert state.versions[1] == 12
        state.parts.clear()  # as after a rebalance
        state.versions.clear()
        await feed(agent, "cx.internal.metrics", b"web:v-0", events[0], 1, 7)  # read again
        assert state.versions[1] == 9  # the newest record's offset: 12 wrote nothing


def web_partial(minute: int, agg: MinuteAgg, version: int) -> bytes:
    """A partials message of partition 2's web aggregate of `minute`, at `version`."""
    return orjson.dumps({
        "p": 2, "scope": "web", "minute": minute, "agg": agg.to_json(),
        "wm": int(NOW.timestamp() * 1000), "v": version,
    })  # fmt: skip


def refuse_one_table_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next table write is refused, as when the session has just expired."""
    refusals = [Fenced("session expired: table write refused")]

    def refuse_once(app: Any) -> None:
        if refusals:
            raise refusals.pop()

    monkeypatch.setattr(storage, "refuse_if_stale", refuse_once)


async def test_merger_ignores_a_partial_older_than_the_one_it_holds(harness: Harness) -> None:
    """A worker paused past its session sends, when it resumes, what its producer held: an
    aggregate older than its successor's may come after it."""
    minute = int(NOW.timestamp() // 60)
    one = touchpoint("web:m-1", NOW, 0, "C-1")
    newer, older = MinuteAgg(), MinuteAgg()
    for event in (one, touchpoint("web:m-2", NOW, 1, "C-2")):
        newer.add(MinuteAgg.of(event, Derived()))
    older.add(MinuteAgg.of(one, Derived()))
    key = f"2|web|{minute}"

    async with harness.worker.agents["merger"].test_context() as agent:
        await feed(agent, "cx.internal.partials", key.encode(), web_partial(minute, newer, 9), 0, 0)
        await feed(agent, "cx.internal.partials", key.encode(), web_partial(minute, older, 5), 0, 1)
    merger = harness.worker.metrics_state.merger
    assert merger is not None
    assert {s.key: s.events for s in merger.snapshots(30, NOW)}["all/1h"] == 2
    assert harness.worker.app.tables["partials"][key]["v"] == 9
    assert harness.count("cxpulse_metrics_stale_partials_total") == 1


async def test_merger_takes_a_message_of_many_minutes_each_on_its_own(harness: Harness) -> None:
    """A partition sends its changed minutes together: each replaces the one held (or is
    ignored when older) and is kept under its own key, as a message of one would be."""
    minute = int(NOW.timestamp() // 60)
    one, two = touchpoint("web:b-1", NOW, 0, "C-1"), touchpoint("web:b-2", NOW, 1, "C-2")
    both = MinuteAgg()
    for event in (one, two):
        both.add(MinuteAgg.of(event, Derived()))
    wm = int(NOW.timestamp() * 1000)

    def bucket(scope: str, at: int, agg: MinuteAgg) -> dict[str, Any]:
        return {"scope": scope, "minute": at, "agg": orjson.loads(orjson.dumps(agg.to_json()))}

    support = MinuteAgg.of(touchpoint("support:b-3", NOW, 2, "C-3"), Derived())
    held = {"p": 2, "wm": wm, "v": 9, **bucket("web", minute, both)}
    batch = {
        "p": 2, "wm": wm, "v": 7,
        "buckets": [bucket("support", minute, support), bucket("chat", minute - 1, MinuteAgg()),
                    bucket("web", minute, MinuteAgg.of(one, Derived()))],
    }  # fmt: skip
    async with harness.worker.agents["merger"].test_context() as agent:
        await feed(agent, "cx.internal.partials", f"2|web|{minute}".encode(),
                   orjson.dumps(held), 0, 0)  # fmt: skip
        await feed(agent, "cx.internal.partials", b"2", orjson.dumps(batch), 0, 1)
    table = StrKeys(harness.worker.app.tables["partials"])
    assert sorted(table) == [f"2|chat|{minute - 1}", f"2|support|{minute}", f"2|web|{minute}"]
    assert table[f"2|support|{minute}"] == {
        "p": 2, "wm": wm, "v": 7, **bucket("support", minute, support)
    }  # fmt: skip
    assert table[f"2|web|{minute}"]["v"] == 9  # the older web minute of the batch was ignored
    assert harness.count("cxpulse_metrics_stale_partials_total") == 1
    merger = harness.worker.metrics_state.merger
    assert merger is not None
    events = {s.key: s.events for s in merger.snapshots(30, NOW)}
    assert (events["all/1h"], events["web/1h"], events["support/1h"]) == (3, 2, 1)


async def test_merger_sums_all_itself_and_drops_the_all_partials_of_earlier_versions(
    harness: Harness,
) -> None:
    """An earlier version's partitions also sent "all": the merger sums it from the channels
    now, so one of those (sent, or kept in its table) would count twice: it is left out."""
    minute = int(NOW.timestamp() // 60)
    web = MinuteAgg.of(touchpoint("web:o-1", NOW, 0, "C-1"), Derived())
    wm = int(NOW.timestamp() * 1000)

    def partial(scope: str, at: int) -> dict[str, Any]:
        return {"p": 2, "scope": scope, "minute": at, "agg": web.to_json(), "wm": wm, "v": 3}

    table = harness.worker.app.tables["partials"]
    table.data[f"2|all|{minute - 1}"] = partial("all", minute - 1)  # as recovered
    table.data[f"2|web|{minute - 1}"] = partial("web", minute - 1)
    async with harness.worker.agents["merger"].test_context() as agent:
        for offset, scope in enumerate(("all", "web")):
            value = orjson.dumps(partial(scope, minute))
            await feed(agent, "cx.internal.partials", b"2", value, 0, offset)
    assert sorted(StrKeys(table)) == [f"2|web|{minute - 1}", f"2|web|{minute}"]
    assert harness.count("cxpulse_metrics_stale_partials_total") == 0
    merger = harness.worker.metrics_state.merger
    assert merger is not None
    events = {s.key: s.events for s in merger.snapshots(30, NOW)}
    assert (events["all/1h"], events["web/1h"]) == (2, 2)


# --- replays after a crash: filed once, under one key -------------------------------------


async def test_identity_replay_goes_to_the_key_the_event_was_first_filed_under(
    harness: Harness,
) -> None:
    """What the identity stage had not committed is read again after a crash. A link read in
    between moved the first event's identifier to another key: the replay still goes to the
    key the event was first filed under (where its record is, or whose merge it follows)."""
    first = linking("web:1", NOW, 0, ident("anonymous_id", "a-9"))
    sign_in = linking("web:2", NOW, 1, ident("anonymous_id", "a-9"), ident("customer_id", "C7"))
    async with harness.worker.agents["identity"].test_context() as agent:
        await feed_identity(agent, b"web:1", first, 0)
        await feed_identity(agent, b"web:2", sign_in, 1)
        before = len(harness.customers.sent)
        await feed_identity(agent, b"web:1", first, 0)  # both read again
        await feed_identity(agent, b"web:2", sign_in, 1)
        later = linking("web:3", NOW, 2, ident("anonymous_id", "a-9"))
        await feed_identity(agent, b"web:3", later, 2)  # a new event: the current key

    replayed = commands(harness.customers)[before:]
    assert [(key, command["t"]) for key, command in replayed] == [
        ("anon-a-9", "event"),
        ("anon-a-9", "merge"),
        ("C7", "event"),
        ("C7", "event"),
    ]
    assert [event_command(sent)[1].customer_key for sent in (replayed[0], replayed[2])] == [
        "anon-a-9",
        "C7",
    ]


async def test_customers_replay_after_a_merge_is_published_as_first_filed(
    harness: Harness,
) -> None:
    """A replayed event whose key merged away since, whether it arrives at the old key (and is
    re-routed) or at the survivor, is published again exactly as first filed: same key, same
    bytes, so a consumer deduplicating by event id sees one record."""
    async with harness.worker.agents["customers"].test_context() as agent:
        absorb = await merge_setup(agent, harness)
        await feed_customer(agent, SURVIVOR, absorb, 3)
        profiles = len(harness.profiles.sent)
        replay = {"t": "event", "tp": tp_json("chat:1", EARLIER, ALIAS)}
        await feed_customer(agent, ALIAS, replay, 4)
        [(key, rerouted)] = commands(harness.customers)[1:]
        await feed_customer(agent, key, rerouted, 5)
        rekeyed = {"t": "event", "tp": tp_json("chat:1", EARLIER, SURVIVOR)}
        await feed_customer(agent, SURVIVOR, rekeyed, 6)

    first = harness.timeline.sent[0]
    assert first.key == ALIAS.encode()
    assert harness.timeline.sent[2:] == [first, first]
    assert [sent.value for sent in harness.metrics.sent[2:]] == [first.value, first.value]
    assert len(harness.profiles.sent) == profiles  # nothing counted again
    merged = harness.record(SURVIVOR)
    assert merged is not None
    assert merged["profile"]["counts"] == {"web": 1, "chat": 1}


# --- a worker whose group session expired -------------------------------------------------


async def test_stale_session_releases_the_message_unhandled_on_a_rebalance(
    harness: Harness,
) -> None:
    """Not confirmed by the coordinator for longer than the session: the stage does not touch
    the message; once the group rebalances it is released, unacknowledged and unpublished."""
    fence = harness.worker.fence
    fence.confirm()
    fence.confirmed_at = (fence.confirmed_at or 0.0) - 2 * fence.session_timeout
    harness.worker.app.rebalancing = True
    async with harness.worker.agents["ingest"].test_context() as agent:
        message = build_message(agent, "cx.raw.web", b"k", raw_event("web", "w-1"), 0, 0)
        await put_message(agent, message)
    assert harness.accepted.sent == []
    assert harness.count("cxpulse_messages_consumed_total", channel="web") == 0
    assert harness.count("cxpulse_messages_released_total", stage="ingest") == 1
    assert harness.fatal == []

    harness.worker.app.rebalancing = False
    fence.confirm()  # a heartbeat answered: the stage goes on as usual
    async with harness.worker.agents["ingest"].test_context() as agent:
        await feed(agent, "cx.raw.web", b"k", raw_event("web", "w-1"), 0, 0)
    [accepted] = harness.accepted.sent
    assert accepted.key == b"web:w-1"


@pytest.mark.parametrize("level", ["info", "warning", "error"])
def test_worker_logging_stays_at_the_configured_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    """Faust's spinner used to lower the root logger to DEBUG at WARNING and above."""
    settings = offline_settings(tmp_path, monkeypatch, log_level=level)
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        faust_worker_for(build_worker(settings))._setup_logging()
        assert root.level == logging.getLevelName(level.upper())
        assert not logging.getLogger("aiokafka.producer").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


async def test_a_partial_whose_table_write_is_refused_counts_once_when_read_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session expires between the merger taking a partial and its table write: the
    message is released, and read again it replaces what the table holds, once (the merger
    reads the aggregate it replaces from the table)."""
    minute = int(NOW.timestamp() // 60)
    one = touchpoint("web:f-1", NOW, 0, "C-1")
    first, second = MinuteAgg.of(one, Derived()), MinuteAgg()
    for event in (one, touchpoint("web:f-2", NOW, 1, "C-2")):
        second.add(MinuteAgg.of(event, Derived()))
    key = f"2|web|{minute}"

    async with harness.worker.agents["merger"].test_context() as agent:
        await feed(agent, "cx.internal.partials", key.encode(), web_partial(minute, first, 5), 0, 0)
        refuse_one_table_write(monkeypatch)
        await feed(
            agent, "cx.internal.partials", key.encode(), web_partial(minute, second, 9), 0, 1
        )
        assert harness.count("cxpulse_messages_released_total", stage="merger") == 1
        assert harness.worker.app.tables["partials"][key]["v"] == 5
        await feed(
            agent, "cx.internal.partials", key.encode(), web_partial(minute, second, 9), 0, 1
        )
    merger = harness.worker.metrics_state.merger
    assert merger is not None
    assert {s.key: s.events for s in merger.snapshots(30, NOW)}["all/1h"] == 2
    assert harness.worker.app.tables["partials"][key]["v"] == 9
    assert harness.fatal == []


async def test_an_event_whose_table_write_is_refused_reaches_the_table_when_read_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session expires between a metrics partition counting an event and its table
    write: released, and read again, the event is counted once and kept in the table (from
    which the partition is rebuilt after a restart)."""
    state = harness.worker.metrics_state
    minute = int(NOW.timestamp() // 60)
    first = touchpoint("web:r-1", NOW, 0, "C-1").model_dump_json().encode()
    second = touchpoint("web:r-2", NOW, 1, "C-2").model_dump_json().encode()
    async with harness.worker.agents["metrics"].test_context() as agent:
        await feed(agent, "cx.internal.metrics", b"web:r-1", first, 2, 0)
        refuse_one_table_write(monkeypatch)
        await feed(agent, "cx.internal.metrics", b"web:r-2", second, 2, 1)
        assert harness.count("cxpulse_messages_released_total", stage="metrics") == 1
        assert 2 not in state.parts  # rebuilt from the table at the next event
        assert 2 not in state.versions
        await feed(agent, "cx.internal.metrics", b"web:r-2", second, 2, 1)
    table = harness.worker.app.tables["metrics"]
    assert sorted(StrKeys(table)) == [f"2|{minute}|web:r-1", f"2|{minute}|web:r-2"]
    bucket = state.parts[2].minutes[("web", minute)]
    assert (bucket.events, len(bucket.customers)) == (2, 2)
    assert ("web", minute) in state.dirty[2]
    assert state.versions[2] == 1
    assert harness.fatal == []
