"""Session fencing without transactions: a worker that may have been replaced writes nothing.

A consumer that has not had a heartbeat answered for longer than the group's session timeout
(the process was paused, starved or cut off from the broker) may have been evicted, and its
partitions handed to another worker. Whatever it then writes (outputs, changelog records)
would interleave with its successor's. So until a heartbeat is answered again, or the group
rebalances, it neither takes another message nor publishes anything, and a table write in a
message it was handling when it froze is refused (`Fenced`); the message it holds is released
unacknowledged (its offset is never committed, and it is read again, by this worker or the
partition's next owner).

Records already handed to the producer before the pause (a linger's worth, and whatever
waits behind a request in flight) are held too (`gate_producer`): sent once the session is
confirmed again, or dropped, their futures failed with `Fenced`, once the group rebalances. They
belong to messages whose offsets were not committed (a commit waits for the producer), which
the partition's next owner reads again. Sent late, they would land after the successor's
records: a dead letter or an output twice, a changelog record over a newer one, and (found by
tests/reliability/test_rebalance.py) a delivered changelog offset past the successor's
records, from which this worker would later restore the table, skipping them.

Once records were dropped, no offset is committed until partitions are assigned again
(`guard_commits`): the messages they came from were acknowledged, and the broker may still
take a commit from a member it has not evicted yet (a worker stopping while stale).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from aiokafka.consumer.group_coordinator import GroupCoordinator
from faust.transport.consumer import Consumer

log = logging.getLogger(__name__)


class Fenced(Exception):
    """Raised inside a stage when the session went stale and the group began to rebalance:
    the message is to be released without an ack."""


class SessionFence:
    """When the group coordinator last confirmed this member -> whether it may still write."""

    def __init__(self, session_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.session_timeout = session_timeout
        self.clock = clock
        self.confirmed_at: float | None = None  # None: not in a group yet (nothing to fence)
        # The producer's gate dropped records since partitions were last assigned: nothing
        # may be committed until they are assigned again (`guard_commits`).
        self.dropped = False

    def confirm(self) -> None:
        """A heartbeat was answered, or partitions were assigned: the session is current."""
        self.confirmed_at = self.clock()

    def stale(self) -> bool:
        """True when the coordinator has not confirmed this member for a session timeout."""
        return (
            self.confirmed_at is not None
            and self.clock() - self.confirmed_at > self.session_timeout
        )

    async def wait_current(self, rebalancing: Callable[[], bool], poll: float = 0.05) -> None:
        """Return once the session is current again; raise `Fenced` if the group rebalances
        (or the worker stops) first."""
        while self.stale():
            if rebalancing():
                raise Fenced("session expired; the group is rebalancing")
            await asyncio.sleep(poll)


# app -> its fence, for the table writes
_APP_FENCES: weakref.WeakKeyDictionary[Any, SessionFence] = weakref.WeakKeyDictionary()
# group id -> the fence of the worker consuming in that group (one worker per process; the
# registry is weak so that apps built in tests leave nothing behind)
_FENCES: weakref.WeakValueDictionary[str, SessionFence] = weakref.WeakValueDictionary()


def register(app: Any, group_id: str, fence: SessionFence) -> None:
    """Have heartbeats answered for `group_id` confirm `fence`, and refuse `app`'s table
    writes while it is stale (`refuse_if_stale`)."""
    _FENCES[group_id] = fence
    _APP_FENCES[app] = fence
    if getattr(GroupCoordinator, "_cx_fenced", False):
        return
    original = GroupCoordinator._do_heartbeat

    async def heartbeat(self: Any) -> bool:
        ok = bool(await original(self))
        if ok and (found := _FENCES.get(self.group_id)) is not None:
            found.confirm()
        return ok

    setattr(GroupCoordinator, "_do_heartbeat", heartbeat)  # noqa: B010 - monkeypatch on purpose
    setattr(GroupCoordinator, "_cx_fenced", True)  # noqa: B010
    guard_commits()


def guard_commits() -> None:
    """Have Faust's commit flush the producer first, as it does, then commit nothing when the
    gate dropped records (now or since the last assignment): their messages were acknowledged
    but their records never sent, and they are read again from the last commit (once per
    process)."""
    if getattr(Consumer, "_cx_guarded_commits", False):
        return
    original = Consumer._commit_offsets

    async def commit_offsets(self: Any, offsets: Any, start_new_transaction: bool = True) -> bool:
        found = _APP_FENCES.get(self.app)
        if found is not None:
            await self.app.producer.flush()  # a drop shows here (the commit flushes again)
            if found.dropped:
                log.warning(
                    "commit skipped: records were dropped when the session expired; their "
                    "messages are read again",
                    extra={"partitions": len(offsets)},
                )
                return False
        return bool(await original(self, offsets, start_new_transaction))

    setattr(Consumer, "_commit_offsets", commit_offsets)  # noqa: B010 - monkeypatch on purpose
    setattr(Consumer, "_cx_guarded_commits", True)  # noqa: B010


def refuse_if_stale(app: Any) -> None:
    """Raise `Fenced` when `app`'s session is stale: called by a table before it changes
    anything, so that a refused write leaves neither the store nor its changelog changed."""
    found = _APP_FENCES.get(app)
    if found is not None and found.stale():
        raise Fenced("session expired: table write refused")


# While held, the producer's sender looks again this often (seconds).
HOLD_POLL = 0.05


def gate_producer(
    producer: Any, fence: SessionFence, rebalancing: Callable[[], bool]
) -> Callable[[], int]:
    """Have an aiokafka producer send nothing while `fence` is stale: what it holds waits until
    the session is confirmed, or is dropped (each future failed with `Fenced`) once
    `rebalancing()` -> a function returning how many records were dropped so far."""
    accumulator = producer._message_accumulator
    drain = accumulator.drain_by_nodes
    dropped = 0
    holding = False

    def gated(ignore_nodes: Any, muted_partitions: Any = frozenset()) -> Any:
        nonlocal dropped, holding
        if not fence.stale():
            if holding:
                holding = False
                log.info("session confirmed: the producer sends again")
            return drain(ignore_nodes, muted_partitions)
        if not holding:
            holding = True
            log.warning("session stale: the producer holds its records until a heartbeat is "
                        "answered or the group rebalances")  # fmt: skip
        if rebalancing() and (count := _drop_batches(accumulator)):
            dropped += count
            fence.dropped = True
        # As aiokafka's own drain does: a fresh waiter for new data, and a wake-up to look
        # again (here: whether the session was confirmed meanwhile).
        if not accumulator._waiter_future.done():
            accumulator._waiter_future.set_result(None)
        loop = asyncio.get_running_loop()
        accumulator._waiter_future = loop.create_future()
        if accumulator._wakeup_handle is not None:
            accumulator._wakeup_handle.cancel()
        accumulator._wakeup_handle = loop.call_later(
            HOLD_POLL, accumulator._wakeup, accumulator._waiter_future
        )
        return {}, False

    accumulator.drain_by_nodes = gated
    return lambda: dropped


def _drop_batches(accumulator: Any) -> int:
    """Fail every batch `accumulator` has not sent with `Fenced` -> the records dropped."""
    count = 0
    for tp in list(accumulator._batches):
        for batch in accumulator._batches.pop(tp):
            count += batch.record_count
            batch.failure(Fenced("session expired and the group rebalanced: record dropped"))
            if batch._drain_waiter.done():
                batch._drain_waiter.exception()  # retrieved: nobody waits on a dropped batch
    if count:
        log.warning(
            "session expired: records held by the producer dropped; their messages are read "
            "again by the partitions' next owners",
            extra={"records": count},
        )
    return count
