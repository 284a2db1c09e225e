"""Reliability tier: kill -9 of the worker, with and without its local state.

1. The worker is killed at three points of one stream (before its first commit, mid-stream,
   right after a commit) and restarted on the same state each time: still exact, and every
   record published again by a replay is identical to the first (same key, same bytes).
2. The worker is killed and its local state directory (RocksDB) deleted: the restarted worker
   rebuilds its tables from the changelog topics. Profiles, served metrics and dedup answer as
   before the crash, and the stream stays exact. The recovery times are printed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.broker import EmbeddedBroker
from service.canonical import Touchpoint
from service.simulate import SimMessage, generate
from service.storage import true_end_offsets
from tests.kafka.harness import Scenario, WorkerProcess, publish, read_topic, total
from tests.kafka.metrics_check import expected_snapshots
from tests.reliability.exact import Expected, assert_exact

pytestmark = pytest.mark.reliability

# With the real changelog ends (service.storage.true_end_offsets) Faust's check that local
# state is not ahead of its changelog holds on Tansu too: on here, it guards the restarts.
FAST = {"CX_EMIT_INTERVAL": "500ms", "CX_RECOVERY_CONSISTENCY_CHECK": "true"}
RAW = ("raw.web", "raw.chat", "raw.support", "raw.store")
T = TypeVar("T")


def _messages(count: int, seed: int) -> list[SimMessage]:
    return list(
        generate(count, customers=80, seed=seed, now=datetime.now(UTC), span=timedelta(hours=12),
                 dup_share=0.04, bad_share=0.03)
    )  # fmt: skip


def _until(probe: Callable[[], T | None], within: float, what: str, every: float = 0.1) -> T:
    """Poll `probe` until it returns something (not None) -> that; fail after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(every)
    raise AssertionError(f"not within {within}s: {what}")


def _sample(worker: WorkerProcess, name: str) -> float:
    """One counter of this worker process (summed across labels); 0 while it cannot answer."""
    try:
        return total(worker.metrics(), name)
    except (OSError, AssertionError):
        return 0.0


def _timeline(scenario: Scenario, want: set[str], within: float) -> list[Touchpoint]:
    """cx.timeline from the start until every id of `want` is there (or `within` s)."""
    seen: set[str] = set()
    parsed = 0

    def done(records: list[Any]) -> bool:
        nonlocal parsed
        for record in records[parsed:]:
            seen.add(Touchpoint.model_validate_json(record.value or b"").event_id)
        parsed = len(records)
        return want <= seen

    records = asyncio.run(
        read_topic(scenario.broker.bootstrap, scenario.topic("timeline"), done, within=within)
    )
    return [Touchpoint.model_validate_json(r.value or b"") for r in records]


async def _committed(scenario: Scenario, suffixes: tuple[str, ...]) -> int:
    """Messages of some topics the worker's consumer group has committed (the sum of its
    committed offsets over their partitions: offsets start at 0 and have no gaps)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=scenario.broker.bootstrap,
        group_id=f"{scenario.prefix}-cxpulse",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        committed = 0
        for suffix in suffixes:
            topic = scenario.topic(suffix)
            for partition in consumer.partitions_for_topic(topic) or ():
                committed += await consumer.committed(TopicPartition(topic, partition)) or 0
        return committed
    finally:
        await consumer.stop()


def committed_raw(scenario: Scenario) -> int:
    return asyncio.run(_committed(scenario, RAW))


def _publish(scenario: Scenario, messages: list[SimMessage]) -> None:
    asyncio.run(publish(scenario.broker.bootstrap, scenario.prefix, messages))


def _kill(worker: WorkerProcess, point: str, started: float) -> None:
    """kill -9, and say where the stream was."""
    consumed = _sample(worker, "cxpulse_messages_consumed_total")
    filed = _sample(worker, "cxpulse_processing_latency_seconds_count")
    assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
    print(
        f"kill -9 {point} at {time.monotonic() - started:.1f}s: this run read {consumed:.0f} "
        f"raw messages and filed {filed:.0f} events"
    )


def _differences(copies: set[tuple[bytes | None, bytes | None]]) -> dict[str, list[Any]]:
    """Differing copies of one timeline record -> each field (the record key as "key") whose
    values differ, with the value of each copy; their bytes when no field does (key order)."""
    documents = [
        {"key": (key or b"").decode(), **json.loads(value or b"{}")} for key, value in copies
    ]
    fields = {name for document in documents for name in document}
    differ = {
        name: [document.get(name) for document in documents]
        for name in sorted(fields)
        if len({json.dumps(document.get(name), sort_keys=True) for document in documents}) > 1
    }
    return differ or {"bytes": [value for _, value in copies]}


def test_kill_9_at_three_points_is_exact(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages = _messages(800, seed=71)
    parts = [messages[:170], messages[170:470], messages[470:670], messages[670:]]
    started = time.monotonic()
    published: list[SimMessage] = []

    def run(index: int) -> WorkerProcess:
        worker = WorkerProcess(scenario, tmp_path / f"w{index}.log", **FAST).start()
        worker.wait_ready()
        _publish(scenario, parts[index])
        published.extend(parts[index])
        return worker

    # (a) Before the first commit: the first messages are read, none committed yet
    # (Faust commits every second).
    worker = run(0)
    try:
        _until(lambda: _sample(worker, "cxpulse_messages_consumed_total") or None, 1.0, "a read")
    finally:
        _kill(worker, "before the first commit", started)
    print(f"  committed then: {committed_raw(scenario)} of {len(published)}")

    # (b) Mid-stream: this run has filed some events on cx.timeline, far from all.
    worker = run(1)
    try:
        third = len(Expected.of(parts[1]).valid_ids) // 3
        _until(
            lambda: _sample(worker, "cxpulse_processing_latency_seconds_count") >= third or None,
            60,
            "a third of the part filed",
        )
    finally:
        _kill(worker, "mid-stream", started)
    print(f"  committed then: {committed_raw(scenario)} of {len(published)}")

    # (c) Right after a commit: everything so far is filed and its raw offsets committed.
    worker = run(2)
    try:
        so_far = Expected.of(published).valid_ids
        _until(
            lambda: so_far <= {t.event_id for t in _timeline(scenario, so_far, 5)} or None,
            60,
            "everything filed",
        )
        _until(
            lambda: committed_raw(scenario) == len(published) or None, 30, "everything committed"
        )
    finally:
        _kill(worker, "right after a commit", started)

    worker = run(3)
    try:
        assert_exact(scenario, messages, within=90)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    copies: dict[str, set[tuple[bytes | None, bytes | None]]] = {}
    for record in asyncio.run(
        read_topic(broker.bootstrap, scenario.topic("timeline"), lambda r: False, within=3)
    ):
        event_id = Touchpoint.model_validate_json(record.value or b"").event_id
        copies.setdefault(event_id, set()).add((record.key, record.value))
    differing = {event_id: found for event_id, found in copies.items() if len(found) > 1}
    assert not differing, {event_id: _differences(found) for event_id, found in differing.items()}
    print(f"kill -9 at three points: exact after {time.monotonic() - started:.1f}s")


def _served(worker: WorkerProcess) -> dict[str, dict[str, Any]] | None:
    """GET /v1/metrics of this worker -> snapshot numbers by key (None while it cannot answer)."""
    try:
        status, body = worker.http("/v1/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    return {
        f"{s['scope']}/{s['window']}": {k: v for k, v in s.items() if k != "emitted_at"}
        for s in json.loads(body)["snapshots"]
    }


def _profiles(worker: WorkerProcess, keys: set[str]) -> dict[str, Any]:
    """GET /v1/customers/{key} for each key -> the profile (or the status when not 200)."""
    answers: dict[str, Any] = {}
    for key in sorted(keys):
        status, body = worker.http(f"/v1/customers/{key}")
        answers[key] = json.loads(body) if status == 200 else status
    return answers


def test_state_rebuilt_from_changelogs(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages = _messages(600, seed=72)
    first, second = messages[:430], messages[430:]
    started = time.monotonic()

    worker = WorkerProcess(scenario, tmp_path / "w1.log", **FAST).start()
    try:
        worker.wait_ready()
        _publish(scenario, first)
        reference = expected_snapshots(scenario, Expected.of(first).valid_ids, within=60)
        _until(lambda: _served(worker) == reference or None, 60, "metrics of the first part")
        _until(lambda: committed_raw(scenario) == len(first) or None, 30, "first part committed")
        # And the accept stage's: a copy it reads again after the kill would count as newly
        # accepted if its dedup record had not reached the changelog, which this test does
        # not mean to measure (the counters below are this worker process's).
        parsed = len(first) - len(Expected.of(first).bad)
        _until(
            lambda: asyncio.run(_committed(scenario, ("internal.accepted",))) == parsed or None,
            30,
            "first part accepted and committed",
        )
        keys = {t.customer_key for t in _timeline(scenario, Expected.of(first).valid_ids, 30)}
        before = _profiles(worker, keys)
    finally:
        assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
    assert all(isinstance(p, dict) for p in before.values()), before
    shutil.rmtree(scenario.data_dir)

    restarted = time.monotonic()
    worker = WorkerProcess(scenario, tmp_path / "w2.log", **FAST).start()
    try:
        worker.wait_ready()
        ready = time.monotonic() - restarted
        _until(lambda: _served(worker) == reference or None, 60, "metrics rebuilt", every=0.2)
        exact = time.monotonic() - restarted
        print(
            f"state rebuilt from changelogs: /readyz 200 after {ready:.1f}s, "
            f"metrics exact after {exact:.1f}s ({len(keys)} customers)"
        )
        assert _profiles(worker, keys) == before

        # Dedup state came back too: a re-send of an event filed before the crash is a
        # duplicate, not a new event.
        _publish(scenario, second)
        assert_exact(scenario, messages, within=90)
        expected_duplicates = sum(1 for m in second if m.kind == "duplicate")
        expected_accepted = len(Expected.of(messages).valid_ids - Expected.of(first).valid_ids)

        def counts() -> tuple[float, float, float]:
            samples = worker.metrics()
            return tuple(  # type: ignore[return-value]
                total(samples, f"cxpulse_{name}_total")
                for name in ("events_duplicate", "events_accepted", "deadletters")
            )

        _until(lambda: sum(counts()) == len(second) or None, 30, "the second part accounted")
        assert counts()[:2] == (expected_duplicates, expected_accepted)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    print(f"state rebuilt from changelogs: whole test {time.monotonic() - started:.1f}s")


def test_changelogs_are_read_to_their_real_end(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """What table recovery relies on: the real end of a partition whose last batch holds
    many records, whatever end offset the broker reports."""
    scenario = Scenario.new(broker, tmp_path)
    topic = TopicPartition(scenario.topic("probe"), 0)

    async def run() -> tuple[int, int]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=200)
        await producer.start()
        try:
            sent = [await producer.send(topic.topic, b"x", partition=0) for _ in range(10)]
            await asyncio.gather(*sent)  # one batch of ten: offsets 0-9
            await producer.send_and_wait(topic.topic, b"y", partition=0)  # offset 10, alone
            sent = [await producer.send(topic.topic, b"z", partition=0) for _ in range(5)]
            await asyncio.gather(*sent)  # offsets 11-15
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
        await consumer.start()
        try:
            reported = (await consumer.end_offsets([topic]))[topic]
        finally:
            await consumer.stop()
        ends = await true_end_offsets({"bootstrap_servers": broker.bootstrap}, {topic: reported})
        return reported, ends[topic]

    reported, real = asyncio.run(run())
    print(f"end offset: reported {reported}, real {real}")
    assert real == 16
