"""Kafka tier: the rolling metrics published on cx.metrics equal the reference implementation's,
with one worker, after kill -9 and a restart, and with two workers."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.broker import EmbeddedBroker
from service.simulate import SimMessage, generate
from tests.kafka.harness import Scenario, WorkerProcess, publish
from tests.kafka.metrics_check import expected_snapshots, wait_for_reference

pytestmark = pytest.mark.kafka

FAST = {"CX_EMIT_INTERVAL": "500ms"}


def _workload(count: int, seed: int) -> tuple[list[SimMessage], set[str]]:
    messages = list(
        generate(count, customers=80, seed=seed, now=datetime.now(UTC), span=timedelta(days=3))
    )
    return messages, {m.event_id for m in messages if m.kind != "bad" and m.event_id}


def test_snapshots_equal_the_reference(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages, valid = _workload(1500, seed=51)
    worker = WorkerProcess(scenario, tmp_path / "worker.log", **FAST).start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        expected = expected_snapshots(scenario, valid)
        published = wait_for_reference(scenario, expected)
        status, body = worker.http("/v1/metrics")
        assert status == 200
        served = {
            f"{s['scope']}/{s['window']}": {k: v for k, v in s.items() if k != "emitted_at"}
            for s in json.loads(body)["snapshots"]
        }
        assert served == published
        assert len(served) == 20
        samples = worker.metrics()
        assert (
            samples['cxpulse_nps_score{scope="all",window="30d"}']
            == expected["all/30d"]["nps"]["score"]
        )
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_exact_after_kill_9_and_restart(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages, valid = _workload(1500, seed=52)
    worker = WorkerProcess(scenario, tmp_path / "worker-1.log", **FAST).start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages[:900]))
        time.sleep(1.5)  # mid-stream: some committed, some not
    finally:
        worker.stop(signal.SIGKILL)
    asyncio.run(publish(broker.bootstrap, scenario.prefix, messages[900:]))
    worker = WorkerProcess(scenario, tmp_path / "worker-2.log", **FAST).start()
    try:
        worker.wait_ready()
        wait_for_reference(scenario, expected_snapshots(scenario, valid), within=90)
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_two_workers_give_the_reference(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages, valid = _workload(1500, seed=53)
    first = WorkerProcess(scenario, tmp_path / "worker-a.log", name="a", **FAST).start()
    second = WorkerProcess(scenario, tmp_path / "worker-b.log", name="b", **FAST).start()
    try:
        first.wait_ready()
        second.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        wait_for_reference(scenario, expected_snapshots(scenario, valid), within=90)
        answers = [json.loads(w.http("/v1/metrics")[1])["snapshots"] for w in (first, second)]
        assert [len(a) for a in answers] == [20, 20]
        assert [{k: v for k, v in s.items() if k != "emitted_at"} for s in answers[0]] == [
            {k: v for k, v in s.items() if k != "emitted_at"} for s in answers[1]
        ]
    finally:
        assert first.stop() == 0, first.log_tail()
        assert second.stop() == 0, second.log_tail()
