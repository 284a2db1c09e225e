"""Kafka-tier helper: the published snapshots against the reference implementation."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from service.canonical import Touchpoint
from service.metrics import Snapshot, reference_snapshots
from tests.kafka.harness import Scenario, read_topic

EMITTED = datetime(2026, 1, 1, tzinfo=UTC)


def _numbers(snapshot: Snapshot) -> dict[str, Any]:
    return snapshot.model_dump(mode="json", exclude={"emitted_at"})


def expected_snapshots(
    scenario: Scenario, valid_ids: set[str], within: float = 120.0
) -> dict[str, dict[str, Any]]:
    """The reference's snapshots over what the timeline says was accepted (first copy of each
    event id: a replay after a crash may publish one again)."""
    seen: set[str] = set()
    parsed = 0

    def done(records: list[Any]) -> bool:
        nonlocal parsed  # parse each record once: a large run would otherwise be quadratic
        for record in records[parsed:]:
            seen.add(Touchpoint.model_validate_json(record.value or b"").event_id)
        parsed = len(records)
        return len(seen) >= len(valid_ids)

    records = asyncio.run(
        read_topic(scenario.broker.bootstrap, scenario.topic("timeline"), done, within=within)
    )
    # The first copy is the one published first (read order across partitions is arbitrary):
    # a copy under another key, published after a crash, must not stand in for it.
    ordered = sorted(records, key=lambda r: r.timestamp)
    touchpoints = [Touchpoint.model_validate_json(r.value or b"") for r in ordered]
    filed = {t.event_id for t in touchpoints}
    assert filed == valid_ids, (sorted(filed - valid_ids)[:5], sorted(valid_ids - filed)[:5])
    return {s.key: _numbers(s) for s in reference_snapshots(touchpoints, 30, EMITTED)}


def published_snapshots(scenario: Scenario) -> dict[str, dict[str, Any]]:
    """The latest snapshot per key on cx.metrics (as a compacted topic reads)."""
    records = asyncio.run(
        read_topic(scenario.broker.bootstrap, scenario.topic("metrics"), lambda r: False, within=2)
    )
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        snapshot = Snapshot.model_validate_json(record.value or b"")
        latest[snapshot.key] = _numbers(snapshot)
    return latest


def wait_for_reference(
    scenario: Scenario, expected: dict[str, dict[str, Any]], within: float = 60.0
) -> dict[str, dict[str, Any]]:
    """Poll cx.metrics until it equals `expected` -> the published snapshots."""
    deadline = time.monotonic() + within
    published: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        published = published_snapshots(scenario)
        if published == expected:
            return published
        time.sleep(1)
    differing = sorted(k for k in expected if published.get(k) != expected[k])
    first = differing[0] if differing else None
    raise AssertionError(
        f"snapshots differ for {differing[:5]}: "
        f"{published.get(first or '')} != {expected.get(first or '')}"
    )
