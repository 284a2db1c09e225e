"""Kafka tier: a partition `service.pausing.apply` paused in a real aiokafka consumer is not
fetched, and is again once resumed."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faust.types import TP

from service import pausing
from service.broker import EmbeddedBroker

pytestmark = pytest.mark.kafka


async def _fetched(consumer: AIOKafkaConsumer, rounds: int = 5) -> dict[int, list[bytes]]:
    """A few fetches -> record values by partition."""
    seen: dict[int, list[bytes]] = {}
    for _ in range(rounds):
        batches = await consumer.getmany(timeout_ms=300)
        for tp, records in batches.items():
            seen.setdefault(tp.partition, []).extend(r.value or b"" for r in records)
    return seen


async def test_a_paused_partition_is_not_fetched_until_resumed(broker: EmbeddedBroker) -> None:
    name = f"pausing-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(name, 0), TopicPartition(name, 1)])
        await consumer.seek_to_beginning()
        # Faust's own partition type, and one partition not assigned (skipped, not refused)
        paused = pausing.apply(consumer, [TP(name, 1), TP(name, 5)], "pause")
        assert paused == [TopicPartition(name, 1)]
        assert consumer.paused() == {TopicPartition(name, 1)}
        for partition in (0, 1):
            await (await producer.send(name, b"v%d" % partition, partition=partition))
        assert await _fetched(consumer) == {0: [b"v0"]}
        pausing.apply(consumer, [TP(name, 1)], "resume")
        assert consumer.paused() == set()
        assert await _fetched(consumer) == {1: [b"v1"]}
    finally:
        await consumer.stop()
        await producer.stop()
