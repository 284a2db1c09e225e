"""deploy/prometheus and deploy/grafana hang together with the code and the compose file (no
Docker engine here; tests/kafka/test_prometheus.py runs them through a real Prometheus)."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.ops import (
    ALERTS,
    DASHBOARD,
    DASHBOARD_PROVIDER,
    DATASOURCE,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SERIES,
    ROOT,
    alert_rules,
    check_operands,
    dashboard_targets,
    exported_families,
    exported_series,
    load_yaml,
    metric_names,
)

pytestmark = pytest.mark.unit

EXPORTED = exported_series(exported_families())
# Aggregations over counters and histograms; a gauge inside one of these is a mistake.
_RATE_ARGUMENT = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


def _all_expressions() -> list[tuple[str, str]]:
    alerts = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    panels = [(f"panel {title!r}", expr) for title, expr in dashboard_targets()]
    return alerts + panels


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Host path (relative to the repository) -> container path, of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[source.removeprefix("./").rstrip("/")] = target
    return mounts


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(mapping).split(":")[-1]) for mapping in service.get("ports", [])}


# --- the PromQL helpers themselves --------------------------------------------------------


def test_metric_names_skips_functions_keywords_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (channel, le) (rate(a_bucket{reason="x{y}", job=~"j"}'
        "[5m] offset 1h))) / on (instance) group_left (table) max without (topic) (b) > bool 1e3"
        " and on () sum(c{}) unless d[1m:15s]"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d"}
    assert metric_names("cxpulse_ready == 0") == {"cxpulse_ready"}
    assert metric_names('up{job="cxpulse"}') == {"up"}


def test_check_operands_removes_the_threshold() -> None:
    assert check_operands("x == 0") == ["x"]
    assert check_operands("sum by (r) (rate(x[5m])) / on () group_left () y\n> 0.05") == [
        "sum by (r) (rate(x[5m])) / on () group_left () y"
    ]
    assert check_operands('a{l=">"} > 1 and on () sum(b) > bool 2') == ['a{l=">"}', "sum(b)"]
    assert check_operands("a > b") == ["a", "b"]
    assert check_operands("histogram_quantile(0.5, x)") == ["histogram_quantile(0.5, x)"]


def test_exposed_names_follow_the_metric_types() -> None:
    assert EXPORTED["cxpulse_messages_consumed_total"] == "counter"
    assert "cxpulse_messages_consumed" not in EXPORTED, "counters are exposed with _total only"
    assert {"cxpulse_processing_latency_seconds" + s for s in ("_bucket", "_sum", "_count")} <= (
        EXPORTED.keys()
    )
    assert "cxpulse_processing_latency_seconds" not in EXPORTED
    assert EXPORTED["cxpulse_ready"] == "gauge"
    assert "cxpulse_ready_total" not in EXPORTED


# --- every name in alerts and dashboard is exported ---------------------------------------


def test_every_metric_in_alerts_and_dashboard_is_exported() -> None:
    expressions = _all_expressions()
    assert len(expressions) >= 20
    unknown = {
        (where, name)
        for where, expr in expressions
        for name in metric_names(expr)
        if name not in EXPORTED and name not in PROMETHEUS_SERIES
    }
    assert not unknown, f"not exported by service.observability.Metrics: {sorted(unknown)}"


def test_rates_are_taken_of_counters_and_histograms_only() -> None:
    for where, expr in _all_expressions():
        for name in _RATE_ARGUMENT.findall(expr):
            assert EXPORTED.get(name) in {"counter", "histogram"}, f"{where}: rate of {name}"
        for name in metric_names(expr):
            if name.endswith("_bucket"):
                assert "histogram_quantile" in expr, f"{where}: {name} outside a quantile"


def test_the_required_signals_are_alerted_on() -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    assert {
        "cxpulse_deadletters_total",
        "cxpulse_messages_consumed_total",
        "cxpulse_consumer_lag",
        "cxpulse_event_freshness_seconds",
        "cxpulse_ready",
        "cxpulse_broker_up",
        "cxpulse_processing_latency_seconds_bucket",
        "cxpulse_identity_merges_refused_total",
        "cxpulse_nps_score",
    } <= used


def test_alert_rules_are_actionable() -> None:
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules), "alert names are unique"
    for rule in rules:
        assert re.fullmatch(r"Cxpulse[A-Za-z0-9]+", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), f"{rule['alert']}: a for: duration"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        annotations = rule["annotations"]
        assert annotations["summary"].strip()
        assert len(annotations["description"].split()) >= 20, "says what to do"
        # The quick check of tests/kafka/test_prometheus.py needs `<signal> <cmp> <number>`.
        operands = check_operands(rule["expr"])
        assert all(metric_names(operand) for operand in operands), rule["alert"]


# --- the dashboard --------------------------------------------------------------------------


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = load_yaml(DATASOURCE)["datasources"][0]["uid"]
    assert dashboard["uid"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", {"uid": datasource_uid})["uid"] == datasource_uid


def test_dashboard_covers_the_operations_view() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_targets()))
    assert {
        "cxpulse_messages_consumed_total",
        "cxpulse_events_accepted_total",
        "cxpulse_events_duplicate_total",
        "cxpulse_deadletters_total",
        "cxpulse_consumer_lag",
        "cxpulse_processing_latency_seconds_bucket",
        "cxpulse_event_freshness_seconds",
        "cxpulse_identity_merges_total",
        "cxpulse_identity_merges_refused_total",
        "cxpulse_customers",
        "cxpulse_timeline_entries",
        "cxpulse_ready",
    } <= used
    exprs = [expr for _, expr in dashboard_targets()]
    assert any("histogram_quantile(0.5," in expr for expr in exprs)
    assert any("histogram_quantile(0.99," in expr for expr in exprs)


# --- Prometheus config against the compose file --------------------------------------------


def test_prometheus_scrapes_every_compose_worker(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "cxpulse"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    workers = {name for name in compose["services"] if name.startswith("cxpulse")}
    assert {target.split(":")[0] for target in targets} == workers
    for target in targets:
        host, port = target.split(":")
        service = compose["services"][host]
        assert int(service["environment"]["CX_HTTP_PORT"]) == int(port)
        assert int(port) in _container_ports(service), f"{host} publishes port {port}"


def test_prometheus_loads_the_alert_rules(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    rule_files = [PROMETHEUS_CONFIG.parent / name for name in config["rule_files"]]
    assert ALERTS in rule_files
    service = compose["services"]["prometheus"]
    assert service["image"].startswith("prom/prometheus")
    # The config file Prometheus is started with is ours, in the mounted directory.
    config_dir = _mounts(service)[str(PROMETHEUS_CONFIG.parent.relative_to(ROOT))]
    assert f"--config.file={config_dir}/{PROMETHEUS_CONFIG.name}" in service["command"]
    assert 9090 in _container_ports(service)


def test_grafana_datasource_is_the_compose_prometheus(compose: dict[str, Any]) -> None:
    (datasource,) = load_yaml(DATASOURCE)["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    match = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert match, datasource["url"]
    assert match[1] == "prometheus"
    assert match[1] in compose["services"]
    assert int(match[2]) in _container_ports(compose["services"][match[1]])
    config = load_yaml(PROMETHEUS_CONFIG)
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def test_grafana_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    assert service["image"].startswith("grafana/grafana")
    assert 3000 in _container_ports(service)
    assert service["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert service["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = _mounts(service)
    provisioning = mounts[str(DATASOURCE.parents[1].relative_to(ROOT))]
    assert provisioning == "/etc/grafana/provisioning"
    (provider,) = load_yaml(DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file"
    dashboards_in_container = mounts[str(DASHBOARD.parent.relative_to(ROOT))]
    assert PurePosixPath(provider["options"]["path"]) == PurePosixPath(dashboards_in_container)
    assert "prometheus" in service["depends_on"]


def test_monitoring_starts_after_the_workers(compose: dict[str, Any]) -> None:
    names = list(compose["services"])
    last_worker = max(i for i, name in enumerate(names) if name.startswith("cxpulse"))
    assert names.index("prometheus") > last_worker
    assert names.index("grafana") > last_worker
    depends = compose["services"]["prometheus"]["depends_on"]
    assert {name for name in names if name.startswith("cxpulse")} <= set(depends)
    for path in (ALERTS, DASHBOARD, DATASOURCE, DASHBOARD_PROVIDER):
        assert Path(path).is_file()
