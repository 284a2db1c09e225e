"""`own_size`: kept bytes at their own size, not in orjson's 4 KiB buffer."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from service.buffers import own_size

pytestmark = pytest.mark.unit


def test_a_copy_holds_its_bytes_only() -> None:
    documents = [f"e|{n}" for n in range(2000)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        written = [orjson.dumps(document) for document in documents]
        as_written = tracemalloc.get_traced_memory()[0] - base
        copied = [own_size(data) for data in written]
        del written
        as_copied = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert copied == [orjson.dumps(document) for document in documents]
    assert as_written > 2000 * 4000  # orjson's buffer, kept with each result
    assert as_copied < 2000 * 100, as_copied
