"""Dedup: decide, per event id, whether a message is new, a duplicate, or our own replay.

An event id is remembered until the low event-time watermark of its channel (see
`ExpiryIndex`) has moved a full horizon past the later of its event time and the watermark when
it was accepted; at most `max_ids` ids per channel and partition are kept (oldest dropped
first). The ids live in a changelogged table; `ExpiryIndex` only orders them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["new", "replay", "duplicate"]
SourceRef = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Seen:
    """What the dedup table keeps per accepted event id."""

    expires_ms: int
    source: SourceRef
    partition: int

    def to_json(self) -> list[Any]:
        return [self.expires_ms, *self.source, self.partition]

    @classmethod
    def from_json(cls, value: list[Any]) -> Seen:
        expires_ms, topic, partition, offset, own_partition = value
        return cls(int(expires_ms), (str(topic), int(partition), int(offset)), int(own_partition))


def classify(seen: Seen | None, source: SourceRef) -> Decision:
    """(what is remembered of the id, this message's source) -> new | replay | duplicate.

    The same source coordinates mean the very message accepted before, read again after a
    restart: it is re-published, never counted as a duplicate."""
    if seen is None:
        return "new"
    return "replay" if seen.source == source else "duplicate"


class ExpiryIndex:
    """The ids of one channel in one partition, ordered by expiry, with a low watermark.

    The watermark is the minimum, over the channel's raw source partitions, of the latest
    event time read from each: while one source partition lags behind (a backlog being read
    partition by partition), ids its late copies could still match are not forgotten."""

    def __init__(self, horizon_ms: int, max_ids: int) -> None:
        self.horizon_ms = horizon_ms
        self.max_ids = max_ids
        self._latest: dict[int, int] = {}
        self._sources = 0
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def watermark_ms(self) -> int | None:
        """Low watermark: None until every source partition has been read from."""
        if not self._sources or len(self._latest) < self._sources:
            return None
        return min(self._latest.values())

    def advance(self, source_partition: int, occurred_ms: int, source_partitions: int) -> None:
        """Note an event read from a source partition (of `source_partitions` in all)."""
        self._sources = max(self._sources, source_partitions, source_partition + 1)
        if occurred_ms > self._latest.get(source_partition, occurred_ms - 1):
            self._latest[source_partition] = occurred_ms

    def remember(self, event_id: str, occurred_ms: int) -> int:
        """Track a newly accepted id -> the expiry (ms) to store with it: a horizon past the
        later of its own time and the watermark when it was accepted."""
        expires_ms = max(occurred_ms, self.watermark_ms or occurred_ms) + self.horizon_ms
        heapq.heappush(self._heap, (expires_ms, event_id))
        return expires_ms

    def restore(self, event_id: str, seen: Seen) -> None:
        """Track an id found in recovered state."""
        heapq.heappush(self._heap, (seen.expires_ms, event_id))

    def expired(self) -> list[tuple[str, Literal["horizon", "capacity"]]]:
        """Pop the ids past the horizon or over the size bound -> (id, why) to forget."""
        gone: list[tuple[str, Literal["horizon", "capacity"]]] = []
        watermark = self.watermark_ms
        while self._heap and watermark is not None and self._heap[0][0] < watermark:
            gone.append((heapq.heappop(self._heap)[1], "horizon"))
        while len(self._heap) > self.max_ids:
            gone.append((heapq.heappop(self._heap)[1], "capacity"))
        return gone
