"""Rolling CX metrics: the snapshot model, the formulas, and the reference implementation.

`reference_snapshots` is written for clarity, not speed: a list of accepted touchpoints -> the
snapshot of every scope and window at the end. A streaming engine must agree with it exactly.

Definitions (contract section 4; `DEFINITIONS_VERSION` rises whenever one changes):
- watermark: the latest `occurred_at` accepted; `window_end`: the end of the minute holding it;
  a window of size W covers `window_end - W <= occurred_at < window_end`.
- scopes: `all` and one per channel; every accepted event counts once.
- customers: exact count of distinct customer keys (as filed on the timeline).
- NPS: promoters 9-10, passives 7-8, detractors 0-6; score = 100 (p - d) / n.
- CSAT: score = 100 x share of 4-5; mean. CES: mean; easy_share = 100 x share of 5-7.
- margin_of_error: half-width of the 95 % interval in the block's own unit, null under 2
  responses (NPS: 1.96 x 100 x sqrt((p + d - (p - d)^2) / n) with p, d shares; CSAT:
  1.96 x 100 x sqrt(s (1 - s) / n); CES: 1.96 x sample stdev / sqrt(n)).
- late: an event older than `window_end - 30d` when it arrives changes nothing.
- Tickets and conversations (events with a support or chat `thread_id`) are joined looking at
  most 30 days (`JOIN_SPAN`) back from the event being judged (`derive`).
- support: tickets created, solved and reopened in the window (counts of those events);
  median_resolution_seconds over the solves in the window whose ticket was created at most
  30 days before: solve time - creation time (the earliest such creation);
  first_contact_resolution: of the first solves in the window (a solve with no earlier solve
  of the ticket within 30 days), the percentage with at most one agent reply in the 30 days
  before it and no reopen after it.
- chat: conversations started and handoffs in the window; bot_containment: of the
  conversation closes in the window, the percentage with no handoff in the 30 days before.
- store: purchases, returns, revenue = purchase amounts - return amounts (exact decimal).
- churn: closed_accounts = distinct customers with an account_closed event in the window;
  detractors = distinct customers with an NPS detractor answer in the window.
- Floats are rounded to 2 decimals.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Literal, Protocol

from pydantic import Field

from service.canonical import CHANNELS, Canonical, Channel, Kind, Touchpoint, UtcMillis

DEFINITIONS_VERSION = 1

Scope = Literal["all", "web", "chat", "support", "store"]
WindowName = Literal["1h", "24h", "7d", "30d"]
SCOPES: tuple[Scope, ...] = ("all", *CHANNELS)
WINDOWS: dict[WindowName, timedelta] = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
LONGEST = max(WINDOWS.values())
Z95 = 1.96


class NpsBlock(Canonical):
    score: float | None
    promoters: int
    passives: int
    detractors: int
    responses: int
    margin_of_error: float | None
    low_sample: bool


class CsatBlock(Canonical):
    score: float | None
    mean: float | None
    responses: int
    margin_of_error: float | None
    low_sample: bool


class CesBlock(Canonical):
    mean: float | None
    easy_share: float | None
    responses: int
    margin_of_error: float | None
    low_sample: bool


class SentimentBlock(Canonical):
    mean: float | None
    samples: int


class SupportBlock(Canonical):
    tickets_created: int
    tickets_solved: int
    reopened: int
    median_resolution_seconds: float | None
    first_contact_resolution: float | None


class ChatBlock(Canonical):
    conversations: int
    handoffs: int
    bot_containment: float | None


class StoreBlock(Canonical):
    purchases: int
    returns: int
    revenue: str = Field(pattern=r"^-?[0-9]{1,30}(\.[0-9]{1,6})?$")


class ChurnBlock(Canonical):
    closed_accounts: int
    detractors: int


class Snapshot(Canonical):
    """The value of `cx.metrics` (key "{scope}/{window}") and of `GET /v1/metrics`."""

    scope: Scope
    window: WindowName
    window_start: UtcMillis
    window_end: UtcMillis
    emitted_at: UtcMillis
    events: int
    customers: int
    nps: NpsBlock
    csat: CsatBlock
    ces: CesBlock
    sentiment: SentimentBlock
    support: SupportBlock
    chat: ChatBlock
    store: StoreBlock
    churn: ChurnBlock
    definitions_version: int

    @property
    def key(self) -> str:
        return f"{self.scope}/{self.window}"


def round2(value: float | None) -> float | None:
    """Floats in snapshots are rounded to 2 decimals."""
    return None if value is None else round(value, 2)


_r = round2


def sentiment_block(samples: Sequence[float]) -> SentimentBlock:
    """Sentiment scores -> their mean (summed exactly, so the order they come in never
    matters) and how many."""
    if not samples:
        return SentimentBlock(mean=None, samples=0)
    total = sum((Decimal(repr(value)) for value in samples), Decimal(0))
    return SentimentBlock(mean=round2(float(total / len(samples))), samples=len(samples))


def sentiment_block_of_counts(counts: Mapping[float, int]) -> SentimentBlock:
    """Sentiment score -> how many times it was seen -> the same block as `sentiment_block`
    of every sample (each product is exact, as is the sum), in time proportional to the
    distinct scores: a 30-day window holds one sample per text event."""
    n = sum(counts.values())
    if not n:
        return SentimentBlock(mean=None, samples=0)
    total = sum((Decimal(repr(value)) * count for value, count in counts.items()), Decimal(0))
    return SentimentBlock(mean=round2(float(total / n)), samples=n)


def median_of_sorted(samples: Sequence[float]) -> float | None:
    """Samples in ascending order -> `statistics.median` of them (None when there is none),
    without sorting them again."""
    n = len(samples)
    if not n:
        return None
    high = samples[n // 2]
    return high if n % 2 else (samples[n // 2 - 1] + high) / 2


def nps_block(scores: Sequence[int], min_responses: int) -> NpsBlock:
    """NPS answers (0..10) -> the NPS block."""
    promoters = sum(1 for s in scores if s >= 9)
    detractors = sum(1 for s in scores if s <= 6)
    return _nps(len(scores), promoters, detractors, min_responses)


def _nps(n: int, promoters: int, detractors: int, min_responses: int) -> NpsBlock:
    score = moe = None
    if n:
        p, d = promoters / n, detractors / n
        score = 100 * (p - d)
        if n >= 2:
            moe = Z95 * 100 * math.sqrt(max(0.0, p + d - (p - d) ** 2) / n)
    return NpsBlock(
        score=_r(score),
        promoters=promoters,
        passives=n - promoters - detractors,
        detractors=detractors,
        responses=n,
        margin_of_error=_r(moe),
        low_sample=n < min_responses,
    )


def csat_block(scores: Sequence[int], min_responses: int) -> CsatBlock:
    """CSAT answers (1..5) -> the CSAT block."""
    return _csat(len(scores), sum(1 for x in scores if x >= 4), sum(scores), min_responses)


def _csat(n: int, satisfied: int, total: int, min_responses: int) -> CsatBlock:
    score = mean = moe = None
    if n:
        s = satisfied / n
        score, mean = 100 * s, total / n
        if n >= 2:
            moe = Z95 * 100 * math.sqrt(s * (1 - s) / n)
    return CsatBlock(
        score=_r(score),
        mean=_r(mean),
        responses=n,
        margin_of_error=_r(moe),
        low_sample=n < min_responses,
    )


def ces_block(scores: Sequence[int], min_responses: int) -> CesBlock:
    """CES answers (1..7, 7 = very easy) -> the CES block."""
    n = len(scores)
    stdev = statistics.stdev(scores) if n >= 2 else None
    return _ces(n, sum(scores), sum(1 for x in scores if x >= 5), stdev, min_responses)


def _ces(n: int, total: int, easy: int, stdev: float | None, min_responses: int) -> CesBlock:
    mean = share = moe = None
    if n:
        mean = total / n
        share = 100 * easy / n
        if stdev is not None:
            moe = Z95 * stdev / math.sqrt(n)
    return CesBlock(
        mean=_r(mean),
        easy_share=_r(share),
        responses=n,
        margin_of_error=_r(moe),
        low_sample=n < min_responses,
    )


# The blocks below are computed from counters (answer -> how many times it was given), in time
# proportional to the distinct answers: a window's blocks were built from a list of every
# answer in it at every emit tick (at a million answers, 0.2 s a snapshot). Each equals the
# block of the same answers listed (`nps_block`, `csat_block`, `ces_block`): the same integer
# sums, then the same float operations.


def nps_block_of_counts(counts: Mapping[int, int], min_responses: int) -> NpsBlock:
    """NPS answer -> how many times it was given -> the same block as `nps_block`."""
    return _nps(
        sum(counts.values()),
        sum(c for s, c in counts.items() if s >= 9),
        sum(c for s, c in counts.items() if s <= 6),
        min_responses,
    )


def csat_block_of_counts(counts: Mapping[int, int], min_responses: int) -> CsatBlock:
    """CSAT answer -> how many times it was given -> the same block as `csat_block`."""
    return _csat(
        sum(counts.values()),
        sum(c for x, c in counts.items() if x >= 4),
        sum(x * c for x, c in counts.items()),
        min_responses,
    )


def ces_block_of_counts(counts: Mapping[int, int], min_responses: int) -> CesBlock:
    """CES answer -> how many times it was given -> the same block as `ces_block`."""
    n = sum(counts.values())
    easy = sum(c for x, c in counts.items() if x >= 5)
    total = sum(x * c for x, c in counts.items())
    return _ces(n, total, easy, stdev_of_counts(counts), min_responses)


def stdev_of_counts(counts: Mapping[int, int]) -> float | None:
    """Answer -> how many times it was given -> `statistics.stdev` of every answer (None
    under two): the exact sum of squared deviations over n - 1, its square root correctly
    rounded by the same (private) helper `statistics.stdev` uses."""
    n = sum(counts.values())
    if n < 2:
        return None
    total = sum(x * c for x, c in counts.items())
    squares = sum(x * x * c for x, c in counts.items())
    mss = Fraction(n * squares - total * total, n) / (n - 1)
    return float(statistics._float_sqrt_of_frac(mss.numerator, mss.denominator))  # type: ignore[attr-defined]


def window_end_for(watermark: datetime) -> datetime:
    """Watermark -> the end of the minute that holds it."""
    return watermark.replace(second=0, microsecond=0) + timedelta(minutes=1)


JOIN_SPAN = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class Derived:
    """What an event means once joined with the rest of its ticket or conversation."""

    resolution_seconds: float | None = None  # ticket_solved: since the ticket's creation
    first_solve: bool = False  # ticket_solved: no earlier solve of the ticket within the span
    first_contact: bool = False  # first solve with <= 1 agent reply before it, never reopened
    contained: bool = False  # conversation_closed: no handoff within the span before it


def thread_key(event: Touchpoint) -> str | None:
    """The ticket or conversation an event belongs to ('support:T-1'), else None."""
    if event.channel in ("support", "chat") and event.thread_id is not None:
        return f"{event.channel}:{event.thread_id}"
    return None


class Joinable(Protocol):
    """What `derive` reads of a thread's event (a touchpoint, or what is kept of one)."""

    @property
    def event_id(self) -> str: ...
    @property
    def channel(self) -> Channel: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def occurred_at(self) -> datetime: ...


def derive(thread: Sequence[Joinable]) -> dict[str, Derived]:
    """The on-time events of one ticket or conversation -> event id -> what it means.

    Every join looks back (or ahead) at most `JOIN_SPAN`, so a thread's events older than
    that before anything new can be forgotten without changing any result."""
    order = sorted(thread, key=lambda e: (e.occurred_at, e.event_id))
    created = [e.occurred_at for e in order if e.kind == "ticket_created"]
    replies = [e.occurred_at for e in order if e.kind == "agent_reply" and e.channel == "support"]
    reopens = [e for e in order if e.kind == "ticket_reopened"]
    handoffs = [e.occurred_at for e in order if e.kind == "handoff"]
    solves = [e for e in order if e.kind == "ticket_solved"]
    derived: dict[str, Derived] = {}
    for index, solve in enumerate(solves):
        t = solve.occurred_at
        since = [c for c in created if t - JOIN_SPAN <= c <= t]
        first = not any(t - JOIN_SPAN <= s.occurred_at for s in solves[:index])
        contact = (
            first
            and sum(1 for r in replies if t - JOIN_SPAN <= r < t) <= 1
            and not any((r.occurred_at, r.event_id) > (t, solve.event_id) for r in reopens)
        )
        derived[solve.event_id] = Derived(
            resolution_seconds=(t - min(since)).total_seconds() if since else None,
            first_solve=first,
            first_contact=contact,
        )
    for close in (e for e in order if e.kind == "conversation_closed"):
        t = close.occurred_at
        handed_off = any(t - JOIN_SPAN <= h <= t for h in handoffs)
        derived[close.event_id] = Derived(contained=not handed_off)
    return derived


def derive_all(events: Iterable[Touchpoint]) -> dict[str, Derived]:
    """Every event -> what it means in its thread (events without a thread: nothing)."""
    threads: dict[str, list[Touchpoint]] = {}
    for event in events:
        key = thread_key(event)
        if key is not None:
            threads.setdefault(key, []).append(event)
    derived: dict[str, Derived] = {}
    for thread in threads.values():
        derived.update(derive(thread))
    return derived


def _snapshot(
    scope: Scope,
    window: WindowName,
    end: datetime,
    events: list[Touchpoint],
    derived: dict[str, Derived],
    min_responses: int,
    emitted_at: datetime,
) -> Snapshot:
    start = end - WINDOWS[window]
    inside = [e for e in events if start <= e.occurred_at < end]
    if scope != "all":
        inside = [e for e in inside if e.channel == scope]
    kinds: dict[str, list[Touchpoint]] = {}
    for event in inside:
        kinds.setdefault(event.kind, []).append(event)

    def count(kind: str) -> int:
        return len(kinds.get(kind, []))

    solves = [derived.get(e.event_id, Derived()) for e in kinds.get("ticket_solved", [])]
    durations = [d.resolution_seconds for d in solves if d.resolution_seconds is not None]
    first_solves = [d for d in solves if d.first_solve]
    first_contact = [d for d in first_solves if d.first_contact]
    closes = [derived.get(e.event_id, Derived()) for e in kinds.get("conversation_closed", [])]
    contained = [d for d in closes if d.contained]
    revenue = sum((Decimal(e.amount or "0") for e in kinds.get("purchase", [])), Decimal(0)) - sum(
        (Decimal(e.amount or "0") for e in kinds.get("return", [])), Decimal(0)
    )
    sentiments = [e.sentiment for e in inside if e.sentiment is not None]
    nps = [e.ratings.nps for e in inside if e.ratings.nps is not None]
    csat = [e.ratings.csat for e in inside if e.ratings.csat is not None]
    ces = [e.ratings.ces for e in inside if e.ratings.ces is not None]
    store = StoreBlock(purchases=count("purchase"), returns=count("return"), revenue=str(revenue))
    return Snapshot(
        scope=scope,
        window=window,
        window_start=start,
        window_end=end,
        emitted_at=emitted_at,
        events=len(inside),
        customers=len({e.customer_key for e in inside}),
        nps=nps_block(nps, min_responses),
        csat=csat_block(csat, min_responses),
        ces=ces_block(ces, min_responses),
        sentiment=sentiment_block(sentiments),
        support=SupportBlock(
            tickets_created=count("ticket_created"),
            tickets_solved=count("ticket_solved"),
            reopened=count("ticket_reopened"),
            median_resolution_seconds=_r(statistics.median(durations)) if durations else None,
            first_contact_resolution=(
                _r(100 * len(first_contact) / len(first_solves)) if first_solves else None
            ),
        ),
        chat=ChatBlock(
            conversations=count("conversation_started"),
            handoffs=count("handoff"),
            bot_containment=_r(100 * len(contained) / len(closes)) if closes else None,
        ),
        store=store,
        churn=ChurnBlock(
            closed_accounts=len({e.customer_key for e in kinds.get("account_closed", [])}),
            detractors=len(
                {e.customer_key for e in inside if e.ratings.nps is not None and e.ratings.nps <= 6}
            ),
        ),
        definitions_version=DEFINITIONS_VERSION,
    )


def on_time(touchpoints: Iterable[Touchpoint]) -> tuple[list[Touchpoint], int]:
    """Accepted touchpoints in arrival order -> (those that count, how many were late).

    A repeated event id counts once. An event older than the longest window when it arrives
    (before `window_end - 30d` of the watermark so far) is late and changes nothing."""
    seen: set[str] = set()
    kept: list[Touchpoint] = []
    late = 0
    watermark: datetime | None = None
    for touchpoint in touchpoints:
        if touchpoint.event_id in seen:
            continue
        seen.add(touchpoint.event_id)
        if watermark is not None and touchpoint.occurred_at < window_end_for(watermark) - LONGEST:
            late += 1
            continue
        kept.append(touchpoint)
        watermark = max(watermark or touchpoint.occurred_at, touchpoint.occurred_at)
    return kept, late


def reference_snapshots(
    touchpoints: Iterable[Touchpoint], min_responses: int, emitted_at: datetime
) -> list[Snapshot]:
    """Accepted touchpoints (in arrival order) -> the snapshot of every scope and window at the
    final watermark (none for no events)."""
    events, _ = on_time(touchpoints)
    if not events:
        return []
    end = window_end_for(max(e.occurred_at for e in events))
    derived = derive_all(events)
    return [
        _snapshot(scope, window, end, events, derived, min_responses, emitted_at)
        for scope in SCOPES
        for window in WINDOWS
    ]
