"""Rolling CX metrics, reference implementation: formulas, windows, blocks, late events and
properties, checked against hand-computed numbers (contract section 4, service/metrics.py)."""

from __future__ import annotations

import itertools
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.canonical import Ratings, Source, Touchpoint
from service.metrics import (
    Snapshot,
    ces_block,
    ces_block_of_counts,
    csat_block,
    csat_block_of_counts,
    median_of_sorted,
    nps_block,
    nps_block_of_counts,
    on_time,
    reference_snapshots,
    sentiment_block,
    sentiment_block_of_counts,
    stdev_of_counts,
    window_end_for,
)
from tests.unit._golden import REPEATABLE

pytestmark = pytest.mark.unit

EMITTED = datetime(2026, 6, 1, 12, 0, 0, 500_000, tzinfo=UTC)
WM = datetime(2026, 5, 20, 10, 30, 15, 250_000, tzinfo=UTC)  # the watermark of most timelines
END = datetime(2026, 5, 20, 10, 31, tzinfo=UTC)  # the end of the minute holding WM
MS = timedelta(milliseconds=1)
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SCOPES = ("all", "web", "chat", "support", "store")
CHANNELS = ("web", "chat", "support", "store")
WINDOW_SIZES = {"1h": HOUR, "24h": DAY, "7d": 7 * DAY, "30d": 30 * DAY}
WINDOW_NAMES = tuple(WINDOW_SIZES)

KIND_CHANNEL = {
    "page_view": "web",
    "sign_in": "web",
    "form_submit": "web",
    "survey_response": "web",
    "account_closed": "web",
    "conversation_started": "chat",
    "message": "chat",
    "handoff": "chat",
    "conversation_closed": "chat",
    "ticket_created": "support",
    "agent_reply": "support",
    "customer_reply": "support",
    "ticket_solved": "support",
    "ticket_reopened": "support",
    "purchase": "store",
    "return": "store",
}

_ids = itertools.count()


def tp(
    kind: str,
    at: datetime,
    *,
    key: str = "C1",
    thread: str | None = None,
    channel: str | None = None,
    nps: int | None = None,
    csat: int | None = None,
    ces: int | None = None,
    sentiment: float | None = None,
    amount: str | None = None,
    event_id: str | None = None,
) -> Touchpoint:
    ch = channel or KIND_CHANNEL[kind]
    n = next(_ids)
    return Touchpoint(
        event_id=event_id or f"{ch}:e{n}",
        channel=ch,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        occurred_at=at,
        customer_key=key,
        thread_id=thread,
        ratings=Ratings(nps=nps, csat=csat, ces=ces),
        text=None if sentiment is None else "some text",
        sentiment=sentiment,
        amount=amount,
        currency=None if amount is None else "EUR",
        source=Source(topic=f"cx.raw.{ch}", partition=0, offset=n),
    )


def snaps(events: Iterable[Touchpoint], min_responses: int = 30) -> dict[tuple[str, str], Snapshot]:
    return {(s.scope, s.window): s for s in reference_snapshots(events, min_responses, EMITTED)}


def anchor(kind: str = "page_view", key: str = "anchor") -> Touchpoint:
    """An event at WM: fixes window_end at END."""
    return tp(kind, WM, key=key)


# --------------------------------------------------------------------------------------------
# 1. Formulas
# --------------------------------------------------------------------------------------------


def test_nps_empty() -> None:
    b = nps_block([], 30)
    assert (b.score, b.margin_of_error, b.responses, b.low_sample) == (None, None, 0, True)
    assert (b.promoters, b.passives, b.detractors) == (0, 0, 0)


def test_nps_one_response_has_no_margin() -> None:
    b = nps_block([10], 30)
    assert (b.score, b.promoters, b.responses, b.margin_of_error) == (100.0, 1, 1, None)


def test_nps_two_responses() -> None:
    # p = d = 0.5: score 0; moe = 196 * sqrt((1 - 0) / 2) = 196 * 0.7071068 = 138.59
    b = nps_block([10, 0], 30)
    assert (b.score, b.promoters, b.passives, b.detractors) == (0.0, 1, 0, 1)
    assert b.margin_of_error == 138.59


def test_nps_all_promoters() -> None:
    b = nps_block([9, 10, 9], 30)
    assert (b.score, b.margin_of_error, b.promoters, b.passives, b.detractors) == (
        100.0,
        0.0,
        3,
        0,
        0,
    )


def test_nps_all_detractors() -> None:
    b = nps_block([0, 6, 3, 5], 30)
    assert (b.score, b.margin_of_error, b.promoters, b.passives, b.detractors) == (
        -100.0,
        0.0,
        0,
        0,
        4,
    )


def test_nps_mixed() -> None:
    # p = 4/8, d = 2/8: score 25; moe = 196 * sqrt((0.75 - 0.0625) / 8) = 196 * 0.2931515
    b = nps_block([10, 10, 10, 9, 8, 7, 6, 2], 30)
    assert (b.promoters, b.passives, b.detractors, b.responses) == (4, 2, 2, 8)
    assert b.score == 25.0
    assert b.margin_of_error == 57.46


def test_nps_category_edges() -> None:
    # 6 detractor, 7 and 8 passive, 9 promoter; p = d = 1/4: moe = 196 * sqrt(0.5 / 4) = 69.30
    b = nps_block([6, 7, 8, 9], 30)
    assert (b.promoters, b.passives, b.detractors, b.score) == (1, 2, 1, 0.0)
    assert b.margin_of_error == 69.3


def test_nps_rounds_to_two_decimals() -> None:
    # p = 1/3, d = 0: 33.333..; moe = 196 * sqrt((1/3 - 1/9) / 3) = 196 * 0.2721655 = 53.34
    b = nps_block([9, 7, 7], 30)
    assert b.score == 33.33
    assert b.margin_of_error == 53.34
    assert nps_block([0, 7, 7], 30).score == -33.33


def test_csat_empty() -> None:
    b = csat_block([], 30)
    assert (b.score, b.mean, b.margin_of_error, b.responses, b.low_sample) == (
        None,
        None,
        None,
        0,
        True,
    )


def test_csat_one_response_has_no_margin() -> None:
    b = csat_block([5], 30)
    assert (b.score, b.mean, b.responses, b.margin_of_error) == (100.0, 5.0, 1, None)


def test_csat_two_responses() -> None:
    # s = 0.5: moe = 196 * sqrt(0.25 / 2) = 69.30
    b = csat_block([5, 1], 30)
    assert (b.score, b.mean, b.margin_of_error) == (50.0, 3.0, 69.3)


def test_csat_all_satisfied() -> None:
    b = csat_block([4, 5, 5], 30)
    assert (b.score, b.mean, b.margin_of_error) == (100.0, 4.67, 0.0)  # mean 14/3


def test_csat_all_unsatisfied() -> None:
    b = csat_block([1, 2, 3], 30)
    assert (b.score, b.mean, b.margin_of_error) == (0.0, 2.0, 0.0)


def test_csat_mixed() -> None:
    # s = 4/7 = 57.142..%; mean 24/7 = 3.428..; moe = 196 * sqrt((4/7)(3/7) / 7) = 36.66
    b = csat_block([5, 4, 3, 2, 1, 4, 5], 30)
    assert (b.score, b.mean, b.responses, b.margin_of_error) == (57.14, 3.43, 7, 36.66)


def test_csat_edge_three_vs_four() -> None:
    assert csat_block([3, 4], 30).score == 50.0


def test_ces_empty() -> None:
    b = ces_block([], 30)
    assert (b.mean, b.easy_share, b.margin_of_error, b.responses, b.low_sample) == (
        None,
        None,
        None,
        0,
        True,
    )


def test_ces_one_response_has_no_margin() -> None:
    b = ces_block([7], 30)
    assert (b.mean, b.easy_share, b.responses, b.margin_of_error) == (7.0, 100.0, 1, None)


def test_ces_two_responses_sample_stdev() -> None:
    # sample stdev of [1, 7] = sqrt(18 / 1) = 4.2426; moe = 1.96 * 4.2426 / sqrt(2) = 5.88
    # (the population stdev, 3, would give 4.16)
    b = ces_block([1, 7], 30)
    assert (b.mean, b.easy_share, b.margin_of_error) == (4.0, 50.0, 5.88)


def test_ces_all_easy_identical() -> None:
    b = ces_block([5, 5, 5], 30)
    assert (b.mean, b.easy_share, b.margin_of_error) == (5.0, 100.0, 0.0)


def test_ces_all_hard() -> None:
    b = ces_block([1, 2, 4], 30)
    assert (b.mean, b.easy_share) == (2.33, 0.0)  # mean 7/3


def test_ces_mixed() -> None:
    # mean 19/5 = 3.8; easy 2/5; squares 7.84 + 3.24 + 0.04 + 1.44 + 10.24 = 22.8;
    # sample var 22.8 / 4 = 5.7; moe = 1.96 * sqrt(5.7) / sqrt(5) = 2.09 (population: 1.87)
    b = ces_block([1, 2, 4, 5, 7], 30)
    assert (b.mean, b.easy_share, b.responses, b.margin_of_error) == (3.8, 40.0, 5, 2.09)


def test_ces_edge_four_vs_five() -> None:
    assert ces_block([4, 5], 30).easy_share == 50.0


@pytest.mark.parametrize("block", [nps_block, csat_block, ces_block])
@pytest.mark.parametrize(("min_responses", "n", "low"), [(3, 2, True), (3, 3, False)])
def test_low_sample_threshold(block: Any, min_responses: int, n: int, low: bool) -> None:
    assert block([5] * n, min_responses).low_sample is low


@pytest.mark.parametrize("block", [nps_block, csat_block, ces_block])
def test_low_sample_default_threshold(block: Any) -> None:
    assert block([5] * 29, 30).low_sample is True
    assert block([5] * 30, 30).low_sample is False


# --------------------------------------------------------------------------------------------
# 2. Windows and scopes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("watermark", "expected"),
    [
        (WM, END),
        (datetime(2026, 5, 20, 10, 30, tzinfo=UTC), datetime(2026, 5, 20, 10, 31, tzinfo=UTC)),
        (
            datetime(2026, 5, 20, 10, 30, 59, 999_000, tzinfo=UTC),
            datetime(2026, 5, 20, 10, 31, tzinfo=UTC),
        ),
        (
            datetime(2026, 5, 20, 23, 59, 59, 999_000, tzinfo=UTC),
            datetime(2026, 5, 21, 0, 0, tzinfo=UTC),
        ),
        (
            datetime(2026, 1, 31, 23, 59, 59, 999_000, tzinfo=UTC),
            datetime(2026, 2, 1, 0, 0, tzinfo=UTC),
        ),
        (
            datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC),
            datetime(2027, 1, 1, 0, 0, tzinfo=UTC),
        ),
        (
            datetime(2028, 2, 28, 23, 59, 59, 999_000, tzinfo=UTC),
            datetime(2028, 2, 29, 0, 0, tzinfo=UTC),
        ),
    ],
)
def test_window_end_for(watermark: datetime, expected: datetime) -> None:
    assert window_end_for(watermark) == expected


def test_no_events_no_snapshots() -> None:
    assert reference_snapshots([], 30, EMITTED) == []


def test_snapshot_frame() -> None:
    out = reference_snapshots([anchor()], 30, EMITTED)
    assert [s.key for s in out] == [f"{sc}/{w}" for sc in SCOPES for w in WINDOW_NAMES]
    for s in out:
        assert s.window_end == END
        assert s.window_start == END - WINDOW_SIZES[s.window]
        assert s.emitted_at == EMITTED
        assert s.definitions_version == 1
    dumped = out[0].model_dump(mode="json")
    assert dumped["window_end"] == "2026-05-20T10:31:00.000Z"
    assert dumped["emitted_at"] == "2026-06-01T12:00:00.500Z"


@pytest.mark.parametrize("window", WINDOW_NAMES)
def test_window_lower_bound_inclusive(window: str) -> None:
    size = WINDOW_SIZES[window]
    inside = tp("page_view", END - size, key="in")
    outside = tp("page_view", END - size - MS, key="out")
    # the old events arrive first, so none is late
    got = snaps([outside, inside, anchor()])[("all", window)]
    assert got.events == 2
    assert got.customers == 2  # "in" and "anchor"


@pytest.mark.parametrize(
    "watermark",
    [
        datetime(2026, 5, 20, 10, 30, tzinfo=UTC),
        WM,
        datetime(2026, 5, 20, 10, 30, 59, 999_000, tzinfo=UTC),
    ],
)
def test_event_in_watermark_minute_is_inside(watermark: datetime) -> None:
    got = snaps([tp("page_view", watermark - 59 * MIN), tp("page_view", watermark)])
    assert got[("all", "1h")].window_end == END
    assert got[("all", "1h")].events == 2


def test_every_window_and_scope() -> None:
    # channel i gets i+1 events at each age; ages fall in 1h, 24h (not 1h), 7d, 30d bands
    ages = [timedelta(0), 5 * HOUR, 3 * DAY, 20 * DAY]
    kind = {"web": "page_view", "chat": "message", "support": "customer_reply", "store": "purchase"}
    events = []
    for i, channel in enumerate(CHANNELS):
        for age in ages:
            for j in range(i + 1):
                events.append(
                    tp(
                        kind[channel],
                        WM - age,
                        key=f"{channel}-{j}",
                        amount="1.00" if channel == "store" else None,
                    )
                )
    got = snaps(events)
    per_channel = {"web": 1, "chat": 2, "support": 3, "store": 4}
    for w, bands in zip(WINDOW_NAMES, (1, 2, 3, 4), strict=True):
        for channel, m in per_channel.items():
            assert got[(channel, w)].events == m * bands, (channel, w)
            assert got[(channel, w)].customers == m, (channel, w)
        assert got[("all", w)].events == 10 * bands
        assert got[("all", w)].customers == 10
        assert got[("store", w)].store.purchases == 4 * bands
        assert got[("web", w)].store.purchases == 0
        assert got[("all", w)].store.purchases == 4 * bands


# --------------------------------------------------------------------------------------------
# 3. Blocks
# --------------------------------------------------------------------------------------------


def test_ratings_per_scope() -> None:
    events = [
        tp("survey_response", WM, nps=10, csat=5, ces=7),
        tp("survey_response", WM, channel="chat", nps=0, csat=2),
        tp("survey_response", WM, channel="support", nps=8, ces=3),
        anchor(),
    ]
    got = snaps(events, min_responses=2)
    a = got[("all", "1h")]
    assert (a.nps.promoters, a.nps.passives, a.nps.detractors, a.nps.score) == (1, 1, 1, 0.0)
    assert (a.nps.low_sample, a.csat.responses, a.csat.score, a.csat.mean) == (False, 2, 50.0, 3.5)
    assert (a.ces.responses, a.ces.mean, a.ces.easy_share) == (2, 5.0, 50.0)
    web = got[("web", "1h")]
    assert (web.nps.responses, web.nps.score, web.nps.low_sample) == (1, 100.0, True)
    assert got[("store", "1h")].nps.responses == 0
    assert got[("store", "1h")].nps.score is None


def _support_timeline() -> list[Touchpoint]:
    base = END - 10 * HOUR
    return [
        # T1: 1 reply before the solve, 1 after it: FCR; 3600 s
        tp("ticket_created", base, thread="T1"),
        tp("agent_reply", base + 10 * MIN, thread="T1"),
        tp("ticket_solved", base + HOUR, thread="T1"),
        tp("agent_reply", base + 2 * HOUR, thread="T1"),
        # T2: 2 replies before the solve: not FCR; 7200 s
        tp("ticket_created", base, thread="T2"),
        tp("agent_reply", base + 5 * MIN, thread="T2"),
        tp("agent_reply", base + 10 * MIN, thread="T2"),
        tp("ticket_solved", base + 2 * HOUR, thread="T2"),
        # T3: no reply: FCR; 600 s
        tp("ticket_created", base, thread="T3"),
        tp("ticket_solved", base + 10 * MIN, thread="T3"),
        # T4: reopened: not FCR; 1800 s
        tp("ticket_created", base, thread="T4"),
        tp("agent_reply", base + MIN, thread="T4"),
        tp("ticket_solved", base + 30 * MIN, thread="T4"),
        tp("ticket_reopened", base + 40 * MIN, thread="T4"),
        # T5: creation unknown: no duration; FCR
        tp("ticket_solved", base + 3 * HOUR, thread="T5"),
        anchor(),
    ]


def test_support_block_counts_median_and_fcr() -> None:
    got = snaps(_support_timeline())
    s = got[("support", "24h")].support
    assert (s.tickets_created, s.tickets_solved, s.reopened) == (4, 5, 1)
    assert s.median_resolution_seconds == 2700.0  # median of 600, 1800, 3600, 7200
    assert s.first_contact_resolution == 60.0  # T1, T3, T5 of 5
    assert got[("all", "24h")].support == s
    quiet = got[("support", "1h")].support
    assert (quiet.tickets_created, quiet.tickets_solved, quiet.reopened) == (0, 0, 0)
    assert quiet.median_resolution_seconds is None
    assert quiet.first_contact_resolution is None
    web = got[("web", "24h")].support
    assert (web.tickets_solved, web.median_resolution_seconds) == (0, None)


def test_support_median_odd_and_joined_across_windows() -> None:
    events = [
        tp("ticket_created", END - 3 * DAY, thread="T6"),
        tp("ticket_solved", END - 30 * MIN, thread="T6"),  # 3 d - 30 min = 257400 s
        tp("ticket_created", END - 2 * HOUR, thread="T7"),
        tp("ticket_solved", END - 20 * MIN, thread="T7"),  # 6000 s
        tp("ticket_created", END - 50 * MIN, thread="T8"),
        tp("ticket_solved", END - 10 * MIN, thread="T8"),  # 2400 s
        anchor(),
    ]
    got = snaps(events)
    hour = got[("support", "1h")].support
    assert (hour.tickets_created, hour.tickets_solved) == (1, 3)
    assert hour.median_resolution_seconds == 6000.0
    week = got[("support", "7d")].support
    assert (week.tickets_created, week.tickets_solved) == (3, 3)
    assert week.median_resolution_seconds == 6000.0


def test_support_creation_outside_longest_window_is_unknown() -> None:
    # the creation arrives first (so it is not late) but lies before window_end - 30 d
    events = [
        tp("ticket_created", END - 31 * DAY, thread="T9"),
        tp("ticket_solved", WM, thread="T9"),
    ]
    s = snaps(events)[("support", "30d")].support
    assert (s.tickets_created, s.tickets_solved) == (0, 1)
    assert s.median_resolution_seconds is None
    assert s.first_contact_resolution == 100.0


@pytest.mark.parametrize(
    ("before", "after", "reopened", "fcr"),
    [
        (0, 0, False, 100.0),
        (1, 0, False, 100.0),
        (2, 0, False, 0.0),
        (1, 3, False, 100.0),
        (0, 0, True, 0.0),
        (1, 1, True, 0.0),
    ],
)
def test_first_contact_resolution(before: int, after: int, reopened: bool, fcr: float) -> None:
    base = END - 5 * HOUR
    events = [tp("ticket_created", base, thread="T")]
    events += [tp("agent_reply", base + (i + 1) * MIN, thread="T") for i in range(before)]
    events.append(tp("ticket_solved", base + HOUR, thread="T"))
    if reopened:
        events.append(tp("ticket_reopened", base + 2 * HOUR, thread="T"))
    events += [tp("agent_reply", base + 3 * HOUR + i * MIN, thread="T") for i in range(after)]
    if reopened:
        events.append(tp("ticket_solved", base + 4 * HOUR, thread="T"))
    events.append(anchor())
    s = snaps(events)[("support", "24h")].support
    assert s.first_contact_resolution == fcr
    assert s.median_resolution_seconds == (2.5 * 3600 if reopened else 3600.0)


def test_joins_follow_event_time_not_arrival_order() -> None:
    base = END - 5 * HOUR
    created = tp("ticket_created", base, thread="T")
    replies = [tp("agent_reply", base + (i + 1) * MIN, thread="T") for i in range(2)]
    solved = tp("ticket_solved", base + HOUR, thread="T")
    started = tp("conversation_started", base, thread="K")
    handoff = tp("handoff", base + MIN, thread="K")
    closed = tp("conversation_closed", base + 2 * MIN, thread="K")
    arrival = [anchor(), solved, closed, *reversed(replies), handoff, created, started]
    got = snaps(arrival)[("all", "24h")]
    assert got.support.first_contact_resolution == 0.0  # both replies came before the solve
    assert got.support.median_resolution_seconds == 3600.0
    assert got.chat.bot_containment == 0.0


def test_first_contact_resolution_share() -> None:
    base = END - 5 * HOUR
    events = [anchor()]
    for ticket, replies in (("A", 0), ("B", 1), ("C", 2)):
        events.append(tp("ticket_created", base, thread=ticket))
        events += [tp("agent_reply", base + (i + 1) * MIN, thread=ticket) for i in range(replies)]
        events.append(tp("ticket_solved", base + HOUR, thread=ticket))
    assert snaps(events)[("support", "24h")].support.first_contact_resolution == 66.67
    events.append(tp("ticket_created", base, thread="D"))
    events.append(tp("ticket_solved", base + HOUR, thread="D"))
    events.append(tp("ticket_reopened", base + 2 * HOUR, thread="D"))
    assert snaps(events)[("support", "24h")].support.first_contact_resolution == 50.0


def test_chat_block() -> None:
    base = END - 5 * HOUR
    events = [
        tp("conversation_started", base, thread="K1"),
        tp("message", base + MIN, thread="K1"),
        tp("conversation_closed", base + 2 * MIN, thread="K1"),  # contained
        tp("conversation_started", base, thread="K2"),
        tp("handoff", base + MIN, thread="K2"),
        tp("conversation_closed", base + 2 * MIN, thread="K2"),  # not contained
        tp("conversation_started", base, thread="K3"),
        tp("handoff", base + MIN, thread="K3"),  # still open
        tp("conversation_started", base, thread="K4"),
        tp("conversation_closed", base + 3 * MIN, thread="K4"),  # contained
        anchor(),
    ]
    got = snaps(events)
    c = got[("chat", "24h")].chat
    assert (c.conversations, c.handoffs, c.bot_containment) == (4, 2, 66.67)
    assert got[("all", "24h")].chat == c
    assert got[("chat", "1h")].chat.bot_containment is None
    assert got[("web", "24h")].chat.conversations == 0


def test_chat_containment_null_when_none_closed() -> None:
    events = [tp("conversation_started", WM - MIN, thread="K1"), tp("message", WM, thread="K1")]
    c = snaps(events)[("chat", "1h")].chat
    assert (c.conversations, c.handoffs, c.bot_containment) == (1, 0, None)


def test_chat_containment_all_contained() -> None:
    events = [
        tp("conversation_started", WM - 2 * MIN, thread="K1"),
        tp("conversation_closed", WM, thread="K1"),
    ]
    assert snaps(events)[("chat", "1h")].chat.bot_containment == 100.0


@pytest.mark.parametrize(
    ("purchases", "returns", "revenue"),
    [
        (["19.99", "0.01"], ["5.00"], "15.00"),
        (["0.10", "0.20"], [], "0.30"),
        ([], ["5.00"], "-5.00"),
        (["100"], ["0.5"], "99.5"),
    ],
)
def test_store_revenue_exact(purchases: list[str], returns: list[str], revenue: str) -> None:
    events = [tp("purchase", WM - MIN, amount=a) for a in purchases]
    events += [tp("return", WM - MIN, amount=a) for a in returns]
    events.append(anchor())
    got = snaps(events)
    s = got[("store", "1h")].store
    assert (s.purchases, s.returns, s.revenue) == (len(purchases), len(returns), revenue)
    assert got[("all", "1h")].store == s
    assert Decimal(got[("web", "1h")].store.revenue) == 0


def test_store_revenue_empty_is_zero() -> None:
    revenue = snaps([anchor()])[("all", "30d")].store.revenue
    assert re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", revenue)
    assert Decimal(revenue) == 0


def test_churn_block() -> None:
    events = [
        tp("account_closed", WM - MIN, key="C1"),
        tp("account_closed", WM - 2 * MIN, key="C1"),
        tp("account_closed", WM - 3 * MIN, key="C2"),
        tp("survey_response", WM - MIN, key="C1", nps=3),
        tp("survey_response", WM - MIN, key="C1", nps=5),
        tp("survey_response", WM - MIN, key="C2", nps=9),
        tp("survey_response", WM - MIN, key="C3", nps=6, channel="chat"),
        tp("survey_response", WM - MIN, key="C4", nps=7),
        anchor(),
    ]
    got = snaps(events)
    assert got[("all", "1h")].churn.closed_accounts == 2
    assert got[("all", "1h")].churn.detractors == 2  # C1 and C3
    assert got[("web", "1h")].churn.detractors == 1  # C1
    assert got[("chat", "1h")].churn.closed_accounts == 0


def test_sentiment_block() -> None:
    events = [
        tp("message", WM - MIN, sentiment=0.6),
        tp("message", WM - MIN, sentiment=-0.2),
        tp("page_view", WM - MIN, sentiment=0.1),
        tp("page_view", WM - MIN, sentiment=0.0),  # a zero is a sample
        tp("page_view", WM - MIN, sentiment=0.3),
        tp("page_view", WM - MIN),
    ]
    got = snaps(events)
    assert got[("all", "1h")].sentiment.samples == 5
    assert got[("all", "1h")].sentiment.mean == 0.16  # 0.8 / 5
    assert got[("chat", "1h")].sentiment.samples == 2
    assert got[("chat", "1h")].sentiment.mean == 0.2  # 0.4 / 2
    assert got[("web", "1h")].sentiment.samples == 3
    assert got[("web", "1h")].sentiment.mean == 0.13  # 0.4 / 3 = 0.1333
    assert got[("store", "1h")].sentiment.mean is None
    assert got[("store", "1h")].sentiment.samples == 0


def test_customers_and_events() -> None:
    events = [
        tp("page_view", WM, key="C1"),
        tp("page_view", WM - MIN, key="C1"),
        tp("message", WM - MIN, key="C1"),
        tp("message", WM - MIN, key="C2"),
        tp("purchase", WM - 2 * HOUR, key="C3", amount="1.00"),
    ]
    got = snaps(events)
    assert (got[("all", "1h")].events, got[("all", "1h")].customers) == (4, 2)
    assert (got[("all", "24h")].events, got[("all", "24h")].customers) == (5, 3)
    assert (got[("web", "1h")].events, got[("web", "1h")].customers) == (2, 1)
    assert (got[("chat", "1h")].events, got[("chat", "1h")].customers) == (2, 2)
    assert (got[("store", "1h")].events, got[("store", "24h")].customers) == (0, 1)


# --------------------------------------------------------------------------------------------
# 4. on_time: repeats and late events
# --------------------------------------------------------------------------------------------


def test_repeated_id_counts_once() -> None:
    first = tp("purchase", WM, amount="10.00", event_id="store:1")
    again = tp("purchase", WM, amount="10.00", event_id="store:1")
    variant = tp("return", WM - MIN, amount="99.00", key="C9", event_id="store:1")
    kept, late = on_time([first, again, variant])
    assert (kept, late) == ([first], 0)
    s = snaps([first, again, variant])[("all", "1h")]
    assert (s.events, s.customers, s.store.purchases, s.store.returns) == (1, 1, 1, 0)
    assert s.store.revenue == "10.00"


def test_late_event_is_dropped_and_counted() -> None:
    new = tp("purchase", WM, amount="10.00")
    old = tp("purchase", END - 30 * DAY - MS, key="C9", amount="99.00", nps=0)
    kept, late = on_time([new, old])
    assert (kept, late) == ([new], 1)
    assert reference_snapshots([new, old], 30, EMITTED) == reference_snapshots([new], 30, EMITTED)


def test_late_event_cannot_join_a_ticket() -> None:
    solved = tp("ticket_solved", WM, thread="T")
    created = tp("ticket_created", END - 30 * DAY - MS, thread="T")
    assert on_time([solved, created]) == ([solved], 1)
    s = snaps([solved, created])[("support", "30d")].support
    assert (s.tickets_created, s.tickets_solved, s.median_resolution_seconds) == (0, 1, None)


def test_event_at_lateness_bound_is_kept() -> None:
    new = tp("page_view", WM)
    edge = tp("page_view", END - 30 * DAY, key="C2")
    assert on_time([new, edge]) == ([new, edge], 0)
    s = snaps([new, edge])[("all", "30d")]
    assert (s.events, s.customers) == (2, 2)


def test_old_event_arriving_first_is_kept() -> None:
    old = tp("page_view", END - 30 * DAY - MS, key="C9")
    new = tp("page_view", WM)
    assert on_time([old, new]) == ([old, new], 0)
    s = snaps([old, new])[("all", "30d")]
    assert (s.events, s.customers) == (1, 1)  # kept, but outside the final window


def test_lateness_is_judged_against_the_watermark_so_far() -> None:
    mid = tp("page_view", WM - 20 * DAY)  # window end then: END - 20 d; bound END - 50 d
    old = tp("page_view", WM - 45 * DAY)
    new = tp("page_view", WM)
    assert on_time([mid, old, new]) == ([mid, old, new], 0)
    assert on_time([mid, new, old]) == ([mid, new], 1)


# --------------------------------------------------------------------------------------------
# 5. Properties
# --------------------------------------------------------------------------------------------

PROPS = settings(REPEATABLE, max_examples=60)
BASE = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
SPAN_MS = 20 * 24 * 3600 * 1000
CHANNEL_KINDS: dict[str, tuple[str, ...]] = {
    "web": ("page_view", "sign_in", "form_submit", "survey_response", "account_closed"),
    "chat": (
        "conversation_started",
        "message",
        "handoff",
        "conversation_closed",
        "survey_response",
    ),
    "support": (
        "ticket_created",
        "agent_reply",
        "customer_reply",
        "ticket_solved",
        "ticket_reopened",
        "survey_response",
    ),
    "store": ("purchase", "return", "survey_response"),
}
# offsets before the latest possible event, so that window edges get hit
EDGE_OFFSETS = [SPAN_MS - d for d in (0, 1, 3_600_000, 3_600_001, 86_400_000, 86_400_001)]


@st.composite
def touchpoint_spec(draw: st.DrawFn) -> dict[str, Any]:
    channel = draw(st.sampled_from(CHANNELS))
    kind = draw(st.sampled_from(CHANNEL_KINDS[channel]))
    offset = draw(st.one_of(st.integers(0, SPAN_MS), st.sampled_from(EDGE_OFFSETS)))
    survey = kind == "survey_response"
    return {
        "channel": channel,
        "kind": kind,
        "at": BASE + timedelta(milliseconds=offset),
        "key": draw(st.sampled_from(["C1", "C2", "C3", "anon-x"])),
        "thread": draw(st.sampled_from([None, "t1", "t2", "t3"])),
        "nps": draw(st.none() | st.integers(0, 10)) if survey else None,
        "csat": draw(st.none() | st.integers(1, 5)) if survey else None,
        "ces": draw(st.none() | st.integers(1, 7)) if survey else None,
        "sentiment": draw(st.none() | st.floats(-1.0, 1.0, allow_nan=False)),
        "amount": (
            str(draw(st.decimals(min_value=0, max_value=10_000, places=2)))
            if kind in ("purchase", "return")
            else None
        ),
    }


event_sets = st.lists(touchpoint_spec(), min_size=1, max_size=25).map(
    lambda specs: [tp(**spec, event_id=f"{spec['channel']}:h{i}") for i, spec in enumerate(specs)]
)

COUNTS = (
    ("events",),
    ("customers",),
    ("nps", "responses"),
    ("nps", "promoters"),
    ("nps", "passives"),
    ("nps", "detractors"),
    ("csat", "responses"),
    ("ces", "responses"),
    ("sentiment", "samples"),
    ("support", "tickets_created"),
    ("support", "tickets_solved"),
    ("support", "reopened"),
    ("chat", "conversations"),
    ("chat", "handoffs"),
    ("store", "purchases"),
    ("store", "returns"),
    ("churn", "closed_accounts"),
    ("churn", "detractors"),
)
# distinct-customer counts are not additive over channels
ADDITIVE = tuple(c for c in COUNTS if c not in (("customers",), ("churn", "closed_accounts")))
ADDITIVE = tuple(c for c in ADDITIVE if c != ("churn", "detractors"))


def field_of(snapshot: Snapshot, path: tuple[str, ...]) -> Any:
    value: Any = snapshot
    for name in path:
        value = getattr(value, name)
    return value


@PROPS
@given(events=event_sets, data=st.data())
def test_permutation_invariant_when_nothing_late(
    events: list[Touchpoint], data: st.DataObject
) -> None:
    assert on_time(events)[1] == 0
    shuffled = data.draw(st.permutations(events))
    expected = reference_snapshots(events, 3, EMITTED)
    assert len(expected) == 20
    assert reference_snapshots(shuffled, 3, EMITTED) == expected


@PROPS
@given(events=event_sets)
def test_longer_windows_count_at_least_as_much(events: list[Touchpoint]) -> None:
    got = snaps(events, 3)
    for scope in SCOPES:
        for path in COUNTS:
            values = [field_of(got[(scope, w)], path) for w in WINDOW_NAMES]
            assert values == sorted(values), (scope, path, values)


@PROPS
@given(events=event_sets)
def test_all_scope_is_sum_of_channels(events: list[Touchpoint]) -> None:
    got = snaps(events, 3)
    for w in WINDOW_NAMES:
        total = got[("all", w)]
        for path in ADDITIVE:
            parts = sum(field_of(got[(c, w)], path) for c in CHANNELS)
            assert field_of(total, path) == parts, (w, path)
        revenue = sum((Decimal(got[(c, w)].store.revenue) for c in CHANNELS), Decimal(0))
        assert Decimal(total.store.revenue) == revenue
    assert got[("all", "30d")].events == len(events)


@PROPS
@given(events=event_sets)
def test_snapshots_round_trip_through_json(events: list[Touchpoint]) -> None:
    for s in reference_snapshots(events, 3, EMITTED):
        assert Snapshot.model_validate_json(s.model_dump_json()) == s


# --- blocks from counts (the streaming path) equal the blocks from every sample -----------

# Scores as `normalize` gives them (4 decimals), and finer ones; a sum of such scores never
# needs more than the 28 digits of Decimal's context, so both ways are exact.
_SENTIMENTS = st.sampled_from((4, 12)).flatmap(
    lambda places: st.floats(-1.0, 1.0, allow_nan=False).map(lambda x: round(x, places))
)


@given(st.lists(_SENTIMENTS, max_size=300))
def test_sentiment_from_counts_equals_from_every_sample(samples: list[float]) -> None:
    assert sentiment_block_of_counts(Counter(samples)) == sentiment_block(samples)


@given(st.lists(st.integers(0, 10), max_size=300), st.integers(0, 40))
def test_nps_from_counts_equals_from_every_answer(scores: list[int], least: int) -> None:
    assert nps_block_of_counts(Counter(scores), least) == nps_block(scores, least)


@given(st.lists(st.integers(1, 5), max_size=300), st.integers(0, 40))
def test_csat_from_counts_equals_from_every_answer(scores: list[int], least: int) -> None:
    assert csat_block_of_counts(Counter(scores), least) == csat_block(scores, least)


@given(st.lists(st.integers(1, 7), max_size=300), st.integers(0, 40))
def test_ces_from_counts_equals_from_every_answer(scores: list[int], least: int) -> None:
    assert ces_block_of_counts(Counter(scores), least) == ces_block(scores, least)


@given(st.lists(st.integers(-(10**6), 10**6), max_size=300))
def test_stdev_from_counts_equals_statistics_stdev(answers: list[int]) -> None:
    expected = statistics.stdev(answers) if len(answers) >= 2 else None
    assert stdev_of_counts(Counter(answers)) == expected


def test_blocks_from_counts_equal_from_every_answer_at_a_window_of_a_month() -> None:
    """The margins of error to the last digit at the sizes a 30-day window reaches."""
    rng = random.Random(7)
    for n in (2, 3, 1_000, 250_000):
        nps = [rng.choice((0, 3, 6, 7, 8, 9, 10, 10)) for _ in range(n)]
        csat = [rng.choice((1, 2, 4, 5, 5)) for _ in range(n)]
        ces = [rng.choice((1, 2, 3, 5, 6, 7, 7)) for _ in range(n)]
        assert nps_block_of_counts(Counter(nps), 30) == nps_block(nps, 30)
        assert csat_block_of_counts(Counter(csat), 30) == csat_block(csat, 30)
        assert ces_block_of_counts(Counter(ces), 30) == ces_block(ces, 30)


@given(st.lists(st.floats(0, 1e9, allow_nan=False), max_size=300) | st.lists(
    st.integers(0, 20).map(float), max_size=300))  # fmt: skip
def test_median_of_sorted_samples_equals_statistics_median(samples: list[float]) -> None:
    expected = statistics.median(samples) if samples else None
    assert median_of_sorted(sorted(samples)) == expected
