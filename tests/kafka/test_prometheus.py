"""Kafka tier: the shipped Prometheus files, run by the real tools against a worker with traffic.

Needs `prometheus` and `promtool` on PATH (Debian's `prometheus` package; `.ci/run` installs
it). One worker processes simulated traffic, then:

- `promtool check metrics` lints its /metrics output;
- `promtool check config` / `check rules` accept the shipped and the generated configuration;
- a real Prometheus server scrapes the worker every second, loading the shipped alerts.yml,
  and every alert expression and dashboard target is run through /api/v1/query.

How an alert expression is checked: the whole expression must evaluate (`status: success`;
it is empty because nothing is wrong). Then each operand, split at top-level `and` / `or` /
`unless`, is run with its comparison against a number removed (`tests.ops.check_operands`),
and must return series: so a misspelt name or a label matching that can never match fails
here instead of giving an alert that never fires. Dashboard targets run as they are, with
Grafana's variables replaced (`$__rate_interval` -> 1m), and must return series.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.broker import EmbeddedBroker, free_port
from service.metrics import SCOPES, WINDOWS
from service.simulate import generate
from tests.kafka.harness import Scenario, WorkerProcess, publish, total
from tests.ops import (
    ALERTS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SERIES,
    alert_rules,
    check_operands,
    dashboard_targets,
    load_yaml,
    metric_names,
)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="needs prometheus and promtool (Debian package `prometheus`, see .ci/run)",
    ),
]

MESSAGES = 240


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}{query}", timeout=5) as answer:
                loaded: dict[str, Any] = json.loads(answer.read())
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with a JSON error
            loaded = json.loads(exc.read())
        return loaded

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _scrape_config(worker_port: int) -> dict[str, Any]:
    """The shipped prometheus.yml, pointed at the test worker, scraping every second."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{worker_port}"]}]
    return config


@pytest.fixture(scope="module")
def worker(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    tmp_path = tmp_path_factory.mktemp("prometheus-worker")
    process = WorkerProcess(Scenario.new(broker, tmp_path), tmp_path / "worker.log").start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def prometheus(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    assert PROMETHEUS is not None
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(_scrape_config(worker.http_port)))
    log = tmp_path / "prometheus.log"
    address = f"127.0.0.1:{free_port()}"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={address}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Server(address, process, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, server.log_tail()
            assert time.monotonic() < deadline, f"target never up\n{server.log_tail()}"
            try:
                targets = server.get("/api/v1/targets")["data"]["activeTargets"]
                if targets and all(target["health"] == "up" for target in targets):
                    break
            except (OSError, ValueError):  # not listening yet, or an empty answer while it starts
                pass
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def traffic(worker: WorkerProcess, prometheus: Server) -> int:
    """Simulated traffic (valid, duplicates, every bad class), processed by the worker and
    scraped by Prometheus -> the number of messages."""
    messages = list(
        generate(
            MESSAGES,
            customers=30,
            seed=11,
            now=datetime.now(UTC),
            span=timedelta(minutes=30),
            dup_share=0.05,
            bad_share=0.05,
        )
    )
    asyncio.run(publish(worker.scenario.broker.bootstrap, worker.scenario.prefix, messages))
    deadline = time.monotonic() + 60
    while total(worker.metrics(), "cxpulse_messages_consumed_total") < len(messages):
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.2)
    # Prometheus has seen the counters move, and has a few samples for rate() since.
    while True:
        result = prometheus.query("sum(cxpulse_messages_consumed_total)")["data"]["result"]
        if result and float(result[0]["value"][1]) >= len(messages):
            break
        assert time.monotonic() < deadline, prometheus.log_tail()
        time.sleep(0.2)
    # And has scraped the scores of every scope and window: a snapshot is published a moment
    # after the last event is read (on a busy machine, a few seconds).
    while True:
        result = prometheus.query("count(cxpulse_nps_score)")["data"]["result"]
        if result and float(result[0]["value"][1]) == len(SCOPES) * len(WINDOWS):
            break
        assert time.monotonic() < deadline, prometheus.log_tail()
        time.sleep(0.2)
    time.sleep(2.5)
    return len(messages)


def test_worker_metrics_pass_promtool_lint(worker: WorkerProcess, traffic: int) -> None:
    status, body = worker.http("/metrics")
    assert status == 200
    assert b"cxpulse_messages_consumed_total" in body
    checked = _promtool("check", "metrics", stdin=body)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not checked.stdout.strip(), checked.stdout
    assert not checked.stderr.strip(), checked.stderr


def test_configuration_and_rules_pass_promtool(tmp_path: Path) -> None:
    generated = tmp_path / "prometheus.yml"
    generated.write_text(yaml.safe_dump(_scrape_config(6066)))
    for config in (PROMETHEUS_CONFIG, generated):
        checked = _promtool("check", "config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "SUCCESS" in checked.stdout
    rules = _promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout


def test_prometheus_loaded_the_shipped_rules(prometheus: Server) -> None:
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule["alert"] for rule in alert_rules()}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] != "err", rule


def test_every_alert_and_panel_query_returns_data(
    worker: WorkerProcess, prometheus: Server, traffic: int
) -> None:
    exposed = {name.split("{")[0] for name in worker.metrics()} | PROMETHEUS_SERIES
    checks: list[tuple[str, str, bool]] = []  # (where, expr, must return series)
    for rule in alert_rules():
        checks.append((f"alert {rule['alert']}", rule["expr"], False))
        checks += [
            (f"alert {rule['alert']} (signal)", part, True) for part in check_operands(rule["expr"])
        ]
    checks += [(f"panel {title!r}", expr, True) for title, expr in dashboard_targets()]

    failures: list[str] = []
    for where, expr, needs_series in checks:
        answer = prometheus.query(expr)
        if answer.get("status") != "success":
            failures.append(f"{where}: {answer.get('error')}\n    {expr}")
        elif missing := metric_names(expr) - exposed:
            failures.append(f"{where}: the worker does not expose {sorted(missing)}")
        elif needs_series and not answer["data"]["result"]:
            failures.append(f"{where}: no series\n    {expr}")
    assert not failures, "\n".join(failures)
