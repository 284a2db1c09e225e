"""`cxpulse dlq replay`: dead letters -> back to the raw topic they came from."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.deadletter import HEADER_REASON, HEADER_TOPIC, read_headers
from service.kafka import kafka_client_kwargs
from service.settings import Settings
from service.topics import Topics

log = logging.getLogger(__name__)

REPLAY_HEADER = "cx.replay.of"


@dataclass
class ReplayReport:
    replayed: int = 0
    skipped: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


async def replay(
    settings: Settings,
    *,
    reasons: frozenset[str] | None = None,
    from_beginning: bool = False,
    idle_seconds: float = 3.0,
    dry_run: bool = False,
) -> ReplayReport:
    """Re-publish dead letters not yet replayed (tracked by a consumer group) to their source
    topic, unchanged, optionally only those with one of `reasons`. Returns what was done."""
    topics = Topics(settings.topic_prefix)
    raw_topics = set(topics.raw_topics)
    group = f"{settings.consumer_group}-dlq-replay"
    consumer = AIOKafkaConsumer(
        topics.deadletter,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=200,
        session_timeout_ms=int(settings.kafka_session_timeout.total_seconds() * 1000),
        heartbeat_interval_ms=int(settings.kafka_session_timeout.total_seconds() * 200),
        **kafka_client_kwargs(settings),
    )
    producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(settings))
    report = ReplayReport()
    await consumer.start()
    await producer.start()
    try:
        if from_beginning:
            await _wait_for_assignment(consumer)
            await consumer.seek_to_beginning()
        idle_since = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - idle_since < idle_seconds:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            if not any(batches.values()):
                continue
            idle_since = asyncio.get_running_loop().time()
            sends = []
            for records in batches.values():
                for record in records:
                    headers = read_headers(list(record.headers))
                    target = headers.get(HEADER_TOPIC)
                    wanted = reasons is None or headers.get(HEADER_REASON) in reasons
                    if target not in raw_topics or not wanted:
                        report.skipped += 1
                        continue
                    report.replayed += 1
                    report.by_topic[target] = report.by_topic.get(target, 0) + 1
                    if not dry_run:
                        marker = f"{record.partition}:{record.offset}".encode()
                        sends.append(
                            await producer.send(
                                target,
                                record.value,
                                key=record.key,
                                headers=[(REPLAY_HEADER, marker)],
                            )
                        )
            # Commit only what has been delivered, so an interrupted replay resumes exactly.
            await asyncio.gather(*sends)
            if not dry_run:
                await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()
    log.info("dlq replay done: %s", report)
    return report


async def _wait_for_assignment(consumer: AIOKafkaConsumer) -> set[TopicPartition]:
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
    return set(consumer.assignment())
