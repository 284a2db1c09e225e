"""Kafka-tier helpers: a worker in its own process, topic readers, /metrics parsing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from service.bench import parse_metrics as parse_metrics  # the tests import these from here
from service.bench import total as total
from service.broker import EmbeddedBroker, free_port
from service.simulate import SimMessage, topic_for

PII_KEY = "kafka-tier-test-key-0123456789"


@dataclass
class Scenario:
    """One test's isolated namespace on the shared broker."""

    broker: EmbeddedBroker
    prefix: str
    data_dir: Path
    http_port: int

    @classmethod
    def new(cls, broker: EmbeddedBroker, tmp_path: Path) -> Scenario:
        return cls(broker, f"t{uuid.uuid4().hex[:10]}", tmp_path / "state", free_port())

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CX_")}
        env.update(
            CX_KAFKA_BOOTSTRAP_SERVERS=self.broker.bootstrap,
            CX_TOPIC_PREFIX=self.prefix,
            CX_PII_KEY=PII_KEY,
            CX_DATA_DIR=str(self.data_dir),
            CX_HTTP_PORT=str(self.http_port),
            CX_HTTP_HOST="127.0.0.1",
            CX_PARTITIONS="4",
            CX_KAFKA_SESSION_TIMEOUT="6s",
            CX_KAFKA_REBALANCE_TIMEOUT="5s",
            # Tansu under-reports changelog end offsets (see README, "Tests").
            CX_RECOVERY_CONSISTENCY_CHECK="false",
        )
        env.update(extra)
        return env

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"


class WorkerProcess:
    """`python -m service worker` as a child process with its log in a file. A second worker
    of the same scenario gets its own `name` (own HTTP port and state directory)."""

    def __init__(self, scenario: Scenario, log_path: Path, name: str = "", **env: str) -> None:
        self.scenario = scenario
        self.extra_env = env
        self.log_path = log_path
        self.http_port = free_port() if name else scenario.http_port
        self.data_dir = scenario.data_dir / name if name else scenario.data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        env = self.scenario.env(
            CX_HTTP_PORT=str(self.http_port),
            CX_HTTP_ADVERTISED_URL=f"http://127.0.0.1:{self.http_port}",
            CX_DATA_DIR=str(self.data_dir),
            **self.extra_env,
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "worker"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def http(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            assert self.process.poll() is None, self.log_tail()
            try:
                if self.http("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        status, body = self.http("/metrics")
        assert status == 200
        return parse_metrics(body.decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            if self._log is not None:
                self._log.close()
        return code

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def publish(bootstrap: str, prefix: str, messages: Iterable[SimMessage]) -> int:
    """Publish simulated messages to their raw topics in order -> how many."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    count = 0
    try:
        futures = []
        for message in messages:
            futures.append(
                await producer.send(
                    topic_for(prefix, message.channel), message.value, key=message.key
                )
            )
            count += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


async def read_topic(
    bootstrap: str,
    topic: str,
    done: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    within: float = 60.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` from the start, until `done(records)` or `within` seconds."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + within
        partitions: set[int] | None = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.2)
        assert partitions, f"topic {topic} does not exist"
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        while not done(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records
