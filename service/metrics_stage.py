"""The metrics stages of the worker: per-partition minute aggregates, one merger, `cx.metrics`.

customers stage --(filed touchpoint, keyed by its ticket/conversation or event id)-->
  metrics agent (N partitions): the events of the last days per minute in a table, each id
  once; in memory a `PartitionAggregator`. Every CX_EMIT_INTERVAL the changed minute
  aggregates (per channel) go, whole, up to about 256 kB of them per message, to
  merger agent (1 partition): keeps every partition's latest aggregate per minute (replacing
  one is idempotent) and, every CX_EMIT_INTERVAL, publishes the snapshots whose numbers
  changed or whose window slid to the compacted `cx.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import faust
import orjson
from faust.exceptions import NotReady

from service.canonical import CHANNELS, Touchpoint, epoch_ms, from_epoch_ms, to_utc_millis
from service.fence import Fenced
from service.metrics import LONGEST, Scope, Snapshot
from service.observability import Metrics
from service.rolling import (
    Merger,
    MinuteAgg,
    PartitionAggregator,
    minute_of,
)
from service.settings import Settings
from service.storage import json_table, text_key

log = logging.getLogger(__name__)

Publish = Callable[[faust.TopicT, bytes | None, bytes | None], Awaitable[None]]
# Events are kept this long behind a partition's watermark: a window looks back 30 days and a
# thread join 30 days before that.
KEEP = LONGEST + LONGEST + timedelta(days=1)
# In a metrics table record: the offset its event was read at (not a touchpoint field).
OFFSET = "_offset"


def metrics_key(touchpoint: dict[str, Any]) -> bytes:
    """Touchpoint JSON -> the metrics partition key: its ticket or conversation, else itself."""
    thread = touchpoint.get("thread_id")
    if touchpoint["channel"] in ("support", "chat") and thread is not None:
        return f"{touchpoint['channel']}:{thread}".encode()
    return str(touchpoint["event_id"]).encode()


@dataclass
class MetricsState:
    """In-memory views of the two tables, rebuilt after every assignment."""

    parts: dict[int, PartitionAggregator] = field(default_factory=dict)
    # partition -> the last offset its aggregator has applied (the version of its partials)
    versions: dict[int, int] = field(default_factory=dict)
    dirty: dict[int, set[tuple[Scope, int]]] = field(default_factory=dict)
    merger: Merger | None = None
    published: dict[str, dict[str, Any]] = field(default_factory=dict)
    latest: dict[str, Snapshot] = field(default_factory=dict)


def wire_metrics(
    app: faust.App,
    settings: Settings,
    metrics: Metrics,
    stream: faust.TopicT,
    partials_stream: faust.TopicT,
    metrics_topic: faust.TopicT,
    publish: Publish,
    agent: Callable[[str, Callable[[Any], Awaitable[None]]], Any],
    clock: Callable[[], datetime],
) -> tuple[MetricsState, dict[str, Any], Any]:
    """Declare the two metrics tables, agents and timers -> (state, agents, partials table)."""
    events_table = json_table(app, "metrics", settings.partitions)
    partials_table = json_table(app, "partials", 1)
    state = MetricsState()
    interval = settings.emit_interval.total_seconds()

    def aggregator(partition: int) -> PartitionAggregator:
        """The partition's aggregator, rebuilt from its table after an assignment."""
        found = state.parts.get(partition)
        if found is None:
            found = PartitionAggregator()
            prefix = f"{partition}|"
            records = [
                dict(event)
                for key, value in events_table.items()
                if text_key(key).startswith(prefix)
                # a value is one event (in 0.1.0 it was a whole minute: {id: event})
                for event in ([value] if "event_id" in value else value.values())
            ]
            # Records are written in offset order, so the newest one's offset is the version:
            # every event up to it is in the table (0.1.0 records carry none: -1).
            version = max((int(r.pop(OFFSET, -1)) for r in records), default=-1)
            kept = [Touchpoint.model_validate(record, strict=False) for record in records]
            # Every restored bucket is sent again: what was sent before a crash is unknown.
            state.dirty.setdefault(partition, set()).update(found.restore(kept))
            state.versions[partition] = max(state.versions.get(partition, -1), version)
            state.parts[partition] = found
        return found

    def merger() -> Merger:
        if state.merger is None:
            # The partials table holds every aggregate the merger does: read back from it
            # when replaced, not kept a second time in memory.
            state.merger = Merger(stored=lambda key: partials_table[partial_key(*key)]["agg"])
            summed = []
            for key, value in partials_table.items():
                if value["scope"] in CHANNELS:
                    _receive(state.merger, value)
                else:
                    summed.append(key)
            for key in summed:  # "all", kept by an earlier version: now summed from channels
                partials_table.pop(key, None)
        return state.merger

    async def handle_event(message: Any) -> None:
        """Filed touchpoint -> its partition's minute aggregates (each event id once)."""
        touchpoint = Touchpoint.model_validate_json(message.value or b"")
        partition = message.partition
        parts = aggregator(partition)
        try:
            late_before = parts.late
            changed = parts.apply(touchpoint)
            # Whatever it did, the aggregates now reflect every event up to this offset.
            state.versions[partition] = max(state.versions.get(partition, -1), message.offset)
            if parts.late != late_before:
                metrics.late.labels(channel=touchpoint.channel).inc()
                return
            if not changed:
                return  # an event id already counted
            # One record per event: a record per minute grew with the minute's traffic, and each
            # event wrote it whole again (quadratic under a steady rate).
            minute = minute_of(touchpoint.occurred_at)
            record = orjson.loads(message.value)
            record[OFFSET] = message.offset
            events_table[f"{partition}|{minute}|{touchpoint.event_id}"] = record
            state.dirty.setdefault(partition, set()).update(changed)
            if parts.watermark is not None:
                gone = parts.forget_before(minute_of(parts.watermark - KEEP))
                for minute, event_id in gone:
                    events_table.pop(f"{partition}|{minute}|{event_id}", None)
                for minute in {minute for minute, _ in gone}:
                    events_table.pop(f"{partition}|{minute}", None)  # a 0.1.0 minute record
        except Fenced:
            # A table write refused (the session expired) after the aggregates took the
            # event: they are ahead of their table, and read again (released, never
            # acknowledged) the event would find its id counted and never reach the table.
            # Rebuilt from the table at the next event, they take it as the first time.
            state.parts.pop(partition, None)
            state.versions.pop(partition, None)
            raise

    async def handle_partial(message: Any) -> None:
        """A partition's minute aggregates -> the merger (each replacing the one before)."""
        merged = merger()
        try:
            for key, value in unbatch(orjson.loads(message.value or b"{}")):
                if value["scope"] not in CHANNELS:
                    continue  # "all", sent by an earlier version: the merger sums it itself
                if _receive(merged, value):
                    partials_table[key] = value
                else:
                    metrics.stale_partials.inc()
            end = merged.window_end
            if end is not None:
                for partition, scope, minute in merged.forget_before(minute_of(end - LONGEST)):
                    partials_table.pop(partial_key(partition, scope, minute), None)
        except Fenced:
            # A table write refused (the session expired) after the merger took the partial:
            # the merger is ahead of its table, from which it reads what it replaces. Rebuilt
            # from the table, it takes this message again as the first time when it is read
            # again (released: never acknowledged).
            state.merger = None
            raise

    def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        state.parts.clear()
        state.versions.clear()
        state.dirty.clear()
        state.merger = None

    app.on_partitions_revoked.connect(on_revoked)

    @app.timer(interval)  # type: ignore[untyped-decorator]
    async def send_partials() -> None:
        await _unless_stopping(app, _send_partials)  # what is dirty stays dirty

    def restore_assigned() -> None:
        """Rebuild the state of every assigned partition as soon as its table is recovered,
        not at its next event: a restarted worker re-sends, publishes and serves its metrics
        without waiting for new traffic."""
        if app.rebalancing or not cast(Any, app.tables).recovery.completed.is_set():
            return
        for tp in cast(Any, app.assignor).assigned_actives():
            if tp.topic == stream.get_topic_name():
                aggregator(tp.partition)
            elif tp.topic == partials_stream.get_topic_name():
                merger()

    async def _send_partials() -> None:
        restore_assigned()
        for partition, dirty in list(state.dirty.items()):
            parts = state.parts.get(partition)
            if parts is None or parts.watermark is None:
                continue
            head = {"p": partition, "wm": epoch_ms(parts.watermark),
                    "v": state.versions.get(partition, -1)}  # fmt: skip
            buckets = [
                (bucket, orjson.dumps({"scope": bucket[0], "minute": bucket[1],
                                       "agg": orjson.Fragment(parts.encoded(bucket))}))
                for bucket in sorted(dirty)
            ]  # fmt: skip
            for chunk in chunks(buckets, PARTIALS_BYTES):
                # Unmarked before sending: a change made while these are on their way marks
                # a bucket again, for the next tick.
                dirty.difference_update(bucket for bucket, _ in chunk)
                try:
                    await publish(partials_stream, str(partition).encode(), batch_of(head, chunk))
                except NotReady:
                    dirty.update(bucket for bucket, _ in chunk)
                    raise
        for held in state.parts.values():
            # After sending: a bucket changed since the last tick is encoded once, to be sent,
            # not frozen first and then decoded to be sent.
            held.freeze_cold()

    @app.timer(interval)  # type: ignore[untyped-decorator]
    async def emit_snapshots() -> None:
        await _unless_stopping(app, _emit_snapshots)  # the next tick publishes what changed

    async def _emit_snapshots() -> None:
        if state.merger is None:
            return
        now = to_utc_millis(clock())
        for snapshot in state.merger.snapshots(settings.min_responses, now):
            numbers = snapshot.model_dump(mode="json", exclude={"emitted_at"})
            if state.published.get(snapshot.key) == numbers:
                continue
            await publish(metrics_topic, snapshot.key.encode(), snapshot.model_dump_json().encode())
            state.published[snapshot.key] = numbers
            state.latest[snapshot.key] = snapshot
            labels: dict[str, str] = {"scope": snapshot.scope, "window": snapshot.window}
            metrics.snapshots.labels(**labels).inc()
            _gauge(metrics.nps_score, labels, snapshot.nps.score)
            _gauge(metrics.csat_score, labels, snapshot.csat.score)
            _gauge(metrics.ces_mean, labels, snapshot.ces.mean)

    agents = {
        "metrics": app.agent(stream, name="metrics")(agent("metrics", handle_event)),
        "merger": app.agent(partials_stream, name="merger")(agent("merger", handle_partial)),
    }
    return state, agents, partials_table


# A partials message holds a partition's changed minutes up to about this size: one message
# per bucket was more than one message per event (in a replay of older events almost every
# event changes a minute of its own), and the broker refuses a message over 1 MB by default.
PARTIALS_BYTES = 256 * 1024


def chunks(items: list[tuple[Any, bytes]], limit: int) -> Iterator[list[tuple[Any, bytes]]]:
    """(item, encoded) pairs -> runs of them whose encodings add up to at most `limit` bytes
    (a larger single one alone)."""
    run: list[tuple[Any, bytes]] = []
    size = 0
    for item in items:
        if run and size + len(item[1]) > limit:
            yield run
            run, size = [], 0
        run.append(item)
        size += len(item[1])
    if run:
        yield run


def batch_of(head: dict[str, Any], buckets: list[tuple[Any, bytes]]) -> bytes:
    """A partition's watermark and version, and some of its encoded minute aggregates -> one
    partials message: {"p", "wm", "v", "buckets": [{"scope", "minute", "agg"}, ...]}."""
    body = orjson.dumps(head)[:-1]  # the encodings are spliced in, not decoded again
    return body + b',"buckets":[' + b",".join(encoded for _, encoded in buckets) + b"]}"


def partial_key(partition: object, scope: object, minute: object) -> str:
    """A partition's minute aggregate -> its key in the merger's table."""
    return f"{partition}|{scope}|{minute}"


def unbatch(value: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A partials message -> (table key, partial) per minute aggregate it holds. A message
    of an earlier version held one aggregate: {"p", "scope", "minute", "agg", "wm", "v"}."""
    if "buckets" not in value:
        yield partial_key(value["p"], value["scope"], value["minute"]), value
        return
    head = {name: value[name] for name in ("p", "wm", "v")}
    for bucket in value["buckets"]:
        yield partial_key(head["p"], bucket["scope"], bucket["minute"]), {**bucket, **head}


def _receive(merger: Merger, partial: dict[str, Any]) -> bool:
    """A partial as sent (or kept in the partials table) -> the merger; False: older, ignored.
    Partials of 0.1.0 carry no version: -1."""
    return merger.receive(
        int(partial["p"]), partial["scope"], int(partial["minute"]),
        MinuteAgg.from_json(partial["agg"]), from_epoch_ms(int(partial["wm"])),
        int(partial.get("v", -1)),
    )  # fmt: skip


async def _unless_stopping(app: faust.App, work: Callable[[], Awaitable[None]]) -> None:
    """Run a timer's work, unless the worker is stopping or its producer is not (yet) there:
    timers can fire during a stop, and a crash then would turn a clean exit into exit 1."""
    if app.should_stop:
        return
    try:
        await work()
    except (NotReady, Fenced):  # Fenced: the session expired; the next owner publishes
        return


def _gauge(gauge: Any, labels: Mapping[str, str], value: float | None) -> None:
    """Set a score gauge; NaN while the window has no answers."""
    gauge.labels(**labels).set(float("nan") if value is None else value)
