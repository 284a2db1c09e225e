"""`cxpulse bench`: a small throughput run completes and prints the report as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.broker import EmbeddedBroker

pytestmark = pytest.mark.kafka


def test_bench_prints_a_json_report(broker: EmbeddedBroker, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CX_")}
    env["CX_KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
    env["TMPDIR"] = str(tmp_path)  # the workers' and the floor's data directories
    done = subprocess.run(
        [sys.executable, "-m", "service", "bench", "--events", "1500"],
        env=env,
        capture_output=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
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
