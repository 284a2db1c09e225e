"""Prometheus metrics on an injected registry. Labels stay low-cardinality: never a customer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.metrics import MetricWrapperBase

from service.canonical import CHANNELS
from service.parse import REASONS

# `_created` series double the exposition and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_T = TypeVar("_T", bound=MetricWrapperBase)


class _RememberedLabels(MetricWrapperBase):
    """`labels(...)` -> the child of that label set, remembered: prometheus_client's checks
    the names, builds the values and takes a lock at every call (1.7 % of the worker's CPU
    late in a 200 000-message run, where stages call it for each event). Its children are
    never removed here (no `remove` or `clear`), so a remembered one is always the current."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remembered: dict[tuple[Any, ...], Any] = {}

    def labels(self: _T, *labelvalues: object, **labelkwargs: object) -> _T:
        remembered: dict[tuple[Any, ...], Any] = self._remembered  # type: ignore[attr-defined]
        key = (labelvalues, *labelkwargs.items())
        child = remembered.get(key)
        if child is None:
            child = remembered[key] = super().labels(*labelvalues, **labelkwargs)
        return child


class Counter(_RememberedLabels, PromCounter):
    """A prometheus_client Counter whose children are remembered (see `_RememberedLabels`)."""


class Gauge(_RememberedLabels, PromGauge):
    """A prometheus_client Gauge whose children are remembered (see `_RememberedLabels`)."""


class Histogram(_RememberedLabels, PromHistogram):
    """A prometheus_client Histogram whose children are remembered (see `_RememberedLabels`)."""


class Metrics:
    """The service's counters and gauges, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.consumed = Counter(
            "cxpulse_messages_consumed",
            "Messages read from the raw input topics.",
            ["channel"],
            registry=registry,
        )
        self.accepted = Counter(
            "cxpulse_events_accepted",
            "Events accepted and published to the timeline (first copy of each event id).",
            ["channel"],
            registry=registry,
        )
        self.duplicates = Counter(
            "cxpulse_events_duplicate",
            "Messages dropped because their event id was already accepted within the horizon.",
            ["channel"],
            registry=registry,
        )
        self.deadletters = Counter(
            "cxpulse_deadletters",
            "Messages sent to the dead-letter topic, by reason.",
            ["channel", "reason"],
            registry=registry,
        )
        self.replayed = Counter(
            "cxpulse_events_replayed",
            "Events seen again from the same source offset after a restart (re-published, "
            "not counted as duplicates).",
            ["channel"],
            registry=registry,
        )
        self.dedup_evictions = Counter(
            "cxpulse_dedup_evictions",
            "Event ids dropped from the dedup state: past the horizon, or over the size bound.",
            ["reason"],
            registry=registry,
        )
        self.dedup_ids = Gauge(
            "cxpulse_dedup_ids",
            "Event ids held in this worker's dedup state.",
            registry=registry,
        )
        self.processing_errors = Counter(
            "cxpulse_processing_errors",
            "Unexpected exceptions while processing one message.",
            ["stage"],
            registry=registry,
        )
        self.released = Counter(
            "cxpulse_messages_released",
            "Messages released unacknowledged because this worker's group session expired "
            "(paused, starved or cut off) and the group rebalanced: another worker reads them.",
            ["stage"],
            registry=registry,
        )
        self.identity_merges = Counter(
            "cxpulse_identity_merges",
            "Customers merged into another because an event linked their identifiers.",
            registry=registry,
        )
        self.identity_refused = Counter(
            "cxpulse_identity_merges_refused",
            "Merges refused because the customers have different known customer_ids.",
            registry=registry,
        )
        self.identity_placeholders = Counter(
            "cxpulse_identity_placeholders",
            "Placeholder identifiers ('null', 'guest', test@example.com, ...) never linked.",
            ["channel"],
            registry=registry,
        )
        self.forgotten = Counter(
            "cxpulse_customers_forgotten",
            "Right-to-be-forgotten requests carried out.",
            registry=registry,
        )
        self.stale_partials = Counter(
            "cxpulse_metrics_stale_partials",
            "Partition aggregates older than the one the merger holds (sent late), ignored.",
            registry=registry,
        )
        self.forgotten_replays = Counter(
            "cxpulse_forgotten_events_dropped",
            "Copies of a forgotten customer's events read again after a crash, dropped.",
            registry=registry,
        )
        self.latency = Histogram(
            "cxpulse_processing_latency_seconds",
            "From reading a raw message to publishing its timeline record.",
            ["channel"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.freshness = Gauge(
            "cxpulse_event_freshness_seconds",
            "Wall clock minus the newest event time accepted (the watermark), per channel.",
            ["channel"],
            registry=registry,
        )
        # Not a remembered-labels gauge: `set_lags` removes the series of revoked partitions.
        self.lag = PromGauge(
            "cxpulse_consumer_lag",
            "Messages not yet processed, per assigned input partition (end offset - position).",
            ["topic", "partition"],
            registry=registry,
        )
        self._lag_series: set[tuple[str, int]] = set()
        self.state_keys = Gauge(
            "cxpulse_state_keys",
            "Keys in this worker's local state, per table (dedup, identity, customers).",
            ["table"],
            registry=registry,
        )
        self.customers = Gauge(
            "cxpulse_customers",
            "Customers whose records this worker holds.",
            registry=registry,
        )
        self.timeline_entries = Gauge(
            "cxpulse_timeline_entries",
            "Touchpoints held on the timelines of this worker's customers.",
            registry=registry,
        )
        self.broker_up = Gauge(
            "cxpulse_broker_up",
            "1 when the Kafka cluster answered the last metadata request, else 0.",
            registry=registry,
        )
        self.alerts = Counter(
            "cxpulse_alerts",
            "Closed-loop alerts published, by type (detractor, low_csat, high_effort).",
            ["type"],
            registry=registry,
        )
        self.late = Counter(
            "cxpulse_late_events",
            "Events older than the longest window when they arrived: they change no window.",
            ["channel"],
            registry=registry,
        )
        self.snapshots = Counter(
            "cxpulse_snapshots_emitted",
            "Metric snapshots published to cx.metrics.",
            ["scope", "window"],
            registry=registry,
        )
        self.nps_score = Gauge(
            "cxpulse_nps_score", "Current NPS (-100..100).", ["scope", "window"], registry=registry
        )
        self.csat_score = Gauge(
            "cxpulse_csat_score",
            "Current CSAT score (percentage of 4-5 answers).",
            ["scope", "window"],
            registry=registry,
        )
        self.ces_mean = Gauge(
            "cxpulse_ces_mean", "Current CES mean (1..7).", ["scope", "window"], registry=registry
        )
        self.ready = Gauge(
            "cxpulse_ready",
            "1 when partitions are assigned and state is recovered, else 0.",
            registry=registry,
        )
        # Children exist from the start so that rates and sums see zeros, not gaps.
        for channel in CHANNELS:
            for counter in (
                self.consumed,
                self.accepted,
                self.duplicates,
                self.replayed,
                self.identity_placeholders,
            ):
                counter.labels(channel=channel)
            for reason in REASONS:
                self.deadletters.labels(channel=channel, reason=reason)
            self.latency.labels(channel=channel)
            self.late.labels(channel=channel)
        for kind in ("detractor", "low_csat", "high_effort"):
            self.alerts.labels(type=kind)
        for table in ("dedup", "identity", "customers"):
            self.state_keys.labels(table=table)

    def set_lags(self, lags: Mapping[tuple[str, int], int]) -> None:
        """(topic, partition) -> lag, for the partitions assigned now: each set, and the series
        of a partition no longer listed removed (a revoked partition's last value stayed
        exported, stale, beside its new owner's)."""
        for topic, partition in self._lag_series - lags.keys():
            self.lag.remove(topic, str(partition))
        for (topic, partition), lag in lags.items():
            self.lag.labels(topic=topic, partition=str(partition)).set(lag)
        self._lag_series = set(lags)
