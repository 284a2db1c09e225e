"""Reliability tier: the one check every scenario ends with.

Pass = every input message is accounted for exactly once (each valid event id filed on
cx.timeline, each bad message in cx.deadletter with its reason and original key and bytes) and
the published metrics equal the reference implementation's over the filed events. Outputs are
at-least-once across a crash, so copies are counted once: a timeline record by its event id, a
dead letter by its source (topic, partition, offset) header.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord

from service.canonical import Touchpoint
from service.deadletter import DeadLetterHeaders, read_headers
from service.simulate import SimMessage
from tests.kafka.harness import Scenario, read_topic
from tests.kafka.metrics_check import expected_snapshots, wait_for_reference


@dataclass(frozen=True)
class Expected:
    """What a stream of simulated messages must produce."""

    valid_ids: set[str]
    bad: list[SimMessage]

    @classmethod
    def of(cls, messages: list[SimMessage]) -> Expected:
        valid = {m.event_id for m in messages if m.kind != "bad" and m.event_id is not None}
        return cls(valid, [m for m in messages if m.kind == "bad"])


def _source(record: ConsumerRecord[bytes, bytes]) -> tuple[str, str, str]:
    headers = DeadLetterHeaders.model_validate(read_headers(record.headers))
    return headers.source_topic, headers.source_partition, headers.source_offset


def distinct_dead_letters(
    records: list[ConsumerRecord[bytes, bytes]],
) -> list[ConsumerRecord[bytes, bytes]]:
    """Dead letters, one per source message (a replay after a crash may repeat one)."""
    first: dict[tuple[str, str, str], ConsumerRecord[bytes, bytes]] = {}
    for record in records:
        first.setdefault(_source(record), record)
    return list(first.values())


def read_dead_letters(
    scenario: Scenario, count: int, within: float = 120.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """cx.deadletter until `count` distinct source messages are there -> one record each."""
    records = asyncio.run(
        read_topic(
            scenario.broker.bootstrap,
            scenario.topic("deadletter"),
            lambda r: len({_source(x) for x in r}) >= count,
            within=within,
        )
    )
    return distinct_dead_letters(records)


def assert_dead_letters(
    expected: list[SimMessage], dead: list[ConsumerRecord[bytes, bytes]]
) -> None:
    """One dead letter per bad message: original key and bytes, the reason it should earn."""
    assert Counter((r.key, r.value) for r in dead) == Counter((m.key, m.value) for m in expected)
    reasons = {(m.key, m.value): m.reason for m in expected}
    for record in dead:
        headers = DeadLetterHeaders.model_validate(read_headers(record.headers))
        assert headers.reason == reasons[(record.key, record.value)], headers


def assert_exact(
    scenario: Scenario, messages: list[SimMessage], within: float = 120.0
) -> dict[str, dict[str, Any]]:
    """Every message accounted for once; cx.metrics equals the reference -> the snapshots."""
    expected = Expected.of(messages)
    reference = expected_snapshots(scenario, expected.valid_ids, within=within)
    if expected.bad:
        assert_dead_letters(expected.bad, read_dead_letters(scenario, len(expected.bad), within))
    return wait_for_reference(scenario, reference, within=within)


def filed_ids(scenario: Scenario, within: float = 2.0) -> set[str]:
    """Event ids on cx.timeline so far."""
    records = asyncio.run(
        read_topic(scenario.broker.bootstrap, scenario.topic("timeline"), lambda r: False, within)
    )
    return {Touchpoint.model_validate_json(r.value or b"").event_id for r in records}
