"""At-least-once guards over Faust's acknowledgements and commits (found by the rebalance tests).

Faust's stream skips a message it reads while a rebalance is under way, or from an earlier
generation, and *acknowledges* it: its offset is then committed though no stage handled it.
Its consumer drops records it fetched when a rebalance begins (the position moves on all the
same) and takes the offsets it then sees skipped for empty (transaction markers), committing
past them. Its commit logic tolerates a gap at the head of the acknowledged offsets, and
aiokafka does not seek a partition whose committed offset is 0 or absent, so a message fetched
and dropped there is never read again. Together, a rebalance could lose messages. With these
guards:

- only a message a stage finished is acknowledged (`mark_handled`); any other is released
  unacknowledged, to be read again from the committed offset after the rebalance;
- an offset is committed only when every offset from the committed position up to it was
  acknowledged; where one is missing while later ones are done, the partition is read again
  from it, and only offsets that several readings over a minute never bring are taken for
  empty (`_behind`);
- after every assignment each partition is positioned at its committed offset, or at its
  beginning when it has none, and a message released after that is sought back to, so that
  whatever was released is read again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
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
# consumer -> partition -> its commit's wait. Held weakly, as the two above: keyed by the
# consumer's id, a dead consumer's waits stayed behind, and a consumer given its id later
# inherited them (a unit test failed so, 1 run in many).
_WAITING: weakref.WeakKeyDictionary[Any, dict[Any, _Wait]] = weakref.WeakKeyDictionary()
# Later offsets handled while an earlier one is not, for this long: it will not come by itself.
REREAD_AFTER = 3.0
# Offsets that this many readings over this long never bring hold no message.
GAP_REREADS, GAP_AFTER = 3, 60.0
# consumer -> partition -> the first offset it will read when it has no committed offset
_STARTS: weakref.WeakKeyDictionary[Any, dict[Any, int]] = weakref.WeakKeyDictionary()


def mark_handled(message: Message) -> None:
    """A stage finished `message`: its acknowledgement may count towards a commit."""
    _HANDLED.add(message)


def forget_acks(consumer: Consumer) -> None:
    """Forget every acknowledgement not committed yet, of every partition: none of them may
    be committed (see `service.fence.guard_commits`); their messages are read again from the
    committed offsets."""
    consumer._acked.clear()
    consumer._acked_index.clear()
    consumer._n_acked = 0


def install() -> None:
    """Patch Faust's acknowledgements, commits and seeks (once per process)."""
    if getattr(Event, "_cx_guarded", False):
        return
    setattr(Event, "ack", _ack)  # noqa: B010 - monkeypatches on purpose
    # Faust's compiled stream iterator acknowledges inline, past Event.ack: use the Python one.
    setattr(faust.streams, "_CStreamIterator", None)  # noqa: B010
    setattr(Consumer, "_new_offset", _new_offset)  # noqa: B010
    setattr(Consumer, "_add_gap", _no_gap)  # noqa: B010
    consumer_init = Consumer.__init__

    def init(self: Consumer, *args: Any, **kwargs: Any) -> None:
        consumer_init(self, *args, **kwargs)
        self._read_offset = _ReadOffsets()

    setattr(Consumer, "__init__", init)  # noqa: B010
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
    # Every partition is read again from its commit: a commit's wait from before is void. Kept,
    # its readings and its age would count towards taking offsets for empty at once (`_behind`).
    _WAITING.pop(thread.consumer, None)
    return committed


class _ReadOffsets(defaultdict[Any, int | None]):
    """Faust's last read offset per partition, which it drops any message below. A message
    read again after a seek back (`_read_again`) can come after Faust has read past it from a
    batch fetched before the seek: below a partition's floor nothing is dropped, until the
    message at the floor itself has been read."""

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self.floors: dict[Any, int] = {}

    def __getitem__(self, tp: Any) -> int | None:
        value = super().__getitem__(tp)
        floor = self.floors.get(tp)
        return value if floor is None or value is None else min(value, floor)

    def read(self, tp: Any, offset: int) -> None:
        """The consumer handed on the message at `offset` (`handoff.drain`): the floor goes
        once the message at it is read. A seek sets the read offset with `[]=` and keeps the
        floor: a seek back to the floor cleared it, and a record fetched before the seek
        then raised the read offset past the message sought (found in a failing run of
        tests/reliability/test_deadletter_failure.py: the re-read message was dropped)."""
        if self.floors.get(tp) == offset:
            del self.floors[tp]
        self[tp] = offset

    def pop(self, tp: Any, *default: Any) -> Any:
        self.floors.pop(tp, None)
        return super().pop(tp, *default)


async def _no_gap(self: Consumer, tp: Any, offset_from: int, offset_to: int) -> None:
    """Faust takes offsets skipped between two delivered messages for empty and commits past
    them; they may be messages it fetched and dropped. `_behind` decides instead."""


def _key(tp: Any) -> tuple[str, int]:
    return (tp.topic, tp.partition)


def _ack(self: Event) -> bool:
    message = self.message
    if message in _HANDLED:
        return bool(message.ack(self.app.consumer))
    # Released: marked done so that a rebalance does not wait for it, but its offset is not
    # acknowledged and never committed.
    message.acked = True
    log.debug(  # routine around a rebalance: Faust skips what it had buffered
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
    floors = getattr(consumer._read_offset, "floors", None)
    if floors is not None:
        floors[tp] = min(offset, floors.get(tp, offset))

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
    acked[:] = sorted(set(acked))
    committed = self._committed_offset[tp]
    expected = committed or _STARTS.get(self, {}).get(_key(tp))
    if expected is not None:
        del acked[: sum(1 for offset in acked if offset < expected)]  # read again: done
        if acked and acked[0] != expected:
            _behind(self, tp, expected, acked)
        if not acked or acked[0] != expected:
            return None
    batch = list(next(consecutive_numbers(acked)))
    del acked[: len(batch)]
    self._acked_index[tp].difference_update(batch)
    return batch[-1] + 1


@dataclass
class _Wait:
    """A commit waiting at one offset while later offsets are done."""

    offset: int
    since: float
    last_read: float
    rereads: int = 0


def _behind(consumer: Any, tp: Any, expected: int, acked: list[int]) -> None:
    """The commit of `tp` waits at `expected` while later offsets are done: the records in
    between were fetched and dropped (Faust drops what it fetched while a rebalance began,
    the position moving on all the same), or hold no message (a transaction marker of an
    upstream producer). Read the partition again from `expected`; only when several readings
    over `GAP_AFTER` seconds never bring it, take the offsets for empty and commit past them
    (by extending `acked`)."""
    now = time.monotonic()
    waits = _WAITING.setdefault(consumer, {})
    wait = waits.get(tp)
    where = {"topic": tp.topic, "partition": tp.partition, "offset": expected}
    if wait is None or wait.offset != expected:
        waits[tp] = _Wait(expected, now, now)
        log.info("commit waits for a message not yet handled", extra=where)
    elif now - wait.last_read > REREAD_AFTER:
        if wait.rereads >= GAP_REREADS and now - wait.since > GAP_AFTER:
            log.warning("no message at these offsets: committing past them",
                        extra={**where, "up_to": acked[0]})  # fmt: skip
            acked[:0] = range(expected, acked[0])
            del waits[tp]
            return
        wait.last_read, wait.rereads = now, wait.rereads + 1
        log.warning("reading a partition again from a message it skipped", extra=where)
        _read_again(consumer, tp, expected)
