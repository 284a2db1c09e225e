"""Reliability tier baseline: with no fault at all, the exactness check passes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.broker import EmbeddedBroker
from service.simulate import generate
from tests.kafka.harness import Scenario, WorkerProcess, publish
from tests.reliability.exact import assert_exact

pytestmark = pytest.mark.reliability


def test_no_fault_is_exact(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages = list(
        generate(600, customers=50, seed=70, now=datetime.now(UTC), span=timedelta(hours=12),
                 dup_share=0.05, bad_share=0.05)
    )  # fmt: skip
    worker = WorkerProcess(scenario, tmp_path / "w.log", CX_EMIT_INTERVAL="500ms").start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        assert_exact(scenario, messages)
    finally:
        assert worker.stop() == 0, worker.log_tail()
