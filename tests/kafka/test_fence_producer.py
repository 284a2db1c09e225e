"""Kafka tier: `service.fence.gate_producer` holds a real producer's records while the session
is stale, sends them once it is confirmed, and drops them once the group rebalances."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from service.broker import EmbeddedBroker
from service.fence import Fenced, SessionFence, gate_producer
from tests.kafka.harness import read_topic
from tests.unit.test_fence import Clock

pytestmark = pytest.mark.kafka


async def _values(bootstrap: str, topic: str, within: float) -> list[bytes | None]:
    return [r.value for r in await read_topic(bootstrap, topic, lambda r: False, within)]


async def test_held_while_stale_then_sent_or_dropped(broker: EmbeddedBroker) -> None:
    topic = f"fence-{uuid.uuid4().hex[:8]}"
    clock = Clock()
    fence = SessionFence(1.0, clock)
    fence.confirm()
    rebalancing = False
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        dropped = gate_producer(producer, fence, lambda: rebalancing)
        # A current session sends at once.
        await (await producer.send(topic, b"current", partition=0))
        clock.now += 5  # no heartbeat answered for a session timeout: stale
        held = await producer.send(topic, b"held", partition=0)
        await asyncio.sleep(0.5)
        assert not held.done()
        assert await _values(broker.bootstrap, topic, within=1) == [b"current"]
        fence.confirm()  # answered again: what was held goes out
        await asyncio.wait_for(held, timeout=5)
        clock.now += 5
        late = await producer.send(topic, b"late", partition=0)
        await asyncio.sleep(0.2)
        rebalancing = True  # replaced meanwhile: what it holds is dropped
        with pytest.raises(Fenced):
            await asyncio.wait_for(late, timeout=5)
        assert dropped() == 1
        fence.confirm()
        rebalancing = False
        await producer.send_and_wait(topic, b"after", partition=0)
        assert await _values(broker.bootstrap, topic, within=2) == [b"current", b"held", b"after"]
    finally:
        await producer.stop()
