"""Reliability tier: rebalances. Two workers in one group, while events flow:

- one is stopped (SIGTERM) and started again, three times: every raw partition keeps being
  consumed through every handover, the group ends committed at the end of every partition it
  reads, and the outputs are exact;
- one is paused (SIGSTOP) past the session timeout, the other takes its partitions over, then
  it is resumed (SIGCONT): whatever it still writes from before changes nothing, it rejoins,
  and both go on.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.broker import EmbeddedBroker
from service.canonical import Touchpoint
from service.deadletter import DeadLetterHeaders, read_headers
from service.simulate import SimMessage, generate, topic_for
from service.topics import Topics
from tests.kafka.harness import Scenario, WorkerProcess, publish, total
from tests.reliability.exact import assert_exact

pytestmark = pytest.mark.reliability

FAST = {"CX_EMIT_INTERVAL": "500ms"}
RawPartition = tuple[str, int]


def _messages(count: int, seed: int) -> list[SimMessage]:
    return list(
        generate(count, customers=80, seed=seed, now=datetime.now(UTC), span=timedelta(hours=12),
                 dup_share=0.05, bad_share=0.03)
    )  # fmt: skip


@dataclass(frozen=True)
class Sent:
    """A published message and where it landed."""

    message: SimMessage
    topic: str
    partition: int
    offset: int


class Publisher(threading.Thread):
    """Publishes messages at a steady rate in the background, recording where each landed."""

    def __init__(self, scenario: Scenario, messages: list[SimMessage], rate: float) -> None:
        super().__init__(daemon=True)
        self.scenario = scenario
        self.messages = messages
        self.rate = rate
        self.error: BaseException | None = None
        self._sent: list[Sent] = []
        self._lock = threading.Lock()

    def sent(self) -> list[Sent]:
        with self._lock:
            return list(self._sent)

    def run(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.error = exc

    def finish(self, timeout: float = 120.0) -> list[Sent]:
        self.join(timeout)
        assert not self.is_alive(), "publisher did not finish"
        assert self.error is None, repr(self.error)
        return self.sent()

    async def _publish(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.scenario.broker.bootstrap, acks="all", linger_ms=5
        )
        await producer.start()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            chunk = max(1, int(self.rate / 10))
            for first in range(0, len(self.messages), chunk):
                delay = started + first / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                batch = self.messages[first : first + chunk]
                futures = [
                    await producer.send(
                        topic_for(self.scenario.prefix, m.channel), m.value, key=m.key
                    )
                    for m in batch
                ]
                landed = await asyncio.gather(*futures)
                with self._lock:
                    self._sent.extend(
                        Sent(m, r.topic, r.partition, r.offset)
                        for m, r in zip(batch, landed, strict=True)
                    )
        finally:
            await producer.stop()


class OutputWatcher(threading.Thread):
    """Tails cx.timeline and cx.deadletter in the background: which event ids are filed and
    which raw (topic, partition, offset) are dead-lettered, so far."""

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(daemon=True)
        self.scenario = scenario
        self.filed: set[str] = set()
        self.dead: set[tuple[str, int, int]] = set()
        self.customer_partitions: set[int] = set()  # timeline partitions = customers partitions
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._started = threading.Event()
        self._lock = threading.Lock()

    def begin(self) -> OutputWatcher:
        self.start()
        assert self._started.wait(30), f"watcher not started: {self.error!r}"
        return self

    def close(self) -> None:
        self._stop_event.set()
        self.join(10)

    def outstanding(self, sent: list[Sent]) -> dict[RawPartition, int]:
        """Raw partition -> how many of its messages sent so far are on no output yet.
        (A duplicate is accounted for by its event id being filed.)"""
        with self._lock:
            filed, dead = set(self.filed), set(self.dead)
        missing: dict[RawPartition, int] = defaultdict(int)
        for s in sent:
            if s.message.kind == "bad":
                done = (s.topic, s.partition, s.offset) in dead
            else:
                done = s.message.event_id in filed
            if not done:
                missing[(s.topic, s.partition)] += 1
        return dict(missing)

    def wait_accounted(self, sent: list[Sent], within: float) -> float:
        """Poll until every message in `sent` is on an output -> seconds it took."""
        started = time.monotonic()
        missing = self.outstanding(sent)
        while missing and time.monotonic() - started < within:
            assert self.error is None, repr(self.error)
            time.sleep(0.2)
            missing = self.outstanding(sent)
        assert not missing, f"raw partitions not consumed within {within}s: {missing}"
        return time.monotonic() - started

    def run(self) -> None:
        try:
            asyncio.run(self._tail())
        except BaseException as exc:  # reported by the polls, in the test's thread
            self.error = exc
            self._started.set()

    async def _tail(self) -> None:
        topics = [self.scenario.topic("timeline"), self.scenario.topic("deadletter")]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.scenario.broker.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        try:
            assigned = await _all_partitions(consumer, topics)
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            self._started.set()
            while not self._stop_event.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                for tp, records in batches.items():
                    with self._lock:
                        for r in records:
                            if tp.topic == topics[0]:
                                touchpoint = Touchpoint.model_validate_json(r.value or b"")
                                self.filed.add(touchpoint.event_id)
                                self.customer_partitions.add(tp.partition)
                            else:
                                h = DeadLetterHeaders.model_validate(read_headers(r.headers))
                                source = (h.source_topic, int(h.source_partition))
                                self.dead.add((*source, int(h.source_offset)))
        finally:
            await consumer.stop()


async def _all_partitions(consumer: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    """Every partition of `topics` (waiting for the metadata to show them)."""
    deadline = time.monotonic() + 20
    found: list[TopicPartition] = []
    for topic in topics:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} does not exist"
        found.extend(TopicPartition(topic, p) for p in sorted(partitions))
    return found


async def _ends(bootstrap: str, topics: list[str], quiet: float = 1.5) -> dict[TopicPartition, int]:
    """The true end offset of every partition of `topics`: read to the last record, since the
    test broker's ListOffsets (and fetch high-water mark) stop short of it."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        assigned = await _all_partitions(consumer, topics)
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = dict.fromkeys(assigned, 0)
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                if records:
                    ends[tp] = max(ends[tp], records[-1].offset + 1)
                    last = time.monotonic()
        return ends
    finally:
        await consumer.stop()


async def _committed(
    bootstrap: str, group: str, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {tp: (await consumer.committed(tp)) or 0 for tp in partitions}
    finally:
        await consumer.stop()


def assert_consumed_to_end(scenario: Scenario, within: float = 30.0) -> None:
    """The group's committed offset is the end of every partition it reads (raw and internal):
    nothing is stuck, and nothing would be read again by the next worker to get it."""
    names = Topics(scenario.prefix)
    topics = [
        *names.raw_topics,
        names.accepted,
        names.identity_stream,
        names.customer_stream,
        names.metrics_stream,
        names.partials_stream,
    ]
    bootstrap, group = scenario.broker.bootstrap, f"{scenario.prefix}-cxpulse"
    deadline = time.monotonic() + within
    behind: dict[str, tuple[int, int]] = {}
    while time.monotonic() < deadline:
        ends = asyncio.run(_ends(bootstrap, topics))
        committed = asyncio.run(_committed(bootstrap, group, list(ends)))
        behind = {
            f"{tp.topic}/{tp.partition}": (committed[tp], end)
            for tp, end in ends.items()
            if committed[tp] != end
        }
        if not behind:
            return
        time.sleep(1)
    raise AssertionError(f"committed != end (committed, end): {behind}")


def _single_partition_holders(
    scenario: Scenario, a: WorkerProcess, b: WorkerProcess, within: float = 15.0
) -> tuple[set[str], set[str]]:
    """-> which workers hold the identity stage and which the metrics merger, as their lag
    series say (a worker exports the lag of the partitions it holds now, every 2 s), once
    each has one holder (or after `within` seconds)."""

    def holds(samples: dict[str, float], suffix: str) -> bool:
        labels = (f'topic="{scenario.topic(suffix)}"', 'partition="0"')
        return any(
            name.startswith("cxpulse_consumer_lag{") and all(label in name for label in labels)
            for name in samples
        )

    deadline = time.monotonic() + within
    while True:
        samples = {"a": a.metrics(), "b": b.metrics()}
        identity, partials = (
            {name for name, mine in samples.items() if holds(mine, suffix)}
            for suffix in ("internal.identity", "internal.partials")
        )
        if (len(identity) == len(partials) == 1) or time.monotonic() > deadline:
            return identity, partials
        time.sleep(0.5)


def _consumed(worker: WorkerProcess) -> float:
    return total(worker.metrics(), "cxpulse_messages_consumed_total")


def test_rolling_restarts_keep_every_partition_going(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Worker b is stopped and started three times while a steady stream flows."""
    run_started = time.monotonic()
    scenario = Scenario.new(broker, tmp_path)
    messages = _messages(1000, seed=731)
    streamed, tail = messages[:850], messages[850:]
    a = WorkerProcess(scenario, tmp_path / "a.log", name="a", **FAST).start()
    b = WorkerProcess(scenario, tmp_path / "b.log", name="b", **FAST).start()
    watcher: OutputWatcher | None = None
    try:
        a.wait_ready()
        b.wait_ready()
        watcher = OutputWatcher(scenario).begin()
        publisher = Publisher(scenario, streamed, rate=30)
        publisher.start()
        for cycle in range(1, 4):
            # A rolling restart: a takes b's partitions while b is down and gives them back.
            t0 = time.monotonic()
            assert b.stop(signal.SIGTERM) == 0, b.log_tail()
            stopped = time.monotonic() - t0
            b = WorkerProcess(scenario, tmp_path / "b.log", name="b", **FAST).start()
            b.wait_ready()
            ready = time.monotonic() - t0
            caught_up = watcher.wait_accounted(publisher.sent(), within=45)
            print(
                f"cycle {cycle}: b stopped in {stopped:.1f}s, ready again {ready:.1f}s after"
                f" SIGTERM; every partition caught up {caught_up:.1f}s later"
                f" ({len(publisher.sent())} sent)"
            )
        sent = publisher.finish()
        # After the last handover, a burst: both workers take their share of it.
        before = (_consumed(a), _consumed(b))
        asyncio.run(publish(broker.bootstrap, scenario.prefix, tail))
        assert_exact(scenario, messages, within=90)
        after = (_consumed(a), _consumed(b))
        assert after[0] > before[0], (before, after)  # both workers took a share
        assert after[1] > before[1], (before, after)
        raw = {(s.topic, s.partition) for s in sent}
        assert len(raw) == 16, f"the stream reached every raw partition: {sorted(raw)}"
        assert watcher.customer_partitions == {0, 1, 2, 3}
        assert_consumed_to_end(scenario)
        # The two single-partition stages end on different workers. Which holds which is not
        # fixed: a restart of b can come back before the group ever rebalances without it, and
        # then each stage stays where it was first placed (measured: identity on b, the merger
        # on a, in every generation of a run).
        identity, merger = _single_partition_holders(scenario, a, b)
        assert len(identity) == len(merger) == 1, (identity, merger)
        assert identity != merger, (identity, merger)
        print(f"rolling restarts: {time.monotonic() - run_started:.1f}s")
    finally:
        if watcher is not None:
            watcher.close()
        codes = (a.stop(), b.stop())
    assert codes == (0, 0), (a.log_tail(), b.log_tail())


def test_paused_worker_rejoins_and_changes_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Worker a is paused (SIGSTOP) past the session timeout while b takes over, then resumed.

    At 300 messages a second a is most likely handling a message, or has records in flight,
    when it freezes (at 40 a second it was mostly idle): in one of six runs the flush of its
    revoke then raised `Fenced` and crashed it (`service.outbox._settled`)."""
    run_started = time.monotonic()
    scenario = Scenario.new(broker, tmp_path)
    messages = _messages(3000, seed=741)
    streamed, tail = messages[:2850], messages[2850:]
    a = WorkerProcess(scenario, tmp_path / "a.log", name="a", **FAST).start()
    b = WorkerProcess(scenario, tmp_path / "b.log", name="b", **FAST).start()
    watcher: OutputWatcher | None = None
    paused = False
    try:
        a.wait_ready()
        b.wait_ready()
        watcher = OutputWatcher(scenario).begin()
        publisher = Publisher(scenario, streamed, rate=300)
        publisher.start()
        while len(watcher.filed) < 600:  # a is mid-stream when it freezes
            assert publisher.is_alive(), publisher.error
            time.sleep(0.1)
        assert a.process is not None
        a.process.send_signal(signal.SIGSTOP)
        paused, t0 = True, time.monotonic()
        takeover = watcher.wait_accounted(publisher.sent(), within=40)
        time.sleep(max(0.0, 10 - (time.monotonic() - t0)))
        a.process.send_signal(signal.SIGCONT)
        paused = False
        print(f"b took over in {takeover:.1f}s; a paused {time.monotonic() - t0:.1f}s")
        t1 = time.monotonic()
        a.wait_ready()
        print(f"a ready {time.monotonic() - t1:.1f}s after SIGCONT")
        sent = publisher.finish()
        print(f"{len(sent)} sent")
        time.sleep(10)
        before = (_consumed(a), _consumed(b))
        asyncio.run(publish(broker.bootstrap, scenario.prefix, tail))
        assert_exact(scenario, messages, within=60)
        after = (_consumed(a), _consumed(b))
        assert after[0] > before[0], (before, after)  # both workers took a share
        assert after[1] > before[1], (before, after)
        assert_consumed_to_end(scenario)
        print(f"pause and resume: {time.monotonic() - run_started:.1f}s")
    finally:
        if paused and a.process is not None:
            a.process.send_signal(signal.SIGCONT)
        if watcher is not None:
            watcher.close()
        codes = (a.stop(), b.stop())
    assert codes == (0, 0), (a.log_tail(), b.log_tail())
