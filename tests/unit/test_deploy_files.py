"""docker-compose.yml and Dockerfile hang together with the code (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from service.topics import Topics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_every_cx_variable_in_compose_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {name.upper() for name in Settings.model_fields}
    used = {
        name
        for service in compose["services"].values()
        for name in (service.get("environment") or {})
        if name.startswith("CX_")
    }
    assert used, "the compose file configures cxpulse through CX_ variables"
    assert {name.removeprefix("CX_") for name in used} <= fields


def test_compose_creates_the_contract_topics(compose: dict[str, Any]) -> None:
    script = compose["services"]["topics"]["command"][0]
    plain = set(re.search(r"for t in ([^;]+); do create \"\$\$t\"; done", script)[1].split())
    compacted_line = re.search(r"for t in ([^;]+); do create \"\$\$t\" --config cleanup", script)
    compacted = set(compacted_line[1].split())
    expected = Topics("cx").contract_topics()
    assert plain | compacted == set(expected)
    assert compacted == {name for name, is_compacted in expected.items() if is_compacted}


def test_workers_wait_for_kafka_and_topics(compose: dict[str, Any]) -> None:
    workers = [name for name in compose["services"] if name.startswith("cxpulse")]
    assert len(workers) >= 2, "two workers show scale-out"
    for name in workers:
        service = compose["services"][name]
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert service["environment"]["CX_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert "healthcheck" in compose["services"]["kafka"]


def test_dockerfile_runs_the_worker_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2, "multi-stage"
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE)
    assert 'CMD ["worker"]' in text
    assert "HEALTHCHECK" in text
    assert "/healthz" in text
