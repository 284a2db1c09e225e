"""Reliability scenario 5: broker faults on the worker's path to the broker.

The broker advertises a TCP proxy the test controls, so the worker reaches it only through the
proxy: connections reset, a 30 s black hole, 500 ms of latency each way. The test's own clients
(plain aiokafka, whose client id the proxy spares) publish before, during and after each fault.
The worker never exits, /readyz is 503 while the broker is unreachable and 200 after, and every
message is accounted for exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.simulate import SimMessage, generate
from tests.kafka.harness import Scenario, WorkerProcess, publish, total
from tests.kafka.proxy import Proxied, proxied_broker
from tests.reliability.exact import Expected, assert_exact, filed_ids

pytestmark = pytest.mark.reliability

BLACK_HOLE = 30.0


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    """A broker of its own, advertised at the proxy (faults must not reach other tests)."""
    with proxied_broker(tmp_path_factory.mktemp("faults") / "tansu.log") as running:
        yield running


def _thirds(
    seed: int, count: int = 450
) -> tuple[list[SimMessage], list[SimMessage], list[SimMessage]]:
    messages = list(
        generate(count, customers=40, seed=seed, now=datetime.now(UTC), span=timedelta(hours=12),
                 dup_share=0.05, bad_share=0.05)
    )  # fmt: skip
    third = count // 3
    return messages[:third], messages[third : 2 * third], messages[2 * third :]


def _until(worker: WorkerProcess, condition: Callable[[], bool], within: float) -> float:
    """Seconds until `condition()` held; the worker must be alive at every look."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        assert worker.process is not None
        assert worker.process.poll() is None, f"the worker exited\n{worker.log_tail()}"
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not within {within}s\n{worker.log_tail()}")


def _readyz(worker: WorkerProcess) -> int:
    try:
        return worker.http("/readyz")[0]
    except OSError:  # a busy worker may not answer within the client's timeout
        return 0


def _consumed(worker: WorkerProcess) -> float:
    try:
        return total(worker.metrics(), "cxpulse_messages_consumed_total")
    except OSError:  # a busy worker may not answer within the client's timeout
        return 0.0


class Run:
    """One scenario on the proxied broker: a worker, and a publisher that bypasses faults."""

    def __init__(self, proxied: Proxied, tmp_path: Path) -> None:
        self.proxied = proxied
        self.scenario = Scenario.new(proxied.broker, tmp_path)
        self.worker = WorkerProcess(self.scenario, tmp_path / "w.log", CX_EMIT_INTERVAL="500ms")
        self.published: list[SimMessage] = []

    def __enter__(self) -> Run:
        self.worker.start().wait_ready()
        return self

    def __exit__(self, *_: object) -> None:
        self.proxied.proxy.restore()  # a failed test must not leave the fault on
        assert self.worker.stop() == 0, self.worker.log_tail()

    def publish(self, messages: list[SimMessage]) -> None:
        asyncio.run(publish(self.proxied.direct, self.scenario.prefix, messages))
        self.published += messages

    def until(self, condition: Callable[[], bool], within: float) -> float:
        return _until(self.worker, condition, within)

    def alive(self) -> None:
        assert self.worker.process is not None
        assert self.worker.process.poll() is None, f"the worker exited\n{self.worker.log_tail()}"


def test_connection_resets(proxied: Proxied, tmp_path: Path) -> None:
    started = time.monotonic()
    before, during, after = _thirds(seed=51)
    proxy = proxied.proxy
    with Run(proxied, tmp_path) as run:
        run.publish(before)
        run.until(lambda: _consumed(run.worker) >= 50, within=30)
        proxy.reset()  # every connection reset, and every new one, for ~8 s
        down = run.until(lambda: _readyz(run.worker) == 503, within=20)
        run.publish(during)
        time.sleep(max(0.0, 8.0 - down))  # the outage lasts; the assertions are below
        proxy.restore()
        restored = time.monotonic()
        up = run.until(lambda: _readyz(run.worker) == 200, within=60)
        run.publish(after)
        for _ in range(3):  # short blips: RST on every open connection, reconnect at once
            time.sleep(1)
            proxy.reset()
            proxy.restore()
        assert_exact(run.scenario, run.published)
        exact = time.monotonic() - restored
    print(
        f"\nresets: readyz 503 {down:.1f}s into the outage, 200 {up:.1f}s after restore, "
        f"all exact {exact:.1f}s after restore; run {time.monotonic() - started:.1f}s"
    )


def test_black_hole(proxied: Proxied, tmp_path: Path) -> None:
    started = time.monotonic()
    before, during, after = _thirds(seed=52)
    proxy = proxied.proxy
    with Run(proxied, tmp_path) as run:
        run.publish(before)
        run.until(lambda: _consumed(run.worker) >= 50, within=30)
        proxy.black_hole()
        hole = time.monotonic()
        down = run.until(lambda: _readyz(run.worker) == 503, within=20)
        run.publish(during)
        statuses: list[int] = []
        while time.monotonic() - hole < BLACK_HOLE:
            statuses.append(_readyz(run.worker))
            run.alive()
            time.sleep(0.5)
        proxy.restore()
        restored = time.monotonic()
        up = run.until(lambda: _readyz(run.worker) == 200, within=60)
        assert 200 not in statuses, statuses  # (0: no answer within 2 s, on a busy machine)
        run.publish(after)
        assert_exact(run.scenario, run.published)
        exact = time.monotonic() - restored
    print(
        f"\nblack hole {BLACK_HOLE:.0f}s: readyz 503 after {down:.1f}s and at "
        f"{statuses.count(503)}/{len(statuses)} looks, 200 {up:.1f}s after restore, all exact "
        f"{exact:.1f}s after restore; run {time.monotonic() - started:.1f}s"
    )


def test_latency(proxied: Proxied, tmp_path: Path) -> None:
    started = time.monotonic()
    before, during, after = _thirds(seed=53, count=300)
    proxy = proxied.proxy
    with Run(proxied, tmp_path) as run:
        run.publish(before)
        run.until(lambda: _consumed(run.worker) >= 30, within=30)
        proxy.latency(0.5)
        run.publish(during)
        statuses: list[int] = []
        expected = Expected.of(before + during).valid_ids

        def filed() -> bool:
            statuses.append(_readyz(run.worker))
            return filed_ids(run.scenario) >= expected

        # Processed end to end while every chunk is late.
        took = run.until(filed, within=90)
        proxy.restore()
        run.publish(after)
        assert_exact(run.scenario, run.published)
    ready = statuses.count(200) / len(statuses)
    print(
        f"\nlatency 500 ms each way: {len(before) + len(during)} messages filed "
        f"{took:.1f}s after it began, /readyz 200 at {ready:.0%} of looks; "
        f"run {time.monotonic() - started:.1f}s"
    )
