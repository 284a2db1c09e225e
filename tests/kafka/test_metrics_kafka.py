"""Kafka tier: the rolling metrics published on cx.metrics equal the reference implementation's.
After kill -9 and with two workers: the reliability tier (test_crashes, test_rebalance)."""

from __future__ import annotations

import asyncio
import json
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
