"""The Faust worker: agents that wire the pure stages to topics and state.

raw topics -> [ingest: parse, normalize] -> internal topic keyed by event id
           -> [accept: dedup, identity] -> cx.timeline
rejections -> cx.deadletter (original key and bytes, error headers)
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import Message
from prometheus_client import CollectorRegistry

from service.canonical import CHANNELS, Normalized, Source
from service.deadletter import deadletter_headers
from service.dedup import ExpiryIndex, Seen, classify
from service.http import HttpService, make_web_app
from service.identity import ProvisionalResolver, Resolver
from service.kafka import ssl_context
from service.normalize import normalize
from service.observability import Metrics
from service.parse import Limits, Rejected, parse
from service.settings import SecurityProtocol, Settings
from service.topics import Topics

log = logging.getLogger(__name__)


def exit_now(stage: str, exc: BaseException) -> None:
    """Log and end the process without committing: at-least-once, never a silent ack."""
    log.critical("fatal error in %s, stopping the worker: %r", stage, exc, exc_info=exc)
    logging.shutdown()
    os._exit(70)  # EX_SOFTWARE; a graceful stop would commit the failed message's offset


def ingest_one(
    channel: str,
    value: bytes | None,
    source: Source,
    limits: Limits,
    pii_key: bytes,
    now: datetime,
) -> Normalized | Rejected:
    """One raw message -> normalized event or rejection. Never raises: an unexpected error
    is a `processing_error` rejection, so the message still reaches the dead letters."""
    try:
        parsed = parse(channel, value, limits, now)
        if isinstance(parsed, Rejected):
            return parsed
        return normalize(parsed, source, pii_key)
    except Exception as exc:  # a bug must not lose the message: it becomes a dead letter
        log.exception("processing error", extra={"topic": source.topic, "offset": source.offset})
        return Rejected("processing_error", f"{type(exc).__name__} while processing")


_FETCH_WAIT_MS: weakref.WeakKeyDictionary[faust.App, int] = weakref.WeakKeyDictionary()


def _patch_fetch_wait() -> None:
    """Faust hard-codes fetch_max_wait_ms=1500 (over a second of latency on a quiet topic);
    give each consumer its app's CX_KAFKA_FETCH_MAX_WAIT instead."""
    thread = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(thread, "_cx_patched", False):
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = _FETCH_WAIT_MS.get(self.app, 1500)
        return consumer

    setattr(thread, "_create_worker_consumer", create)  # noqa: B010 - monkeypatch on purpose
    setattr(thread, "_cx_patched", True)  # noqa: B010


def _credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    protocol = settings.kafka_security_protocol
    context = ssl_context(settings)
    if protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL):
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            mechanism=settings.kafka_sasl_mechanism.value,
            ssl_context=context,
        )
    if protocol is SecurityProtocol.SSL:
        return faust.SSLCredentials(context)
    return None


def _faust_app(settings: Settings) -> faust.App:
    session = settings.kafka_session_timeout.total_seconds()
    app = faust.App(
        settings.consumer_group,
        broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
        store="rocksdb://",
        datadir=str(settings.data_dir),
        autodiscover=False,
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=session,
        broker_heartbeat_interval=max(0.5, session / 5),
        broker_rebalance_timeout=settings.kafka_rebalance_timeout.total_seconds(),
        broker_commit_interval=1.0,
        producer_acks=-1,
        producer_linger=0.005,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        table_standby_replicas=0,
        recovery_consistency_check=settings.recovery_consistency_check,
    )
    _FETCH_WAIT_MS[app] = int(settings.kafka_fetch_max_wait.total_seconds() * 1000)
    return app


def _raw_topic(app: faust.App, *names: str, partitions: int | None = None) -> faust.TopicT:
    """Topic(s) whose keys and values are passed through as bytes."""
    return app.topic(
        *names,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
        internal=partitions is not None,
    )


@dataclass
class Worker:
    """A configured Faust app with its agents, topics, dedup state, metrics and readiness."""

    settings: Settings
    app: faust.App
    metrics: Metrics
    registry: CollectorRegistry
    topics: Topics
    raw_topic: faust.TopicT
    accepted_topic: faust.TopicT
    timeline_topic: faust.TopicT
    deadletter_topic: faust.TopicT
    dedup_table: Any
    agents: dict[str, faust.types.AgentT[Any]] = field(default_factory=dict)
    indexes: dict[int, dict[str, ExpiryIndex]] = field(default_factory=dict)
    assigned_once: bool = False

    def ready(self) -> bool:
        """Partitions assigned, not rebalancing, table state recovered."""
        app = self.app
        ok = (
            self.assigned_once
            and not app.rebalancing
            and cast(Any, app.tables).recovery.completed.is_set()
        )
        self.metrics.ready.set(1 if ok else 0)
        return ok

    def http_service(self) -> HttpService:
        web_app = make_web_app(self.registry, self.ready)
        return HttpService(web_app, self.settings.http_host, self.settings.http_port)

    def source_partitions(self, topic: str) -> int:
        """How many partitions a raw topic has (0 while unknown), from cluster metadata."""
        try:
            return int(self.app.consumer.topic_partitions(topic) or 0)
        except Exception:  # no consumer yet (agent tests): count unknown, expiry waits
            return 0

    def index_for(self, partition: int, channel: str) -> ExpiryIndex:
        """The expiry order of one channel's ids in one dedup partition. Each channel has its
        own watermark: the four raw topics are read at different paces, and one channel
        running ahead must not expire another's ids. Rebuilt from the table after assignment."""
        indexes = self.indexes.get(partition)
        if indexes is None:
            horizon_ms = int(self.settings.dedup_horizon.total_seconds() * 1000)
            indexes = {
                name: ExpiryIndex(horizon_ms, self.settings.dedup_max_ids) for name in CHANNELS
            }
            for key, value in self.dedup_table.items():
                seen = Seen.from_json(value)
                event_id = key.decode() if isinstance(key, bytes) else key
                if seen.partition == partition:
                    indexes[event_id.partition(":")[0]].restore(event_id, seen)
            self.indexes[partition] = indexes
        return indexes[channel]


def build_worker(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    resolver: Resolver | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    on_fatal: Callable[[str, BaseException], None] | None = None,
) -> Worker:
    """Settings -> a Worker whose app is ready to run (nothing is started).

    `on_fatal(stage, exc)` is called when a message cannot be processed nor dead-lettered
    (a bug, or an output that could not be published); by default it ends the process at once
    so that the message's offset is never committed and it is read again after a restart."""
    if on_fatal is None:
        on_fatal = exit_now
    _patch_fetch_wait()
    registry = registry or CollectorRegistry()
    resolver = resolver or ProvisionalResolver()
    metrics = Metrics(registry)
    topics = Topics(settings.topic_prefix)
    pii_key = settings.require_pii_key()
    limits = Limits(settings.max_payload_bytes, settings.max_clock_skew)
    app = _faust_app(settings)
    worker = Worker(
        settings=settings,
        app=app,
        metrics=metrics,
        registry=registry,
        topics=topics,
        raw_topic=_raw_topic(app, *topics.raw_topics),
        accepted_topic=_raw_topic(app, topics.accepted, partitions=settings.partitions),
        timeline_topic=_raw_topic(app, topics.timeline),
        deadletter_topic=_raw_topic(app, topics.deadletter),
        dedup_table=app.Table(
            "dedup",
            partitions=settings.partitions,
            schema=faust.Schema(key_serializer="raw", value_serializer="json"),
        ),
    )
    dedup_table = worker.dedup_table

    def on_sent(fut: asyncio.Future[Any]) -> None:
        # A lost output must stop the worker before it commits past the input.
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            on_fatal("publish", exc)

    async def publish(
        topic: faust.TopicT,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        fut: Any = await topic.send(key=key, value=value, headers=headers)
        fut.add_done_callback(on_sent)

    def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        worker.assigned_once = True

    def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        worker.indexes.clear()

    app.on_partitions_assigned.connect(on_assigned)
    app.on_partitions_revoked.connect(on_revoked)

    async def handle_raw(message: Message) -> None:
        """Raw message -> internal accepted topic, or the dead letters."""
        channel = topics.raw_topics[message.topic]
        metrics.consumed.labels(channel=channel).inc()
        source = Source(topic=message.topic, partition=message.partition, offset=message.offset)
        outcome = ingest_one(channel, message.value, source, limits, pii_key, clock())
        if isinstance(outcome, Rejected):
            headers = deadletter_headers(
                outcome, message.topic, message.partition, message.offset, clock()
            )
            await publish(worker.deadletter_topic, message.key, message.value, headers)
            metrics.deadletters.labels(channel=channel, reason=outcome.reason).inc()
        else:
            event_id = outcome.touchpoint.event_id.encode()
            await publish(worker.accepted_topic, event_id, outcome.model_dump_json().encode())

    async def handle_accepted(message: Message) -> None:
        """Normalized event -> dedup -> identity -> cx.timeline."""
        normalized = Normalized.model_validate_json(message.value or b"")
        touchpoint = normalized.touchpoint
        channel = touchpoint.channel
        index = worker.index_for(message.partition, channel)
        src = touchpoint.source
        occurred_ms = int(touchpoint.occurred_at.timestamp() * 1000)
        index.advance(src.partition, occurred_ms, worker.source_partitions(src.topic))
        for event_id, why in index.expired():
            dedup_table.pop(event_id, None)
            metrics.dedup_evictions.labels(reason=why).inc()
        metrics.dedup_ids.set(sum(len(i) for p in worker.indexes.values() for i in p.values()))
        ref = (src.topic, src.partition, src.offset)
        current = dedup_table.get(touchpoint.event_id)
        decision = classify(None if current is None else Seen.from_json(current), ref)
        if decision == "duplicate":
            metrics.duplicates.labels(channel=channel).inc()
            return
        if decision == "new":
            expires = index.remember(touchpoint.event_id, occurred_ms)
            dedup_table[touchpoint.event_id] = Seen(expires, ref, message.partition).to_json()
            metrics.accepted.labels(channel=channel).inc()
        else:
            metrics.replayed.labels(channel=channel).inc()
        key = resolver.resolve(normalized.identifiers)
        if key != touchpoint.customer_key:
            touchpoint = touchpoint.model_copy(update={"customer_key": key})
        await publish(worker.timeline_topic, key.encode(), touchpoint.model_dump_json().encode())

    def agent(stage: str, handle: Callable[[Message], Awaitable[None]]) -> Any:
        async def run(stream: faust.StreamT[bytes]) -> None:
            async for event in stream.events():
                try:
                    await handle(event.message)
                except Exception as exc:  # every failure ends in on_fatal, never in an ack
                    on_fatal(stage, exc)
                    # Never move on: Faust would ack this message and commit past it.
                    await asyncio.Event().wait()

        run.__name__ = run.__qualname__ = stage
        return run

    worker.agents = {
        "ingest": app.agent(worker.raw_topic, name="ingest")(agent("ingest", handle_raw)),
        "accept": app.agent(worker.accepted_topic, name="accept")(agent("accept", handle_accepted)),
    }
    return worker
