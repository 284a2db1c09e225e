"""Unit tier: the commit rule of `service.delivery` (a commit never passes an offset that no
stage finished) and its acknowledgement guard."""

from __future__ import annotations

import asyncio
import gc
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types.tuples import TP, Message
from intervaltree import IntervalTree

from service import delivery
from service.delivery import _new_offset, mark_handled

pytestmark = pytest.mark.unit

PART = TP("cx.raw.web", 0)


class FakeConsumer:
    """The bookkeeping `Consumer._new_offset` reads, as Faust keeps it."""

    def __init__(self, committed: int | None = None, acked: list[int] | None = None) -> None:
        self._acked: defaultdict[Any, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[Any, set[int]] = defaultdict(set)
        self._gap: defaultdict[Any, IntervalTree] = defaultdict(IntervalTree)
        self._committed_offset: defaultdict[Any, int | None] = defaultdict(lambda: None)
        self._committed_offset[PART] = committed
        self._read_offset = delivery._ReadOffsets()
        self.seeks = []
        for offset in acked or []:
            self._acked[PART].append(offset)
            self._acked_index[PART].add(offset)

    def new_offset(self) -> int | None:
        return _new_offset(self, PART)  # type: ignore[arg-type]

    # What a seek back needs: the assignment and the seek itself (recorded).
    seeks: list[tuple[TP, int]]

    def assignment(self) -> set[TP]:
        return {PART}

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def test_commits_the_run_that_starts_at_the_committed_offset() -> None:
    consumer = FakeConsumer(committed=5, acked=[7, 5, 6, 9])
    assert consumer.new_offset() == 8
    assert consumer._acked[PART] == [9]  # waits for 8


def test_a_gap_at_the_head_commits_nothing() -> None:
    """Faust itself would commit 8 here (a gap of one is tolerated): offset 5 would be lost."""
    consumer = FakeConsumer(committed=5, acked=[6, 7])
    assert consumer.new_offset() is None
    assert consumer._acked[PART] == [6, 7]  # kept for when 5 is done


def test_no_committed_offset_uses_where_reading_started() -> None:
    consumer = FakeConsumer(committed=None, acked=[7, 8])
    delivery._STARTS[consumer] = {(PART.topic, PART.partition): 0}
    assert consumer.new_offset() is None  # 0..6 are not done: Faust would commit 9
    consumer._acked[PART].extend(range(7))
    assert consumer.new_offset() == 9


def test_offsets_read_again_below_the_commit_are_dropped() -> None:
    consumer = FakeConsumer(committed=10, acked=[8, 9, 10, 11])
    assert consumer.new_offset() == 12
    assert consumer._acked[PART] == []


def _message(offset: int) -> Message:
    return Message(
        topic=PART.topic, partition=PART.partition, offset=offset, timestamp=0.0,
        timestamp_type=0, headers=[], key=None, value=b"{}", checksum=None,
    )  # fmt: skip


class SeekingConsumer:
    """What a released message needs of the consumer: its commits, assignment and seek."""

    def __init__(self, committed: int | None) -> None:
        self._committed_offset = {PART: committed}
        self._read_offset = delivery._ReadOffsets()
        self.seeks: list[tuple[TP, int]] = []

    def assignment(self) -> set[TP]:
        return {PART}

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


class FakeApp:
    def __init__(self, consumer: SeekingConsumer) -> None:
        self.consumer = consumer


class FakeEvent:
    def __init__(self, message: Message, consumer: SeekingConsumer) -> None:
        self.message = message
        self.app = FakeApp(consumer)


async def test_an_unhandled_message_is_released_and_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acks: list[int] = []
    monkeypatch.setattr(Message, "ack", lambda self, consumer: acks.append(self.offset) or True)
    consumer = SeekingConsumer(committed=1)
    old, skipped, later, handled = _message(0), _message(3), _message(4), _message(5)
    mark_handled(handled)
    assert delivery._ack(FakeEvent(skipped, consumer)) is False  # type: ignore[arg-type]
    assert skipped.acked  # a rebalance does not wait for it
    assert delivery._ack(FakeEvent(later, consumer)) is False  # type: ignore[arg-type]
    assert delivery._ack(FakeEvent(old, consumer)) is False  # type: ignore[arg-type]
    assert delivery._ack(FakeEvent(handled, consumer)) is True  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert acks == [5]
    assert consumer.seeks == [(PART, 3)]  # once, to the earliest; 0 is committed already


async def test_a_partition_whose_commit_waits_is_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Later offsets are done, the committed one never comes (Faust dropped it at fetch time):
    after REREAD_AFTER seconds the partition is read again from it, once per wait."""
    clock = [1000.0]
    monkeypatch.setattr(delivery.time, "monotonic", lambda: clock[0])
    consumer = FakeConsumer(committed=5, acked=[7, 8])
    seeks = consumer.seeks
    assert consumer.new_offset() is None
    clock[0] += delivery.REREAD_AFTER / 2
    assert consumer.new_offset() is None
    await asyncio.sleep(0)
    assert seeks == []
    clock[0] += delivery.REREAD_AFTER
    assert consumer.new_offset() is None
    await asyncio.sleep(0)
    assert seeks == [(PART, 5)]
    assert consumer._read_offset.floors == {PART: 5}  # the re-read 5 is not dropped
    consumer._acked[PART].extend([5, 6])  # read again and handled
    assert consumer.new_offset() == 9


async def test_offsets_that_rereading_never_brings_are_taken_for_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction marker of an upstream producer: no reading ever delivers offset 5. After
    GAP_REREADS readings over GAP_AFTER seconds the commit goes past it, not before."""
    clock = [1000.0]
    monkeypatch.setattr(delivery.time, "monotonic", lambda: clock[0])
    consumer = FakeConsumer(committed=5, acked=[6, 7])
    seeks = consumer.seeks
    results = []
    while clock[0] < 1000.0 + delivery.GAP_AFTER + 10 * delivery.REREAD_AFTER:
        results.append(consumer.new_offset())
        await asyncio.sleep(0)
        clock[0] += delivery.REREAD_AFTER + 0.5
        if results[-1] is not None:
            break
    assert results[-1] == 8
    assert all(r is None for r in results[:-1])
    assert len(seeks) >= delivery.GAP_REREADS
    assert (len(results) - 1) * (delivery.REREAD_AFTER + 0.5) > delivery.GAP_AFTER


async def test_a_wait_from_before_an_assignment_does_not_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A commit waited at offset 5 for over GAP_AFTER seconds, read again GAP_REREADS times,
    then the group rebalanced: the partition is read again from 5, and the wait starts over.
    Kept, the next commit would have taken 5 and 6 for empty at once."""
    clock = [1000.0]
    monkeypatch.setattr(delivery.time, "monotonic", lambda: clock[0])
    consumer = FakeConsumer(committed=5, acked=[7, 8])
    old = delivery._Wait(5, since=0.0, last_read=0.0, rereads=delivery.GAP_REREADS)
    delivery._WAITING[consumer] = {PART: old}

    class Client:  # aiokafka's consumer: every partition has a committed offset
        async def seek_to_committed(self) -> dict[Any, int]:
            return {PART: 5}

    thread = SimpleNamespace(consumer=consumer, _ensure_consumer=Client)
    await delivery._seek_to_committed(thread)
    assert consumer.new_offset() is None  # still waiting for 5 (and 6)
    assert delivery._WAITING[consumer] == {PART: delivery._Wait(5, 1000.0, 1000.0)}


async def test_faust_inferred_gaps_are_ignored() -> None:
    """Faust records offsets it saw skipped as empty; they may be dropped messages."""
    consumer = FakeConsumer(committed=5, acked=[5, 8])
    await delivery._no_gap(consumer, PART, 6, 7)  # type: ignore[arg-type]
    consumer._gap[PART].addi(6, 8)  # even where Faust's own bookkeeping has one
    assert consumer.new_offset() == 6
    assert consumer._acked[PART] == [8]


def test_read_offsets_let_a_message_read_again_through() -> None:
    """After a seek back to 5, Faust may still read 9 from a batch fetched before the seek;
    the re-read 5 must not be dropped as 'below the read offset' (Faust drops those)."""
    offsets = delivery._ReadOffsets()
    offsets.read(PART, 4)
    offsets.floors[PART] = 5  # what _read_again sets with its seek
    offsets[PART] = 5  # the seek itself (Faust's Consumer.seek) keeps the floor
    offsets.read(PART, 9)
    assert offsets[PART] == 5  # 5..9 pass Faust's `offset >= read offset` check
    offsets.read(PART, 5)  # the message read again
    assert PART not in offsets.floors
    offsets.read(PART, 9)
    assert offsets[PART] == 9
    offsets.floors[PART] = 3
    assert offsets.pop(PART) == 9
    assert PART not in offsets.floors


async def test_a_commits_wait_goes_with_its_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer's waits are dropped with it: kept under its id, a consumer given that id
    later inherited them (a wait's last reading far ahead of its clock: it never read again)."""
    monkeypatch.setattr(delivery.time, "monotonic", lambda: 1000.0)
    consumer = FakeConsumer(committed=5, acked=[7, 8])
    assert consumer.new_offset() is None  # waits at 5
    assert delivery._WAITING[consumer] == {PART: delivery._Wait(5, 1000.0, 1000.0)}
    waits_before = len(delivery._WAITING)
    del consumer
    gc.collect()
    assert len(delivery._WAITING) == waits_before - 1
