"""Closed-loop alerts: a newly filed touchpoint -> one alert per poor answer it carries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from service.canonical import Canonical, Channel, UtcMillis

AlertType = Literal["detractor", "low_csat", "high_effort"]
# (rating, alert type, the scores that raise it): NPS 0-6, CSAT 1-2, CES 1-2.
RULES: tuple[tuple[str, AlertType, range], ...] = (
    ("nps", "detractor", range(0, 7)),
    ("csat", "low_csat", range(1, 3)),
    ("ces", "high_effort", range(1, 3)),
)


class Alert(Canonical):
    """The value of `cx.alerts` (keyed by customer key)."""

    type: AlertType
    customer_key: str
    event_id: str
    channel: Channel
    score: int
    occurred_at: UtcMillis
    thread_id: str | None


def alerts_for(touchpoint: dict[str, Any], customer_key: str) -> list[Alert]:
    """Touchpoint JSON + the key it is filed under -> its alerts (none for good answers)."""
    ratings = touchpoint["ratings"]
    return [
        Alert(
            type=kind,
            customer_key=customer_key,
            event_id=touchpoint["event_id"],
            channel=touchpoint["channel"],
            score=ratings[rating],
            occurred_at=datetime.fromisoformat(touchpoint["occurred_at"]),
            thread_id=touchpoint["thread_id"],
        )
        for rating, kind, scores in RULES
        if ratings[rating] is not None and ratings[rating] in scores
    ]
