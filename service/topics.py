"""Topic names of the contract, derived from CX_TOPIC_PREFIX."""

from __future__ import annotations

from dataclasses import dataclass

from service.canonical import CHANNELS, Channel


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic cxpulse reads or writes, for one prefix."""

    prefix: str

    def raw(self, channel: Channel) -> str:
        return f"{self.prefix}.raw.{channel}"

    @property
    def raw_topics(self) -> dict[str, Channel]:
        """Raw topic name -> its channel."""
        return {self.raw(channel): channel for channel in CHANNELS}

    @property
    def timeline(self) -> str:
        return f"{self.prefix}.timeline"

    @property
    def identity(self) -> str:
        return f"{self.prefix}.identity"

    @property
    def profiles(self) -> str:
        return f"{self.prefix}.profiles"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}.metrics"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def accepted(self) -> str:
        """Internal: normalized events keyed by event id, so duplicates meet in one partition."""
        return f"{self.prefix}.internal.accepted"

    @property
    def identity_stream(self) -> str:
        """Internal, one partition: every event passes the single writer of the identity
        graph, so all workers agree on who is who."""
        return f"{self.prefix}.internal.identity"

    @property
    def customer_stream(self) -> str:
        """Internal: events, merges and forgets keyed by customer key."""
        return f"{self.prefix}.internal.customers"

    @property
    def metrics_stream(self) -> str:
        """Internal: filed touchpoints keyed by ticket, conversation or event, for metrics."""
        return f"{self.prefix}.internal.metrics"

    @property
    def partials_stream(self) -> str:
        """Internal, one partition: minute aggregates on their way to the merger."""
        return f"{self.prefix}.internal.partials"

    def contract_topics(self) -> dict[str, bool]:
        """Topic name -> compacted?, for every topic of the contract."""
        names = dict.fromkeys(self.raw_topics, False)
        names.update(
            {
                self.timeline: False,
                self.identity: False,
                self.profiles: True,
                self.metrics: True,
                self.alerts: False,
                self.deadletter: False,
            }
        )
        return names
