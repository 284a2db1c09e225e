"""Faust's stream iterator gives the event loop a turn every few events, not before each one.

`Stream._py_aiter` runs `await sleep(0)` before it takes each event from its queue: a whole
loop turn (a selector poll, the ready callbacks) per event and per stage, so that a stage whose
queue is never empty cannot hold the loop. Measured with five forwarding agents on the worker's
transport (`service/floor.py`): 45 µs of CPU a hop, 31.8 µs when it yields every 16th time.
In the worker (20 000 messages): 1.25 ms of CPU an event, 0.89 ms every 16th, 0.84 ms every
64th; a stage then holds the loop for at most 64 events, a few tens of milliseconds.

`install` gives `faust.streams` an `asyncio` whose `sleep(0)` yields every `YIELD_EVERY`-th
call and returns at once otherwise; every other name (and any other delay) is asyncio's own.
The count is shared by every stream of the process, so no stage takes more than `YIELD_EVERY`
events in a row without the loop getting a turn. What the iterator does with an event is
unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import types
from collections.abc import Awaitable
from typing import Any

import faust.streams

YIELD_EVERY = 64

# Every line of `faust.streams` that sleeps (all in `_py_aiter`): a faust-streaming that
# changes them fails tests/unit/test_yielding.py until the patch is checked again.
EXPECTED_LINES = ["sleep = asyncio.sleep", "await sleep(0)"]


class RarerYields(types.ModuleType):
    """asyncio, except that `sleep(0)` yields to the loop only every `every`-th call."""

    def __init__(self, every: int) -> None:
        super().__init__("asyncio")
        self._calls = itertools.count(1)
        self._every = every

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def sleep(self, delay: float, result: Any = None) -> Awaitable[Any]:
        if delay == 0 and next(self._calls) % self._every:
            return _now(result)
        return asyncio.sleep(delay, result)


async def _now(result: Any) -> Any:
    return result  # finishes without suspending: no loop turn


def faust_sleep_lines() -> list[str]:
    """-> the lines of `faust.streams` that mention `sleep`, stripped."""
    source = inspect.getsource(faust.streams)
    return [line.strip() for line in source.splitlines() if "sleep" in line]


def install(every: int = YIELD_EVERY) -> None:
    """Give Faust's streams the rarer yields (once per process)."""
    if isinstance(getattr(faust.streams, "asyncio", None), RarerYields):
        return
    setattr(faust.streams, "asyncio", RarerYields(every))  # noqa: B010 - a monkeypatch
