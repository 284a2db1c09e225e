"""The bench's measures: percentiles, publish -> timeline, publish -> snapshot, the customers
in state and the people the messages come from."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import bench
from service.bench import (
    CpuMeter,
    Record,
    after_warmup,
    cpu_seconds,
    live_keys,
    messages,
    percentiles,
    to_snapshot_ms,
    to_timeline_ms,
)

pytestmark = pytest.mark.unit


def raw(partition: int, offset: int, at: int) -> Record:
    return Record("p.raw.web", partition, offset, at, b"k", b"{}")


def filed(event_id: str, partition: int, offset: int, at: int) -> Record:
    source = {"topic": "p.raw.web", "partition": partition, "offset": offset}
    value = orjson.dumps({"event_id": event_id, "source": source})
    return Record("p.timeline", 0, 0, at, b"C-1", value)


def snapshot(events: int, at: int, key: bytes = b"all/30d") -> Record:
    return Record("p.metrics", 0, 0, at, key, orjson.dumps({"events": events}))


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentiles(values, (50, 99, 99.9)) == {
        "p50_ms": 500.0,
        "p99_ms": 990.0,
        "p999_ms": 999.0,
    }
    assert percentiles([], (50,)) == {"p50_ms": None}


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200))
def test_percentiles_are_ordered_values_of_the_sample(values: list[float]) -> None:
    found = percentiles(values, (50, 99, 99.9))
    ranks = [found["p50_ms"], found["p99_ms"], found["p999_ms"]]
    assert ranks == sorted(ranks)  # type: ignore[type-var]
    # rounded to 0.1 ms: off by at most half of it (and a float error: 0.75 -> 0.8)
    assert all(any(abs(v - r) <= 0.05 + 1e-9 for v in values) for r in ranks if r is not None)


def test_timeline_latency_pairs_each_event_with_its_raw_record_once() -> None:
    published = [raw(0, 0, 1_000), raw(0, 1, 1_010), raw(1, 0, 1_020)]
    timeline = [
        filed("web:a", 0, 0, 1_100),
        filed("web:b", 0, 1, 1_060),
        filed("web:a", 0, 0, 1_900),  # a replayed copy: the first one counts
        filed("web:x", 5, 5, 2_000),  # no raw record read: left out
    ]
    assert sorted(to_timeline_ms(published, timeline)) == [50, 100]


def test_snapshot_latency_takes_the_first_snapshot_counting_each_event() -> None:
    published = [1_000, 1_100, 1_200, 1_300]
    snapshots = [
        snapshot(2, 1_500),
        snapshot(9, 1_400, key=b"web/1h"),  # another key
        snapshot(2, 1_700),  # unchanged count: nothing new
        snapshot(4, 2_000),
    ]
    assert to_snapshot_ms(published, snapshots, "all/30d") == [500, 400, 800, 700]
    assert to_snapshot_ms(published, [snapshot(3, 1_500)], "all/30d") == [500, 400, 300]


def test_after_warmup_keeps_events_published_that_long_after_the_first() -> None:
    times = {"a": (1_000, 1_400), "b": (2_999, 3_050), "c": (3_000, 3_020), "d": (4_500, 4_530)}
    assert sorted(after_warmup(times, 2.0)) == [20, 30]
    assert sorted(after_warmup(times, 0.0)) == [20, 30, 51, 400]
    assert after_warmup({}, 2.0) == []


def profile(key: bytes, offset: int, value: bytes | None) -> Record:
    return Record("p.profiles", 0, offset, 0, key, value)


def test_live_keys_counts_keys_whose_last_record_is_a_value() -> None:
    records = [
        profile(b"C-1", 0, b"{}"),
        profile(b"C-2", 1, b"{}"),
        profile(b"C-2", 2, None),  # merged away
        profile(b"C-3", 3, None),
        profile(b"C-3", 4, b"{}"),  # filed again after a forget
        profile(b"C-1", 5, b"{}"),
    ]
    assert live_keys(records) == 2
    assert live_keys([]) == 0


def test_the_messages_come_from_the_pool_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    pools: list[int] = []

    def generate(count: int, *, customers: int, **_: object) -> list[object]:
        pools.append(customers)
        return []

    monkeypatch.setattr(bench, "generate", generate)
    messages(3000, 8, timedelta(days=1), customers=1_000_000)
    messages(3000, 8, timedelta(days=1))
    messages(30, 8, timedelta(days=1))
    assert pools == [1_000_000, 500, 100]  # by default a sixth of the messages, at least 100


def test_cpu_seconds_counts_a_process_s_work() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.2  # clock ticks of 10 ms
    assert cpu_seconds(2**22 + 1) == 0.0  # above Linux's largest pid: no such process


class _Worker:
    """What a `CpuMeter` reads of a bench worker: its CPU seconds so far."""

    def __init__(self) -> None:
        self.cpu = 10.0

    def cpu_seconds(self) -> float:
        return self.cpu


def test_cpu_meter_counts_what_was_spent_since_it_started() -> None:
    first, second = _Worker(), _Worker()
    alone = CpuMeter([first, second], None)  # type: ignore[list-item]
    with_broker = CpuMeter([first, second], os.getpid())  # type: ignore[list-item]
    first.cpu += 1.5
    second.cpu += 0.5
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # the "broker" (this process) works too
        pass
    assert alone.report(1000) == {
        "worker_cpu_ms_per_event": 2.0,
        "broker_cpu_ms_per_event": None,
        "machine_busy": None,
    }
    measured = with_broker.report(1000)
    assert measured["worker_cpu_ms_per_event"] == 2.0
    broker = measured["broker_cpu_ms_per_event"]
    assert broker is not None
    assert broker >= 0.15  # 0.2 s over 1 000 events, in clock ticks of 10 ms
    busy = measured["machine_busy"]
    assert busy is not None
    assert busy > 1.0 / (os.cpu_count() or 1)  # 2 s of workers' CPU in well under 2 s
