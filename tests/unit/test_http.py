"""The HTTP endpoints: health, readiness that follows the probe, Prometheus exposition."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from service.http import make_web_app
from service.observability import Metrics

pytestmark = pytest.mark.unit


async def test_health_readiness_and_metrics() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.consumed.labels(channel="web").inc(3)
    ready = {"value": False}
    async with TestClient(TestServer(make_web_app(registry, lambda: ready["value"]))) as client:
        health = await client.get("/healthz")
        assert health.status == 200
        assert await health.json() == {"status": "ok"}

        not_ready = await client.get("/readyz")
        assert (not_ready.status, await not_ready.json()) == (503, {"ready": False})
        ready["value"] = True
        now_ready = await client.get("/readyz")
        assert (now_ready.status, await now_ready.json()) == (200, {"ready": True})

        exposition = await client.get("/metrics")
        assert exposition.status == 200
        assert exposition.headers["Content-Type"].startswith("text/plain")
        text = await exposition.text()
        assert 'cxpulse_messages_consumed_total{channel="web"} 3.0' in text
        assert "_created" not in text

        assert (await client.get("/table/dedup")).status == 404


def test_metric_labels_are_low_cardinality() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    allowed = {"channel", "reason", "stage", "table", "topic", "partition", "le", "type"}
    for family in registry.collect():
        assert family.name.startswith("cxpulse_")
        for sample in family.samples:
            assert set(sample.labels) <= allowed
