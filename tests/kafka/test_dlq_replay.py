"""`cxpulse dlq replay`: dead letters go back to their source topic, once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from service.broker import EmbeddedBroker
from service.deadletter import deadletter_headers
from service.dlq import REPLAY_HEADER, replay
from service.parse import Rejected
from service.settings import load_settings
from tests.kafka.harness import PII_KEY, Scenario, read_topic

pytestmark = pytest.mark.kafka


def _web_event(event_id: str) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "type": "page_view",
            "sent_at": "2026-11-20T10:15:30.123Z",
            "anonymous_id": "a-1",
        }
    )


async def _dead_letters(scenario: Scenario, values: list[bytes], reason: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=scenario.broker.bootstrap, acks="all")
    await producer.start()
    try:
        for offset, value in enumerate(values):
            headers = deadletter_headers(
                Rejected(reason, "test"),  # type: ignore[arg-type]
                scenario.topic("raw.web"),
                0,
                offset,
                datetime.now(UTC),
            )
            await producer.send_and_wait(
                scenario.topic("deadletter"), value, key=b"k", headers=headers
            )
    finally:
        await producer.stop()


def test_replay_republishes_unchanged_and_only_once(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    settings = load_settings(
        kafka_bootstrap_servers=broker.bootstrap,
        topic_prefix=scenario.prefix,
        pii_key=PII_KEY,
        kafka_session_timeout="6s",  # Tansu holds a JoinGroup for half the session timeout
    )
    future = [_web_event("e-1"), _web_event("e-2")]
    asyncio.run(_dead_letters(scenario, future, "timestamp_in_future"))
    asyncio.run(_dead_letters(scenario, [b"{not json"], "invalid_json"))

    dry = asyncio.run(replay(settings, dry_run=True, idle_seconds=1.5))
    assert dry.replayed == 3
    report = asyncio.run(
        replay(settings, reasons=frozenset({"timestamp_in_future"}), idle_seconds=1.5)
    )
    assert (report.replayed, report.skipped) == (2, 1)
    assert report.by_topic == {scenario.topic("raw.web"): 2}

    records = asyncio.run(
        read_topic(broker.bootstrap, scenario.topic("raw.web"), lambda r: len(r) >= 2)
    )
    assert sorted(r.value for r in records if r.value) == sorted(future)
    assert all(r.key == b"k" for r in records)
    assert all(name == REPLAY_HEADER for r in records for name, _ in r.headers)

    again = asyncio.run(replay(settings, idle_seconds=1.5))
    assert again.replayed == 0, "already replayed dead letters must not be replayed again"
