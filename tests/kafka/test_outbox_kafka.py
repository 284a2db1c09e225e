"""Kafka tier: `service.outbox` hands records to a real producer a batch per partition, in
order, with each record's offset, partition and headers as a plain `send` would give them;
the producer's flush drains it first; a stopped producer fails the records, never drops them
silently."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service import outbox
from service.broker import EmbeddedBroker
from service.kafka import CachedPartitioner
from service.outbox import Outbox
from service.worker import producer_changelog_send
from tests.kafka.harness import read_topic

pytestmark = pytest.mark.kafka


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
        send = producer_changelog_send(box)
        last = await send(topic, 0, b"k", b"after the wait")
        assert not box.full()
        metadata = await asyncio.wait_for(asyncio.gather(*futures, last), timeout=30)
        assert [m.offset for m in metadata] == list(range(outbox.MAX_PENDING + 1))
    finally:
        await producer.stop()
