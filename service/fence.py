"""Session fencing without transactions: a worker that may have been replaced writes nothing.

A consumer that has not had a heartbeat answered for longer than the group's session timeout
(the process was paused, starved or cut off from the broker) may have been evicted, and its
partitions handed to another worker. Whatever it then writes (outputs, changelog records)
would interleave with its successor's. So until a heartbeat is answered again, or the group
rebalances, it neither takes another message nor publishes anything, and a table write in a
message it was handling when it froze is refused (`Fenced`); the message it holds is released
unacknowledged (its offset is never committed, and it is read again, by this worker or the
partition's next owner).

What this cannot stop, without Kafka transactions: records already handed to the producer
before the pause (at most a linger's worth, 5 ms) are sent when the process resumes.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any

from aiokafka.consumer.group_coordinator import GroupCoordinator


class Fenced(Exception):
    """Raised inside a stage when the session went stale and the group began to rebalance:
    the message is to be released without an ack."""


class SessionFence:
    """When the group coordinator last confirmed this member -> whether it may still write."""

    def __init__(self, session_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.session_timeout = session_timeout
        self.clock = clock
        self.confirmed_at: float | None = None  # None: not in a group yet (nothing to fence)

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


def refuse_if_stale(app: Any) -> None:
    """Raise `Fenced` when `app`'s session is stale: called by a table before it changes
    anything, so that a refused write leaves neither the store nor its changelog changed."""
    found = _APP_FENCES.get(app)
    if found is not None and found.stale():
        raise Fenced("session expired: table write refused")
