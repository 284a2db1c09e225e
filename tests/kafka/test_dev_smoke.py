"""`cxpulse dev`: starts, events flow to the timeline, stops on SIGINT within 10 s."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.broker import free_port, wait_for_port
from tests.kafka.harness import read_topic

pytestmark = pytest.mark.kafka


def test_dev_runs_the_pipeline_and_stops_on_sigint(tmp_path: Path) -> None:
    broker_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CX_")}
    env["CX_HTTP_PORT"] = str(http_port)
    log = (tmp_path / "dev.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "dev",
            "--port",
            str(broker_port),
            "--rate",
            "50",
            "--data-dir",
            str(tmp_path / "dev"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for_port("127.0.0.1", broker_port, timeout=30), "broker did not start"
        records = asyncio.run(
            read_topic(f"127.0.0.1:{broker_port}", "cx.timeline", lambda r: len(r) >= 20, within=90)
        )
        assert len(records) >= 20, (tmp_path / "dev.log").read_text()
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = process.wait(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    output = (tmp_path / "dev.log").read_text()
    assert code == 0, output
    assert elapsed < 10, f"took {elapsed:.1f}s to stop"
    assert "cxpulse dev is running" in output
    assert "cxpulse dev stopped" in output
    assert not wait_for_port("127.0.0.1", broker_port, timeout=0.5), "broker still running"
