"""Customer records: a bounded newest-first timeline plus profile state; replays and merges
never count twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from service.canonical import Ratings, Source, Touchpoint
from service.profile import apply, empty_state
from service.timeline import Bounds, Holdings, absorb, add_event, events, new_record

pytestmark = pytest.mark.unit

T0 = datetime(2026, 5, 4, 8, 30, tzinfo=UTC)
WIDE = Bounds(max_events=100, max_age=timedelta(days=365))


def tp(
    n: int, *, seconds: float = 0, key: str = "C1", amount: str = "10.00", kind: str = "purchase"
) -> dict[str, Any]:
    return Touchpoint(
        event_id=f"store:{n}",
        channel="store",
        kind=kind,  # type: ignore[arg-type]
        occurred_at=T0 + timedelta(seconds=seconds),
        customer_key=key,
        thread_id=f"txn-{n}",
        ratings=Ratings(nps=None, csat=None, ces=None),
        text=None,
        sentiment=None,
        amount=amount,
        currency="EUR",
        source=Source(topic="cx.raw.store", partition=0, offset=n),
    ).model_dump(mode="json")


def build(touchpoints: list[dict[str, Any]], bounds: Bounds = WIDE) -> dict[str, Any]:
    record: dict[str, Any] | None = None
    for touchpoint in touchpoints:
        record, is_new = add_event(record, touchpoint, bounds)
        assert is_new
    assert record is not None
    return record


def ids(record: dict[str, Any]) -> list[str]:
    return [entry["event_id"] for entry in record["timeline"]]


def test_new_record() -> None:
    assert new_record() == {
        "timeline": [],
        "profile": empty_state(),
        "recent": [],
        "absorbed": [],
        "aliases": 0,
    }


def test_add_event_orders_newest_first_by_event_time() -> None:
    record = build([tp(1, seconds=10), tp(2, seconds=30), tp(3, seconds=20), tp(4, seconds=-5)])
    assert ids(record) == ["store:2", "store:3", "store:1", "store:4"]
    times = [entry["occurred_at"] for entry in record["timeline"]]
    assert times == sorted(times, reverse=True)
    assert record["profile"]["counts"] == {"store": 4}
    assert record["profile"]["ltv"] == "40.00"


def test_same_time_is_ordered_by_event_id() -> None:
    record = build([tp(1), tp(3), tp(2)])
    assert ids(record) == ["store:3", "store:2", "store:1"]


def test_bounded_by_max_events() -> None:
    bounds = Bounds(max_events=3, max_age=timedelta(days=365))
    record = build([tp(n, seconds=n) for n in range(6)], bounds)
    assert ids(record) == ["store:5", "store:4", "store:3"]
    # An older event arriving late does not push out newer ones...
    record, is_new = add_event(record, tp(9, seconds=-100), bounds)
    assert is_new
    assert ids(record) == ["store:5", "store:4", "store:3"]
    # ...but the profile counts every event, not only those kept on the timeline.
    assert record["profile"]["counts"] == {"store": 7}


def test_bounded_by_max_age_relative_to_newest_event() -> None:
    bounds = Bounds(max_events=100, max_age=timedelta(hours=1))
    record = build([tp(1, seconds=0), tp(2, seconds=1800), tp(3, seconds=3600)], bounds)
    assert ids(record) == ["store:3", "store:2", "store:1"]  # exactly max_age old: kept
    record, _ = add_event(record, tp(4, seconds=3601), bounds)
    assert ids(record) == ["store:4", "store:3", "store:2"]
    # A backfilled event older than the window never shows on the timeline.
    record, is_new = add_event(record, tp(5, seconds=-7200), bounds)
    assert is_new
    assert ids(record) == ["store:4", "store:3", "store:2"]
    assert record["profile"]["counts"] == {"store": 5}


def test_max_age_cutoff_has_millisecond_precision() -> None:
    bounds = Bounds(max_events=100, max_age=timedelta(hours=1))
    # 1 h 0 min 0.3 s before the newest event: older than max_age.
    record = build([tp(1, seconds=0.2), tp(2, seconds=3600.5)], bounds)
    assert ids(record) == ["store:2"]


def test_replayed_event_changes_nothing() -> None:
    record = build([tp(1, seconds=1), tp(2, seconds=2)])
    again, is_new = add_event(record, tp(1, seconds=1), WIDE)
    assert is_new is False
    assert again == record
    # Even when the replay differs (it is the event id that counts).
    again, is_new = add_event(record, tp(2, seconds=2, amount="999.00"), WIDE)
    assert is_new is False
    assert again["profile"]["ltv"] == "20.00"


def test_replay_of_an_event_trimmed_from_the_timeline_changes_nothing() -> None:
    bounds = Bounds(max_events=2, max_age=timedelta(days=365))
    record = build([tp(1, seconds=1), tp(2, seconds=2), tp(3, seconds=3)], bounds)
    assert ids(record) == ["store:3", "store:2"]
    assert record["profile"]["ltv"] == "30.00"
    again, is_new = add_event(record, tp(1, seconds=1), bounds)
    assert (is_new, again["profile"]["ltv"], again["profile"]["counts"]) == (
        False,
        "30.00",
        {"store": 3},
    )


def test_add_event_to_an_alias_record_starts_fresh() -> None:
    record, is_new = add_event({"alias_of": "C2"}, tp(1), WIDE)
    assert is_new
    assert "alias_of" not in record
    assert ids(record) == ["store:1"]


def test_absorb_merges_timelines_without_duplicates_and_sums_profiles() -> None:
    survivor = build([tp(1, seconds=1), tp(5, seconds=5)])
    other = build([tp(2, seconds=2), tp(4, seconds=4, amount="0.55")])
    merged = absorb(survivor, "anon-old", other, WIDE)
    assert ids(merged) == ["store:5", "store:4", "store:2", "store:1"]
    assert merged["absorbed"] == ["anon-old"]
    assert merged["aliases"] == 1
    assert Decimal(merged["profile"]["ltv"]) == Decimal("30.55")
    assert merged["profile"]["counts"] == {"store": 4}
    assert merged["profile"]["first"] == survivor["profile"]["first"]
    assert merged["profile"]["last"] == survivor["profile"]["last"]


def test_absorb_keeps_one_copy_of_an_event_on_both_timelines() -> None:
    shared = tp(3, seconds=3)
    survivor = build([tp(1, seconds=1), shared])
    other = build([shared, tp(2, seconds=2)])
    merged = absorb(survivor, "anon-old", other, WIDE)
    assert ids(merged) == ["store:3", "store:2", "store:1"]
    assert merged["timeline"][0] == shared


def test_absorb_disjoint_equals_one_record() -> None:
    a_events = [tp(1, seconds=1), tp(3, seconds=3, kind="return", amount="2.50")]
    b_events = [tp(2, seconds=2), tp(4, seconds=4)]
    merged = absorb(build(a_events), "anon-b", build(b_events), WIDE)
    one = build(a_events + b_events)
    assert merged["timeline"] == one["timeline"]
    assert merged["profile"] == one["profile"]
    state = empty_state()
    for touchpoint in a_events + b_events:
        state = apply(state, touchpoint)
    assert merged["profile"]["ltv"] == "27.50"


def test_absorb_respects_bounds() -> None:
    bounds = Bounds(max_events=3, max_age=timedelta(days=365))
    merged = absorb(
        build([tp(1, seconds=1), tp(4, seconds=4)], bounds),
        "anon-b",
        build([tp(2, seconds=2), tp(3, seconds=3), tp(5, seconds=5)], bounds),
        bounds,
    )
    assert ids(merged) == ["store:5", "store:4", "store:3"]
    assert merged["profile"]["counts"] == {"store": 5}


def test_absorbing_the_same_alias_twice_is_a_no_op() -> None:
    survivor = build([tp(1, seconds=1)])
    other = build([tp(2, seconds=2)])
    once = absorb(survivor, "anon-b", other, WIDE)
    twice = absorb(once, "anon-b", other, WIDE)
    assert twice == once
    assert twice["profile"]["ltv"] == "20.00"
    assert twice["aliases"] == 1


def test_absorb_carries_the_aliases_of_the_absorbed() -> None:
    c = build([tp(3, seconds=3)])
    b = absorb(build([tp(2, seconds=2)]), "anon-c", c, WIDE)
    a = absorb(build([tp(1, seconds=1)]), "anon-b", b, WIDE)
    assert a["absorbed"] == ["anon-b", "anon-c"]
    assert a["aliases"] == 2
    assert ids(a) == ["store:3", "store:2", "store:1"]
    # A replayed absorb of the inner alias changes nothing either.
    assert absorb(a, "anon-c", c, WIDE) == a


def test_absorb_into_nothing_and_of_an_alias_record() -> None:
    other = build([tp(1)])
    fresh = absorb(None, "anon-b", other, WIDE)
    assert ids(fresh) == ["store:1"]
    assert fresh["aliases"] == 1
    survivor = build([tp(2)])
    assert absorb(survivor, "anon-x", {"alias_of": "C9"}, WIDE) == survivor


def test_events_rewrites_customer_key_and_limits() -> None:
    record = build([tp(n, seconds=n, key="anon-old") for n in range(5)])
    newest_two = events(record, "C1", 2)
    assert [e["event_id"] for e in newest_two] == ["store:4", "store:3"]
    assert {e["customer_key"] for e in newest_two} == {"C1"}
    assert {e["customer_key"] for e in record["timeline"]} == {"anon-old"}  # not mutated
    assert len(events(record, "C1", 50)) == 5
    every = events(record, "C1", 50)
    for kept, original in zip(every, record["timeline"], strict=True):
        assert {**original, "customer_key": "C1"} == kept


def test_holdings_follow_each_write_as_a_recount_would() -> None:
    bounds = Bounds(max_events=2, max_age=timedelta(days=365))
    records: dict[str, Any] = {}
    holdings = Holdings()
    holdings.change(None, new_record())  # unknown: a write changes nothing
    assert (holdings.customers, holdings.entries, holdings.known) == (0, 0, False)
    holdings.count(records.values())

    def put(key: str, after: Any) -> None:
        holdings.change(records.get(key), after)
        if after is None:
            records.pop(key, None)
        else:
            records[key] = after

    for n in range(3):  # the third pushes the first off the bounded timeline
        put("a", add_event(records.get("a"), tp(n, seconds=n), bounds)[0])
    put("b", add_event(None, tp(5), bounds)[0])
    put("b", {"alias_of": "a"})
    put("c", None)  # forgetting a key never seen
    recount = Holdings()
    recount.count(records.values())
    assert (holdings.customers, holdings.entries) == (recount.customers, recount.entries) == (1, 2)
    put("a", None)
    assert (holdings.customers, holdings.entries) == (0, 0)
