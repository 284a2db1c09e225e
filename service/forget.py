"""`cxpulse forget KEY`: a right-to-be-forgotten request, queued behind the events in flight."""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaProducer

from service.kafka import kafka_client_kwargs
from service.settings import Settings
from service.topics import Topics

FORGET_KEY = b"forget"


def forget_command(key: str) -> bytes:
    """Customer key -> the command the identity stage carries out."""
    return orjson.dumps({"t": "forget", "key": key})


async def request_forget(settings: Settings, key: str) -> None:
    """Publish a forget request for `key` to the identity stage's topic."""
    producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(settings))
    await producer.start()
    try:
        topic = Topics(settings.topic_prefix).identity_stream
        await producer.send_and_wait(topic, forget_command(key), key=FORGET_KEY)
    finally:
        await producer.stop()
