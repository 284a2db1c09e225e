"""Unit tier: `service.fence.SessionFence`, on a clock the test moves."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.transport.consumer import Consumer
from faust.types import TP

from service.delivery import forget_acks
from service.fence import Fenced, SessionFence, register

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stale_only_after_a_session_without_confirmation() -> None:
    clock = Clock()
    fence = SessionFence(10.0, clock)
    assert not fence.stale()  # not in a group yet: nothing to fence
    fence.confirm()
    clock.now += 10.0
    assert not fence.stale()
    clock.now += 0.5
    assert fence.stale()
    fence.confirm()
    assert not fence.stale()


async def test_wait_returns_once_confirmed_and_raises_on_a_rebalance() -> None:
    clock = Clock()
    fence = SessionFence(1.0, clock)
    fence.confirm()
    clock.now += 5
    polls: list[int] = []

    def rebalancing() -> bool:
        polls.append(1)
        if len(polls) == 3:
            fence.confirm()  # a heartbeat answered meanwhile
        return False

    await fence.wait_current(rebalancing, poll=0)
    assert len(polls) == 3
    clock.now += 5
    with pytest.raises(Fenced):
        await fence.wait_current(lambda: True, poll=0)


class _Producer:
    def __init__(self, during_flush: Callable[[], None]) -> None:
        self.during_flush = during_flush
        self.flushes = 0

    async def flush(self) -> None:
        self.flushes += 1
        self.during_flush()


class _App:  # weakly referenced by the fence registry, as Faust's app is
    def __init__(self, producer: _Producer) -> None:
        self.producer = producer


class _Consumer:
    """What Faust's `_commit_offsets` touches before it asks the broker: an empty assignment
    ends it there (nothing to commit), so `asked` says whether the commit went on."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.log = SimpleNamespace(dev=lambda *a, **k: None, info=lambda *a, **k: None)
        self.asked = 0

    def assignment(self) -> set[TP]:
        self.asked += 1
        return set()


async def test_no_commit_after_the_gate_dropped_records_until_assigned_again() -> None:
    fence = SessionFence(10.0, Clock())
    fence.confirm()
    drop = [False]

    def during_flush() -> None:  # the gate drops records while the commit flushes
        if drop[0]:
            fence.dropped = True

    app = _App(_Producer(during_flush))
    register(app, "guarded-commits", fence)
    consumer = _Consumer(app)
    offsets = {TP("t", 0): 5}
    assert await Consumer._commit_offsets(cast(Any, consumer), offsets) is False
    assert (app.producer.flushes, consumer.asked) == (1, 1)  # flushed first, then committing
    drop[0] = True
    assert await Consumer._commit_offsets(cast(Any, consumer), offsets) is False
    assert consumer.asked == 1  # skipped: a message of the dropped records is in `offsets`
    drop[0] = False
    assert await Consumer._commit_offsets(cast(Any, consumer), offsets) is False
    assert consumer.asked == 1  # still skipped: the drop was since the last assignment
    fence.dropped = False  # what the worker does once partitions are assigned again
    await Consumer._commit_offsets(cast(Any, consumer), offsets)
    assert consumer.asked == 2


def test_forget_acks_leaves_nothing_to_commit() -> None:
    tp = TP("t", 0)
    consumer = SimpleNamespace(_acked={tp: [3, 4]}, _acked_index={tp: {3, 4}}, _n_acked=2)
    forget_acks(cast(Any, consumer))
    assert (consumer._acked, consumer._acked_index, consumer._n_acked) == ({}, {}, 0)
