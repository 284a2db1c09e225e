"""The worker's records to Kafka, handed to the producer a batch per partition.

aiokafka's `send` costs about 15 µs of CPU a record here (its partitioner, a future and the
accumulator's bookkeeping per record), against about 1 µs a record for a batch built with
`create_batch` and handed over with `send_batch` (60 000 records of 500 bytes against the
embedded broker, measured here), and an event becomes about fifteen records on its way
through the stages. So a record goes into an outbox, and 2 ms after the first record (or
once 500 wait) whatever the stages put there goes to the producer, in order, one batch per
partition.

Nothing is lost to the outbox: a commit flushes the producer first, and `install` has that
flush drain the outbox into the producer before it waits for the producer. A message is
acknowledged only after its records are in the outbox, so every record of a committed
message was delivered. Order is kept per partition: one drain at a time, each in the order
the records came.

A table's changelog records are added `after_delivery`: they go to the producer only once
every record added before them is delivered. The producer keeps no order across partitions
(a batch of one can go in an earlier request than a batch of another added before it, and
on Apache Kafka two partitions' leaders are two brokers). A changelog record delivered
before the outputs of its change would, after a crash, hold a change whose outputs were
lost: the replay finds the change made and does not send them again (a merge's absorb,
an event's alerts and profile). A CI run of the kill -9 test published a timeline record
again under another key, which a merge's lost absorb explains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka.structs import RecordMetadata

from service.buffers import own_size
from service.fence import Fenced

Headers = list[tuple[str, bytes]] | None
# Told how a record ended: (its batch's first RecordMetadata, the record's index in the batch,
# None) once delivered, or (None, 0, the error). Called from the batch's own callback: a
# future per record (created, set, and its callbacks run on a later loop turn), at about 13
# records an event, was most of `Outbox.add`'s 4.1 % of the worker's samples in a profile,
# plus 2.6 % settling them and about 2 % of the loop's scheduling and handles.
Done = Callable[[RecordMetadata | None, int, BaseException | None], None]
# (topic, partition or None for the producer's partitioner, key, value, headers, told when done)
_Record = tuple[str, int | None, bytes | None, bytes | None, Headers, Done]

# An outbox this full makes the stage that adds to it wait for the producer (back-pressure:
# without it a stalled producer would let the stages fill memory).
MAX_PENDING = 2_000
# Records wait this long for others to share their batches with, unless this many are queued
# already; the producer lingers no more (20 000 messages: the same throughput as with 5 ms
# here and the producer's 5 ms, publish-to-timeline p50 at 100 messages/s 179 -> 123 ms).
LINGER, FULL = 0.002, 500


def _fitted(data: bytes | None) -> bytes | None:
    """Bytes -> a copy of their own size (`own_size`): the records of a stage waiting here
    are mostly orjson's, up to `MAX_PENDING` of them, a key and a value each."""
    return None if data is None else own_size(data)


class Outbox:
    """Records for an aiokafka producer (`producer()`, once started), handed to it a batch
    per partition `LINGER` after the first of them was queued (or once `FULL` are), and by
    `drain`."""

    def __init__(self, producer: Callable[[], Any]) -> None:
        self.producer = producer
        self.records: list[_Record] = []
        self.later: list[_Record] = []  # added `after_delivery`, in order
        self._draining: asyncio.Future[None] | None = None  # the newest hand-over
        # Batches handed over that a later record may have to wait for: all that are not
        # known delivered (a failed one stays until a later record takes it).
        self._unconfirmed: list[asyncio.Future[Any]] = []
        self._deferred: asyncio.Future[None] | None = None  # the newest `after_delivery` one
        self._held = 0  # records taken by `after_delivery` hand-overs, not handed over yet
        self._taking = False  # a hand-over is started that has not taken the records yet
        self._timer: asyncio.TimerHandle | None = None

    def add(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = None,
        *,
        after_delivery: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue one record -> a future set to its RecordMetadata once delivered (or to the
        error of its batch). `after_delivery`: see `queue`."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue(topic, partition, key, value, headers, settle_future(future), after_delivery)
        return future

    def queue(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        done: Done,
        after_delivery: bool = False,
    ) -> None:
        """Queue one record; `done` is told how it ended (see `Done`). `after_delivery`:
        handed to the producer only once every record added before it without that flag is
        delivered; failed, unsent, if one of them failed."""
        (self.later if after_delivery else self.records).append(
            (topic, partition, _fitted(key), _fitted(value), headers, done)
        )
        if len(self.records) + len(self.later) >= FULL:
            self._start()
        elif self._timer is None and not self._taking:
            self._timer = asyncio.get_running_loop().call_later(LINGER, self._start)

    async def put(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        done: Done,
        after_delivery: bool = False,
    ) -> None:
        """`queue`, for a stage: first wait while the outbox is full (back-pressure)."""
        if self.full():
            await self.room()
        self.queue(topic, partition, key, value, headers, done, after_delivery)

    def full(self) -> bool:
        """Whether a stage must wait (`room`) before it adds a record."""
        return len(self.records) + len(self.later) + self._held >= MAX_PENDING

    async def room(self) -> None:
        """Wait while the outbox holds `MAX_PENDING` records or more (held ones included:
        without them, records waiting for the delivery of others grew without bound while
        the producer was behind, 240 -> 480 MB of RSS in a 20 000-message benchmark)."""
        while self.full():
            self._start()
            if self._draining is not None:
                await _settled(self._draining)
            if self.full() and self._deferred is not None:
                await _settled(self._deferred)

    async def drain(self) -> None:
        """Hand every record queued so far to the producer (not: wait for its delivery; but
        records added `after_delivery` wait for the delivery of those before them)."""
        self._start()
        if self._draining is not None:
            await _settled(self._draining)
        if self._deferred is not None:  # set by the hand-over just awaited
            await _settled(self._deferred)

    def forget_fenced(self) -> None:
        """Partitions assigned again after records were dropped with `Fenced`: those failures
        belong to the messages of the generation before, which are read again, and records
        added from now on do not wait for them. Records still queued `after_delivery` from
        before it take them with them (they are that generation's too)."""
        if not self.later:
            self._unconfirmed = [f for f in self._unconfirmed if not _fenced(f)]

    def _start(self) -> None:
        """Start a hand-over of what is queued, unless one started is about to take it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if (self.records or self.later) and not self._taking:
            self._taking = True
            self._draining = asyncio.ensure_future(self._next(self._draining))
            # A hand-over that fails (the producer stopped) tells its records: the error is
            # theirs to report.
            self._draining.add_done_callback(lambda f: None if f.cancelled() else f.exception())

    async def _next(self, before: asyncio.Future[None] | None) -> None:
        """After the hand-over `before` it (order per partition), hand over what is queued."""
        if before is not None and not before.done():
            await asyncio.wait((before,))
        records, self.records = self.records, []
        later, self.later = self.later, []
        self._taking = False
        try:
            if records:
                self._unconfirmed = [f for f in self._unconfirmed if _unsettled(f)]
                await _hand_over(self.producer(), records, self._unconfirmed)
        except BaseException as exc:  # what was not handed over failed: later records too
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            failed.exception()  # retrieved: its records report it
            self._unconfirmed.append(failed)
            raise
        finally:
            if later:  # handed over by a task of their own, so that drains go on meanwhile
                waits_for, self._unconfirmed = self._unconfirmed, []
                self._held += len(later)
                self._deferred = asyncio.ensure_future(
                    self._after(self._deferred, waits_for, later)
                )
                self._deferred.add_done_callback(lambda f: None if f.cancelled() else f.exception())

    async def _after(
        self,
        before: asyncio.Future[None] | None,
        waits_for: list[asyncio.Future[Any]],
        records: list[_Record],
    ) -> None:
        """After the `after_delivery` hand-over `before` (order per partition) and once
        `waits_for` are settled, hand `records` over; or fail them with the first error of
        `waits_for` (theirs to report, as a batch's error is its records')."""
        try:
            if before is not None and not before.done():
                await asyncio.wait((before,))
            if waits_for:
                await asyncio.wait(waits_for)
        except BaseException as exc:  # cancelled: the records are not sent
            self._held -= len(records)
            _fail(records, exc)
            raise
        self._held -= len(records)
        error = next((e for f in waits_for if (e := _error(f)) is not None), None)
        if error is not None:
            _fail(records, error)
            return
        await _hand_over(self.producer(), records, [])


def settle_future(future: asyncio.Future[Any]) -> Done:
    """A future -> a `Done` that sets it to the record's RecordMetadata, or to the error."""

    def done(first: RecordMetadata | None, n: int, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None or first is None:
            future.set_exception(exc or RuntimeError("no metadata for a delivered record"))
            return
        future.set_result(
            RecordMetadata(first.topic, first.partition, first.topic_partition, first.offset + n,
                           first.timestamp, first.timestamp_type, first.log_start_offset)
        )  # fmt: skip

    return done


def _fail(records: list[_Record], exc: BaseException) -> None:
    for record in records:
        record[5](None, 0, exc)


def _error(future: asyncio.Future[Any]) -> BaseException | None:
    """A settled future -> its error (a cancellation as CancelledError), None if delivered."""
    return asyncio.CancelledError() if future.cancelled() else future.exception()


def _fenced(future: asyncio.Future[Any]) -> bool:
    return future.done() and isinstance(_error(future), Fenced)


async def _settled(hand_over: asyncio.Future[None]) -> None:
    """Wait for a hand-over. One that ended in `Fenced` met records the producer's gate
    dropped (`service.fence`): it told them, and their messages are read again, so it is not
    the flush's error (raised into Faust's flush while partitions are revoked, it crashed
    the worker; before a commit, `fence` skips the commit instead)."""
    with contextlib.suppress(Fenced):
        await asyncio.shield(hand_over)


def _unsettled(future: asyncio.Future[Any]) -> bool:
    """Whether a later record must still wait for `future`: pending, or failed."""
    return not future.done() or _error(future) is not None


async def _hand_over(
    producer: Any, records: list[_Record], batches: list[asyncio.Future[Any]]
) -> None:
    """Records -> the producer, one batch (or more, when full) per partition, in order; each
    batch's delivery future appended to `batches`."""
    handed = 0  # records in batches the producer took: their batches settle them
    ordered = records  # in the order they are handed over
    try:
        keyed = {record[0] for record in records if record[1] is None}
        for topic in keyed:  # once a topic per hand-over, not once a record
            await producer.client._wait_on_metadata(topic)
        # What the producer's `_partition` lists for every record, listed once a topic here:
        # that listing was 1.2 % of the worker's samples (3 % with the hashing).
        metadata = producer.client.cluster
        partitions_of = {
            topic: (
                list(metadata.partitions_for_topic(topic)),
                list(metadata.available_partitions_for_topic(topic)),
            )
            for topic in keyed
        }
        partitioner = producer._partitioner  # Kafka's murmur2 of the key (`CachedPartitioner`)
        by_tp: dict[tuple[str, int], list[_Record]] = {}
        for record in records:
            topic, partition = record[0], record[1]
            if partition is None:
                partition = partitioner(record[2], *partitions_of[topic])
            by_tp.setdefault((topic, partition), []).append(record)
        ordered = [r for queued in by_tp.values() for r in queued]
        for (topic, partition), queued in by_tp.items():
            start = 0
            while start < len(queued):
                batch = producer.create_batch()
                end = start
                while end < len(queued):
                    _, _, key, value, headers, _ = queued[end]
                    if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        break  # full (a first record always fits)
                    end += 1
                batch.close()
                delivered = await producer.send_batch(batch, topic, partition=partition)
                delivered.add_done_callback(_settle(queued[start:end]))
                batches.append(delivered)
                handed += end - start
                start = end
    except BaseException as exc:  # the producer stopped or refused what was not handed yet
        _fail(ordered[handed:], exc)
        raise


def _settle(records: list[_Record]) -> Callable[[asyncio.Future[Any]], None]:
    """A sent batch's future -> a callback telling each of its records how it ended."""

    def settle(batch: asyncio.Future[Any]) -> None:
        exc = _error(batch)
        if exc is not None:
            _fail(records, exc)
            return
        first = batch.result()
        for n, record in enumerate(records):
            record[5](first, n, None)

    return settle


def install(faust_producer: Any, outbox: Outbox) -> None:
    """Have a Faust producer's `flush` (which every commit awaits first) drain `outbox` into
    the producer before it waits for the producer to deliver, and its stop drain it before
    the producer stops (Faust stops its agents after its last flush: what they queue then
    is delivered, as the producer's own stop delivers what it holds)."""
    flush, stop = faust_producer.flush, faust_producer.on_stop

    async def flush_with_outbox() -> None:
        await outbox.drain()
        await flush()

    async def stop_after_outbox() -> None:
        try:
            await outbox.drain()
        finally:
            await stop()

    faust_producer.flush = flush_with_outbox
    faust_producer.on_stop = stop_after_outbox
