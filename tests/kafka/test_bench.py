"""`cxpulse bench`: a small throughput run and a small latency run complete and print their
reports as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.broker import EmbeddedBroker

pytestmark = pytest.mark.kafka


def bench(broker: EmbeddedBroker, tmp_path: Path, *args: str) -> dict[str, Any]:
    """`cxpulse bench ARGS` against the test's broker -> its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CX_")}
    env["CX_KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
    env["TMPDIR"] = str(tmp_path)  # the workers' and the floor's data directories
    done = subprocess.run(
        [sys.executable, "-m", "service", "bench", *args],
        env=env,
        capture_output=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_bench_prints_a_json_report(broker: EmbeddedBroker, tmp_path: Path) -> None:
    report = bench(broker, tmp_path, "--events", "1500")
    assert report["mode"] == "throughput"
    assert report["messages"] == 1500
    assert 0 < report["events"] <= 1500
    assert report["events_per_s"] > 0
    assert report["baseline"]["events"] == 1500
    assert report["ratio_to_baseline"] == pytest.approx(
        report["events_per_s"] / report["baseline"]["events_per_s"], rel=0.01, abs=1e-6
    )
    assert report["exit_codes"] == [0]
    assert report["customer_pool"] == 250  # a sixth of the messages
    # A broker of its own would be measured too; this one is not the bench's.
    assert report["broker_cpu_ms_per_event"] is None
    assert report["machine_busy"] is None
    # one live profile per customer (not per event, nor per key merged away since)
    assert 0 < report["customers_in_state"] < report["events"]
    assert report["peak_rss_mb"] > 0
    assert report["core_only"]["events"] == report["events"]  # same events, same verdicts
    floor = report["transport_floor"]
    assert floor["hops"] == 5
    assert floor["events"] == 1500  # every raw message, bad ones too, through every hop
    assert floor["events_per_s"] > 0
    assert floor["cpu_us_per_hop"] == pytest.approx(floor["cpu_us_per_event"] / 5, abs=0.1)
    latency = report["publish_to_timeline"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert list(tmp_path.iterdir()) == []  # nothing left behind (the floor ends with os._exit)


def test_bench_latency_prints_a_json_report(broker: EmbeddedBroker, tmp_path: Path) -> None:
    report = bench(broker, tmp_path, "--latency", "--rate", "200", "--events", "600")
    assert report["mode"] == "latency"
    assert report["rate"] == 200.0
    assert report["messages"] == 600
    assert 0 < report["events"] <= 600
    assert 0 < report["published_per_s"] <= 220  # held to the rate asked for
    for measure in ("publish_to_timeline", "publish_to_snapshot"):
        values = report[measure]
        assert values["events"] == report["events"]
        assert 0 < values["p50_ms"] <= values["p99_ms"] <= values["p999_ms"]
    assert report["publish_to_timeline_after_warmup"]["events"] < report["events"]
    assert report["worker_cpu_ms_per_event"] > 0
    assert report["broker_cpu_ms_per_event"] is None  # not the bench's own broker
    assert report["exit_codes"] == [0]
    assert list(tmp_path.iterdir()) == []
