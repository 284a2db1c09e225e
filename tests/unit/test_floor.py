"""The transport floor's tally and report (the run itself: tests/kafka/test_bench.py)."""

from __future__ import annotations

import pytest

from service.floor import Tally, floor_report

pytestmark = pytest.mark.unit


def test_report_divides_the_cpu_by_events_and_hops() -> None:
    report = floor_report(events=1000, seconds=2.0, cpu_seconds=0.5, hops=5)
    assert report["events"] == 1000
    assert report["events_per_s"] == 500
    assert report["cpu_us_per_event"] == 500.0
    assert report["cpu_us_per_hop"] == 100.0
    assert report["peak_rss_mb"] > 0


def test_tally_reports_once_every_message_reached_the_last_hop() -> None:
    tally = Tally(expected=3, hops=2)
    tally.first()
    started = tally.started
    tally.first()  # only the first message starts the clock
    assert tally.started == started
    assert [tally.counted() for _ in range(3)] == [False, False, True]
    assert tally.report["events"] == 3
    assert tally.report["hops"] == 2


def test_tally_without_a_start_reports_nothing() -> None:
    tally = Tally(expected=1, hops=1)
    assert tally.counted() is False
    assert tally.report == {}
