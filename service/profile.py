"""Customer profiles: a mergeable state updated per touchpoint -> the published profile.

The state is a plain JSON dict, so it lives in a changelogged table and two customers'
states combine when they merge. Every update is order-independent (sums, min/max, latest by
event time), so a profile does not depend on the order events arrive in.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from pydantic import Field

from service.canonical import CHANNELS, Canonical, Channel, UtcMillis, format_utc_millis

State = dict[str, Any]

INACTIVE_AFTER = timedelta(days=90)
_SENTIMENT_WINDOW = 10
_MAX_TICKETS = 100
# Churn rules: (reason, weight). The risk is the sum of the weights that apply, capped at 1;
# a closed account is certain churn.
CHURN_RULES: dict[str, float] = {
    "recent_detractor": 0.35,
    "low_csat": 0.2,
    "high_effort": 0.1,
    "reopened_tickets": 0.15,
    "negative_sentiment": 0.15,
    "inactive": 0.25,
}


class ChurnRisk(Canonical):
    score: float = Field(ge=0.0, le=1.0)
    reasons: list[str]


class Profile(Canonical):
    """The value of `cx.profiles` and of `GET /v1/customers/{key}`."""

    customer_key: str
    aliases: int = Field(ge=0)
    first_seen: UtcMillis
    last_seen: UtcMillis
    channels: list[Channel]
    event_counts: dict[Channel, int]
    last_nps: int | None
    csat_mean: float | None
    ces_mean: float | None
    lifetime_value: str = Field(pattern=r"^-?[0-9]{1,30}(\.[0-9]{1,6})?$")
    open_tickets: int = Field(ge=0)
    churn_risk: ChurnRisk


def empty_state() -> State:
    return {
        "first": None,
        "last": None,
        "counts": {},
        "nps": None,
        "csat": [0, 0],
        "ces": [0, 0],
        "ltv": "0",
        "tickets": {},
        "reopened": 0,
        "sentiment": [],
        "closed": False,
    }


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def _later(a: list[Any] | None, b: list[Any] | None) -> list[Any] | None:
    """Of two [value, at_ms] pairs, the later one (ties: the larger value, for determinism)."""
    if a is None or b is None:
        return a or b
    return max(a, b, key=lambda pair: (pair[1], pair[0]))


def apply(state: State, touchpoint: dict[str, Any]) -> State:
    """State + one canonical touchpoint (as JSON) -> the new state."""
    at = _ms(touchpoint["occurred_at"])
    kind, channel, ratings = touchpoint["kind"], touchpoint["channel"], touchpoint["ratings"]
    new = dict(state)
    new["first"] = at if state["first"] is None else min(state["first"], at)
    new["last"] = at if state["last"] is None else max(state["last"], at)
    new["counts"] = {**state["counts"], channel: state["counts"].get(channel, 0) + 1}
    if ratings["nps"] is not None:
        new["nps"] = _later(state["nps"], [ratings["nps"], at])
    for scale in ("csat", "ces"):
        if ratings[scale] is not None:
            total, count = state[scale]
            new[scale] = [total + ratings[scale], count + 1]
    if kind in ("purchase", "return") and touchpoint["amount"] is not None:
        amount = Decimal(touchpoint["amount"])
        new["ltv"] = str(Decimal(state["ltv"]) + (amount if kind == "purchase" else -amount))
    ticket_status = {"ticket_created": "open", "ticket_reopened": "open", "ticket_solved": "solved"}
    if kind in ticket_status and touchpoint["thread_id"] is not None:
        tickets = dict(state["tickets"])
        status = _later(tickets.get(touchpoint["thread_id"]), [ticket_status[kind], at])
        tickets[touchpoint["thread_id"]] = status
        new["tickets"] = _newest_tickets(tickets)
    if kind == "ticket_reopened":
        new["reopened"] = state["reopened"] + 1
    if touchpoint["sentiment"] is not None:
        new["sentiment"] = _newest_sentiment(state["sentiment"] + [[at, touchpoint["sentiment"]]])
    if kind == "account_closed":
        new["closed"] = True
    return new


def _newest_tickets(tickets: dict[str, list[Any]]) -> dict[str, list[Any]]:
    if len(tickets) <= _MAX_TICKETS:
        return tickets
    newest = sorted(tickets.items(), key=lambda item: (item[1][1], item[0]))[-_MAX_TICKETS:]
    return dict(newest)


def _newest_sentiment(samples: list[list[Any]]) -> list[list[Any]]:
    return sorted(samples, key=lambda s: (s[0], s[1]))[-_SENTIMENT_WINDOW:]


def merge(a: State, b: State) -> State:
    """Two customers' states -> the state of the merged customer."""
    firsts = [x for x in (a["first"], b["first"]) if x is not None]
    lasts = [x for x in (a["last"], b["last"]) if x is not None]
    tickets = dict(a["tickets"])
    for ticket, status in b["tickets"].items():
        tickets[ticket] = _later(tickets.get(ticket), status)
    counts = dict(a["counts"])
    for channel, n in b["counts"].items():
        counts[channel] = counts.get(channel, 0) + n
    return {
        "first": min(firsts) if firsts else None,
        "last": max(lasts) if lasts else None,
        "counts": counts,
        "nps": _later(a["nps"], b["nps"]),
        "csat": [a["csat"][0] + b["csat"][0], a["csat"][1] + b["csat"][1]],
        "ces": [a["ces"][0] + b["ces"][0], a["ces"][1] + b["ces"][1]],
        "ltv": str(Decimal(a["ltv"]) + Decimal(b["ltv"])),
        "tickets": _newest_tickets(tickets),
        "reopened": a["reopened"] + b["reopened"],
        "sentiment": _newest_sentiment(a["sentiment"] + b["sentiment"]),
        "closed": a["closed"] or b["closed"],
    }


def _mean(pair: list[int]) -> float | None:
    return round(pair[0] / pair[1], 2) if pair[1] else None


def churn(state: State, as_of_ms: int) -> ChurnRisk:
    """State + evaluation time -> churn risk in [0, 1] and the rules that fired."""
    return ChurnRisk(**_churn(state, as_of_ms))


def _churn(state: State, as_of_ms: int) -> dict[str, Any]:
    """State + evaluation time -> the churn risk's fields."""
    if state["closed"]:
        return {"score": 1.0, "reasons": ["account_closed"]}
    fired = []
    if state["nps"] is not None and state["nps"][0] <= 6:
        fired.append("recent_detractor")
    csat = _mean(state["csat"])
    if csat is not None and csat < 3:
        fired.append("low_csat")
    ces = _mean(state["ces"])
    if ces is not None and ces < 3:
        fired.append("high_effort")
    if state["reopened"] > 0:
        fired.append("reopened_tickets")
    samples = [s for _, s in state["sentiment"]]
    if samples and sum(samples) / len(samples) < -0.3:
        fired.append("negative_sentiment")
    if state["last"] is not None and as_of_ms - state["last"] > INACTIVE_AFTER / timedelta(
        milliseconds=1
    ):
        fired.append("inactive")
    # A float even when no rule fires: the model's JSON has 0.0 there, and so must ours.
    score = min(1.0, sum((CHURN_RULES[reason] for reason in fired), 0.0))
    return {"score": round(score, 2), "reasons": fired}


def _utc(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def profile(key: str, state: State, aliases: int, as_of_ms: int) -> Profile:
    """Customer key + state -> the published profile, churn evaluated at `as_of_ms`."""
    fields = _fields(key, state, aliases, as_of_ms)
    return Profile(
        **{
            **fields,
            "first_seen": _utc(fields["first_seen"]),
            "last_seen": _utc(fields["last_seen"]),
            "churn_risk": ChurnRisk(**fields["churn_risk"]),
        }
    )


def profile_json(key: str, state: State, aliases: int, as_of_ms: int) -> bytes:
    """The same as `profile(...).model_dump_json()`, without building and validating the
    model: the customer stage publishes one per event (a property test holds them equal)."""
    fields = _fields(key, state, aliases, as_of_ms)
    fields["first_seen"] = format_utc_millis(_utc(fields["first_seen"]))
    fields["last_seen"] = format_utc_millis(_utc(fields["last_seen"]))
    return orjson.dumps(fields)


def _fields(key: str, state: State, aliases: int, as_of_ms: int) -> dict[str, Any]:
    """-> the profile's fields in its order; times as epoch ms, the churn risk as a dict."""
    counts = {channel: int(state["counts"].get(channel, 0)) for channel in CHANNELS}
    return {
        "customer_key": key,
        "aliases": aliases,
        "first_seen": state["first"],
        "last_seen": state["last"],
        "channels": [channel for channel in CHANNELS if counts[channel]],
        "event_counts": counts,
        "last_nps": None if state["nps"] is None else int(state["nps"][0]),
        "csat_mean": _mean(state["csat"]),
        "ces_mean": _mean(state["ces"]),
        "lifetime_value": state["ltv"],
        "open_tickets": sum(1 for status, _ in state["tickets"].values() if status == "open"),
        "churn_risk": _churn(state, as_of_ms),
    }
