"""Reliability tier, scenario 8: an unexpected exception while handling one event.

In parse or normalize (the ingest stage) the message becomes a `processing_error` dead letter
and the worker goes on. Anywhere else (identity graph, customer timeline, alerts, metrics
aggregation, merger) the worker stops (`on_fatal`, exit 70) without acknowledging the message,
and a restarted worker handles it in full: it is never silently acked. Agent-tier tests inject
the fault with monkeypatch; real-broker tests inject it into a worker process
(`tests/reliability/faults.py`) and restart it without the fault.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.alerts import alerts_for
from service.broker import EmbeddedBroker
from service.canonical import Normalized, Source
from service.deadletter import HEADER_OFFSET, HEADER_REASON, HEADER_TOPIC, read_headers
from service.rolling import MinuteAgg
from service.simulate import SimMessage, generate, topic_for
from service.worker import ingest_one
from tests.agent.test_worker_agents import (
    CUSTOMER_STREAM,
    IDENTITY_STREAM,
    NOW,
    Harness,
    build_message,
    feed,
    make_harness,
    normalized,
    put_until_fatal,
    raw_event,
    touchpoint,
)
from tests.kafka.harness import Scenario, WorkerProcess, publish, read_topic
from tests.reliability.exact import assert_exact, filed_ids
from tests.reliability.faults import FAULTS, fault_env, patch
from tests.reliability.test_poison import DEFAULT_LIMITS

pytestmark = pytest.mark.reliability

ERRORS = "cxpulse_processing_errors_total"


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return make_harness(tmp_path, monkeypatch)


# --- agent tier ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["parse", "normalize"])
async def test_ingest_fault_is_a_processing_error_dead_letter(harness: Harness, fault: str) -> None:
    first, second = raw_event("chat", "m-1"), raw_event("chat", "m-2")
    with pytest.MonkeyPatch.context() as mp:
        patch(mp, fault, "chat:m-1")
        async with harness.worker.agents["ingest"].test_context() as agent:
            await feed(agent, "cx.raw.chat", None, first, partition=0, offset=7)
            await feed(agent, "cx.raw.chat", b"k2", second, partition=0, offset=8)

    [dead] = harness.deadletter.sent
    assert (dead.key, dead.value) == (None, first)
    headers = read_headers(dead.headers)
    assert headers[HEADER_REASON] == "processing_error"
    assert (headers[HEADER_TOPIC], headers[HEADER_OFFSET]) == ("cx.raw.chat", "7")
    assert [sent.key for sent in harness.accepted.sent] == [b"chat:m-2"]  # the worker goes on
    assert harness.fatal == []
    assert harness.count(ERRORS, stage="ingest") == 1
    assert (
        harness.count("cxpulse_deadletters_total", channel="chat", reason="processing_error") == 1
    )


def detractor(event_id: str, key: str) -> dict[str, Any]:
    """A touchpoint JSON with an NPS 3 answer (it raises a `detractor` alert)."""
    tp = touchpoint(event_id, NOW, 0, key).model_dump(mode="json")
    return {**tp, "kind": "survey_response", "ratings": {"nps": 3, "csat": None, "ces": None}}


async def test_identity_fault_stops_the_worker_unacked(harness: Harness) -> None:
    with pytest.MonkeyPatch.context() as mp:
        patch(mp, "identity", "web:e-1")
        async with harness.worker.agents["identity"].test_context() as agent:
            value = normalized("web:e-1", NOW, 0)
            message = build_message(agent, IDENTITY_STREAM, b"web:e-1", value, 0, 0)
            await put_until_fatal(harness, agent, message)
    [(stage, exc)] = harness.fatal
    assert stage == "identity"
    assert "injected identity fault" in str(exc)
    assert harness.customers.sent == []
    assert harness.announced.sent == []
    assert harness.count(ERRORS, stage="identity") == 1


@pytest.mark.parametrize("fault", ["timeline", "alerts"])
async def test_customer_fault_stops_the_worker_and_changes_no_state(
    harness: Harness, fault: str
) -> None:
    """The record must not hold the event before its outputs are out: a replay would take it
    for already filed and never publish its profile and alert."""
    command = orjson.dumps({"t": "event", "tp": detractor("web:e-1", "C-1"), "rx": 1})
    with pytest.MonkeyPatch.context() as mp:
        patch(mp, fault, "web:e-1")
        async with harness.worker.agents["customers"].test_context() as agent:
            message = build_message(agent, CUSTOMER_STREAM, b"C-1", command, 1, 0)
            await put_until_fatal(harness, agent, message)
    assert [stage for stage, _ in harness.fatal] == ["customers"]
    assert harness.count(ERRORS, stage="customers") == 1
    assert harness.record("C-1") is None, "state changed by an event whose outputs were lost"
    assert harness.timeline.sent == harness.alerts.sent == harness.metrics.sent == []

    # The replay after a restart (fault gone) files the event and publishes everything.
    async with harness.worker.agents["customers"].test_context() as agent:
        await feed(agent, CUSTOMER_STREAM, b"C-1", command, 1, 0)
    record = harness.record("C-1")
    assert record is not None
    assert [e["event_id"] for e in record["timeline"]] == ["web:e-1"]
    assert [orjson.loads(s.value or b"")["event_id"] for s in harness.alerts.sent] == ["web:e-1"]
    assert len(harness.timeline.sent) == 1
    assert harness.profiles.sent[-1].key == b"C-1"


async def test_metrics_fault_stops_the_worker_unacked(harness: Harness) -> None:
    value = touchpoint("web:m-1", NOW, 0, "C-1").model_dump_json().encode()
    with pytest.MonkeyPatch.context() as mp:
        patch(mp, "metrics", "web:m-1")
        async with harness.worker.agents["metrics"].test_context() as agent:
            message = build_message(agent, "cx.internal.metrics", b"web:m-1", value, 2, 0)
            await put_until_fatal(harness, agent, message)
    assert [stage for stage, _ in harness.fatal] == ["metrics"]
    assert harness.count(ERRORS, stage="metrics") == 1
    assert harness.worker.metrics_state.dirty.get(2, set()) == set()  # nothing to send


async def test_merger_fault_stops_the_worker_unacked(harness: Harness) -> None:
    minute = int(NOW.timestamp() // 60)
    agg = MinuteAgg().to_json()
    partial = {"p": 0, "scope": "web", "minute": minute, "agg": agg, "wm": minute * 60_000}
    with pytest.MonkeyPatch.context() as mp:
        patch(mp, "merger", "")
        async with harness.worker.agents["merger"].test_context() as agent:
            key = f"0|web|{minute}".encode()
            value = orjson.dumps(partial)
            message = build_message(agent, "cx.internal.partials", key, value, 0, 0)
            await put_until_fatal(harness, agent, message)
    [(stage, exc)] = harness.fatal
    assert (stage, type(exc).__name__) == ("merger", "InjectedFault")
    assert harness.count(ERRORS, stage="merger") == 1


# --- real broker: the worker process ---------------------------------------------------------


def pick_target(messages: list[SimMessage], now: datetime) -> tuple[str, int]:
    """A valid event, sent once, with identifiers to link and a poor answer (an alert), well
    into the stream -> (event id, how many alerts it raises)."""
    copies = Counter(m.event_id for m in messages)
    for position, message in enumerate(messages):
        if message.kind != "valid" or position < len(messages) // 4:
            continue
        assert message.event_id is not None
        if copies[message.event_id] != 1:
            continue
        source = Source(topic=topic_for("cx", message.channel), partition=0, offset=0)
        result = ingest_one(
            message.channel, message.value, source, DEFAULT_LIMITS, b"target-key", now
        )
        assert isinstance(result, Normalized)
        tp = result.touchpoint.model_dump(mode="json")
        alerts = alerts_for(tp, result.touchpoint.customer_key)
        if result.identifiers and alerts:
            return message.event_id, len(alerts)
    raise AssertionError("no suitable target event")


def wait_exit(worker: WorkerProcess, within: float) -> int:
    """The exit code of a worker that must stop by itself."""
    assert worker.process is not None
    try:
        worker.process.wait(within)
    except Exception as exc:
        raise AssertionError(f"the worker did not stop\n{worker.log_tail()}") from exc
    return worker.stop()


def alert_count(scenario: Scenario, event_id: str, expected: int) -> int:
    """Alerts for `event_id` on cx.alerts, read until `expected` are there (or 5 s)."""

    def mine(records: list[Any]) -> int:
        return sum(orjson.loads(r.value)["event_id"] == event_id for r in records)

    records = asyncio.run(
        read_topic(
            scenario.broker.bootstrap,
            scenario.topic("alerts"),
            lambda r: mine(r) >= expected,
            within=5.0,
        )
    )
    return mine(records)


# On the broker, the customer stage, after the timeline record and before its alerts (the
# hardest place to stop); the agent tier above covers every stage.
@pytest.mark.parametrize("fault", ["alerts"])
def test_fatal_fault_then_restart_handles_the_event(
    broker: EmbeddedBroker, tmp_path: Path, fault: str
) -> None:
    scenario = Scenario.new(broker, tmp_path)
    now = datetime.now(UTC)
    messages = list(
        generate(400, customers=40, seed=88, now=now, span=timedelta(hours=12),
                 dup_share=0.03, bad_share=0.03)
    )  # fmt: skip
    target, alerts = pick_target(messages, now)
    env = fault_env(tmp_path, fault, target)
    first = WorkerProcess(scenario, tmp_path / "w1.log", CX_EMIT_INTERVAL="500ms", **env)
    first.start()
    try:
        first.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        assert wait_exit(first, within=60.0) == 70, first.log_tail()
    finally:
        first.stop()
    log = first.log_path.read_text()
    assert f"fatal error in {FAULTS[fault]}" in log
    assert f"injected {fault} fault for {target}" in log
    if fault != "metrics":  # the metrics stage comes after the timeline
        assert target not in filed_ids(scenario)

    started = time.monotonic()
    second = WorkerProcess(scenario, tmp_path / "w2.log", CX_EMIT_INTERVAL="500ms").start()
    try:
        second.wait_ready()
        assert_exact(scenario, messages)
        print(f"\n{fault} fault: exact {time.monotonic() - started:.1f} s after the restart")
        assert alert_count(scenario, target, alerts) == alerts
    finally:
        assert second.stop() == 0, second.log_tail()


def test_ingest_fault_in_stream_is_dead_lettered_and_the_rest_exact(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    scenario = Scenario.new(broker, tmp_path)
    now = datetime.now(UTC)
    messages = list(
        generate(400, customers=40, seed=89, now=now, span=timedelta(hours=12),
                 dup_share=0.03, bad_share=0.03)
    )  # fmt: skip
    target, _ = pick_target(messages, now)
    expected = [
        replace(m, kind="bad", event_id=None, reason="processing_error")
        if m.event_id == target
        else m
        for m in messages
    ]
    env = fault_env(tmp_path, "normalize", target)
    worker = WorkerProcess(scenario, tmp_path / "w.log", CX_EMIT_INTERVAL="500ms", **env).start()
    try:
        worker.wait_ready()
        started = time.monotonic()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        assert_exact(scenario, expected)
        print(f"\nnormalize fault: exact after {time.monotonic() - started:.1f} s")
        samples = worker.metrics()
        assert samples.get(f'{ERRORS}{{stage="ingest"}}') == 1
        channel = target.partition(":")[0]
        dead = f'cxpulse_deadletters_total{{channel="{channel}",reason="processing_error"}}'
        assert samples.get(dead) == 1
    finally:
        assert worker.stop() == 0, worker.log_tail()
