"""Kafka tier: the ingest pipeline against a real broker, across a worker restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from service.broker import EmbeddedBroker
from service.canonical import Touchpoint
from service.deadletter import DeadLetterHeaders, read_headers
from service.simulate import SimMessage, generate
from service.storage import DISCARDED
from tests.kafka.harness import Scenario, WorkerProcess, publish, read_topic, total

pytestmark = pytest.mark.kafka


def _mixed_batch(count: int, seed: int) -> list[SimMessage]:
    # Within one dedup horizon, so that every re-send is a duplicate whatever the read order.
    return list(
        generate(
            count,
            customers=60,
            seed=seed,
            now=datetime.now(UTC),
            span=timedelta(hours=12),
            dup_share=0.06,
            bad_share=0.05,
        )
    )


def _expected(messages: list[SimMessage]) -> tuple[set[str], list[SimMessage], int]:
    """-> (unique valid event ids, bad messages, number of duplicates)."""
    valid_ids: set[str] = set()
    duplicates = 0
    for message in messages:
        if message.kind == "bad":
            continue
        assert message.event_id is not None
        if message.event_id in valid_ids:
            duplicates += 1
        valid_ids.add(message.event_id)
    return valid_ids, [m for m in messages if m.kind == "bad"], duplicates


def _check_outputs(
    scenario: Scenario, messages: list[SimMessage], timeline_ids: list[str], dead: list
) -> None:
    valid_ids, bad, _ = _expected(messages)
    assert set(timeline_ids) == valid_ids
    assert len(timeline_ids) == len(valid_ids), "an accepted event was published twice"
    # Dead letters carry the original bytes and key, unchanged, with the section 7 headers.
    assert Counter((r.key, r.value) for r in dead) == Counter((m.key, m.value) for m in bad)
    reasons = {m.value: m.reason for m in bad}
    for record in dead:
        headers = DeadLetterHeaders.model_validate(read_headers(record.headers))
        assert headers.reason == reasons[record.value]
        assert headers.source_topic.startswith(f"{scenario.prefix}.raw.")
        assert headers.detail


async def _drain(scenario: Scenario, messages: list[SimMessage]) -> tuple[list[str], list]:
    valid_ids, bad, _ = _expected(messages)
    bootstrap = scenario.broker.bootstrap
    timeline, dead = await asyncio.gather(
        read_topic(
            bootstrap,
            scenario.topic("timeline"),
            lambda records: len({_event_id(r.value) for r in records}) >= len(valid_ids),
        ),
        read_topic(bootstrap, scenario.topic("deadletter"), lambda r: len(r) >= len(bad)),
    )
    return [_event_id(r.value) for r in timeline], dead


def _event_id(value: bytes | None) -> str:
    assert value is not None
    return Touchpoint.model_validate_json(value).event_id


def test_every_message_accounted_for_once(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages = _mixed_batch(800, seed=11)
    worker = WorkerProcess(scenario, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        timeline_ids, dead = asyncio.run(_drain(scenario, messages))
        _check_outputs(scenario, messages, timeline_ids, dead)
        _, bad, duplicates = _expected(messages)
        samples = worker.metrics()
        consumed = total(samples, "cxpulse_messages_consumed_total")
        accepted = total(samples, "cxpulse_events_accepted_total")
        duplicated = total(samples, "cxpulse_events_duplicate_total")
        dead_letters = total(samples, "cxpulse_deadletters_total")
        assert consumed == len(messages)
        assert (accepted, duplicated, dead_letters) == (len(timeline_ids), duplicates, len(bad))
        assert consumed == accepted + duplicated + dead_letters
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_accounting_holds_across_a_restart(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages = _mixed_batch(1000, seed=12)
    first_half, second_half = messages[:500], messages[500:]
    # Re-sends of events accepted before the restart must still be recognized after it.
    resent = [m for m in first_half if m.kind == "valid"][:15]
    second_half += [
        SimMessage(m.channel, m.key, m.value, "duplicate", m.event_id, m.reason) for m in resent
    ]
    everything = first_half + second_half

    counts: Counter[str] = Counter()
    worker = WorkerProcess(scenario, tmp_path / "worker-1.log").start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, first_half))
        asyncio.run(_drain(scenario, first_half))
        samples = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log_tail()
    for name in ("consumed", "accepted", "duplicate", "deadletters"):
        counts[name] += _metric(samples, name)

    asyncio.run(publish(broker.bootstrap, scenario.prefix, second_half))
    worker = WorkerProcess(scenario, tmp_path / "worker-2.log").start()
    try:
        worker.wait_ready()
        timeline_ids, dead = asyncio.run(_drain(scenario, everything))
        samples = worker.metrics()
    finally:
        assert worker.stop() == 0, worker.log_tail()
    for name in ("consumed", "accepted", "duplicate", "deadletters"):
        counts[name] += _metric(samples, name)
    # Stopped cleanly, the first worker kept its local tables (README, "Local state after a
    # crash").
    assert DISCARDED not in (tmp_path / "worker-2.log").read_text()

    _check_outputs(scenario, everything, timeline_ids, dead)
    _, bad, duplicates = _expected(everything)
    assert counts["consumed"] == len(everything)
    assert counts["accepted"] == len(set(timeline_ids))
    assert counts["duplicate"] == duplicates
    assert counts["deadletters"] == len(bad)
    assert counts["consumed"] == counts["accepted"] + counts["duplicate"] + counts["deadletters"]


def _metric(samples: dict[str, float], short: str) -> float:
    names = {
        "consumed": "cxpulse_messages_consumed_total",
        "accepted": "cxpulse_events_accepted_total",
        "duplicate": "cxpulse_events_duplicate_total",
        "deadletters": "cxpulse_deadletters_total",
    }
    return total(samples, names[short])


def test_timeline_values_are_canonical(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Every timeline record is a canonical touchpoint keyed by its customer key, with no PII."""
    scenario = Scenario.new(broker, tmp_path)
    messages = [m for m in _mixed_batch(300, seed=13) if m.kind == "valid"]
    worker = WorkerProcess(scenario, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        records = asyncio.run(
            read_topic(
                broker.bootstrap, scenario.topic("timeline"), lambda r: len(r) >= len(messages)
            )
        )
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert len(records) == len(messages)
    raw_emails = {orjson.loads(m.value).get("email") for m in messages if m.channel == "web"} - {
        None
    }
    for record in records:
        assert record.value is not None
        touchpoint = Touchpoint.model_validate_json(record.value)
        assert record.key == touchpoint.customer_key.encode()
        assert touchpoint.source.topic == scenario.topic(f"raw.{touchpoint.channel}")
        text = record.value.decode()
        assert "@" not in text
        assert not any(email.strip() in text for email in raw_emails)
