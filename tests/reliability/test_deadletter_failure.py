"""Reliability scenario 7: dead letters that cannot be published.

The broker sits behind a TCP proxy the test controls and, like most production clusters,
creates no topic on demand. (a) The broker refuses every write to cx.deadletter (as an ACL
would): the worker exits 70 without committing past the message it could not dead-letter, and
reads it again after a restart; once writes are allowed again nothing is lost. (b) With
CX_CREATE_TOPICS=false and cx.deadletter missing, the worker refuses to start (a send to a
missing topic would stall the producer, not fail); once the topic exists nothing is lost.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.simulate import SimMessage, generate, topic_for
from service.topics import Topics
from tests.kafka.harness import Scenario, WorkerProcess, publish, read_topic
from tests.kafka.proxy import Proxied, proxied_broker
from tests.reliability.exact import Expected, assert_exact, filed_ids

pytestmark = pytest.mark.reliability

EX_SOFTWARE = 70


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    with proxied_broker(
        tmp_path_factory.mktemp("deadletter") / "tansu.log", auto_create=False
    ) as running:
        yield running


def _messages(seed: int) -> list[SimMessage]:
    return list(
        generate(300, customers=30, seed=seed, now=datetime.now(UTC), span=timedelta(hours=12),
                 dup_share=0.05, bad_share=0.05)
    )  # fmt: skip


def _exit_code(worker: WorkerProcess, within: float) -> int:
    assert worker.process is not None
    try:
        return worker.process.wait(within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not exit\n{worker.log_tail()}") from None


async def _create(bootstrap: str, names: dict[str, bool]) -> None:
    """Create topics (name -> compacted?) as an operator would, 4 partitions each."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, 4, 1, topic_configs={"cleanup.policy": "compact"} if c else {})
                for name, c in names.items()
            ]
        )
    finally:
        await admin.close()


async def _committed(
    bootstrap: str, group: str, tps: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """The consumer group's committed offsets (the next offset to read) of `tps`, -1 for none."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        offsets = {tp: await consumer.committed(tp) for tp in tps}
        return {tp: -1 if offset is None else offset for tp, offset in offsets.items()}
    finally:
        await consumer.stop()


def _at_least(count: int, records: list[ConsumerRecord[bytes, bytes]]) -> bool:
    return len(records) >= count


def _raw_records(
    scenario: Scenario, direct: str, messages: list[SimMessage]
) -> Iterator[tuple[str, ConsumerRecord[bytes, bytes]]]:
    """Published messages -> (raw topic, record) for each, read back from the raw topics."""
    for topic in Topics(scenario.prefix).raw_topics:
        count = sum(topic_for(scenario.prefix, m.channel) == topic for m in messages)
        for record in asyncio.run(read_topic(direct, topic, partial(_at_least, count))):
            yield topic, record


def _first_bad(
    scenario: Scenario, direct: str, messages: list[SimMessage]
) -> dict[TopicPartition, int]:
    """Raw partition -> the offset of its first bad message, read back from the raw topics."""
    bad = {(m.key, m.value) for m in messages if m.kind == "bad"}
    first: dict[TopicPartition, int] = {}
    for topic, r in _raw_records(scenario, direct, messages):
        tp = TopicPartition(topic, r.partition)
        if (r.key, r.value) in bad and r.offset < first.get(tp, r.offset + 1):
            first[tp] = r.offset
    assert len(first) > 1, first
    return first


def _assert_not_past(
    scenario: Scenario, direct: str, first_bad: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """No raw partition is committed past a message not dead-lettered yet -> the offsets of
    those with a bad message."""
    group = f"{scenario.prefix}-cxpulse"
    committed = asyncio.run(_committed(direct, group, sorted(first_bad)))
    past = {tp: (c, first_bad[tp]) for tp, c in committed.items() if c > first_bad[tp]}
    assert not past, past
    return committed


def _stages(scenario: Scenario, direct: str) -> dict[str, list[int]]:
    """Topic the worker reads -> its group's committed offset per partition (-1: none)."""
    topics = Topics(scenario.prefix)
    read = [*topics.raw_topics, topics.accepted, topics.customer_stream, topics.metrics_stream]
    tps = [TopicPartition(t, p) for t in read for p in range(4)]
    tps += [TopicPartition(t, 0) for t in (topics.identity_stream, topics.partials_stream)]
    committed = asyncio.run(_committed(direct, f"{scenario.prefix}-cxpulse", tps))
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        by_topic.setdefault(tp.topic.removeprefix(scenario.prefix), []).append(committed[tp])
    return by_topic


def _trace(
    scenario: Scenario,
    direct: str,
    messages: list[SimMessage],
    first_bad: dict[TopicPartition, int],
) -> str:
    """Valid event ids missing from cx.timeline -> how many of them each internal topic holds,
    and where each was in its raw topic (beside that partition's first bad offset): which
    stage lost them."""
    missing = Expected.of(messages).valid_ids - filed_ids(scenario)
    by_raw = {(m.key, m.value): m.event_id for m in messages if m.event_id in missing}
    raw: dict[str | None, list[tuple[str, int, int, int | None]]] = {}
    for topic, r in _raw_records(scenario, direct, messages):
        if (r.key, r.value) in by_raw:
            place = (
                topic,
                r.partition,
                r.offset,
                first_bad.get(TopicPartition(topic, r.partition)),
            )
            raw.setdefault(by_raw[(r.key, r.value)], []).append(place)
    topics = Topics(scenario.prefix)
    held: dict[str, int] = {}
    for name in (topics.accepted, topics.identity_stream, topics.customer_stream):
        values = [r.value or b"" for r in asyncio.run(read_topic(direct, name, lambda _: False, 3))]
        held[name] = sum(any(i.encode() in v for v in values) for i in missing)
    return f"{len(missing)} missing; on {held}; raw (topic, partition, offset, first bad): {raw}"


def test_refused_dead_letter_stops_the_worker_without_committing(
    proxied: Proxied, tmp_path: Path
) -> None:
    started = time.monotonic()
    scenario = Scenario.new(proxied.broker, tmp_path)
    messages = _messages(seed=71)
    proxy = proxied.proxy

    def worker() -> WorkerProcess:
        return WorkerProcess(scenario, tmp_path / "w.log", CX_EMIT_INTERVAL="500ms")

    # Good messages first, committed; then the bad ones among the rest cannot be dead-lettered.
    warmup = [m for m in messages[:150] if m.kind != "bad"]
    rest = [m for m in messages[:150] if m.kind == "bad"] + messages[150:]
    raw = [TopicPartition(t, p) for t in Topics(scenario.prefix).raw_topics for p in range(4)]
    group = f"{scenario.prefix}-cxpulse"

    def committed_total() -> int:
        return sum(max(0, c) for c in asyncio.run(_committed(proxied.direct, group, raw)).values())

    first = worker().start()
    try:
        first.wait_ready()
        asyncio.run(publish(proxied.direct, scenario.prefix, warmup))
        deadline = time.monotonic() + 30
        while committed_total() < len(warmup):
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.5)
        proxy.refuse_produce(scenario.topic("deadletter"))
        asyncio.run(publish(proxied.direct, scenario.prefix, rest))
        refused = time.monotonic()
        assert _exit_code(first, within=60) == EX_SOFTWARE, first.log_tail()
        stopped = time.monotonic() - refused
        cause = f"TopicAuthorizationFailedError('{scenario.topic('deadletter')}')"
        assert cause in first.log_tail(200), first.log_tail()
        first_bad = _first_bad(scenario, proxied.direct, messages)
        committed = _assert_not_past(scenario, proxied.direct, first_bad)
        # A restart reads it again, and stops again: it is never skipped.
        again = worker().start()
        assert _exit_code(again, within=60) == EX_SOFTWARE, again.log_tail()
        _assert_not_past(scenario, proxied.direct, first_bad)
    finally:
        proxy.restore()
    repaired = time.monotonic()
    last = worker().start()
    try:
        last.wait_ready()
        try:
            assert_exact(scenario, messages)
        except AssertionError as exc:
            # Flaky in runs of the whole tier (never alone so far): chat events missing, the
            # last worker idle in a py-spy dump. Where the group stands on each topic, and
            # where the missing events are, for the next failure to say which stage lost them.
            trace = _trace(scenario, proxied.direct, messages, first_bad)
            committed_now = _stages(scenario, proxied.direct)
            raise AssertionError(f"{exc}\ncommitted: {committed_now}\n{trace}") from exc
        recovered = time.monotonic() - repaired
    finally:
        assert last.stop() == 0, last.log_tail()
    at_bad = sum(committed[tp] == offset for tp, offset in first_bad.items())
    print(
        f"\nrefused dead letters: exit 70 {stopped:.1f}s after publishing; {at_bad} of "
        f"{len(first_bad)} partitions committed up to their first bad message, none past; "
        f"after repair all exact in {recovered:.1f}s; run {time.monotonic() - started:.1f}s"
    )


def test_missing_dead_letter_topic_refuses_to_start(proxied: Proxied, tmp_path: Path) -> None:
    started = time.monotonic()
    scenario = Scenario.new(proxied.broker, tmp_path)
    topics = Topics(scenario.prefix)
    contract = topics.contract_topics()
    asyncio.run(
        _create(proxied.direct, {n: c for n, c in contract.items() if n != topics.deadletter})
    )
    messages = _messages(seed=72)
    asyncio.run(publish(proxied.direct, scenario.prefix, messages))
    env = {"CX_CREATE_TOPICS": "false", "CX_EMIT_INTERVAL": "500ms"}

    refused = WorkerProcess(scenario, tmp_path / "refused.log", **env).start()
    assert _exit_code(refused, within=30) == 2, refused.log_tail()
    assert f"do not exist: {topics.deadletter}" in refused.log_tail()

    asyncio.run(_create(proxied.direct, {topics.deadletter: False}))
    repaired = time.monotonic()
    worker = WorkerProcess(scenario, tmp_path / "w.log", **env).start()
    try:
        worker.wait_ready()
        assert_exact(scenario, messages)
        recovered = time.monotonic() - repaired
    finally:
        assert worker.stop() == 0, worker.log_tail()
    print(
        f"\nmissing dead-letter topic: refused to start; after creating it all exact in "
        f"{recovered:.1f}s; run {time.monotonic() - started:.1f}s"
    )
