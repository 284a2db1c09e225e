"""Broker loss: /readyz goes 503 while the cluster is unreachable and back to 200 after; the
worker keeps running and catches up."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.broker import EmbeddedBroker, free_port, start_broker
from service.simulate import generate
from tests.kafka.harness import Scenario, WorkerProcess, publish, read_topic
from tests.kafka.proxy import TcpProxy

pytestmark = pytest.mark.kafka


def _until(condition: object, within: float) -> float:
    """Seconds until `condition()` held (AssertionError after `within`)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not within {within}s")


def test_readiness_follows_the_broker(tmp_path: Path) -> None:
    port = free_port()
    with TcpProxy(port) as proxy:
        broker = start_broker(port, log_file=tmp_path / "tansu.log", advertised_port=proxy.port)
        try:
            through_proxy = EmbeddedBroker(proxy.port, broker.process)
            scenario = Scenario.new(through_proxy, tmp_path)
            worker = WorkerProcess(scenario, tmp_path / "worker.log").start()
            try:
                worker.wait_ready()
                proxy.cut()
                down = _until(lambda: worker.http("/readyz")[0] == 503, within=30)
                assert worker.process is not None
                assert worker.process.poll() is None, "the worker must not exit"
                proxy.restore()
                up = _until(lambda: worker.http("/readyz")[0] == 200, within=60)
                messages = [
                    m
                    for m in generate(100, seed=41, now=datetime.now(UTC), span=timedelta(hours=1))
                    if m.kind == "valid"
                ]
                asyncio.run(publish(through_proxy.bootstrap, scenario.prefix, messages))
                records = asyncio.run(
                    read_topic(
                        through_proxy.bootstrap,
                        scenario.topic("timeline"),
                        lambda r: len(r) >= len(messages),
                    )
                )
                assert len(records) >= len(messages)
                print(f"readyz 503 after {down:.1f}s of outage, 200 {up:.1f}s after restore")
            finally:
                assert worker.stop() == 0, worker.log_tail()
        finally:
            broker.stop()
