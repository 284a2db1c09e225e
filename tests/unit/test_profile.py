"""Customer profiles (contract section 5): the mergeable state, the churn rules and the
published Profile. Expectations are computed here, never read back from the service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.canonical import Ratings, Source, Touchpoint
from service.profile import (
    CHURN_RULES,
    apply,
    churn,
    empty_state,
    merge,
    profile,
    profile_json,
)
from tests.unit._golden import REPEATABLE

pytestmark = pytest.mark.unit

FAST = settings(REPEATABLE, max_examples=150)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY_MS = 86_400_000
CHANNEL_OF = {
    "page_view": "web",
    "sign_in": "web",
    "account_closed": "web",
    "message": "chat",
    "ticket_created": "support",
    "ticket_solved": "support",
    "ticket_reopened": "support",
    "customer_reply": "support",
    "purchase": "store",
    "return": "store",
    "survey_response": "web",
}


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def tp(
    n: int,
    kind: str = "page_view",
    *,
    minutes: float = 0,
    channel: str | None = None,
    nps: int | None = None,
    csat: int | None = None,
    ces: int | None = None,
    amount: str | None = None,
    thread: str | None = None,
    sentiment: float | None = None,
) -> dict[str, Any]:
    """A canonical touchpoint as JSON, `minutes` after T0."""
    channel = channel or CHANNEL_OF[kind]
    return Touchpoint(
        event_id=f"{channel}:{n}",
        channel=channel,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        occurred_at=T0 + timedelta(minutes=minutes),
        customer_key="C1",
        thread_id=thread,
        ratings=Ratings(nps=nps, csat=csat, ces=ces),
        text=None if sentiment is None else "some text",
        sentiment=sentiment,
        amount=amount,
        currency=None if amount is None else "EUR",
        source=Source(topic=f"cx.raw.{channel}", partition=0, offset=n),
    ).model_dump(mode="json")


def state_of(*touchpoints: dict[str, Any]) -> dict[str, Any]:
    return reduce(apply, touchpoints, empty_state())


def view(state: dict[str, Any], as_of_ms: int | None = None) -> Any:
    return profile("C1", state, 0, ms(T0) if as_of_ms is None else as_of_ms)


# ----------------------------------------------------------------------------- apply


def test_empty_state_is_not_shared() -> None:
    a = empty_state()
    apply(a, tp(1, nps=3, kind="survey_response"))
    assert a == empty_state()  # apply returns a new state, the input is unchanged


def test_first_last_seen_and_counts() -> None:
    state = state_of(
        tp(1, "page_view", minutes=30),
        tp(2, "message", minutes=-10),
        tp(3, "purchase", minutes=5, amount="1"),
        tp(4, "page_view", minutes=1),
    )
    result = view(state)
    assert result.first_seen == T0 - timedelta(minutes=10)
    assert result.last_seen == T0 + timedelta(minutes=30)
    assert result.event_counts == {"web": 2, "chat": 1, "support": 0, "store": 1}
    assert result.channels == ["web", "chat", "store"]
    assert result.customer_key == "C1"


def test_last_nps_is_latest_by_event_time_not_arrival() -> None:
    late_answer = tp(1, "survey_response", minutes=60, nps=9)
    early_answer = tp(2, "survey_response", minutes=10, nps=3)
    assert view(state_of(late_answer, early_answer)).last_nps == 9
    assert view(state_of(early_answer, late_answer)).last_nps == 9
    assert view(state_of(early_answer)).last_nps == 3
    assert view(state_of(tp(3, "page_view"))).last_nps is None


def test_csat_and_ces_means() -> None:
    state = state_of(
        tp(1, "survey_response", csat=1),
        tp(2, "survey_response", csat=2, ces=7),
        tp(3, "survey_response", csat=5, ces=6),
        tp(4, "page_view"),
    )
    result = view(state)
    assert result.csat_mean == round(8 / 3, 2) == 2.67
    assert result.ces_mean == 6.5
    empty = view(state_of(tp(5, "page_view")))
    assert (empty.csat_mean, empty.ces_mean) == (None, None)


def test_lifetime_value_is_exact_decimal() -> None:
    amounts = ["19.99", "0.01", "100.10", "0.1", "0.2"]
    returns = ["5.05", "0.3"]
    events = [tp(n, "purchase", amount=a) for n, a in enumerate(amounts)]
    events += [tp(10 + n, "return", amount=a) for n, a in enumerate(returns)]
    result = view(state_of(*events))
    expected = sum(map(Decimal, amounts), Decimal(0)) - sum(map(Decimal, returns), Decimal(0))
    assert Decimal(result.lifetime_value) == expected == Decimal("115.05")
    assert result.lifetime_value == "115.05"
    assert view(state_of(tp(1, "page_view"))).lifetime_value == "0"
    assert view(state_of(tp(1, "return", amount="12.50"))).lifetime_value == "-12.50"


def test_tickets_open_solved_reopened() -> None:
    events = [
        tp(1, "ticket_created", minutes=1, thread="T1"),
        tp(2, "ticket_created", minutes=2, thread="T2"),
        tp(3, "ticket_solved", minutes=3, thread="T1"),
        tp(4, "ticket_created", minutes=4, thread="T3"),
        tp(5, "ticket_solved", minutes=5, thread="T3"),
        tp(6, "ticket_reopened", minutes=6, thread="T3"),
        tp(7, "customer_reply", minutes=7, thread="T1"),  # a reply does not reopen
    ]
    state = state_of(*events)
    assert view(state).open_tickets == 2  # T2 and T3
    assert state["reopened"] == 1
    assert churn(state, ms(T0)).reasons == ["reopened_tickets"]
    # Arrival order does not matter: the solve of T1 arrives before its creation.
    shuffled = state_of(events[2], events[0], events[5], events[4], events[3], events[1])
    assert view(shuffled).open_tickets == 2


def test_ticket_status_is_latest_by_event_time() -> None:
    solved_late = tp(1, "ticket_solved", minutes=10, thread="T1")
    created = tp(2, "ticket_created", minutes=1, thread="T1")
    assert view(state_of(solved_late, created)).open_tickets == 0
    assert view(state_of(created, solved_late)).open_tickets == 0
    assert view(state_of(created)).open_tickets == 1


def test_sentiment_window_keeps_newest_ten_by_event_time() -> None:
    old_positive = [tp(n, "message", minutes=n, sentiment=0.9) for n in range(10)]
    new_negative = [tp(100 + n, "message", minutes=100 + n, sentiment=-0.9) for n in range(10)]
    # Negative samples are the newest: they fill the window, whatever the arrival order.
    for events in (old_positive + new_negative, new_negative + old_positive):
        state = state_of(*events)
        assert len(state["sentiment"]) == 10
        assert churn(state, ms(T0)).reasons == ["negative_sentiment"]
    old_negative = [tp(n, "message", minutes=n, sentiment=-0.9) for n in range(10)]
    new_positive = [tp(100 + n, "message", minutes=100 + n, sentiment=0.9) for n in range(10)]
    assert churn(state_of(*new_positive, *old_negative), ms(T0)).reasons == []


def test_account_closed_is_certain_churn() -> None:
    state = state_of(tp(1, "survey_response", nps=10), tp(2, "account_closed"))
    risk = view(state).churn_risk
    assert (risk.score, risk.reasons) == (1.0, ["account_closed"])


# ---------------------------------------------------------------------------- churn


RULE_EVENTS: dict[str, list[dict[str, Any]]] = {
    "recent_detractor": [tp(1, "survey_response", nps=6)],
    "low_csat": [tp(1, "survey_response", csat=2), tp(2, "survey_response", csat=3)],
    "high_effort": [tp(1, "survey_response", ces=2), tp(2, "survey_response", ces=3)],
    "reopened_tickets": [
        tp(1, "ticket_created", thread="T"),
        tp(2, "ticket_reopened", minutes=1, thread="T"),
    ],
    "negative_sentiment": [tp(1, "message", sentiment=-0.5), tp(2, "message", sentiment=-0.2)],
}
WEIGHTS = {
    "recent_detractor": 0.35,
    "low_csat": 0.2,
    "high_effort": 0.1,
    "reopened_tickets": 0.15,
    "negative_sentiment": 0.15,
    "inactive": 0.25,
}


def test_weights_are_the_documented_ones() -> None:
    assert WEIGHTS == CHURN_RULES


@pytest.mark.parametrize("rule", sorted(RULE_EVENTS))
def test_each_rule_alone(rule: str) -> None:
    state = state_of(*RULE_EVENTS[rule])
    risk = churn(state, state["last"])
    assert risk.reasons == [rule]
    assert risk.score == WEIGHTS[rule]


def test_inactivity_after_90_days() -> None:
    state = state_of(tp(1, "page_view", minutes=5))
    last = ms(T0) + 5 * 60_000
    assert churn(state, last + 90 * DAY_MS).reasons == []
    inactive = churn(state, last + 90 * DAY_MS + 1)
    assert (inactive.score, inactive.reasons) == (0.25, ["inactive"])
    assert view(state, last + 200 * DAY_MS).churn_risk.reasons == ["inactive"]
    assert churn(state, last - 365 * DAY_MS).reasons == []  # as_of before the last event


@pytest.mark.parametrize(
    ("events", "reasons"),
    [
        ([tp(1, "survey_response", nps=7)], []),  # passive, not a detractor
        ([tp(1, "survey_response", nps=0)], ["recent_detractor"]),
        # The latest answer counts: an old detractor who is now a promoter.
        (
            [tp(1, "survey_response", nps=2), tp(2, "survey_response", minutes=5, nps=10)],
            [],
        ),
        ([tp(1, "survey_response", csat=3)], []),  # mean 3 is not low
        ([tp(1, "survey_response", ces=3)], []),
        ([tp(1, "message", sentiment=-0.3)], []),  # not below -0.3
        ([tp(1, "message", sentiment=-0.31)], ["negative_sentiment"]),
    ],
)
def test_rule_thresholds(events: list[dict[str, Any]], reasons: list[str]) -> None:
    state = state_of(*events)
    assert churn(state, state["last"]).reasons == reasons


def test_rules_add_up_and_cap_at_one() -> None:
    two = state_of(tp(1, "survey_response", nps=3, csat=1))
    risk = churn(two, two["last"])
    assert sorted(risk.reasons) == ["low_csat", "recent_detractor"]
    assert risk.score == 0.55

    every = state_of(*(event for events in RULE_EVENTS.values() for event in events))
    risk = churn(every, every["last"] + 91 * DAY_MS)
    assert sorted(risk.reasons) == sorted(WEIGHTS)
    assert sum(WEIGHTS.values()) > 1
    assert risk.score == 1.0
    assert view(every, every["last"] + 91 * DAY_MS).churn_risk.score == 1.0


# ---------------------------------------------------------------------------- merge


KINDS = [
    "page_view",
    "message",
    "survey_response",
    "purchase",
    "return",
    "ticket_created",
    "ticket_solved",
    "ticket_reopened",
    "account_closed",
]


@st.composite
def touchpoints(draw: st.DrawFn, n: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(KINDS))
    rating = st.none() | st.integers(1, 5)
    return tp(
        n,
        kind,
        minutes=draw(st.integers(0, 60)),  # few distinct times: ties happen
        nps=draw(st.none() | st.integers(0, 10)),
        csat=draw(rating),
        ces=draw(st.none() | st.integers(1, 7)),
        amount=(
            draw(st.decimals(0, 1000, places=2).map(str))
            if kind in ("purchase", "return")
            else None
        ),
        thread=draw(st.sampled_from(["T1", "T2", "T3"])) if kind.startswith("ticket") else None,
        sentiment=draw(st.none() | st.sampled_from([-0.9, -0.5, 0.0, 0.4, 0.8])),
    )


@st.composite
def split_histories(
    draw: st.DrawFn,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    size = draw(st.integers(1, 25))
    events = [draw(touchpoints(n)) for n in range(size)]
    sides = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    left = [e for e, side in zip(events, sides, strict=True) if side]
    right = [e for e, side in zip(events, sides, strict=True) if not side]
    return draw(st.permutations(events)), draw(st.permutations(left)), right


@settings(FAST, max_examples=80)
@given(split_histories())
def test_merge_equals_one_state(
    history: tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    everything, left, right = history
    one = state_of(*everything)
    a, b = state_of(*left), state_of(*right)
    merged, flipped = merge(a, b), merge(b, a)
    as_of = one["last"] + 30 * DAY_MS
    expected = profile("C1", one, 1, as_of)
    assert profile("C1", merged, 1, as_of) == expected
    assert profile("C1", flipped, 1, as_of) == expected
    assert merged == one
    # And against quantities computed here.
    assert Decimal(expected.lifetime_value) == sum(
        (Decimal(e["amount"]) * (1 if e["kind"] == "purchase" else -1))
        for e in everything
        if e["amount"] is not None
    )
    assert sum(expected.event_counts.values()) == len(everything)
    answers = [e for e in everything if e["ratings"]["nps"] is not None]
    if answers:
        latest = max(answers, key=lambda e: (e["occurred_at"], e["ratings"]["nps"]))
        assert expected.last_nps == latest["ratings"]["nps"]
    csat = [e["ratings"]["csat"] for e in everything if e["ratings"]["csat"] is not None]
    assert expected.csat_mean == (round(sum(csat) / len(csat), 2) if csat else None)


def test_merge_with_empty_state() -> None:
    state = state_of(tp(1, "purchase", amount="3.50"), tp(2, "survey_response", nps=8))
    assert merge(state, empty_state()) == state
    assert merge(empty_state(), state) == state


def test_large_lifetime_value_still_gives_a_profile() -> None:
    biggest = "999999999999999.99"  # the largest amount a store event may carry
    state = state_of(tp(1, "purchase", amount=biggest), tp(2, "purchase", amount=biggest))
    assert Decimal(view(state).lifetime_value) > 0


@settings(FAST, max_examples=120)
@given(
    split_histories(),
    st.integers(0, 5),
    st.integers(-DAY_MS, 200 * DAY_MS),
    st.text(min_size=1, max_size=8),
)
def test_the_published_json_is_the_profile_model_s(
    history: tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]],
    aliases: int,
    later_ms: int,
    key: str,
) -> None:
    """The customer stage publishes `profile_json`; HTTP serves the model: byte for byte the
    same, whatever the state and the evaluation time (inactivity included)."""
    state = state_of(*history[0])
    as_of = state["last"] + later_ms
    assert profile_json(key, state, aliases, as_of) == (
        profile(key, state, aliases, as_of).model_dump_json().encode()
    )


def test_the_published_json_of_a_large_lifetime_value() -> None:
    biggest = "999999999999999.99"
    state = state_of(tp(1, "purchase", amount=biggest), tp(2, "return", amount="0.01", minutes=1))
    as_of = state["last"]
    published = profile_json("C1", state, 0, as_of)
    assert published == profile("C1", state, 0, as_of).model_dump_json().encode()
    assert b'"lifetime_value":"999999999999999.98"' in published
    assert b'"first_seen":"2026-03-01T12:00:00.000Z","last_seen":"2026-03-01T12:01:00.000Z"' in (
        published
    )
