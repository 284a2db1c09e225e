"""Kafka tier: what ops see of a live worker: /metrics, readiness, JSON logs, a bounded stop."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.broker import EmbeddedBroker
from service.simulate import generate
from tests.kafka.harness import Scenario, WorkerProcess, publish, read_topic, total

pytestmark = pytest.mark.kafka


def test_live_worker_metrics_logs_and_stop(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages = [
        m
        for m in generate(
            400, customers=30, seed=31, now=datetime.now(UTC), span=timedelta(hours=2)
        )
        if m.kind == "valid"
    ]
    worker = WorkerProcess(scenario, tmp_path / "worker.log", CX_STATE_SCAN_INTERVAL="1s").start()
    try:
        worker.wait_ready()
        assert worker.http("/readyz")[0] == 200
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        asyncio.run(
            read_topic(
                broker.bootstrap, scenario.topic("timeline"), lambda r: len(r) >= len(messages)
            )
        )
        time.sleep(2.5)  # the 1 s freshness and state timers and the 2 s broker probe have run
        samples = worker.metrics()
    finally:
        started = time.monotonic()
        code = worker.stop()
        stop_seconds = time.monotonic() - started
    assert code == 0, worker.log_tail()
    assert stop_seconds < 10, f"SIGTERM took {stop_seconds:.1f}s"

    assert total(samples, "cxpulse_processing_latency_seconds_count") == len(messages)
    assert samples["cxpulse_broker_up"] == 1.0
    assert samples["cxpulse_ready"] == 1.0
    for channel in ("web", "chat", "support", "store"):
        freshness = samples[f'cxpulse_event_freshness_seconds{{channel="{channel}"}}']
        assert 0 < freshness < 3 * 3600, "events are at most 2 h old"
    assert samples["cxpulse_customers"] > 0
    assert samples["cxpulse_timeline_entries"] == len(messages)
    assert samples['cxpulse_state_keys{table="dedup"}'] == len({m.event_id for m in messages})
    assert any(name.startswith("cxpulse_consumer_lag{") for name in samples)

    lines = (tmp_path / "worker.log").read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= set(entry)
