"""The partials messages between the metrics partitions and the merger: many minute
aggregates per message, in runs of bounded size, read back as the one-aggregate form."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.metrics_stage import batch_of, chunks, unbatch

pytestmark = pytest.mark.unit

sizes = st.lists(st.integers(min_value=0, max_value=300), max_size=40)


@given(sizes, st.integers(min_value=1, max_value=600))
def test_chunks_keep_every_item_in_order_within_the_limit(lengths: list[int], limit: int) -> None:
    items = [(n, b"x" * length) for n, length in enumerate(lengths)]
    runs = list(chunks(items, limit))
    assert [item for run in runs for item in run] == items
    for run in runs:
        assert run, "no empty message"
        size = sum(len(encoded) for _, encoded in run)
        assert size <= limit or len(run) == 1, "only an item larger than the limit goes alone"
    for run, following in pairwise(runs):
        # A run ends only where its next item would not have fitted.
        assert sum(len(e) for _, e in run) + len(following[0][1]) > limit


def _bucket(scope: str, minute: int, events: int) -> tuple[Any, bytes]:
    agg = {"events": events, "customers": [["C-1", events]]}
    return (scope, minute), orjson.dumps({"scope": scope, "minute": minute, "agg": agg})


def test_a_batch_reads_back_as_one_partial_per_bucket_under_its_table_key() -> None:
    head = {"p": 3, "wm": 1_700_000_000_000, "v": 41}
    buckets = [_bucket("all", 100, 2), _bucket("web", 100, 1), _bucket("all", 101, 5)]
    read = list(unbatch(orjson.loads(batch_of(head, buckets))))
    assert [key for key, _ in read] == ["3|all|100", "3|web|100", "3|all|101"]
    assert read[2][1] == {
        "p": 3, "scope": "all", "minute": 101, "wm": 1_700_000_000_000, "v": 41,
        "agg": {"events": 5, "customers": [["C-1", 5]]},
    }  # fmt: skip


def test_a_message_of_one_partial_still_reads() -> None:
    """As an earlier version sent them: one aggregate per message, possibly without "v"."""
    old = {"p": 1, "scope": "chat", "minute": 7, "agg": {"events": 1}, "wm": 420_000}
    assert list(unbatch(old)) == [("1|chat|7", old)]
