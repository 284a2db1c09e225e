"""The service's metrics: labelled children are remembered, and count as prometheus_client's."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from service.observability import Metrics

pytestmark = pytest.mark.unit


def test_a_label_set_gives_the_same_child_every_time_and_counts_in_the_registry() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    web = metrics.consumed.labels(channel="web")
    assert metrics.consumed.labels(channel="web") is web
    assert metrics.consumed.labels("web") is web  # positional: the same child
    assert metrics.consumed.labels(channel="chat") is not web
    for _ in range(3):
        metrics.consumed.labels(channel="web").inc()
    metrics.consumed.labels(channel="chat").inc(2)
    sample = registry.get_sample_value
    assert sample("cxpulse_messages_consumed_total", {"channel": "web"}) == 3
    assert sample("cxpulse_messages_consumed_total", {"channel": "chat"}) == 2
    two = {"channel": "web", "reason": "invalid_json"}
    metrics.deadletters.labels(reason="invalid_json", channel="web").inc()  # any order
    metrics.deadletters.labels(**two).inc()
    assert sample("cxpulse_deadletters_total", two) == 2


def test_histograms_and_gauges_keep_their_own_behaviour() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.latency.labels(channel="store").observe(0.2)
    metrics.latency.labels(channel="store").observe(7.0)
    sample = registry.get_sample_value
    assert sample("cxpulse_processing_latency_seconds_count", {"channel": "store"}) == 2
    assert sample("cxpulse_processing_latency_seconds_sum", {"channel": "store"}) == 7.2
    metrics.lag.labels(topic="cx.raw.web", partition="0").set(5)
    metrics.lag.labels(topic="cx.raw.web", partition="0").set(1)
    assert sample("cxpulse_consumer_lag", {"topic": "cx.raw.web", "partition": "0"}) == 1
    with pytest.raises(ValueError, match="Incorrect label names"):
        metrics.consumed.labels(chanel="web")  # a wrong name still fails, and is not kept
    with pytest.raises(ValueError, match="Incorrect label names"):
        metrics.consumed.labels(chanel="web")


def test_the_lag_of_a_revoked_partition_is_no_longer_exported() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    sample = registry.get_sample_value
    metrics.set_lags({("cx.raw.web", 0): 5, ("cx.internal.identity", 0): 2})
    metrics.set_lags({("cx.raw.web", 0): 3})  # the identity partition went to another worker
    assert sample("cxpulse_consumer_lag", {"topic": "cx.raw.web", "partition": "0"}) == 3
    assert (
        sample("cxpulse_consumer_lag", {"topic": "cx.internal.identity", "partition": "0"}) is None
    )
    metrics.set_lags({("cx.internal.identity", 0): 0, ("cx.raw.web", 0): 1})  # and came back
    assert sample("cxpulse_consumer_lag", {"topic": "cx.internal.identity", "partition": "0"}) == 0
    assert sample("cxpulse_consumer_lag", {"topic": "cx.raw.web", "partition": "0"}) == 1
