"""At-least-once guards over Faust's acknowledgements and commits (found by the rebalance tests).

Faust's stream skips a message it reads while a rebalance is under way, or from an earlier
generation, and *acknowledges* it: its offset is then committed though no stage handled it.
Its commit logic also tolerates a gap at the head of the acknowledged offsets when nothing was
committed yet (or 0), and aiokafka does not seek a partition whose committed offset is 0 or
absent, so a message fetched and skipped there is never read again. Together, a rebalance could
lose messages. With these guards:

- only a message a stage finished is acknowledged (`mark_handled`); any other is released
  unacknowledged, to be read again from the committed offset after the rebalance;
- an offset is committed only when every offset from the committed position up to it was
  acknowledged;
- after every assignment each partition is positioned at its committed offset, or at its
  beginning when it has none, and a message released after that is sought back to, so that
  whatever was released is read again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

import faust.streams
from faust.events import Event
from faust.transport.consumer import Consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import Message
from faust.utils.functional import consecutive_numbers

log = logging.getLogger(__name__)

_HANDLED: weakref.WeakSet[Message] = weakref.WeakSet()
# consumer -> partition -> the earliest released offset a seek is on its way to
_PENDING: weakref.WeakKeyDictionary[Any, dict[Any, int]] = weakref.WeakKeyDictionary()
_TASKS: set[asyncio.Future[None]] = set()
# (consumer, partition) -> (the offset its commit waits for, since when)
_WAITING: dict[tuple[int, Any], tuple[int, float]] = {}
# Later offsets handled while an earlier one is not, for this long: it will not come by itself.
REREAD_AFTER = 3.0
# consumer -> partition -> the first offset it will read when it has no committed offset
_STARTS: weakref.WeakKeyDictionary[Any, dict[Any, int]] = weakref.WeakKeyDictionary()


def mark_handled(message: Message) -> None:
    """A stage finished `message`: its acknowledgement may count towards a commit."""
    _HANDLED.add(message)


def install() -> None:
    """Patch Faust's acknowledgements, commits and seeks (once per process)."""
    if getattr(Event, "_cx_guarded", False):
        return
    setattr(Event, "ack", _ack)  # noqa: B010 - monkeypatches on purpose
    # Faust's compiled stream iterator acknowledges inline, past Event.ack: use the Python one.
    setattr(faust.streams, "_CStreamIterator", None)  # noqa: B010
    setattr(Consumer, "_new_offset", _new_offset)  # noqa: B010
    thread = faust_aiokafka.AIOKafkaConsumerThread

    async def seek_to_committed(self: Any) -> Any:
        return await self.call_thread(_seek_to_committed, self)

    setattr(thread, "seek_to_committed", seek_to_committed)  # noqa: B010
    setattr(Event, "_cx_guarded", True)  # noqa: B010


async def _seek_to_committed(thread: Any) -> Any:
    """Faust's seek (in the consumer's thread), then the partitions aiokafka left alone."""
    consumer = thread._ensure_consumer()
    committed = await consumer.seek_to_committed()
    # aiokafka leaves the position alone for a committed offset of 0 or none: whatever was
    # fetched and released since would not be read again.
    starts = {tp: 0 for tp, offset in committed.items() if offset == 0}
    for tp in starts:
        consumer.seek(tp, 0)
    fresh = [tp for tp, offset in committed.items() if offset is None]
    if fresh:
        beginnings = await consumer.beginning_offsets(fresh)
        for tp in fresh:
            consumer.seek(tp, beginnings[tp])
            starts[tp] = beginnings[tp]
    _STARTS[thread.consumer] = {_key(tp): start for tp, start in starts.items()}
    return committed


def _key(tp: Any) -> tuple[str, int]:
    return (tp.topic, tp.partition)


def _ack(self: Event) -> bool:
    message = self.message
    if message in _HANDLED:
        return bool(message.ack(self.app.consumer))
    # Released: marked done so that a rebalance does not wait for it, but its offset is not
    # acknowledged and never committed.
    message.acked = True
    log.info(
        "message released unacknowledged",
        extra={"topic": message.topic, "partition": message.partition, "offset": message.offset,
               "generation": message.generation_id},
    )  # fmt: skip
    _read_again(self.app.consumer, message.tp, message.offset)
    return False


def _read_again(consumer: Any, tp: Any, offset: int) -> None:
    """Seek `tp` back to a released `offset` (unless it is committed already): a message
    released after the post-rebalance seek (Faust skips what it reads before it resumes its
    flow) would otherwise never be read again, and the commit would wait for it forever."""
    committed = consumer._committed_offset.get(tp)
    if committed is not None and offset < committed:
        return
    pending = _PENDING.setdefault(consumer, {})
    if tp in pending and pending[tp] <= offset:
        return  # a seek to an earlier offset is on its way
    pending[tp] = offset

    async def seek() -> None:
        target = pending.pop(tp, offset)
        try:
            if tp in consumer.assignment():
                await consumer.seek(tp, target)
        except Exception as exc:  # revoked meanwhile: its next owner reads from the commit
            log.warning("could not seek back to a released message: %r", exc)

    _TASKS.add(task := asyncio.ensure_future(seek()))
    task.add_done_callback(_TASKS.discard)


def _new_offset(self: Consumer, tp: Any) -> int | None:
    """The offset to commit for `tp`: the end of the run of acknowledged offsets that starts
    at the committed position, or None when that position itself is not acknowledged yet."""
    acked: list[int] = self._acked[tp]
    if not acked:
        return None
    gaps = self._gap[tp]  # offsets known to hold no message (e.g. transaction markers)
    if gaps:
        filled = [
            offset
            for interval in sorted(gaps.overlap(0, max(acked)), key=lambda i: i.begin)
            for offset in range(interval.begin, interval.end)
        ]
        if filled:
            acked.extend(filled)
            gaps.chop(0, max(filled[-1], max(acked)) + 1)
    acked[:] = sorted(set(acked))
    committed = self._committed_offset[tp]
    expected = committed or _STARTS.get(self, {}).get(_key(tp))
    if expected is not None:
        del acked[: sum(1 for offset in acked if offset < expected)]  # read again: done
        if not acked or acked[0] != expected:
            if acked:
                _behind(self, tp, expected, acked[0])
            return None
    batch = list(next(consecutive_numbers(acked)))
    del acked[: len(batch)]
    self._acked_index[tp].difference_update(batch)
    return batch[-1] + 1


def _behind(consumer: Any, tp: Any, expected: int, next_handled: int) -> None:
    """The commit of `tp` waits at `expected` while later offsets are done. Faust also drops
    records it fetched for a partition it had not resumed yet (the position moves on all the
    same): if the wait lasts, read the partition again from `expected`."""
    now = time.monotonic()
    key = (id(consumer), tp)
    waiting = _WAITING.get(key)
    if waiting is None or waiting[0] != expected:
        _WAITING[key] = (expected, now)
        log.info(
            "commit waits for a message not yet handled",
            extra={"topic": tp.topic, "partition": tp.partition, "offset": expected,
                   "next_handled": next_handled},
        )  # fmt: skip
    elif now - waiting[1] > REREAD_AFTER:
        _WAITING[key] = (expected, now)
        log.warning(
            "reading a partition again from a message it skipped",
            extra={"topic": tp.topic, "partition": tp.partition, "offset": expected},
        )
        _read_again(consumer, tp, expected)
