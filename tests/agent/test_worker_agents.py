"""Agent tier: the Faust agents of `service.worker` under `agent.test_context()`, no broker.

Messages go in through the test wrapper's channel with explicit source coordinates; what the
agents publish is captured by replacing `send` on the output topics.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from faust.types.tuples import Message
from prometheus_client import CollectorRegistry

import service.worker
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
from service.identity import Resolver
from service.settings import load_settings
from service.simulate import generate
from service.worker import Worker, build_worker

pytestmark = pytest.mark.agent

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
PARTITIONS = 4
ACCEPTED = "cx.internal.accepted"
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
    """Stands in for `Topic.send`: records each call, returns an already-completed future."""

    sent: list[Sent] = field(default_factory=list)

    async def send(
        self,
        *,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        **_: Any,
    ) -> asyncio.Future[None]:
        await asyncio.sleep(0)  # a real send suspends too; the feeding helper must cope
        self.sent.append(Sent(key, value, list(headers or [])))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@dataclass
class Harness:
    worker: Worker
    registry: CollectorRegistry
    accepted: Capture
    timeline: Capture
    deadletter: Capture
    fatal: list[tuple[str, BaseException]]

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


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """This tier has no broker: any attempt to connect anywhere fails the test."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"agent tier opened a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def make_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolver: Resolver | None = None
) -> Harness:
    """A fresh worker (memory tables, fixed clock) whose output topics are captured."""
    for name in [name for name in os.environ if name.upper().startswith("CX_")]:
        monkeypatch.delenv(name)  # defaults only: the environment must not change topic names
    settings = load_settings(
        kafka_bootstrap_servers="localhost:1",
        pii_key="test-pii-key-0123456789",
        data_dir=tmp_path,
        partitions=PARTITIONS,
    )
    registry = CollectorRegistry()
    fatal: list[tuple[str, BaseException]] = []
    worker = build_worker(
        settings,
        registry=registry,
        resolver=resolver,
        clock=lambda: NOW,
        on_fatal=lambda stage, exc: fatal.append((stage, exc)),
    )
    worker.app.finalize()
    worker.app.conf.store = "memory://"
    captures = Capture(), Capture(), Capture()
    topics = worker.accepted_topic, worker.timeline_topic, worker.deadletter_topic
    for topic, capture in zip(topics, captures, strict=True):
        monkeypatch.setattr(topic, "send", capture.send)
    return Harness(worker, registry, *captures, fatal)


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


def accepted_partition(key: bytes) -> int:
    """A stable key -> partition map (any will do: equal keys must meet in one partition)."""
    return zlib.crc32(key) % PARTITIONS


async def feed_accepted(agent: Any, sent: Sent, offset: int) -> None:
    assert sent.key is not None
    await feed(agent, ACCEPTED, sent.key, sent.value, accepted_partition(sent.key), offset)


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


def normalized(
    event_id: str, at: datetime, offset: int, topic: str = "cx.raw.web", partition: int = 0
) -> bytes:
    """An internal accepted-topic value, as the ingest agent would have produced it."""
    touchpoint = Touchpoint(
        event_id=event_id,
        channel="web",
        kind="page_view",
        occurred_at=at,
        customer_key="C000042",
        thread_id=None,
        ratings=Ratings(nps=None, csat=None, ces=None),
        text=None,
        sentiment=None,
        amount=None,
        currency=None,
        source=Source(topic=topic, partition=partition, offset=offset),
    )
    identifiers = (Identifier(kind="customer_id", value="C000042"),)
    return Normalized(touchpoint=touchpoint, identifiers=identifiers).model_dump_json().encode()


# --- ingest ------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["web", "chat", "support", "store"])
async def test_ingest_valid_message_goes_to_accepted_topic(harness: Harness, channel: str) -> None:
    topic = f"cx.raw.{channel}"
    async with harness.worker.agents["ingest"].test_context() as agent:
        await feed(agent, topic, b"some-key", raw_event(channel, "src-1"), partition=3, offset=17)

    assert harness.deadletter.sent == []
    assert harness.timeline.sent == []
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


async def test_accept_new_duplicate_and_replay(harness: Harness) -> None:
    at = NOW - timedelta(hours=1)
    original = normalized("web:e-1", at, offset=5)
    async with harness.worker.agents["accept"].test_context() as agent:
        await feed(agent, ACCEPTED, b"web:e-1", original, partition=2, offset=0)
        [first] = harness.timeline.sent
        assert first.key == b"C000042"
        assert touchpoint_of(first).event_id == "web:e-1"
        assert harness.count("cxpulse_events_accepted_total", channel="web") == 1

        resent = normalized("web:e-1", at, offset=6)  # same id, another source offset
        await feed(agent, ACCEPTED, b"web:e-1", resent, partition=2, offset=1)
        assert len(harness.timeline.sent) == 1
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 1

        await feed(agent, ACCEPTED, b"web:e-1", original, partition=2, offset=2)  # a replay
        assert len(harness.timeline.sent) == 2
        assert harness.timeline.sent[1] == first
        assert harness.count("cxpulse_events_replayed_total", channel="web") == 1
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 1
        assert harness.count("cxpulse_events_accepted_total", channel="web") == 1


class FixedResolver:
    def __init__(self, key: str) -> None:
        self.key = key

    def resolve(self, identifiers: Any) -> str:
        return self.key


class FailingResolver:
    def resolve(self, identifiers: Any) -> str:
        raise RuntimeError("identity store unavailable")


async def test_accept_rekeys_to_the_resolved_customer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = make_harness(tmp_path, monkeypatch, FixedResolver("C-surviving"))
    async with harness.worker.agents["accept"].test_context() as agent:
        await feed(agent, ACCEPTED, b"web:e-1", normalized("web:e-1", NOW, 0), 0, 0)
    [sent] = harness.timeline.sent
    assert sent.key == b"C-surviving"
    assert touchpoint_of(sent).customer_key == "C-surviving"


async def test_accept_failure_is_fatal_and_never_acks_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error stops the worker (on_fatal) before the message can be acked."""
    harness = make_harness(tmp_path, monkeypatch, FailingResolver())
    async with harness.worker.agents["accept"].test_context() as agent:
        value = normalized("web:e-1", NOW, 0)
        message = build_message(agent, ACCEPTED, b"web:e-1", value, 0, 0)
        channel = agent.stream().channel
        await channel.put(await channel.decode(message))
        for _ in range(1000):
            if harness.fatal:
                break
            await asyncio.sleep(0)
        [(stage, exc)] = harness.fatal
        assert stage == "accept"
        assert isinstance(exc, RuntimeError)
        assert "identity store unavailable" in str(exc)
        assert not message.acked, "acked, so at-least-once would commit past an unhandled event"
    assert harness.timeline.sent == []


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

    timeline_ids = [touchpoint_of(sent).event_id for sent in harness.timeline.sent]
    horizon_evictions = harness.count("cxpulse_dedup_evictions_total", reason="horizon")
    if evicted:
        assert timeline_ids == ["web:old", "web:later", "web:old"]
        assert horizon_evictions == 1
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 0
        assert harness.count("cxpulse_events_accepted_total", channel="web") == 3
    else:
        assert timeline_ids == ["web:old", "web:later"]
        assert horizon_evictions == 0
        assert harness.count("cxpulse_events_duplicate_total", channel="web") == 1


# --- the whole chain ---------------------------------------------------------------------


def raw_coordinates(messages: list[Any]) -> Iterator[tuple[str, int, int]]:
    """Simulated messages -> (topic, partition, offset) as a keyed producer would place them."""
    next_offset: Counter[tuple[str, int]] = Counter()
    for message in messages:
        topic = f"cx.raw.{message.channel}"
        partition = 0 if message.key is None else zlib.crc32(message.key) % PARTITIONS
        yield topic, partition, next_offset[topic, partition]
        next_offset[topic, partition] += 1


async def test_full_chain_accounts_for_every_message(harness: Harness) -> None:
    messages = list(generate(300, seed=3, now=NOW, dup_share=0.05, bad_share=0.05))
    kinds = Counter(message.kind for message in messages)
    assert kinds["duplicate"] > 0  # the sample exercises every path
    assert kinds["bad"] > 0
    coordinates = list(raw_coordinates(messages))

    async with harness.worker.agents["ingest"].test_context() as ingest:
        for message, (topic, partition, offset) in zip(messages, coordinates, strict=True):
            await feed(ingest, topic, message.key, message.value, partition, offset)
    async with harness.worker.agents["accept"].test_context() as accept:
        for offset, sent in enumerate(harness.accepted.sent):
            await feed_accepted(accept, sent, offset)

    consumed = harness.total("cxpulse_messages_consumed_total")
    accepted = harness.total("cxpulse_events_accepted_total")
    duplicates = harness.total("cxpulse_events_duplicate_total")
    deadletters = harness.total("cxpulse_deadletters_total")
    assert consumed == len(messages)
    assert consumed == accepted + duplicates + deadletters
    assert (accepted, duplicates, deadletters) == (kinds["valid"], kinds["duplicate"], kinds["bad"])

    valid_ids = [message.event_id for message in messages if message.kind == "valid"]
    timeline_ids = [touchpoint_of(sent).event_id for sent in harness.timeline.sent]
    assert sorted(timeline_ids) == sorted(valid_ids)  # each exactly once

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
