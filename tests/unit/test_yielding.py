"""Faust's streams yield to the event loop every few events (service/yielding.py)."""

from __future__ import annotations

import asyncio

import faust.streams
import pytest

from service.yielding import EXPECTED_LINES, RarerYields, faust_sleep_lines, install

pytestmark = pytest.mark.unit


def test_faust_sleeps_only_where_the_patch_expects() -> None:
    assert faust_sleep_lines() == EXPECTED_LINES


async def _loop_turns_during(sleeps: RarerYields, calls: int, delay: float = 0) -> int:
    """-> how many turns another task got while `calls` sleeps of `delay` ran."""
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    for _ in range(calls):
        await sleeps.sleep(delay)
    task.cancel()
    return turns


def test_zero_sleeps_yield_every_nth_call() -> None:
    assert asyncio.run(_loop_turns_during(RarerYields(16), 32)) == 2
    assert asyncio.run(_loop_turns_during(RarerYields(1), 5)) == 5


def test_other_delays_always_sleep() -> None:
    assert asyncio.run(_loop_turns_during(RarerYields(16), 3, delay=0.001)) >= 3


def test_a_sleep_returns_its_result() -> None:
    async def both() -> tuple[str, str]:
        sleeps = RarerYields(2)
        return await sleeps.sleep(0, "now"), await sleeps.sleep(0, "after a turn")

    assert asyncio.run(both()) == ("now", "after a turn")


def test_install_keeps_every_other_name_of_asyncio() -> None:
    install()
    patched = faust.streams.asyncio  # type: ignore[attr-defined]
    install()  # once per process: the count stays shared
    assert faust.streams.asyncio is patched  # type: ignore[attr-defined]
    assert isinstance(patched, RarerYields)
    assert patched.Event is asyncio.Event
    assert patched.CancelledError is asyncio.CancelledError
