"""Kafka tier: `service.outbox` hands records to a real producer a batch per partition, in
order, with each record's offset, partition and headers as a plain `send` would give them;
the producer's flush drains it first; a stopped producer fails the records, never drops them
silently. Changelog records reach the producer only after the records before them are
delivered, fail when one of those failed, and count towards a full outbox while they wait.
Records the producer's gate drops (`Fenced`) fail only the records of their generation, and
never the flush."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service import outbox
from service.broker import EmbeddedBroker
from service.fence import Fenced, SessionFence, gate_producer
from service.kafka import CachedPartitioner
from service.outbox import Outbox, settle_future
from service.storage import ChangelogSend
from service.worker import producer_changelog_send
from tests.kafka.harness import read_topic

pytestmark = pytest.mark.kafka


async def _change(
    send: ChangelogSend, topic: str, partition: int, key: bytes, value: bytes
) -> asyncio.Future[Any]:
    """A changelog record through the worker's changelog send -> a future of its metadata."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await send(topic, partition, key, value, settle_future(future))
    return future


async def _topic(bootstrap: str, partitions: int) -> str:
    name = f"outbox-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def test_records_arrive_in_order_where_a_send_would_put_them(
    broker: EmbeddedBroker,
) -> None:
    topic = await _topic(broker.bootstrap, 4)
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, linger_ms=5, partitioner=CachedPartitioner()
    )
    await producer.start()
    try:
        box = Outbox(lambda: producer)
        # More than FULL, keyed (the producer's partitioner decides), explicitly placed and
        # with headers, some large enough to need several batches per partition.
        sent: list[tuple[bytes, bytes, int | None, Any]] = []
        futures = []
        for n in range(outbox.FULL * 3):
            key = f"customer-{n % 37}".encode()
            value = (f"{n}:" + "x" * (4000 if n % 50 == 0 else 40)).encode()
            partition = 3 if n % 10 == 0 else None
            headers = [("n", str(n).encode())] if n % 7 == 0 else None
            sent.append((key, value, partition, headers))
            futures.append(box.add(topic, partition, key, value, headers))
        metadata = await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
        records = await read_topic(broker.bootstrap, topic, lambda r: len(r) >= len(sent))
    finally:
        await producer.stop()
    assert len(records) == len(sent)
    at = {(r.partition, r.offset): r for r in records}
    expected_partition = CachedPartitioner()
    for (key, value, partition, headers), meta in zip(sent, metadata, strict=True):
        record = at[(meta.partition, meta.offset)]  # the future tells where it went
        assert (record.key, record.value) == (key, value)
        assert list(record.headers) == list(headers or [])
        assert meta.partition == (
            partition if partition is not None else expected_partition(key, [0, 1, 2, 3], [])
        )
    for p in range(4):  # per partition, in the order they were added
        order = [int(r.value.split(b":")[0]) for r in sorted(records, key=lambda r: r.offset)
                 if r.partition == p]  # fmt: skip
        assert order == sorted(order)


async def test_the_producers_flush_and_stop_drain_the_outbox_first(broker: EmbeddedBroker) -> None:
    topic = await _topic(broker.bootstrap, 1)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        box = Outbox(lambda: producer)

        class FaustProducer:  # what the worker patches: Faust's producer, whose flush
            async def flush(self) -> None:  # waits for the aiokafka producer
                await producer.flush()

            async def on_stop(self) -> None:  # and whose stop stops it
                await producer.stop()

        faust_producer = FaustProducer()
        outbox.install(faust_producer, box)
        future = box.add(topic, 0, b"k", b"queued before the flush")
        await faust_producer.flush()  # what a commit awaits before it commits
        assert future.done()  # delivered, not merely handed over
        assert future.result().offset == 0
        late = box.add(topic, 0, b"k", b"queued after the last flush")
        await faust_producer.on_stop()
        assert late.done()
        assert late.result().offset == 1
    finally:
        await producer.stop()


async def test_a_stopped_producer_fails_the_records(broker: EmbeddedBroker) -> None:
    topic = await _topic(broker.bootstrap, 1)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    await producer.stop()
    box = Outbox(lambda: producer)
    futures = [box.add(topic, 0, b"k", f"{n}".encode()) for n in range(3)]
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the stopped producer raises
        await box.drain()
    for future in futures:
        assert future.done()
        assert future.exception() is not None


async def test_a_stage_waits_for_room_while_the_outbox_is_full(broker: EmbeddedBroker) -> None:
    """Back-pressure: a stage's send into a full outbox waits until its records are handed to
    the producer, then queues its own after them."""
    topic = await _topic(broker.bootstrap, 1)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        box = Outbox(lambda: producer)
        futures = [box.add(topic, 0, b"k", f"{n}".encode()) for n in range(outbox.MAX_PENDING)]
        assert box.full()  # nothing handed over yet: the loop has not run
        last = await _change(producer_changelog_send(box), topic, 0, b"k", b"after the wait")
        assert not box.full()
        metadata = await asyncio.wait_for(asyncio.gather(*futures, last), timeout=30)
        assert [m.offset for m in metadata] == list(range(outbox.MAX_PENDING + 1))
    finally:
        await producer.stop()


async def test_a_changelog_record_waits_for_the_delivery_of_the_records_before_it(
    broker: EmbeddedBroker,
) -> None:
    """`after_delivery`: each such record reaches the producer only once every record added
    before it is delivered, across partitions and hand-overs; in order."""
    topic = await _topic(broker.bootstrap, 4)
    changelog = await _topic(broker.bootstrap, 1)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
    await producer.start()
    outputs: list[asyncio.Future[Any]] = []
    before: list[int] = []  # for each changelog record, how many outputs were added before it
    too_early: list[int] = []  # changelog records handed over before those were delivered
    handed = 0
    send_batch = producer.send_batch

    async def watched(batch: Any, to: str, *, partition: int) -> Any:
        nonlocal handed
        if to == changelog:
            first_pending = next((n for n, f in enumerate(outputs) if not f.done()), None)
            for index in range(handed, handed + batch.record_count()):
                if first_pending is not None and before[index] > first_pending:
                    too_early.append(index)
            handed += batch.record_count()
        return await send_batch(batch, to, partition=partition)

    producer.send_batch = watched  # type: ignore[method-assign]
    try:
        box = Outbox(lambda: producer)
        send = producer_changelog_send(box)
        changes = []
        for n in range(outbox.FULL * 4):  # several hand-overs, some full
            outputs.append(box.add(topic, n % 4, b"k", f"{n}:".encode() + b"x" * (n % 300)))
            if n % 3 == 0:
                before.append(len(outputs))
                changes.append(await _change(send, changelog, 0, b"k", f"{n}".encode()))
            if n % 300 == 0:
                await asyncio.sleep(0.003)  # a hand-over happens in between
        await asyncio.wait_for(box.drain(), timeout=30)
        metadata = await asyncio.wait_for(asyncio.gather(*changes), timeout=30)
    finally:
        await producer.stop()
    assert handed == len(changes)
    assert too_early == []
    assert [m.offset for m in metadata] == list(range(len(changes)))  # in the order added


@asynccontextmanager
async def _stale_producer(
    bootstrap: str, *, rebalancing: bool | list[bool]
) -> AsyncIterator[tuple[AIOKafkaProducer, SessionFence]]:
    """A producer behind the worker's gate, whose session is stale: it holds what it is given
    (dropped with `Fenced` when `rebalancing`) until the fence is confirmed again."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    now = [0.0]
    fence = SessionFence(session_timeout=10, clock=lambda: now[0])
    fence.confirm()
    flag = rebalancing if isinstance(rebalancing, list) else [rebalancing]
    gate_producer(producer, fence, rebalancing=lambda: flag[0])
    now[0] = 11  # no heartbeat answered for a session timeout
    assert fence.stale()
    try:
        yield producer, fence
    finally:
        fence.confirm()  # a held producer would not stop
        await producer.stop()


async def test_a_changelog_record_after_a_dropped_output_is_dropped_too(
    broker: EmbeddedBroker,
) -> None:
    """An output dropped unsent (`Fenced`, by the producer's gate while the session is stale
    and the group rebalances) fails the changelog records added after it with the same error:
    never sent, though the session is confirmed again just after."""
    topic = await _topic(broker.bootstrap, 1)
    changelog = await _topic(broker.bootstrap, 1)
    async with _stale_producer(broker.bootstrap, rebalancing=True) as (producer, fence):
        box = Outbox(lambda: producer)
        output = box.add(topic, 0, b"k", b"output")
        send = producer_changelog_send(box)
        change = await _change(send, changelog, 0, b"k", b"change")
        await asyncio.wait((output,), timeout=10)
        fence.confirm()  # current again: whatever reaches the producer now is sent
        await asyncio.wait_for(box.drain(), timeout=10)
        assert isinstance(output.exception(), Fenced)
        assert isinstance(change.exception(), Fenced)
        after = await _change(send, changelog, 0, b"k", b"a later change")
        assert (await asyncio.wait_for(after, timeout=10)).offset == 0  # nothing before it


async def test_a_flush_that_meets_dropped_records_ends_without_raising(
    broker: EmbeddedBroker,
) -> None:
    """Two changelog hand-overs to one partition, the first held by the gate: the second
    waits in the producer for the first batch to go, and the gate drops that batch when the
    group rebalances. Both records are told `Fenced`, and the flush (which Faust awaits while
    partitions are revoked, and before every commit) returns: it raised `Fenced`, which
    crashed the worker (found by pausing a worker under 300 messages/s)."""
    changelog = await _topic(broker.bootstrap, 1)
    rebalancing = [False]
    async with _stale_producer(broker.bootstrap, rebalancing=rebalancing) as (producer, fence):
        box = Outbox(lambda: producer)
        send = producer_changelog_send(box)
        first = await _change(send, changelog, 0, b"k", b"first")
        await asyncio.sleep(0.05)  # handed over, and held by the gate
        second = await _change(send, changelog, 0, b"k", b"second")
        await asyncio.sleep(0.05)  # its hand-over waits for the first batch to leave
        rebalancing[0] = True
        await asyncio.wait_for(box.drain(), timeout=10)
        assert isinstance(first.exception(), Fenced)
        assert isinstance(second.exception(), Fenced)
        assert fence.dropped


async def test_once_assigned_again_a_change_does_not_wait_for_dropped_records(
    broker: EmbeddedBroker,
) -> None:
    """An output dropped (`Fenced`) with no changelog record behind it: once partitions are
    assigned again (`forget_fenced`), the next change is sent. Before, it failed with the
    error of the generation before, though its own message was acknowledged: the change was
    then only in the local store, discarded at the next rebalance."""
    topic = await _topic(broker.bootstrap, 1)
    changelog = await _topic(broker.bootstrap, 1)
    async with _stale_producer(broker.bootstrap, rebalancing=True) as (producer, fence):
        box = Outbox(lambda: producer)
        output = box.add(topic, 0, b"k", b"output")
        await asyncio.wait((output,), timeout=10)
        assert isinstance(output.exception(), Fenced)
        box.forget_fenced()
        fence.confirm()
        change = await _change(producer_changelog_send(box), changelog, 0, b"k", b"change")
        assert (await asyncio.wait_for(change, timeout=10)).offset == 0


async def test_records_waiting_for_delivery_count_towards_a_full_outbox(
    broker: EmbeddedBroker,
) -> None:
    """Back-pressure holds while the producer sends nothing (its session stale): changelog
    records waiting for an undelivered output fill the outbox, and a stage's next send waits
    until the output is delivered and they are handed over."""
    topic = await _topic(broker.bootstrap, 1)
    changelog = await _topic(broker.bootstrap, 1)
    async with _stale_producer(broker.bootstrap, rebalancing=False) as (producer, fence):
        box = Outbox(lambda: producer)
        output = box.add(topic, 0, b"k", b"output")
        send = producer_changelog_send(box)
        changes = [
            await _change(send, changelog, 0, b"k", f"{n}".encode()) for n in range(outbox.FULL)
        ]
        changes += [
            box.add(changelog, 0, b"k", f"{n}".encode(), after_delivery=True)
            for n in range(outbox.FULL, outbox.MAX_PENDING)
        ]
        await asyncio.sleep(0.05)  # handed over: the output to the producer, which holds it
        assert not box.records
        assert not box.later
        assert box.full()  # the changelog records wait for the output
        waiting = asyncio.ensure_future(_change(send, changelog, 0, b"k", b"after the wait"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        fence.confirm()
        last = await asyncio.wait_for(waiting, timeout=30)
        metadata = await asyncio.wait_for(asyncio.gather(output, *changes, last), timeout=30)
        assert [m.offset for m in metadata[1:]] == list(range(outbox.MAX_PENDING + 1))
