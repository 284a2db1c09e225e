"""The shipped monitoring files (deploy/): their PromQL, and the metric names it uses.

Shared by tests/unit/test_ops_files.py (names against `Metrics`) and
tests/kafka/test_prometheus.py (expressions against a real Prometheus).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from service.observability import Metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DATASOURCE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "cxpulse.yml"
DASHBOARD = GRAFANA_DIR / "dashboards" / "cxpulse.json"

# What Grafana puts in for its variables when we run a panel's query ourselves.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

# Series Prometheus makes itself for every target: allowed although `Metrics` has no such name.
PROMETHEUS_SERIES = frozenset({"up"})

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "atan2",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
# An identifier followed by `{`, `[`, or the end of its operand (space, operator, `)`, `,`, end
# of text) is a series name; one followed by `(` is a function or aggregation.
_NAME = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")
_SET_OPERATOR = re.compile(r"\b(and|or|unless)\b(\s*(?:on|ignoring)\s*\([^)]*\))?")
_NUMBER = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*")


def load_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml, over all groups."""
    return [
        rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def with_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables substituted) of every dashboard target."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], with_grafana_variables(target["expr"]))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads (not functions, keywords or label names)."""
    text = _STRING.sub('""', expr)  # label values, and braces inside them
    text = _MATCHERS.sub("{}", text)  # label names in matchers
    text = _GROUPING.sub(" ", text)  # by (...), on (...), group_left (...): label names
    text = _RANGE.sub("[]", text)  # durations
    return {name for name in _NAME.findall(text) if name not in _KEYWORDS}


def exported_families() -> dict[str, str]:
    """Metric family name -> type ("counter", "gauge", "histogram", ...) of `Metrics`."""
    registry = CollectorRegistry()
    Metrics(registry)
    return {family.name: family.type for family in registry.collect()}


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "unknown": ("",),
}


def exported_series(families: dict[str, str]) -> dict[str, str]:
    """Sample name as exposed on /metrics -> its family's type. A counter `x` is exposed as
    `x_total` only (`_created` is disabled), a histogram `x` as `x_bucket`, `x_sum`, `x_count`."""
    return {
        name + suffix: kind
        for name, kind in families.items()
        for suffix in _SUFFIXES.get(kind, ("",))
    }


def _depths(expr: str) -> list[int]:
    """Nesting depth of every character (-1 inside a string literal)."""
    depths: list[int] = []
    depth = 0
    quote = ""
    escaped = False
    for char in expr:
        if quote:
            depths.append(-1)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
            continue
        if char in "\"'`":
            quote = char
            depths.append(-1)
            continue
        if char in ")]}":
            depth -= 1
        depths.append(depth)
        if char in "([{":
            depth += 1
    return depths


def _top_level(pattern: re.Pattern[str], expr: str) -> list[re.Match[str]]:
    depths = _depths(expr)
    return [match for match in pattern.finditer(expr) if depths[match.start()] == 0]


def check_operands(expr: str) -> list[str]:
    """The parts of an alert expression that must return series in a healthy system.

    An alert expression is `<signal> <comparison> <number>`, possibly joined to others by a
    top-level `and` / `or` / `unless` (with `on (...)`). Each operand is returned with its
    trailing comparison against a number removed, i.e. the signal itself: in a healthy system
    it returns series although the alert does not fire. A comparison between two vectors
    yields both sides.
    """
    operands: list[str] = []
    start = 0
    for match in [*_top_level(_SET_OPERATOR, expr), None]:
        end = len(expr) if match is None else match.start()
        operand = expr[start:end]
        if match is not None:
            start = match.end()
        comparisons = _top_level(_COMPARISON, operand)
        if not comparisons:
            operands.append(operand.strip())
            continue
        last = comparisons[-1]
        left, right = operand[: last.start()], operand[last.end() :]
        operands.append(left.strip())
        if not _NUMBER.fullmatch(right):
            operands.append(right.strip())
    return operands
