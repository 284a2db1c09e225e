"""Streaming metrics, as pure code: per-partition minute aggregates, merged into rolling windows.

The shape the worker will run (and that tests check against `metrics.reference_snapshots`):

- events are spread over partitions by `partition_key` (a ticket's or conversation's events
  stay together, so `derive` can join them);
- each `PartitionAggregator` keeps, per minute and channel, a `MinuteAgg` of what its events
  contribute, plus its threads; a late-arriving thread event re-derives its thread and
  replaces the contributions it changed;
- a `Merger` adds the partitions' minute aggregates (each one replaced whole, so receiving one
  twice changes nothing) to its channel's totals and to those of "all" (every part of an
  aggregate adds up, distinct customers included: "all" is the sum of the channels), and cuts
  windows at the global watermark.

A `MinuteAgg` keeps counters of raw values, so a window is computed by the same block
functions as the reference, from the same numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sortedcontainers import SortedList

from service.buffers import own_size
from service.canonical import CHANNELS, Channel, Kind, Ratings, Touchpoint
from service.metrics import (
    DEFINITIONS_VERSION,
    LONGEST,
    SCOPES,
    WINDOWS,
    ChatBlock,
    ChurnBlock,
    Derived,
    Scope,
    Snapshot,
    StoreBlock,
    SupportBlock,
    WindowName,
    ces_block_of_counts,
    csat_block_of_counts,
    derive,
    median_of_sorted,
    nps_block_of_counts,
    round2,
    sentiment_block_of_counts,
    thread_key,
    window_end_for,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A partition's aggregate of one minute and channel, in the merger: (partition, scope, minute)
PartialKey = tuple[int, Scope, int]
_COUNTERS = (
    "customers", "nps", "csat", "ces", "sentiment", "kinds", "resolution",
    "closed_accounts", "detractors",
)  # fmt: skip
MINUTE = timedelta(minutes=1)
# Each window's length, and the longest, in minutes: a window ending at minute E holds the
# minutes E - span <= m < E.
SPANS: dict[WindowName, int] = {window: int(size // MINUTE) for window, size in WINDOWS.items()}
LONGEST_SPAN = int(LONGEST // MINUTE)


def minute_of(moment: datetime) -> int:
    """Aware datetime -> minutes since the epoch (the bucket it falls in)."""
    return int((moment - EPOCH) // MINUTE)


def partition_key(event: Touchpoint) -> str:
    """Where an event is aggregated: its thread when it has one, else the event itself."""
    return thread_key(event) or event.event_id


class _Empty(Counter[Any]):
    """The one empty counter every `MinuteAgg` starts with, shared: most minutes of a scope
    have a few events, and nine fresh counters each were most of the metrics state's memory.
    It refuses writes, so a caller that forgets to replace it fails instead of sharing them."""

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("the shared empty counter is read-only")

    def __delitem__(self, key: Any) -> None:
        raise TypeError("the shared empty counter is read-only")

    def update(self, *args: Any, **kwargs: Any) -> None:
        if any(arg is not None for arg in args) or kwargs:  # Counter() itself calls update()
            raise TypeError("the shared empty counter is read-only")


_EMPTY: Counter[Any] = _Empty()
_ZERO = Decimal(0)


def _empty() -> Counter[Any]:
    return _EMPTY


_NO_PAIRS: list[list[Any]] = []


def _counter(pairs: list[list[Any]]) -> Counter[Any]:
    return Counter(dict(pairs)) if pairs else _EMPTY


@dataclass(slots=True)
class MinuteAgg:
    """What the events of one minute (and scope) contribute: counters of raw values.

    A counter no event has touched is the shared read-only `_EMPTY`; `add` gives it its own
    before the first write."""

    events: int = 0
    customers: Counter[str] = field(default_factory=_empty)
    nps: Counter[int] = field(default_factory=_empty)
    csat: Counter[int] = field(default_factory=_empty)
    ces: Counter[int] = field(default_factory=_empty)
    sentiment: Counter[float] = field(default_factory=_empty)
    kinds: Counter[str] = field(default_factory=_empty)
    resolution: Counter[float] = field(default_factory=_empty)
    first_solves: int = 0
    first_contact: int = 0
    closes: int = 0
    contained: int = 0
    revenue: Decimal = _ZERO
    closed_accounts: Counter[str] = field(default_factory=_empty)
    detractors: Counter[str] = field(default_factory=_empty)

    def add(self, other: MinuteAgg, sign: int = 1) -> None:
        """Add (sign 1) or take away (sign -1) another aggregate."""
        self.events += sign * other.events
        for name in _COUNTERS:
            theirs: Counter[object] = getattr(other, name)
            if not theirs:
                continue
            mine: Counter[object] = getattr(self, name)
            if mine is _EMPTY:
                mine = Counter()
                setattr(self, name, mine)
            for value, count in theirs.items():
                total = mine[value] + sign * count
                if total:
                    mine[value] = total
                else:
                    del mine[value]
        self.first_solves += sign * other.first_solves
        self.first_contact += sign * other.first_contact
        self.closes += sign * other.closes
        self.contained += sign * other.contained
        if other.revenue is not _ZERO:
            # Skipping the shared zero leaves the sum as it was: every amount has at most
            # six decimals and no exponent, and a sum never becomes -0 (it starts at +0).
            self.revenue += sign * other.revenue

    def minus(self, old: MinuteAgg) -> MinuteAgg:
        """This aggregate and an earlier one of the same minute -> what changed between them:
        adding it to a sum holding `old` makes it hold this one. A replaced minute aggregate
        differs from the one before it by a few events: one pass, and the sums it is added to
        touch only what changed (instead of taking `old` away and adding this, whole, to each)."""
        delta = MinuteAgg(
            events=self.events - old.events,
            first_solves=self.first_solves - old.first_solves,
            first_contact=self.first_contact - old.first_contact,
            closes=self.closes - old.closes,
            contained=self.contained - old.contained,
            # The shared zero when neither has an amount: `add` skips it (see there).
            revenue=(
                _ZERO
                if self.revenue is _ZERO and old.revenue is _ZERO
                else self.revenue - old.revenue
            ),
        )
        for name in _COUNTERS:
            mine: Counter[object] = getattr(self, name)
            theirs: Counter[object] = getattr(old, name)
            if not mine and not theirs:
                continue
            changed: Counter[object] = Counter()
            for value, count in mine.items():
                difference = count - theirs.get(value, 0)
                if difference:
                    changed[value] = difference
            for value, count in theirs.items():
                if value not in mine:
                    changed[value] = -count
            if changed:
                setattr(delta, name, changed)
        return delta

    def to_json(self) -> dict[str, Any]:
        """-> JSON (counters as [value, count] pairs: their values are not all strings)."""
        return {
            "events": self.events,
            **{name: sorted(getattr(self, name).items()) for name in _COUNTERS},
            "first_solves": self.first_solves,
            "first_contact": self.first_contact,
            "closes": self.closes,
            "contained": self.contained,
            "revenue": str(self.revenue),
        }

    def to_compact_json(self) -> dict[str, Any]:
        """-> `to_json` without its empty counters and zero counts, and without the revenue
        when no amount ever reached it (`from_json` reads either): a minute of one or two
        events in half the bytes."""
        value = {name: v for name, v in self.to_json().items() if v != [] and v != 0}
        if self.revenue is _ZERO:
            del value["revenue"]
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> MinuteAgg:
        """`to_json` or `to_compact_json` -> the aggregate."""
        revenue = value.get("revenue")
        agg = cls(
            events=int(value.get("events", 0)),
            first_solves=int(value.get("first_solves", 0)),
            first_contact=int(value.get("first_contact", 0)),
            closes=int(value.get("closes", 0)),
            contained=int(value.get("contained", 0)),
            revenue=_ZERO if revenue is None else Decimal(revenue),
        )
        for name in _COUNTERS:
            setattr(agg, name, _counter(value.get(name, _NO_PAIRS)))
        return agg

    @classmethod
    def of(cls, event: Touchpoint | ThreadEvent, derived: Derived) -> MinuteAgg:
        """One event (and what it means in its thread) -> its contribution."""
        key = event.customer_key
        agg = cls(events=1, customers=Counter((key,)), kinds=Counter((event.kind,)))
        ratings = event.ratings
        if ratings.nps is not None:
            agg.nps = Counter((ratings.nps,))
            if ratings.nps <= 6:
                agg.detractors = Counter((key,))
        if ratings.csat is not None:
            agg.csat = Counter((ratings.csat,))
        if ratings.ces is not None:
            agg.ces = Counter((ratings.ces,))
        if event.sentiment is not None:
            agg.sentiment = Counter((event.sentiment,))
        if event.kind in ("purchase", "return") and event.amount is not None:
            amount = Decimal(event.amount)
            agg.revenue = amount if event.kind == "purchase" else -amount
        if event.kind == "account_closed":
            agg.closed_accounts = Counter((key,))
        if event.kind == "ticket_solved":
            if derived.resolution_seconds is not None:
                agg.resolution = Counter((derived.resolution_seconds,))
            agg.first_solves = int(derived.first_solve)
            agg.first_contact = int(derived.first_contact)
        if event.kind == "conversation_closed":
            agg.closes, agg.contained = 1, int(derived.contained)
        return agg


def snapshot_of(
    agg: MinuteAgg,
    scope: Scope,
    window: WindowName,
    end: datetime,
    min_responses: int,
    emitted_at: datetime,
    resolutions: Sequence[float],
) -> Snapshot:
    """A window's summed aggregate and its resolution times in ascending order (one per solve
    counted, as `agg.resolution` counts them) -> its snapshot (the same formulas as the
    reference)."""
    kinds = agg.kinds
    median = median_of_sorted(resolutions)
    return Snapshot(
        scope=scope,
        window=window,
        window_start=end - WINDOWS[window],
        window_end=end,
        emitted_at=emitted_at,
        events=agg.events,
        customers=len(agg.customers),
        nps=nps_block_of_counts(agg.nps, min_responses),
        csat=csat_block_of_counts(agg.csat, min_responses),
        ces=ces_block_of_counts(agg.ces, min_responses),
        sentiment=sentiment_block_of_counts(agg.sentiment),
        support=SupportBlock(
            tickets_created=kinds["ticket_created"],
            tickets_solved=kinds["ticket_solved"],
            reopened=kinds["ticket_reopened"],
            median_resolution_seconds=round2(median),
            first_contact_resolution=(
                round2(100 * agg.first_contact / agg.first_solves) if agg.first_solves else None
            ),
        ),
        chat=ChatBlock(
            conversations=kinds["conversation_started"],
            handoffs=kinds["handoff"],
            bot_containment=round2(100 * agg.contained / agg.closes) if agg.closes else None,
        ),
        store=StoreBlock(
            purchases=kinds["purchase"], returns=kinds["return"], revenue=str(agg.revenue)
        ),
        churn=ChurnBlock(closed_accounts=len(agg.closed_accounts), detractors=len(agg.detractors)),
        definitions_version=DEFINITIONS_VERSION,
    )


_RATINGS: dict[Ratings, Ratings] = {}  # one object per distinct value (a few hundred at most)


@dataclass(frozen=True, slots=True)
class ThreadEvent:
    """What a thread's later joins read of one of its events, kept for up to 61 days: a
    touchpoint without its text, source and currency (a tenth of its memory)."""

    event_id: str
    channel: Channel
    kind: Kind
    occurred_at: datetime
    customer_key: str
    ratings: Ratings
    sentiment: float | None
    amount: str | None

    @classmethod
    def of(cls, event: Touchpoint) -> ThreadEvent:
        ratings = _RATINGS.setdefault(event.ratings, event.ratings)
        return cls(
            event.event_id, event.channel, event.kind, event.occurred_at,
            event.customer_key, ratings, event.sentiment, event.amount,
        )  # fmt: skip


MinuteKey = tuple[Scope, int]
# A partition freezes (see `Minutes`) the aggregates of minutes this many minutes or more
# behind its watermark: late events are few. The merger freezes its minute totals more than
# 25 hours behind the windows' end: the 24h window reads a total as it leaves it, still as
# objects; the 7d and 30d windows read each once more, decoded, as it leaves them.
FREEZE_AFTER = 60
MERGER_FREEZE_AFTER = 25 * 60


class Minutes(Mapping[MinuteKey, MinuteAgg]):
    """Minute aggregates by (scope, minute). Those before a line (`freeze_before`) are kept
    as compact JSON (about 220 bytes for a minute of two events, against 720 as objects) and
    decoded when read; one taken to be changed (`take`) is kept as objects again. The
    aggregates of each minute were most of the metrics state in memory."""

    __slots__ = ("frozen", "hot", "revenues")

    def __init__(self) -> None:
        self.hot: dict[MinuteKey, MinuteAgg] = {}
        self.frozen: dict[MinuteKey, bytes] = {}
        # A frozen aggregate's revenue, when an amount ever reached it: a window an amount
        # leaves sums its minutes' revenues again.
        self.revenues: dict[MinuteKey, Decimal] = {}

    def __getitem__(self, key: MinuteKey) -> MinuteAgg:
        agg = self.hot.get(key)
        return _decoded(self.frozen[key]) if agg is None else agg

    def get(self, key: MinuteKey, default: Any = None) -> Any:
        agg = self.hot.get(key)
        if agg is not None:
            return agg
        frozen = self.frozen.get(key)
        return default if frozen is None else _decoded(frozen)

    def __contains__(self, key: object) -> bool:
        return key in self.hot or key in self.frozen

    def __iter__(self) -> Iterator[MinuteKey]:
        yield from self.hot
        yield from self.frozen

    def __len__(self) -> int:
        return len(self.hot) + len(self.frozen)

    def take(self, key: MinuteKey) -> MinuteAgg:
        """The aggregate of `key` to change (a new one when there is none), kept as objects."""
        agg = self.hot.get(key)
        if agg is None:
            frozen = self.frozen.pop(key, None)
            self.revenues.pop(key, None)
            agg = self.hot[key] = MinuteAgg() if frozen is None else _decoded(frozen)
        return agg

    def revenue(self, key: MinuteKey) -> Decimal:
        """The revenue of `key` (the shared zero when no amount ever reached it)."""
        agg = self.hot.get(key)
        return self.revenues.get(key, _ZERO) if agg is None else agg.revenue

    def pop(self, key: MinuteKey) -> None:
        self.hot.pop(key, None)
        self.frozen.pop(key, None)
        self.revenues.pop(key, None)

    def freeze_before(self, minute: int) -> None:
        """Keep the aggregates of minutes before `minute` as compact JSON."""
        for key in [k for k in self.hot if k[1] < minute]:
            agg = self.hot.pop(key)
            self.frozen[key] = own_size(orjson.dumps(agg.to_compact_json()))
            if agg.revenue is not _ZERO:
                self.revenues[key] = agg.revenue

    def drop_before(self, minute: int) -> None:
        """Forget the aggregates of minutes before `minute`."""
        for key in [k for k in self if k[1] < minute]:
            self.pop(key)


def _decoded(encoded: bytes) -> MinuteAgg:
    return MinuteAgg.from_json(orjson.loads(encoded))


def _scopes(scope: Scope) -> tuple[Scope, Scope]:
    """A channel's scope -> the scopes its aggregates count in: its own, and "all"."""
    return scope, "all"


@dataclass
class PartitionAggregator:
    """One partition's share: minute aggregates per channel, and the threads it joins."""

    minutes: Minutes = field(default_factory=Minutes)
    threads: dict[str, list[ThreadEvent]] = field(default_factory=dict)
    derived: dict[str, Derived] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # event id -> its minute
    watermark: datetime | None = None
    late: int = 0
    # The oldest minute in `seen`: `forget_before` is called per event and scans only when
    # there is something to drop.
    oldest: int | None = field(default=None, compare=False, repr=False)

    def apply(self, event: Touchpoint) -> set[tuple[Scope, int]]:
        """One accepted event (any copy: each id counts once) -> the (scope, minute) buckets
        it changed. A late event changes nothing."""
        if event.event_id in self.seen:
            return set()
        if (
            self.watermark is not None
            and event.occurred_at < window_end_for(self.watermark) - LONGEST
        ):
            self.late += 1
            return set()
        self._see(event)
        changed: set[tuple[Scope, int]] = set()
        key = thread_key(event)
        if key is None:
            self._contribute(event, Derived(), 1, changed)
            return changed
        thread = self.threads.setdefault(key, [])
        before = {e.event_id: self.derived.get(e.event_id, Derived()) for e in thread}
        thread.append(ThreadEvent.of(event))
        after = derive(thread)
        for member in thread:
            old, new = before.get(member.event_id), after.get(member.event_id, Derived())
            if member.event_id == event.event_id:
                self._contribute(member, new, 1, changed)
            elif old != new:
                self._contribute(member, old or Derived(), -1, changed)
                self._contribute(member, new, 1, changed)
            self.derived[member.event_id] = new
        return changed

    def restore(self, events: list[Touchpoint]) -> set[tuple[Scope, int]]:
        """Rebuild from the events kept in state (all on time when they came) -> every bucket."""
        changed: set[tuple[Scope, int]] = set()
        threads: dict[str, list[ThreadEvent]] = {}
        for event in events:
            if event.event_id in self.seen:
                continue
            self._see(event)
            key = thread_key(event)
            if key is None:
                self._contribute(event, Derived(), 1, changed)
            else:
                threads.setdefault(key, []).append(ThreadEvent.of(event))
        for key, thread in threads.items():
            self.threads.setdefault(key, []).extend(thread)
            derived = derive(self.threads[key])
            for member in thread:
                self.derived[member.event_id] = derived.get(member.event_id, Derived())
                self._contribute(member, self.derived[member.event_id], 1, changed)
        return changed

    def encoded(self, key: MinuteKey) -> bytes:
        """A bucket -> its aggregate's JSON (`MinuteAgg.to_json`; an empty aggregate's when no
        event is in it): what the merger is sent."""
        agg: MinuteAgg = self.minutes.get(key) or MinuteAgg()
        return orjson.dumps(agg.to_json())

    def freeze_cold(self) -> None:
        """Freeze the buckets of minutes `FREEZE_AFTER` or more behind the watermark."""
        if self.watermark is not None:
            self.minutes.freeze_before(minute_of(self.watermark) - FREEZE_AFTER)

    def _see(self, event: Touchpoint) -> None:
        minute = minute_of(event.occurred_at)
        self.seen[event.event_id] = minute
        self.oldest = minute if self.oldest is None else min(self.oldest, minute)
        self.watermark = max(self.watermark or event.occurred_at, event.occurred_at)

    def forget_before(self, minute: int) -> list[tuple[int, str]]:
        """Drop what came before `minute` (no window or join can reach it) -> the (minute,
        event id) of each event dropped."""
        if self.oldest is None or self.oldest >= minute:
            return []
        self.minutes.drop_before(minute)
        gone = sorted((m, e) for e, m in self.seen.items() if m < minute)
        for _, event_id in gone:
            del self.seen[event_id]
            self.derived.pop(event_id, None)
        for thread_id, thread in list(self.threads.items()):
            kept = [e for e in thread if e.event_id in self.seen]
            if kept:
                self.threads[thread_id] = kept
            else:
                del self.threads[thread_id]
        self.oldest = min(self.seen.values(), default=None)
        return gone

    def _contribute(
        self,
        event: Touchpoint | ThreadEvent,
        derived: Derived,
        sign: int,
        changed: set[tuple[Scope, int]],
    ) -> None:
        # The channel's scope only: "all" is the sum of the channels (every part of an
        # aggregate adds up, distinct customers included), and the merger sums it.
        bucket_key = (event.channel, minute_of(event.occurred_at))
        self.minutes.take(bucket_key).add(MinuteAgg.of(event, derived), sign)
        changed.add(bucket_key)


@dataclass
class Merger:
    """All partitions' minute aggregates -> rolling windows at the global watermark.

    Each window's total is kept up to date as aggregates arrive (what changed is added), and
    rebuilt only when the window end moves to another minute: an emit tick costs the number of
    scopes and windows, not the events in them."""

    # partial key -> the version it was sent at: the last offset its partition had applied
    versions: dict[PartialKey, int] = field(default_factory=dict)
    # partial key -> the aggregate as JSON, read again only when the partial is replaced.
    # Encoded: a few hundred bytes instead of a few kilobytes of objects. Unused with `stored`.
    encoded: dict[PartialKey, bytes] = field(default_factory=dict)
    # Where the aggregates are read back from instead, when they are kept elsewhere already
    # (the worker's partials table): partial key -> the aggregate's JSON, decoded.
    stored: Callable[[PartialKey], dict[str, Any]] | None = field(
        default=None, compare=False, repr=False
    )
    totals: Minutes = field(default_factory=Minutes)
    watermarks: dict[int, datetime] = field(default_factory=dict)
    # (scope, window) -> its total, for windows ending at `windows_end` (a minute number)
    windows: dict[tuple[Scope, WindowName], MinuteAgg] = field(default_factory=dict)
    # (scope, window) -> the resolution times its total counts, in ascending order: a median
    # at every emit tick from the counter sorted 30 days of them each time (0.9 s at a
    # million; a sorted list takes one in 4 µs and indexes in 1 µs at that size)
    resolutions: dict[tuple[Scope, WindowName], SortedList] = field(default_factory=dict)
    windows_end: int | None = None
    # The oldest minute among the partials: forgetting scans only when something is due.
    oldest: int | None = field(default=None, compare=False, repr=False)

    def receive(
        self,
        partition: int,
        scope: Scope,
        minute: int,
        agg: MinuteAgg,
        watermark: datetime,
        version: int = -1,
    ) -> bool:
        """Replace one partition's aggregate of one minute (idempotent) -> False when it is
        older than the one held (a lower `version`), and ignored.

        A partition's aggregates at version V count exactly its events up to offset V,
        whichever worker sent them. An older one can come after a newer one: a worker paused
        past its session sends what its producer held when it resumes, after its successor's."""
        if scope not in CHANNELS:
            raise ValueError(f"partials are per channel, not {scope!r}: the merger sums 'all'")
        key = (partition, scope, minute)
        held = self.versions.get(key)
        if held is not None and version < held:
            return False
        change = agg if held is None else agg.minus(self._held(key))
        for counted in _scopes(scope):
            self.totals.take((counted, minute)).add(change)
        if self.windows_end is not None:
            for window, span in SPANS.items():
                if self.windows_end - span <= minute < self.windows_end:
                    for counted in _scopes(scope):
                        self.windows[(counted, window)].add(change)
                        _move(self.resolutions[(counted, window)], change.resolution)
        self.versions[key] = version
        if self.stored is None:
            self.encoded[key] = own_size(orjson.dumps(agg.to_json()))
        self.oldest = minute if self.oldest is None else min(self.oldest, minute)
        if partition not in self.watermarks or watermark > self.watermarks[partition]:
            self.watermarks[partition] = watermark
        return True

    def _held(self, key: PartialKey) -> MinuteAgg:
        """The aggregate held for a partial key (one is)."""
        if self.stored is not None:
            return MinuteAgg.from_json(self.stored(key))
        return MinuteAgg.from_json(orjson.loads(self.encoded[key]))

    @property
    def window_end(self) -> datetime | None:
        """The end of the minute holding the global watermark (None before any event)."""
        return window_end_for(max(self.watermarks.values())) if self.watermarks else None

    def _windows_at(self, end_minute: int) -> None:
        """Every window's total for windows ending at `end_minute`: slid from the windows held
        when the end moved forward by less than a day, else rebuilt from the minute totals."""
        start = self.windows_end
        if start is not None and 0 < end_minute - start <= SLIDE_MINUTES:
            self._slide(start, end_minute)
        else:
            self.windows = window_totals(self.totals, end_minute)
            self.resolutions = {
                key: SortedList(total.resolution.elements()) for key, total in self.windows.items()
            }
        self.windows_end = end_minute

    def _slide(self, start: int, end: int) -> None:
        """Windows ending at minute `start` -> ending at `end` (later): the minutes that came
        into each window added, those that left it taken away. Rebuilding every window from
        every minute total at each new minute was O(minutes held) per minute of event time.

        A sum keeps the finest decimal places of every amount it took, so when an amount leaves
        a window its revenue is summed again from the minutes it holds: as a rebuilt window's,
        and the reference's, it then has those of the amounts it holds."""
        for window, span in SPANS.items():
            leaving = range(start - span, min(end - span, start))
            entering = range(max(start, end - span), end)
            for scope in SCOPES:
                total = self.windows[(scope, window)]
                ordered = self.resolutions[(scope, window)]
                amount_left = False
                for minute in leaving:
                    agg = self.totals.get((scope, minute))
                    if agg is not None:
                        total.add(agg, -1)
                        _move(ordered, Counter({v: -n for v, n in agg.resolution.items()}))
                        amount_left = amount_left or agg.revenue is not _ZERO
                for minute in entering:
                    agg = self.totals.get((scope, minute))
                    if agg is not None:
                        total.add(agg)
                        _move(ordered, agg.resolution)
                if amount_left:
                    total.revenue = _revenue(self.totals, scope, range(end - span, end))
        # A minute out of the longest window whose partials are forgotten: its totals were
        # kept for this slide only (see `forget_before`).
        for minute in range(start - LONGEST_SPAN, min(end - LONGEST_SPAN, start)):
            if self.oldest is None or minute < self.oldest:
                for scope in SCOPES:
                    self.totals.pop((scope, minute))

    def snapshots(self, min_responses: int, emitted_at: datetime) -> list[Snapshot]:
        """Every scope and window at the global watermark (none before any event)."""
        end = self.window_end
        if end is None:
            return []
        if self.windows_end != minute_of(end):
            self._windows_at(minute_of(end))
            self.totals.freeze_before(minute_of(end) - MERGER_FREEZE_AFTER)
        return [
            snapshot_of(
                self.windows[(scope, window)],
                scope,
                window,
                end,
                min_responses,
                emitted_at,
                self.resolutions[(scope, window)],
            )
            for scope in SCOPES
            for window in WINDOWS
        ]

    def forget_before(self, minute: int) -> list[tuple[int, Scope, int]]:
        """Drop minutes no window can reach any more -> the partial keys dropped."""
        if self.oldest is None or self.oldest >= minute:
            return []
        gone = [key for key in self.versions if key[2] < minute]
        for key in gone:
            del self.versions[key]
            self.encoded.pop(key, None)
        # A minute the held windows still count keeps its total until they slide past it
        # (`_slide` takes it away): the windows move on only at the next snapshot.
        if self.windows_end is not None:
            minute = min(minute, self.windows_end - LONGEST_SPAN)
        self.totals.drop_before(minute)
        self.oldest = min((key[2] for key in self.versions), default=None)
        return gone


# How far a window end may move forward and still be slid (see `Merger._slide`): a longer
# jump (a gap in the traffic) rebuilds the windows from the minute totals instead.
SLIDE_MINUTES = 24 * 60


def window_totals(
    totals: Mapping[MinuteKey, MinuteAgg], end_minute: int
) -> dict[tuple[Scope, WindowName], MinuteAgg]:
    """Minute totals -> each scope's and window's sum, for windows ending at `end_minute`."""
    windows = {(scope, window): MinuteAgg() for scope in SCOPES for window in WINDOWS}
    for (scope, minute), agg in totals.items():
        for window, span in SPANS.items():
            if end_minute - span <= minute < end_minute:
                windows[(scope, window)].add(agg)
    return windows


def _revenue(totals: Minutes, scope: Scope, minutes: range) -> Decimal:
    """The revenue of a scope's minutes, summed as `MinuteAgg.add` sums it."""
    revenue = _ZERO
    for minute in minutes:
        amount = totals.revenue((scope, minute))
        if amount is not _ZERO:
            revenue += amount
    return revenue


def _move(ordered: SortedList, change: Counter[float]) -> None:
    """Samples in ascending order + value -> count added (or, negative, taken away) ->
    still in order. A value taken away is there: `change` is the difference between two
    aggregates the samples hold the first of."""
    for value, count in change.items():
        if count > 0:
            ordered.update([value] * count)
            continue
        for _ in range(-count):
            try:
                ordered.remove(value)
            except ValueError:
                raise ValueError(f"resolution {value} taken away, not held") from None
