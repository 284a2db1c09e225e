"""The Faust worker: agents that wire the pure stages to topics and state.

raw topics -> [ingest: parse, normalize] -> internal topic keyed by event id
           -> [accept: dedup, identity] -> cx.timeline
rejections -> cx.deadletter (original key and bytes, error headers)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import faust
import orjson
from faust.sensors.monitor import Monitor
from faust.transport.consumer import Consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import Message
from mode import ServiceT
from prometheus_client import CollectorRegistry

from service import assignor, delivery, handoff, pausing, yielding
from service.alerts import alerts_for
from service.canonical import (
    CHANNELS,
    Arrival,
    IdentityMerge,
    Normalized,
    Routed,
    Source,
    epoch_ms,
)
from service.deadletter import deadletter_headers
from service.dedup import ExpiryIndex, Seen, classify
from service.delivery import mark_handled
from service.fence import Fenced, SessionFence, gate_producer, register
from service.forget import FORGET_KEY, forget_command
from service.http import HttpService, ShutdownWatchdog, make_web_app
from service.identity import FiledKeys, IdentityGraph
from service.kafka import CachedPartitioner, kafka_client_kwargs, ssl_context
from service.logs import logging_config
from service.metrics_stage import MetricsState, metrics_key, wire_metrics
from service.normalize import normalize
from service.observability import Metrics
from service.outbox import Done, Headers, Outbox, settle_future
from service.outbox import install as install_outbox
from service.parse import Limits, Rejected, parse
from service.profile import profile, profile_json
from service.settings import SecurityProtocol, Settings
from service.storage import (
    BufferedTable,
    ChangelogSend,
    flush_changelogs,
    json_table,
    recover_to_true_ends,
    text_key,
)
from service.timeline import Bounds, Holdings, Record, absorb, add_event, as_filed
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


_PARTITIONER = CachedPartitioner()
# A dead letter carries the original record unchanged, so the producer must take any record the
# broker accepted on a raw topic: the broker's size limits decide, not a client-side one. (With
# Faust's default of 1 MB a larger raw record stopped the worker at every restart.)
MAX_REQUEST_BYTES = 2**31 - 1  # the Kafka protocol's own bound (int32)
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


class QuietMonitor(Monitor):
    """Faust's monitor without its per-message statistics (nothing here reads them; the
    service's own metrics are in Prometheus): it keeps only when each partition's stream last
    took an event, which Faust's slow-processing warnings compare against."""

    def on_message_in(self, tp: TP, offset: int, message: Message) -> None:
        return None

    def on_stream_event_in(self, tp: TP, offset: int, stream: Any, event: Any) -> None:
        self.stream_inbound_time[tp] = time.monotonic()

    def on_stream_event_out(
        self, tp: TP, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        return None

    def on_send_initiated(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_send_completed(self, *args: Any, **kwargs: Any) -> None:
        return None


def _faust_app(settings: Settings) -> faust.App:
    session = settings.kafka_session_timeout.total_seconds()
    app = faust.App(
        settings.consumer_group,
        # Faust would read unprefixed variables (WEB_PORT, TOPIC_PARTITIONS, ...) over these
        # arguments: a Kubernetes service named "web" (WEB_PORT=tcp://...) stopped the start.
        env={},
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
        producer_linger=0.0,  # the outbox batches (service/outbox.py)
        producer_max_request_size=MAX_REQUEST_BYTES,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        table_standby_replicas=0,
        recovery_consistency_check=settings.recovery_consistency_check,
        canonical_url=settings.advertised_url,
        monitor=QuietMonitor(),
        producer_partitioner=_PARTITIONER,
        PartitionAssignor=assignor.SpreadAssignor,
    )
    _FETCH_WAIT_MS[app] = int(settings.kafka_fetch_max_wait.total_seconds() * 1000)
    return app


class RawSchema(faust.Schema[bytes | None, bytes | None]):
    """Keys and values as the bytes read. Faust's decoder went through its codec registry for
    each (a lookup, two calls and a copy per key and value) to get the same bytes back, on
    every record of every stage; the stages read `event.message` in any case."""

    def compile(
        self,
        app: faust.types.AppT,
        *,
        on_key_decode_error: Any = None,
        on_value_decode_error: Any = None,
        default_propagate: bool = False,
    ) -> Callable[..., Awaitable[Any]]:
        # What `app.create_event` does, without its lookup of the class in the app's settings
        # at every record (about 0.7 % of the worker's samples).
        event_class: Any = app.conf.Event

        async def decode(message: Message, *, propagate: bool = default_propagate) -> Any:
            return event_class(app, message.key, message.value, message.headers, message)

        return decode


def _raw_topic(app: faust.App, *names: str, partitions: int | None = None) -> faust.TopicT:
    """Topic(s) whose keys and values are passed through as bytes."""
    return app.topic(
        *names,
        schema=RawSchema(key_serializer="raw", value_serializer="raw"),
        partitions=partitions,
        internal=partitions is not None,
    )


# (topic, key, value, headers, told how the record ended), once the record is in the outbox
Send = Callable[[faust.TopicT, bytes | None, bytes | None, Headers, Done], Awaitable[None]]


def producer_send(outbox: Outbox) -> Send:
    """An outbox -> a Send into it (a batch per partition to the producer, `service.outbox`).
    Faust's `Topic.send` costs about 120 µs a record here (futures, sensors, buffering), the
    producer's `send` about 15 µs, a record in the outbox a few. The commit flushes the
    producer, which drains the outbox first, so every record sent for an event is delivered
    before its offset is committed."""

    async def send(
        topic: faust.TopicT, key: bytes | None, value: bytes | None, headers: Headers, done: Done
    ) -> None:
        await outbox.put(topic.get_topic_name(), None, key, value, headers, done)

    return send


def producer_changelog_send(outbox: Outbox) -> ChangelogSend:
    """An outbox -> a ChangelogSend into it (see `BufferedTable`), sent only once the records
    before it are delivered: a change is never on its changelog while its outputs may be
    lost (`service.outbox`)."""

    async def send(topic: str, partition: int, key: bytes, value: bytes | None, done: Done) -> None:
        await outbox.put(topic, partition, key, value, None, done, after_delivery=True)

    return send


@dataclass
class Worker:
    """A configured Faust app with its agents, topics, state, metrics and readiness."""

    settings: Settings
    app: faust.App
    metrics: Metrics
    registry: CollectorRegistry
    topics: Topics
    raw_topic: faust.TopicT
    accepted_topic: faust.TopicT
    identity_stream: faust.TopicT
    customer_stream: faust.TopicT
    timeline_topic: faust.TopicT
    deadletter_topic: faust.TopicT
    identity_out: faust.TopicT
    profiles_topic: faust.TopicT
    alerts_topic: faust.TopicT
    metrics_stream: faust.TopicT
    partials_stream: faust.TopicT
    metrics_topic: faust.TopicT
    dedup_table: Any
    identity_table: Any
    customers_table: Any
    fence: SessionFence
    send: Send
    send_changelog: ChangelogSend
    agents: dict[str, faust.types.AgentT[Any]] = field(default_factory=dict)
    metrics_state: MetricsState = field(default_factory=MetricsState)
    holdings: Holdings = field(default_factory=Holdings)  # counts of the local customer records
    partials_table: Any = None
    tables: list[BufferedTable] = field(default_factory=list)  # every table, once declared
    indexes: dict[int, dict[str, ExpiryIndex]] = field(default_factory=dict)
    assigned_once: bool = False
    broker_up: bool = True
    latest_ms: int = 0  # newest event time this worker has filed on a customer
    watermarks: dict[str, int] = field(default_factory=dict)  # channel -> newest accepted ms

    def ready(self) -> bool:
        """Partitions assigned, not rebalancing, table state recovered, broker reachable."""
        recovered = cast(Any, self.app.tables).recovery.completed.is_set()
        ok = self.assigned_once and not self.app.rebalancing and recovered and self.broker_up
        self.metrics.ready.set(1 if ok else 0)
        return ok

    def http_service(self) -> HttpService:
        web_app = make_web_app(self.registry, self.ready, CustomerReads(self), SnapshotReads(self))
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
                event_id = text_key(key)
                if seen.partition == partition:
                    indexes[event_id.partition(":")[0]].restore(event_id, seen)
            self.indexes[partition] = indexes
        return indexes[channel]

    def owner_url(self, key: str) -> str | None:
        """Base URL of the worker holding a customer key, or None when it is this one.

        The key's partition is the producer's (murmur2 of the key bytes, as Kafka's default
        partitioner); its owner comes from the assignment every member shares."""
        partitions = self.source_partitions(self.topics.customer_stream) or self.settings.partitions
        partition = _PARTITIONER(key.encode(), list(range(partitions)), list(range(partitions)))
        return self.table_owner(self.customers_table, partition)

    def table_owner(self, table: Any, partition: int) -> str | None:
        """Base URL of the worker that owns one partition of a table, None when this one (or
        while nobody does)."""
        changelog = table.changelog_topic.get_topic_name()
        assignor = cast(Any, self.app.assignor)
        for url, topics in assignor.changelog_distribution.items():
            if partition in topics.get(changelog, ()):
                owner = str(url).rstrip("/")
                return None if owner == self.settings.advertised_url.rstrip("/") else owner
        return None  # not assigned yet: answered locally (a 404 rather than a loop)

    def record(self, key: str) -> Record | None:
        """The local customer record of a key (outside an agent: any local partition)."""
        value = self.customers_table.get(key)
        return None if value is None else cast(Record, value)


class SnapshotReads:
    """What the HTTP layer needs to answer GET /v1/metrics."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def owner_url(self) -> str | None:
        return self.worker.table_owner(self.worker.partials_table, 0)

    def snapshots(self) -> list[dict[str, Any]]:
        latest = self.worker.metrics_state.latest
        return [latest[key].model_dump(mode="json") for key in sorted(latest)]


class CustomerReads:
    """What the HTTP layer needs from a worker to answer customer queries."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def owner_url(self, key: str) -> str | None:
        return self.worker.owner_url(key)

    def record(self, key: str) -> Record | None:
        return self.worker.record(key)

    def profile(self, key: str, record: Record, now_ms: int) -> dict[str, Any]:
        state = record["profile"]
        view = profile(key, state, int(record["aliases"]), max(now_ms, state["last"] or 0))
        return view.model_dump(mode="json")

    async def forget(self, key: str) -> None:
        await forget_request(self.worker, key)

    @property
    def delete_enabled(self) -> bool:
        return self.worker.settings.http_delete_enabled


async def forget_request(worker: Worker, key: str) -> None:
    """Queue a right-to-be-forgotten request behind every event already on its way (the
    stages' records wait in the outbox: sent past it, it could overtake them)."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    command = forget_command(key)
    await worker.send(worker.identity_stream, FORGET_KEY, command, None, settle_future(future))
    await future


def transport(settings: Settings) -> tuple[faust.App, Outbox]:
    """Settings -> the Faust app a worker runs on, with the service's patches to Faust and
    aiokafka installed and its producer behind an outbox (nothing is started). The bench's
    transport floor (`service/floor.py`) runs on the same."""
    _patch_fetch_wait()
    delivery.install()
    handoff.install()
    pausing.install()
    yielding.install()
    app = _faust_app(settings)
    outbox = Outbox(lambda: cast(Any, app.producer)._ensure_producer())
    install_outbox(app.producer, outbox)
    return app, outbox


def build_worker(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    on_fatal: Callable[[str, BaseException], None] | None = None,
) -> Worker:
    """Settings -> a Worker whose app is ready to run (nothing is started).

    `on_fatal(stage, exc)` is called when a message cannot be processed nor dead-lettered
    (a bug, or an output that could not be published); by default it ends the process at once
    so that the message's offset is never committed and it is read again after a restart."""
    if on_fatal is None:
        on_fatal = exit_now
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry)
    topics = Topics(settings.topic_prefix)
    pii_key = settings.require_pii_key()
    limits = Limits(settings.max_payload_bytes, settings.max_clock_skew)
    bounds = Bounds(settings.timeline_max_events, settings.timeline_max_age)
    app, outbox = transport(settings)
    recover_to_true_ends(app, kafka_client_kwargs(settings))

    worker = Worker(
        settings=settings,
        app=app,
        metrics=metrics,
        registry=registry,
        topics=topics,
        raw_topic=_raw_topic(app, *topics.raw_topics),
        accepted_topic=_raw_topic(app, topics.accepted, partitions=settings.partitions),
        identity_stream=_raw_topic(app, topics.identity_stream, partitions=1),
        customer_stream=_raw_topic(app, topics.customer_stream, partitions=settings.partitions),
        timeline_topic=_raw_topic(app, topics.timeline),
        deadletter_topic=_raw_topic(app, topics.deadletter),
        identity_out=_raw_topic(app, topics.identity),
        profiles_topic=_raw_topic(app, topics.profiles),
        alerts_topic=_raw_topic(app, topics.alerts),
        metrics_stream=_raw_topic(app, topics.metrics_stream, partitions=settings.partitions),
        partials_stream=_raw_topic(app, topics.partials_stream, partitions=1),
        metrics_topic=_raw_topic(app, topics.metrics),
        dedup_table=json_table(app, "dedup", settings.partitions),
        identity_table=json_table(app, "identity", 1),
        customers_table=json_table(app, "customers", settings.partitions),
        fence=SessionFence(settings.kafka_session_timeout.total_seconds()),
        send=producer_send(outbox),
        send_changelog=producer_changelog_send(outbox),
    )
    fence = worker.fence
    register(app, settings.consumer_group, fence)
    dedup_table = worker.dedup_table
    customers = worker.customers_table
    graph = IdentityGraph(StrKeys(worker.identity_table))
    filed_keys = FiledKeys(StrKeys(worker.identity_table))

    def publish_failed(exc: BaseException) -> None:
        # A lost output or changelog record must stop the worker before it commits past the
        # input.
        metrics.processing_errors.labels(stage="publish").inc()
        on_fatal("publish", exc)

    def on_sent(_first: Any, _n: int, exc: BaseException | None) -> None:
        # Fenced: dropped unsent by the producer's gate; its message is read again.
        if exc is not None and not isinstance(exc, Fenced):
            publish_failed(exc)

    def rebalancing() -> bool:
        return bool(app.rebalancing or app.should_stop)

    async def publish(
        topic: faust.TopicT,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        if fence.stale():  # possibly replaced: write nothing until confirmed (or released)
            await fence.wait_current(rebalancing)
        await worker.send(topic, key, value, headers, on_sent)

    def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        if not worker.assigned_once:  # the producer has started: hold its records when stale
            gate_producer(cast(Any, app.producer)._ensure_producer(), fence, rebalancing)
        worker.assigned_once = True
        worker.holdings.known = False  # other partitions, recovered from their changelogs
        if fence.dropped:
            # Records of the generation before were dropped: none of its acknowledgements
            # may be committed (those messages are read again), nor its failures fail the
            # records of this one.
            delivery.forget_acks(cast(Consumer, app.consumer))
            outbox.forget_fenced()
            fence.dropped = False
        fence.confirm()  # a group just synced: the session is current

    def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        worker.holdings.known = False
        worker.indexes.clear()
        filed_keys.reset()

    app.on_partitions_assigned.connect(on_assigned)
    app.on_partitions_revoked.connect(on_revoked)

    async def handle_raw(message: Message) -> None:
        """Raw message -> internal accepted topic, or the dead letters."""
        channel = topics.raw_topics[message.topic]
        metrics.consumed.labels(channel=channel).inc()
        source = Source(topic=message.topic, partition=message.partition, offset=message.offset)
        received = clock()
        outcome = ingest_one(channel, message.value, source, limits, pii_key, received)
        if isinstance(outcome, Rejected):
            headers = deadletter_headers(
                outcome, message.topic, message.partition, message.offset, clock()
            )
            await publish(worker.deadletter_topic, message.key, message.value, headers)
            metrics.deadletters.labels(channel=channel, reason=outcome.reason).inc()
            if outcome.reason == "processing_error":
                metrics.processing_errors.labels(stage="ingest").inc()
        else:
            outcome = outcome.model_copy(update={"received_at_ms": epoch_ms(received)})
            event_id = outcome.touchpoint.event_id.encode()
            await publish(worker.accepted_topic, event_id, outcome.model_dump_json().encode())

    async def handle_accepted(message: Message) -> None:
        """Normalized event -> dedup -> the identity stage (duplicates stop here)."""
        arrival = Arrival.model_validate_json(message.value or b"")
        touchpoint = arrival.touchpoint
        channel = touchpoint.channel
        index = worker.index_for(message.partition, channel)
        src = touchpoint.source
        occurred_ms = epoch_ms(touchpoint.occurred_at)
        index.advance(src.partition, occurred_ms, worker.source_partitions(src.topic))
        for event_id, why in index.expired():
            dedup_table.pop(event_id, None)
            metrics.dedup_evictions.labels(reason=why).inc()
        ref = (src.topic, src.partition, src.offset)
        current = dedup_table.get(touchpoint.event_id)
        decision = classify(None if current is None else Seen.from_json(current), ref)
        if decision == "duplicate":
            metrics.duplicates.labels(channel=channel).inc()
            return
        if decision == "new":
            worker.watermarks[channel] = max(worker.watermarks.get(channel, 0), occurred_ms)
            expires = index.remember(touchpoint.event_id, occurred_ms)
            dedup_table[touchpoint.event_id] = Seen(expires, ref, message.partition).to_json()
            metrics.accepted.labels(channel=channel).inc()
        else:
            metrics.replayed.labels(channel=channel).inc()
        if arrival.placeholders:
            metrics.identity_placeholders.labels(channel=channel).inc(arrival.placeholders)
        await publish(worker.identity_stream, message.key, message.value)

    async def to_customer(key: str, command: dict[str, Any]) -> None:
        await publish(worker.customer_stream, key.encode(), orjson.dumps(command))

    async def handle_identity(message: Message) -> None:
        """Event -> its customer key (linking its identifiers), merges -> cx.identity;
        forget requests -> removed from the graph."""
        document = orjson.loads(message.value or b"{}")
        if document.get("t") == "forget":
            key = str(document["key"])
            forgotten = graph.forget(key)
            targets = {key} if forgotten is None else {key, forgotten.key, *forgotten.aliases}
            filed_keys.forget(targets)
            for target in sorted(targets):
                await to_customer(target, {"t": "forget"})
            metrics.forgotten.inc()
            log.info("customer forgotten", extra={"aliases": len(targets) - 1})
            return
        routed = Routed.model_validate(document, strict=False)  # JSON: its arrays are lists
        touchpoint = routed.touchpoint
        event_id = str(touchpoint["event_id"])
        key = str(touchpoint["customer_key"])
        merged: list[str] = []
        if routed.identifiers and filed_keys.forgotten(event_id):
            # A copy read again after a crash, from before the forget (a stage upstream
            # re-sends what it had not committed): linking it would bring the person back.
            metrics.forgotten_replays.inc()
            return
        if routed.identifiers:
            resolution = graph.link(routed.identifiers, event_id)
            key, merged = resolution.key, resolution.merges
            metrics.identity_merges.inc(len(merged))
            if resolution.refused:
                metrics.identity_refused.inc(resolution.refused)
                log.warning(
                    "refused to merge customers with different customer_ids",
                    extra={"event_id": event_id, "refused": resolution.refused},
                )
            # A replay of the linking event re-sends its merges: the first sending may not
            # have reached the customer stage before a crash (absorbing twice is harmless).
            merged = merged or graph.merges_by(key, event_id, resolution.aliases)
        for alias in merged:
            await to_customer(alias, {"t": "merge", "into": key})
            announcement = IdentityMerge(
                alias=alias,
                customer_key=key,
                merged_at=datetime.fromisoformat(touchpoint["occurred_at"]),
            )
            await publish(
                worker.identity_out, alias.encode(), announcement.model_dump_json().encode()
            )
        if routed.identifiers:
            # A replay goes where the event was first filed, though a link since may have
            # moved its identifiers: it must not come out again under another key.
            key = filed_keys.first(event_id, key)
        event = {"t": "event", "tp": {**touchpoint, "customer_key": key}}
        await to_customer(key, {**event, "rx": routed.received_at_ms})

    async def publish_profile(key: str, record: Record) -> None:
        state = record["profile"]
        as_of = max(worker.latest_ms, state["last"] or 0)
        view = profile_json(key, state, int(record["aliases"]), as_of)
        await publish(worker.profiles_topic, key.encode(), view)

    def put(key: str, before: Record | None, after: Record | None) -> None:
        """Write a customer record (None: delete it), keeping the holdings counts."""
        if after is None:
            customers.pop(key, None)
        else:
            customers[key] = after
        worker.holdings.change(before, after)

    async def handle_customer(message: Message) -> None:
        """Customer command (event, merge, absorb, forget) -> customer record, cx.timeline and
        cx.profiles."""
        key = (message.key or b"").decode()
        command = orjson.loads(message.value or b"{}")
        kind = command["t"]
        record = customers.get(key)
        if record is not None and "alias_of" in record and kind in ("event", "absorb"):
            # Merged away while this was on its way: it belongs to the surviving customer.
            await to_customer(str(record["alias_of"]), command)
            return
        if kind == "event":
            touchpoint = command["tp"]
            filed = {**touchpoint, "customer_key": key}
            before = record
            record, is_new = add_event(record, filed, bounds)
            worker.latest_ms = max(worker.latest_ms, int(record["profile"]["last"] or 0))
            if is_new:
                # Only a newly filed event alerts: a replay or a re-routed copy never repeats.
                # So the record is stored after its outputs are sent: should anything before
                # fail, the replay still finds the event new and sends its profile and alerts.
                alerts = alerts_for(touchpoint, key)
                await publish_profile(key, record)
                for alert in alerts:
                    await publish(
                        worker.alerts_topic, key.encode(), alert.model_dump_json().encode()
                    )
                    metrics.alerts.labels(type=alert.type).inc()
                put(key, before, record)
            else:
                # Published again on a replay (the first copy may have been lost in a crash),
                # as first filed: the record may since have absorbed the key it was filed under.
                filed = as_filed(record, filed)
            value = orjson.dumps(filed)
            await publish(worker.timeline_topic, str(filed["customer_key"]).encode(), value)
            await publish(worker.metrics_stream, metrics_key(filed), value)
            if command.get("rx"):
                seconds = max(0.0, (epoch_ms(clock()) - int(command["rx"])) / 1000)
                metrics.latency.labels(channel=touchpoint["channel"]).observe(seconds)
        elif kind == "merge":
            into = str(command["into"])
            if record is not None and "alias_of" not in record:
                await to_customer(into, {"t": "absorb", "from": key, "record": record})
            put(key, record, {"alias_of": into})
            await publish(worker.profiles_topic, key.encode(), None)
        elif kind == "absorb":
            merged = absorb(record, str(command["from"]), command["record"], bounds)
            put(key, record, merged)
            await publish_profile(key, merged)
        elif kind == "forget":
            put(key, record, None)
            await publish(worker.profiles_topic, key.encode(), None)
            if record is not None and "alias_of" in record:
                # This key's record may be on its way to the survivor (an absorb sent just
                # before): forgetting there again, after it, keeps it from coming back.
                await to_customer(str(record["alias_of"]), {"t": "forget"})

    tables = worker.tables  # filled once every table is declared (below)

    def agent(stage: str, handle: Callable[[Message], Awaitable[None]]) -> Any:
        async def run(stream: faust.StreamT[bytes]) -> None:
            async for event in stream.events():
                try:
                    if fence.stale():
                        await fence.wait_current(rebalancing)
                    try:
                        await handle(event.message)
                    finally:
                        # Before the acknowledgement (a commit flushes the producer, not
                        # these), and also for a message released below: what it wrote is
                        # in the local store already, and the changelog must have it too.
                        await flush_changelogs(tables, worker.send_changelog, publish_failed)
                    mark_handled(event.message)  # only now may its offset be committed
                except Fenced:
                    # Released unacknowledged: its offset is never committed, and whoever
                    # owns the partition after the rebalance reads it again.
                    metrics.released.labels(stage=stage).inc()
                    log.warning("session expired: message released", extra={"stage": stage})
                except Exception as exc:  # every failure ends in on_fatal, never in an ack
                    metrics.processing_errors.labels(stage=stage).inc()
                    on_fatal(stage, exc)
                    # Never move on: Faust would ack this message and commit past it.
                    await asyncio.Event().wait()

        run.__name__ = run.__qualname__ = stage
        return run

    stages: list[tuple[str, faust.TopicT, Callable[[Message], Awaitable[None]]]] = [
        ("ingest", worker.raw_topic, handle_raw),
        ("accept", worker.accepted_topic, handle_accepted),
        ("identity", worker.identity_stream, handle_identity),
        ("customers", worker.customer_stream, handle_customer),
    ]
    for stage, topic, handle in stages:
        worker.agents[stage] = app.agent(topic, name=stage)(agent(stage, handle))
    worker.metrics_state, metric_agents, worker.partials_table = wire_metrics(
        app,
        settings,
        metrics,
        worker.metrics_stream,
        worker.partials_stream,
        worker.metrics_topic,
        publish,
        agent,
        clock,
    )
    worker.agents.update(metric_agents)
    tables.extend(t for t in app.tables.values() if isinstance(t, BufferedTable))
    # The two single-partition stages, each with its table, on different workers when there
    # are several (`service.assignor`).
    assignor.spread(
        app,
        [
            {topics.identity_stream, worker.identity_table.changelog_topic.get_topic_name()},
            {topics.partials_stream, worker.partials_table.changelog_topic.get_topic_name()},
        ],
    )

    @app.timer(1.0)  # type: ignore[untyped-decorator]
    async def freshness() -> None:
        if app.should_stop:  # timers can fire while the worker stops
            return
        now_ms = epoch_ms(clock())
        # Sizes are gauges: refreshed here, off the per-event path.
        metrics.dedup_ids.set(sum(len(i) for p in worker.indexes.values() for i in p.values()))
        for channel, watermark in worker.watermarks.items():
            metrics.freshness.labels(channel=channel).set(max(0.0, (now_ms - watermark) / 1000))

    # Joining the group needs the broker, so until the first probe it counts as reachable.
    metrics.broker_up.set(1)

    @app.timer(2.0)  # type: ignore[untyped-decorator]
    async def probe_broker_and_lag() -> None:
        if app.should_stop:  # timers can fire while the worker stops
            return
        worker.broker_up = await _broker_answers(app)
        metrics.broker_up.set(1 if worker.broker_up else 0)
        metrics.set_lags({(tp.topic, tp.partition): lag for tp, lag in _lags(app).items()})

    @app.timer(settings.state_scan_interval.total_seconds())  # type: ignore[untyped-decorator]
    async def state_sizes() -> None:
        if app.should_stop:  # timers can fire while the worker stops
            return
        # The key counts and the holdings are counted once after each assignment, when the
        # recovered records are all there; from then on every write keeps them (a scan of the
        # keys, or every record decoded, at each refresh was O(state)).
        ready = worker.ready()
        for name, table in (
            ("dedup", dedup_table),
            ("identity", worker.identity_table),
            ("customers", customers),
        ):
            held = table.keys_held()
            if held is None and ready:
                held = table.count_keys()
            if held is not None:
                metrics.state_keys.labels(table=name).set(held)
        holdings = worker.holdings
        if not holdings.known and ready:
            holdings.count(customers.values())
        if holdings.known:
            metrics.customers.set(holdings.customers)
            metrics.timeline_entries.set(holdings.entries)

    return worker


def faust_worker_for(worker: Worker, *extra_services: ServiceT) -> faust.Worker:
    """A Worker -> the Faust worker that runs it (with its HTTP service), logging as set."""
    faust_worker = faust.Worker(
        worker.app,
        worker.http_service(),
        *extra_services,
        # Last, so that it is stopped first and times the whole shutdown.
        ShutdownWatchdog(worker.settings.shutdown_timeout.total_seconds()),
        loglevel=worker.settings.log_level.upper(),
        logging_config=logging_config(worker.settings.log_level, worker.settings.log_format),
        quiet=True,
    )
    # At WARNING and above, Faust's terminal spinner sets the root logger to DEBUG: every
    # debug call of aiokafka and Faust then built a record (about a tenth of the CPU).
    faust_worker.spinner = None
    return faust_worker


async def _broker_answers(app: faust.App) -> bool:
    """True when the cluster answers a metadata request within 3 s."""
    try:
        client = cast(Any, app.producer)._ensure_producer().client
        await asyncio.wait_for(client.fetch_all_metadata(), timeout=3.0)
    except Exception as exc:  # any failure means "not reachable now"; gauge and /readyz say so
        log.warning("Kafka cluster not reachable: %r", exc)
        return False
    return True


def _lags(app: faust.App) -> dict[Any, int]:
    """Assigned partition -> end offset minus the next offset to read (what is left)."""
    consumer = cast(Any, app.consumer)
    lags: dict[Any, int] = {}
    try:
        assignment = consumer.assignment()
    except Exception:  # not started yet
        return lags
    for tp in assignment:
        end = _highwater(consumer, tp)
        if end is not None:
            read = consumer._read_offset.get(tp)
            lags[tp] = max(0, end - (int(read) + 1 if read is not None else 0))
    return lags


def _highwater(consumer: Any, tp: Any) -> int | None:
    try:
        end = consumer.highwater(tp)
    except Exception:  # not fetched from yet: unknown
        return None
    return None if end is None else int(end)


class StrKeys(MutableMapping[str, Any]):
    """A Faust table with raw (bytes) keys seen as a str-keyed mapping."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __getitem__(self, key: str) -> Any:
        return self.table[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.table[key] = value

    def __delitem__(self, key: str) -> None:
        del self.table[key]

    def __contains__(self, key: object) -> bool:
        return self.table.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        value = self.table.get(key)
        return default if value is None else value

    def __iter__(self) -> Iterator[str]:
        for key in self.table:
            yield text_key(key)

    def __len__(self) -> int:
        return len(self.table)
