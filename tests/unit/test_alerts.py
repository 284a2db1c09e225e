"""Closed-loop alerts: one per NPS 0-6, CSAT 1-2 and CES 1-2 answer."""

from __future__ import annotations

from typing import Any

import pytest

from service.alerts import alerts_for

pytestmark = pytest.mark.unit


def _touchpoint(
    nps: int | None = None, csat: int | None = None, ces: int | None = None
) -> dict[str, Any]:
    return {
        "event_id": "support:s-9",
        "channel": "support",
        "kind": "survey_response",
        "occurred_at": "2026-11-20T10:15:30.123Z",
        "thread_id": "T-9",
        "ratings": {"nps": nps, "csat": csat, "ces": ces},
    }


@pytest.mark.parametrize(
    ("ratings", "expected"),
    [
        ({"nps": 0}, [("detractor", 0)]),
        ({"nps": 6}, [("detractor", 6)]),
        ({"nps": 7}, []),
        ({"nps": 10}, []),
        ({"csat": 1}, [("low_csat", 1)]),
        ({"csat": 2}, [("low_csat", 2)]),
        ({"csat": 3}, []),
        ({"ces": 1}, [("high_effort", 1)]),
        ({"ces": 2}, [("high_effort", 2)]),
        ({"ces": 3}, []),
        ({"ces": 7}, []),
        ({}, []),
        ({"csat": 1, "ces": 2}, [("low_csat", 1), ("high_effort", 2)]),
        ({"nps": 3, "csat": 5, "ces": 1}, [("detractor", 3), ("high_effort", 1)]),
    ],
)
def test_one_alert_per_poor_answer(
    ratings: dict[str, int], expected: list[tuple[str, int]]
) -> None:
    alerts = alerts_for(_touchpoint(**ratings), "C-1")
    assert [(a.type, a.score) for a in alerts] == expected


def test_alert_fields_match_the_contract() -> None:
    [alert] = alerts_for(_touchpoint(nps=2), "C-1")
    assert alert.model_dump(mode="json") == {
        "type": "detractor",
        "customer_key": "C-1",
        "event_id": "support:s-9",
        "channel": "support",
        "score": 2,
        "occurred_at": "2026-11-20T10:15:30.123Z",
        "thread_id": "T-9",
    }
