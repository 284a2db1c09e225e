"""Kafka client configuration from Settings: security options and topic creation."""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner

from service.settings import SecurityProtocol, Settings
from service.topics import Topics

log = logging.getLogger(__name__)


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


@functools.lru_cache(maxsize=256)
def _words(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


def murmur2(data: bytes) -> int:
    """Key bytes -> Kafka's murmur2 hash (the Java client's `Utils.murmur2`, unsigned).

    aiokafka's own is the same steps a byte at a time in pure Python; this reads the 4-byte
    words at once: a 36-byte key (an event id) in 2.9 µs instead of 6.0 to 6.4 µs here."""
    length = len(data)
    h = 0x9747B28C ^ length
    whole = length & ~3
    for k in _words(length >> 2).unpack_from(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra == 3:
        h ^= data[whole + 2] << 16
    if extra >= 2:
        h ^= data[whole + 1] << 8
    if extra:
        h = ((h ^ data[whole]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


class CachedPartitioner:
    """Kafka's default partitioner (murmur2 of the key bytes, as the Java client) that
    remembers the hashes of the last `size` keys: the same customer keys come back on
    several outputs per event."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._hash = functools.lru_cache(maxsize=size)(murmur2)
        self._default = DefaultPartitioner()

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(self._default(key, all_partitions, available))
        if len(all_partitions) == 1:  # what any hash gives: no hash (the single-partition stages)
            return all_partitions[0]
        hashed: int = self._hash(key)
        return all_partitions[(hashed & 0x7FFFFFFF) % len(all_partitions)]


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Settings -> a TLS context for SSL / SASL_SSL, else None."""
    if settings.kafka_security_protocol not in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL):
        return None
    password = settings.kafka_ssl_key_password
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
        certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
        keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        password=password.get_secret_value() if password else None,
    )
    context.check_hostname = settings.kafka_ssl_check_hostname
    return context


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Settings -> the connection and security keyword arguments of any aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol.value,
    }
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol in (
        SecurityProtocol.SASL_PLAINTEXT,
        SecurityProtocol.SASL_SSL,
    ):
        password = settings.kafka_sasl_password
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism.value
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    return kwargs


@contextlib.asynccontextmanager
async def _admin(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client for the configured cluster, closed on exit."""
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the contract's topics that do not exist yet -> the names created."""
    topics = Topics(settings.topic_prefix)
    async with _admin(settings) as admin:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name,
                settings.partitions,
                settings.replication_factor,
                topic_configs={"cleanup.policy": "compact"} if compacted else {},
            )
            for name, compacted in topics.contract_topics().items()
            if name not in existing
        ]
        if missing:
            await admin.create_topics(missing)
            log.info("created topics", extra={"topics": [topic.name for topic in missing]})
        return [topic.name for topic in missing]


async def missing_outputs(settings: Settings) -> list[str]:
    """The contract topics the worker writes (all but the raw ones) that the cluster lacks."""
    topics = Topics(settings.topic_prefix)
    async with _admin(settings) as admin:
        existing = set(await admin.list_topics())
    return [
        name
        for name in topics.contract_topics()
        if name not in topics.raw_topics and name not in existing
    ]
