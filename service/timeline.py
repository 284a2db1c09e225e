"""Customer records: a bounded, newest-first timeline plus the profile state, as one JSON
dict per customer (one changelog record per update).

Record: {"timeline": [touchpoint JSON as filed, newest first], "profile": profile state,
         "recent": [event ids applied, in arrival order, the last few],
         "absorbed": [keys merged into this one], "aliases": count}
or, for a key merged away: {"alias_of": surviving key}.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from service import profile as profiles
from service.canonical import format_utc_millis

Record = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Bounds:
    max_events: int
    max_age: timedelta


# A replay after a crash repeats what was applied just before it, so "applied recently" is
# what recognizes it, whatever the event's time (an old backfilled event is trimmed from the
# timeline at once, but stays among the recent ids).
_MIN_RECENT = 64


def new_record() -> Record:
    return {
        "timeline": [],
        "profile": profiles.empty_state(),
        "recent": [],
        "absorbed": [],
        "aliases": 0,
    }


def _recent(ids: list[str], bounds: Bounds) -> list[str]:
    return ids[-max(_MIN_RECENT, 2 * bounds.max_events) :]


def _order(entry: dict[str, Any]) -> tuple[str, str]:
    return entry["occurred_at"], entry["event_id"]


def _bounded(timeline: list[dict[str, Any]], bounds: Bounds) -> list[dict[str, Any]]:
    """Newest first, at most `max_events`, none older than `max_age` before the newest."""
    ordered = sorted(timeline, key=_order, reverse=True)[: bounds.max_events]
    if not ordered:
        return ordered
    newest = datetime.fromisoformat(ordered[0]["occurred_at"])
    oldest_kept = format_utc_millis(newest - bounds.max_age)
    return [entry for entry in ordered if entry["occurred_at"] >= oldest_kept]


def add_event(
    record: Record | None, touchpoint: dict[str, Any], bounds: Bounds
) -> tuple[Record, bool]:
    """Record + touchpoint JSON -> (new record, whether it was new). An event already on the
    timeline (a replay) changes nothing, so replays never count twice."""
    current = record if record is not None and "alias_of" not in record else new_record()
    event_id = touchpoint["event_id"]
    recent = current.get("recent", [])
    if event_id in recent or any(e["event_id"] == event_id for e in current["timeline"]):
        return current, False
    updated = dict(current)
    updated["timeline"] = _bounded([touchpoint, *current["timeline"]], bounds)
    updated["profile"] = profiles.apply(current["profile"], touchpoint)
    updated["recent"] = _recent([*recent, event_id], bounds)
    return updated, True


def as_filed(record: Record, touchpoint: dict[str, Any]) -> dict[str, Any]:
    """A touchpoint already on the record -> its entry there, as first filed (under the key it
    was filed under then). One trimmed off the timeline since is returned as given."""
    event_id = touchpoint["event_id"]
    return next((e for e in record["timeline"] if e["event_id"] == event_id), touchpoint)


def absorb(record: Record | None, alias: str, other: Record, bounds: Bounds) -> Record:
    """Surviving record + the record of a key merged into it -> the combined record. Absorbing
    the same alias twice (a replayed merge) changes nothing."""
    current = record if record is not None and "alias_of" not in record else new_record()
    if alias in current["absorbed"] or "alias_of" in other:
        return current
    known = {entry["event_id"] for entry in current["timeline"]}
    extra = [entry for entry in other["timeline"] if entry["event_id"] not in known]
    return {
        "timeline": _bounded(current["timeline"] + extra, bounds),
        "profile": profiles.merge(current["profile"], other["profile"]),
        "recent": _recent([*other.get("recent", []), *current.get("recent", [])], bounds),
        "absorbed": sorted({*current["absorbed"], alias, *other["absorbed"]}),
        "aliases": current["aliases"] + other["aliases"] + 1,
    }


def events(record: Record, key: str, limit: int) -> list[dict[str, Any]]:
    """Record -> its newest `limit` touchpoints, filed under the customer's current key."""
    return [{**entry, "customer_key": key} for entry in record["timeline"][:limit]]


@dataclass
class Holdings:
    """How many customers the local records hold, and touchpoints on their timelines: counted
    once from the records (`count`), then kept up to date by each write (`change`), so that
    a gauge refresh does not decode every record. Unknown (`known` False) until counted."""

    customers: int = 0
    entries: int = 0
    known: bool = False

    def count(self, records: Iterable[Record]) -> None:
        """Every local record -> the counts, from scratch."""
        self.customers = self.entries = 0
        self.known = True
        for record in records:
            self.change(None, record)

    def change(self, before: Record | None, after: Record | None) -> None:
        """One key's record as it was -> as it is now (None: no record)."""
        if not self.known:
            return
        for record, sign in ((before, -1), (after, 1)):
            if record is not None and "alias_of" not in record:
                self.customers += sign
                self.entries += sign * len(record["timeline"])
