"""The streaming shape of the metrics (partitions -> minute aggregates -> merger) gives exactly
the reference implementation's snapshots, whatever the partitioning and arrival order."""

from __future__ import annotations

import itertools
import random
import tracemalloc
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import cache
from unittest.mock import patch

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedList

from service import rolling
from service.canonical import Ratings, Source, Touchpoint
from service.metrics import Derived, reference_snapshots
from service.normalize import normalize
from service.parse import Limits, Rejected, parse
from service.rolling import (
    SLIDE_MINUTES,
    Merger,
    MinuteAgg,
    Minutes,
    PartitionAggregator,
    ThreadEvent,
    _move,
    minute_of,
    partition_key,
    window_totals,
)
from service.simulate import generate

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
EMITTED = datetime(2026, 11, 20, 12, 5, tzinfo=UTC)


@cache
def workload(seed: int, count: int) -> tuple[Touchpoint, ...]:
    """Simulated traffic over 3 days, accepted and normalized (none can be late)."""
    limits = Limits(64 * 1024, timedelta(minutes=5))
    events = []
    for offset, message in enumerate(generate(count, customers=40, seed=seed, now=NOW)):
        parsed = parse(message.channel, message.value, limits, NOW)
        if not isinstance(parsed, Rejected):
            source = Source(topic=f"cx.raw.{message.channel}", partition=0, offset=offset)
            events.append(normalize(parsed, source, b"rolling-test-key").touchpoint)
    return tuple(events)


def stream(
    events: list[Touchpoint],
    partitions: int,
    rng: random.Random,
    resend_share: float,
    stored: bool = False,
) -> Merger:
    """Run events through partitions and a merger, sending changed buckets at random moments
    (sometimes twice; before half of the sends the partitions freeze their older minutes),
    with some events delivered again and snapshots taken in between. Now
    and then an aggregate sent earlier arrives again late (as from a worker that was paused),
    with its older version. `stored`: the merger reads the aggregates it replaces back from a
    table written after each one it takes, as the worker's partials table is."""
    aggregators = [PartitionAggregator() for _ in range(partitions)]
    offsets = [-1] * partitions  # each partition's last offset read: its partials' version
    table: dict[tuple[int, str, int], dict[str, object]] = {}
    merger = Merger(stored=table.__getitem__) if stored else Merger()
    pending: set[tuple[int, str, int]] = set()
    sent_before: dict[tuple[int, str, int], list[tuple[int, MinuteAgg, datetime]]] = {}

    def flush() -> None:
        if rng.random() < 0.5:  # as a send tick does: minutes behind the watermark frozen
            for aggregator in aggregators:
                aggregator.freeze_cold()
        for partition, scope, minute in sorted(pending):
            aggregator = aggregators[partition]
            assert aggregator.watermark is not None
            sent = MinuteAgg.from_json(orjson.loads(aggregator.encoded((scope, minute))))
            version = offsets[partition]
            for _ in range(rng.choice((1, 1, 2))):
                if merger.receive(partition, scope, minute, sent, aggregator.watermark, version):
                    table[(partition, scope, minute)] = orjson.loads(orjson.dumps(sent.to_json()))
            earlier = sent_before.setdefault((partition, scope, minute), [])
            if earlier and rng.random() < 0.3:
                old_version, old, mark = rng.choice(earlier)
                assert not merger.receive(partition, scope, minute, old, mark, old_version)
            earlier.append((version, sent, aggregator.watermark))
        pending.clear()
        if rng.random() < 0.5:  # as an emit tick would: windows kept up to date from here
            merger.snapshots(5, EMITTED)
            assert_resolutions_in_order(merger)
            assert_windows_as_rebuilt(merger)

    for event in events:
        for _ in range(2 if rng.random() < resend_share else 1):
            partition = zlib.crc32(partition_key(event).encode()) % partitions
            offsets[partition] += 1
            for scope, minute in aggregators[partition].apply(event):
                pending.add((partition, scope, minute))
        if rng.random() < 0.2:
            flush()
    flush()
    return merger


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 3),
    partitions=st.sampled_from([1, 2, 3, 8]),
    order_seed=st.integers(0, 2**32 - 1),
    stored=st.booleans(),
    merger_freeze_after=st.sampled_from([0, 60, rolling.MERGER_FREEZE_AFTER]),
)
def test_streaming_equals_reference(
    seed: int, partitions: int, order_seed: int, stored: bool, merger_freeze_after: int
) -> None:
    """Whatever the partitioning, arrival order and re-sends, and however far behind the
    windows' end the merger freezes its minute totals, the snapshots are the reference's."""
    events = list(workload(seed, 600))
    rng = random.Random(order_seed)
    rng.shuffle(events)
    expected = reference_snapshots(events, 5, EMITTED)
    with patch.object(rolling, "MERGER_FREEZE_AFTER", merger_freeze_after):
        merger = stream(events, partitions, rng, resend_share=0.1, stored=stored)
        assert merger.totals.frozen  # three days of traffic: some totals are frozen
        assert merger.snapshots(5, EMITTED) == expected
    assert_resolutions_in_order(merger)
    # Read back from the table, the aggregates are not also kept in memory.
    assert (not merger.encoded) is stored


def assert_resolutions_in_order(merger: Merger) -> None:
    """Each window's resolution times, kept in order as partials arrive, are its counter's."""
    assert merger.resolutions.keys() == merger.windows.keys()
    for key, total in merger.windows.items():
        assert list(merger.resolutions[key]) == sorted(total.resolution.elements()), key


def assert_windows_as_rebuilt(merger: Merger) -> None:
    """Windows kept up to date (slid, partials added) equal windows summed from scratch, to
    the decimal places of their revenue."""
    assert merger.windows_end is not None
    rebuilt = window_totals(merger.totals, merger.windows_end)
    assert merger.windows == rebuilt
    for key, total in rebuilt.items():
        assert str(merger.windows[key].revenue) == str(total.revenue), key


def test_windows_slide_minute_by_minute_as_they_would_be_rebuilt() -> None:
    """Events in time order move the window end a few minutes at a time: each window is slid
    (minutes in, minutes out) and equals one summed from scratch, and the last snapshots
    equal the reference's."""
    events = sorted(workload(2, 600), key=lambda e: e.occurred_at)
    aggregator, merger = PartitionAggregator(), Merger()
    ends: list[int] = []
    for start in range(0, len(events), 10):
        changed: set[tuple[str, int]] = set()
        for event in events[start : start + 10]:
            changed |= aggregator.apply(event)
        assert aggregator.watermark is not None
        for scope, minute in sorted(changed):
            merger.receive(0, scope, minute, aggregator.minutes[(scope, minute)],
                           aggregator.watermark, start)  # fmt: skip
        merger.snapshots(5, EMITTED)
        assert merger.windows_end is not None
        ends.append(merger.windows_end)
        assert_windows_as_rebuilt(merger)
        assert_resolutions_in_order(merger)
    slides = [b - a for a, b in itertools.pairwise(ends) if 0 < b - a <= SLIDE_MINUTES]
    assert len(slides) > 30  # the windows were slid, not rebuilt, most of the way
    assert merger.snapshots(5, EMITTED) == reference_snapshots(events, 5, EMITTED)


@pytest.mark.parametrize("freeze_after", [0, rolling.MERGER_FREEZE_AFTER])
def test_a_window_an_amount_left_has_the_decimal_places_of_what_it_holds(
    freeze_after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sum keeps the finest decimal places of every amount it took: once an amount leaves
    a window, its revenue has those of the amounts still in it (as the reference's), also
    summed from frozen minute totals."""
    monkeypatch.setattr(rolling, "MERGER_FREEZE_AFTER", freeze_after)
    first, second = NOW - timedelta(minutes=90), NOW - timedelta(minutes=20)
    merger = Merger()
    for event_id, at, amount in (("store:a", first, "1.005"), ("store:b", second, "2.50")):
        sale = _event(event_id, "purchase", at).model_copy(
            update={"channel": "store", "thread_id": None, "amount": amount}
        )
        merger.receive(0, "store", minute_of(at), MinuteAgg.of(sale, Derived()), at)
        merger.snapshots(5, EMITTED)
    assert str(merger.windows[("store", "24h")].revenue) == "3.505"
    assert str(merger.windows[("store", "1h")].revenue) == "2.50"  # slid past 1.005
    merger.receive(1, "store", minute_of(NOW), MinuteAgg(), NOW + timedelta(minutes=45))
    merger.snapshots(5, EMITTED)  # slid: 2.50 is now out of the hour too
    assert str(merger.windows[("store", "1h")].revenue) == "0"
    assert_windows_as_rebuilt(merger)
    assert bool(merger.totals.frozen) is (freeze_after == 0)
    later = first + timedelta(days=1, minutes=1)
    merger.receive(1, "store", minute_of(later), MinuteAgg(), later)
    merger.snapshots(5, EMITTED)  # 1.005 left the day: summed again from what it holds
    assert str(merger.windows[("store", "24h")].revenue) == "2.50"
    assert_windows_as_rebuilt(merger)


def test_a_minute_forgotten_before_the_windows_slide_is_still_taken_out_of_them() -> None:
    """The merger forgets minutes as soon as the watermark leaves them behind, but its windows
    move on only at the next snapshot: the total of a minute they still count is kept until
    they have slid past it."""
    old = NOW - timedelta(days=30) + timedelta(minutes=10)
    merger = Merger()
    merger.receive(0, "support", minute_of(old), _agg_of("support:o", old), NOW)
    merger.snapshots(5, EMITTED)
    assert merger.windows[("support", "30d")].events == 1
    later = NOW + timedelta(minutes=20)
    merger.receive(0, "support", minute_of(later), _agg_of("support:l", later), later)
    end = merger.window_end
    assert end is not None
    assert merger.forget_before(minute_of(end - timedelta(days=30))) == [
        (0, "support", minute_of(old))
    ]
    merger.snapshots(5, EMITTED)  # slid by 20 minutes: the old minute left the month
    assert merger.windows[("support", "30d")].events == 1
    assert_windows_as_rebuilt(merger)
    assert sorted(merger.totals) == [("all", minute_of(later)), ("support", minute_of(later))]


def _agg_of(event_id: str, at: datetime) -> MinuteAgg:
    return MinuteAgg.of(_event(event_id, "ticket_created", at), Derived())


def _sum(contributions: list[MinuteAgg]) -> MinuteAgg:
    total = MinuteAgg()
    for contribution in contributions:
        total.add(contribution)
    return total


@settings(max_examples=60, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, 599), st.integers(0, 2)), max_size=120))
def test_adding_what_changed_equals_replacing_the_aggregate(
    picks: list[tuple[int, int]],
) -> None:
    """A sum holding `old` + `new.minus(old)` = the sum with `old` taken away and `new`
    added, to the revenue's last written digit: each event goes to the rest of the sum, to
    `old`, to `new` or to both, so the two aggregates share some events and not others."""
    events = workload(2, 600)
    derived = Derived(resolution_seconds=3600.0, first_solve=True, first_contact=True)
    parts: list[list[MinuteAgg]] = [[], [], []]  # rest, old only, new only
    shared: list[MinuteAgg] = []
    for index, where in picks:
        contribution = MinuteAgg.of(events[index % len(events)], derived)
        (shared if where == 2 and index % 2 else parts[where]).append(contribution)
    rest, old, new = _sum(parts[0]), _sum(parts[1] + shared), _sum(parts[2] + shared)
    replaced = _sum(parts[0])
    replaced.add(old)
    replaced.add(old, -1)
    replaced.add(new)
    changed = _sum(parts[0])
    changed.add(old)
    changed.add(new.minus(old))
    assert changed.to_json() == replaced.to_json()
    assert changed == replaced
    assert rest.events + new.events == changed.events


def test_a_resolution_time_not_held_is_refused() -> None:
    """The merger's ordered resolution times follow its counters: taking away a time they do
    not hold is a bug, and fails instead of leaving a wrong median."""
    ordered = SortedList([5.0, 2.0, 1.0, 2.0])
    _move(ordered, Counter({2.0: -1, 3.0: 2, 7.0: 1}))
    assert list(ordered) == [1.0, 2.0, 3.0, 3.0, 5.0, 7.0]
    with pytest.raises(ValueError, match="not held"):
        _move(ordered, Counter({4.0: -1}))
    with pytest.raises(ValueError, match="not held"):
        _move(ordered, Counter({3.0: -3}))


def test_a_late_thread_event_changes_earlier_contributions() -> None:
    """A ticket's creation arriving after its solve gives the solve its resolution time."""
    created = _event("support:c", "ticket_created", NOW - timedelta(hours=3))
    solved = _event("support:s", "ticket_solved", NOW - timedelta(hours=1))
    aggregator = PartitionAggregator()
    aggregator.apply(solved)
    solve_bucket = ("support", minute_of(solved.occurred_at))
    assert not aggregator.minutes[solve_bucket].resolution
    changed = aggregator.apply(created)
    assert solve_bucket in changed
    assert aggregator.minutes[solve_bucket].resolution == {7200.0: 1}


def test_restore_rebuilds_the_same_buckets() -> None:
    events = list(workload(1, 300))
    live = PartitionAggregator()
    for event in events:
        live.apply(event)
    rebuilt = PartitionAggregator()
    rebuilt.restore(list(reversed(events)))
    assert rebuilt.minutes == live.minutes
    assert rebuilt.watermark == live.watermark


def test_frozen_buckets_change_and_are_sent_as_if_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition that freezes every minute before its watermark's after each event sends
    the same aggregates as one that keeps them all: late events (thread joins among them)
    change frozen buckets as they would change kept ones."""
    monkeypatch.setattr(rolling, "FREEZE_AFTER", 0)
    events = list(workload(3, 400))
    random.Random(7).shuffle(events)
    kept, frozen = PartitionAggregator(), PartitionAggregator()
    for event in events:
        assert frozen.apply(event) == kept.apply(event)
        frozen.freeze_cold()
    assert frozen.watermark is not None
    buckets = kept.minutes.keys()
    assert frozen.minutes.keys() == buckets
    assert len(frozen.minutes.frozen) > len(buckets) / 2
    assert all(k[1] == minute_of(frozen.watermark) for k in frozen.minutes.hot)
    for key in buckets:
        assert frozen.encoded(key) == orjson.dumps(kept.minutes[key].to_json())
        assert frozen.minutes[key] == kept.minutes[key]
        assert frozen.minutes.revenue(key) == kept.minutes[key].revenue
    assert frozen.encoded(("web", 1)) == orjson.dumps(MinuteAgg().to_json())  # no event in it
    assert frozen.minutes.get(("web", 1)) is None
    assert ("web", 1) not in frozen.minutes


def test_a_frozen_minute_takes_under_a_third_of_the_memory() -> None:
    """Minutes of two events each (most minutes held, under a steady trickle): kept as JSON
    they take under a third of the memory of their aggregates."""

    def held(freeze: bool, buckets: bool = True) -> int:
        """Bytes an aggregator of 4 000 events holds (its buckets frozen, or dropped)."""
        tracemalloc.start()
        try:
            aggregator = PartitionAggregator()
            for n in range(4000):  # each its own customer key, as decoded from its message
                event = _event(f"support:{n}", "ticket_created", NOW - timedelta(minutes=n // 2))
                key = f"anon-{n:016x}"
                aggregator.apply(event.model_copy(update={"thread_id": None, "customer_key": key}))
            if freeze:
                aggregator.freeze_cold()
                assert len(aggregator.minutes.frozen) > 1900
            if not buckets:
                aggregator.minutes = Minutes()
            return tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    rest = held(freeze=False, buckets=False)  # the ids it has counted
    kept, frozen = held(freeze=False) - rest, held(freeze=True) - rest
    assert 0 < frozen < kept / 3, (frozen, kept)


def test_forgetting_drops_frozen_minutes_too() -> None:
    old, recent = NOW - timedelta(days=70), NOW
    aggregator = PartitionAggregator()
    aggregator.apply(_event("support:o", "ticket_created", old))
    aggregator.apply(_event("support:r", "ticket_created", recent).model_copy(
        update={"thread_id": "T-2"}))  # fmt: skip
    aggregator.freeze_cold()
    assert list(aggregator.minutes.frozen) == [("support", minute_of(old))]
    assert aggregator.forget_before(minute_of(recent)) == [(minute_of(old), "support:o")]
    assert not aggregator.minutes.frozen
    assert list(aggregator.minutes) == [("support", minute_of(recent))]


def test_each_event_id_counts_once() -> None:
    event = _event("support:c", "ticket_created", NOW)
    aggregator = PartitionAggregator()
    assert aggregator.apply(event)
    assert aggregator.apply(event) == set()
    assert aggregator.minutes[("support", minute_of(NOW))].events == 1
    assert list(aggregator.minutes) == [("support", minute_of(NOW))]  # "all": the merger's sum


def _event(event_id: str, kind: str, at: datetime) -> Touchpoint:
    return Touchpoint(
        event_id=event_id,
        channel="support",
        kind=kind,
        occurred_at=at,
        customer_key="C-1",
        thread_id="T-1",
        ratings=Ratings(nps=None, csat=None, ces=None),
        text=None,
        sentiment=None,
        amount=None,
        currency=None,
        source=Source(topic="cx.raw.support", partition=0, offset=0),
    )


def test_merger_forgets_old_minutes_and_keeps_windows_exact() -> None:
    """Forgetting drops only minutes before the given one (and scans nothing when none is
    due); windows kept up to date across it equal a merger given only what is left."""
    old, recent = NOW - timedelta(days=40), NOW - timedelta(minutes=5)
    merger, fresh = Merger(), Merger()
    for at, event_id in ((old, "support:o"), (recent, "support:r")):
        aggregator = PartitionAggregator()
        for scope, minute in aggregator.apply(_event(event_id, "ticket_created", at)):
            agg, mark = aggregator.minutes[(scope, minute)], at
            merger.receive(0, scope, minute, agg, mark)
            if at == recent:
                fresh.receive(0, scope, minute, agg, mark)
    merger.snapshots(5, EMITTED)
    assert merger.forget_before(minute_of(old)) == []
    gone = merger.forget_before(minute_of(recent))
    assert gone == [(0, "support", minute_of(old))]
    assert {scope for scope, _ in merger.totals} == {"all", "support"}
    assert merger.oldest == minute_of(recent)
    assert merger.snapshots(5, EMITTED) == fresh.snapshots(5, EMITTED)


def test_untouched_counters_are_shared_and_refuse_writes() -> None:
    """A new aggregate's counters are one shared empty counter (memory): adding to one
    aggregate gives it its own, and leaves every other aggregate empty."""
    first, second = MinuteAgg(), MinuteAgg()
    assert first.customers is second.nps
    first.add(MinuteAgg.of(_event("support:a", "ticket_created", NOW), Derived()))
    assert first.customers == {"C-1": 1}
    assert first.kinds == {"ticket_created": 1}
    assert not second.customers
    assert not MinuteAgg().kinds
    with pytest.raises(TypeError):
        second.nps[9] += 1
    with pytest.raises(TypeError):
        second.nps.update([9])


def test_taking_an_aggregate_away_leaves_an_empty_one() -> None:
    sale = _event("support:a", "ticket_created", NOW).model_copy(
        update={"kind": "purchase", "amount": "12.50", "ratings": Ratings(nps=3, csat=5, ces=2)}
    )
    agg = MinuteAgg()
    contribution = MinuteAgg.of(sale, Derived())
    agg.add(contribution)
    assert str(agg.revenue) == "12.50"
    assert agg.detractors == {"C-1": 1}
    agg.add(MinuteAgg.of(_event("support:b", "ticket_created", NOW), Derived()))
    assert str(agg.revenue) == "12.50"  # an event without an amount leaves it as written
    agg.add(contribution, -1)
    assert agg.events == 1
    assert (agg.nps, agg.csat, agg.ces, agg.detractors) == ({}, {}, {}, {})
    assert agg.customers == {"C-1": 1}
    assert str(agg.revenue) == "0.00"
    assert MinuteAgg.from_json(orjson.loads(orjson.dumps(agg.to_json()))) == agg


def test_a_replaced_partial_is_taken_away_whole() -> None:
    """The merger keeps partials encoded: replacing one takes exactly the old one away."""
    merger = Merger()
    first, second = MinuteAgg(), MinuteAgg()
    first.add(MinuteAgg.of(_event("support:a", "ticket_created", NOW), Derived()))
    second.add(MinuteAgg.of(_event("support:b", "ticket_solved", NOW), Derived()))
    minute = minute_of(NOW)
    assert merger.receive(0, "support", minute, first, NOW, version=1)
    assert merger.receive(0, "support", minute, second, NOW, version=2)
    assert not merger.receive(0, "support", minute, first, NOW, version=1)  # older: ignored
    assert merger.totals[("support", minute)] == second
    assert merger.totals[("all", minute)] == second


def test_all_is_the_sum_of_the_channels() -> None:
    """The merger sums "all" from the channels' partials: the same customer on two channels
    counts once, and a partial of "all" itself is refused (it would count twice)."""
    merger = Merger()
    minute = minute_of(NOW)
    web = _event("web:a", "page_view", NOW).model_copy(update={"channel": "web", "thread_id": None})
    for partition, channel, event in ((0, "support", _event("support:a", "ticket_created", NOW)),
                                      (1, "web", web)):  # fmt: skip
        agg = MinuteAgg()
        agg.add(MinuteAgg.of(event, Derived()))
        merger.receive(partition, channel, minute, agg, NOW)
    total = merger.totals[("all", minute)]
    assert total.events == 2
    assert total.customers == {"C-1": 2}  # one customer (a snapshot counts len(customers))
    assert total.kinds == {"ticket_created": 1, "page_view": 1}
    with pytest.raises(ValueError, match="per channel"):
        merger.receive(2, "all", minute, MinuteAgg(), NOW)


def test_a_thread_keeps_what_its_joins_read_and_not_the_text() -> None:
    event = _event("support:a", "ticket_created", NOW).model_copy(
        update={"text": "my order never came"}
    )
    aggregator = PartitionAggregator()
    aggregator.apply(event)
    (kept,) = aggregator.threads["support:T-1"]
    assert kept == ThreadEvent.of(event)
    assert (kept.event_id, kept.kind, kept.customer_key) == ("support:a", "ticket_created", "C-1")
    assert not hasattr(kept, "text")
