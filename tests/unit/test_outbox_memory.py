"""Unit: the records waiting in `service.outbox` cost their own size, not the 4 KiB buffer
each orjson result is written in."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from service.outbox import MAX_PENDING, Outbox

pytestmark = pytest.mark.unit


def _ignore(*_args: object) -> None:
    return None


async def test_a_full_outbox_of_small_orjson_records_holds_their_size() -> None:
    outbox = Outbox(lambda: None)  # never reached: the hand-over is cancelled before it runs
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(MAX_PENDING):
            key, value = orjson.dumps(f"k{n}"), orjson.dumps({"n": n})
            outbox.queue("t", 0, key, value, None, _ignore, after_delivery=n % 2 == 1)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        if outbox._timer is not None:
            outbox._timer.cancel()
        if outbox._draining is not None:  # started once `FULL` records were queued
            outbox._draining.cancel()
    assert outbox.full()
    # Two 4 KiB buffers a record were 16 MB here; their bytes and the queue, under 1 MB.
    assert held < 1_000_000, held
    assert [(r[2], r[3]) for r in (outbox.records[0], outbox.later[0])] == [
        (b'"k0"', b'{"n":0}'),
        (b'"k1"', b'{"n":1}'),
    ]
