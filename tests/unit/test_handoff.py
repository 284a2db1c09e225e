"""Unit tier: `service.handoff` runs a record's hand-off at once when it does not wait, and
otherwise decides as Faust's race does (done, or given up when the flow is suspended)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from faust.transport.consumer import Consumer
from mode import Service

from service import handoff
from service.handoff import FAUST_DRAIN_SHA256, faust_drain_digest

pytestmark = pytest.mark.unit


class Racer(Service):
    """A consumer as `handoff` uses it: Faust's `wait_first`, with its races counted."""

    def __init__(self) -> None:
        super().__init__()
        self.races = 0

    async def wait_first(self, *coros: Any, **options: Any) -> Any:
        self.races += 1
        return await super().wait_first(*coros, **options)


def test_the_copied_loop_is_fausts_own() -> None:
    """`drain` copies Faust's `_drain_messages`: another Faust must be read again first."""
    assert faust_drain_digest() == FAUST_DRAIN_SHA256


def test_install_replaces_the_drain_once() -> None:
    handoff.install()
    handoff.install()
    assert Consumer._drain_messages is handoff.drain
    assert Consumer._cx_original_drain is not handoff.drain  # type: ignore[attr-defined]


async def test_a_hand_off_that_does_not_wait_runs_at_once_without_a_race() -> None:
    consumer, seen = Racer(), []

    async def put(message: str) -> None:
        seen.append(message)

    await handoff.handoff(consumer, put, "m1", asyncio.Event())
    assert seen == ["m1"]
    assert consumer.races == 0


async def test_a_hand_off_that_waits_finishes_in_the_race() -> None:
    consumer, seen = Racer(), []
    room: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def put(message: str) -> None:
        seen.append(f"{message}:{await room}")
        await asyncio.sleep(0)  # a bare yield after the wait
        seen.append("after")

    task = asyncio.ensure_future(handoff.handoff(consumer, put, "m1", asyncio.Event()))
    await asyncio.sleep(0.01)
    assert not task.done()
    room.set_result("room")
    await asyncio.wait_for(task, 1)
    assert seen == ["m1:room", "after"]
    assert consumer.races == 1


async def test_a_waiting_hand_off_gives_way_when_the_flow_is_suspended() -> None:
    consumer, outcome = Racer(), []
    room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    suspended = asyncio.Event()

    async def put(message: str) -> None:
        try:
            await room
            outcome.append("put")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    task = asyncio.ensure_future(handoff.handoff(consumer, put, "m1", suspended))
    await asyncio.sleep(0.01)
    suspended.set()
    await asyncio.wait_for(task, 1)
    await asyncio.sleep(0)
    assert outcome == ["cancelled"]
    assert room.cancelled()


async def test_a_hand_off_while_the_flow_is_suspended_is_raced_from_the_start() -> None:
    consumer, outcome = Racer(), []
    suspended = asyncio.Event()
    suspended.set()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def put(message: str) -> None:
        await never  # as Faust's flow control holds a hand-off while suspended
        outcome.append("put")

    await asyncio.wait_for(handoff.handoff(consumer, put, "m1", suspended), 1)
    assert consumer.races == 1
    assert outcome == []


@pytest.mark.parametrize("waits", [False, True])
async def test_an_error_in_the_hand_off_reaches_the_loop(waits: bool) -> None:
    consumer = Racer()

    async def put(message: str) -> None:
        if waits:
            await asyncio.sleep(0.001)
        raise ValueError(message)

    with pytest.raises(ValueError, match="m1"):
        await handoff.handoff(consumer, put, "m1", asyncio.Event())
