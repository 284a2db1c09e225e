"""Dedup: new / replay / duplicate, and the per-partition expiry index."""

from __future__ import annotations

import orjson
import pytest

from service.dedup import ExpiryIndex, Seen, classify

pytestmark = pytest.mark.unit

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_795_169_730_123  # 2026-11-20T10:15:30.123Z in ms


# --------------------------------------------------------------------------------- classify


def test_classify_unseen_is_new() -> None:
    assert classify(None, ("cx.raw.web", 0, 5)) == "new"


def test_classify_same_source_is_replay() -> None:
    seen = Seen(expires_ms=T0 + DAY, source=("cx.raw.web", 0, 5), partition=2)
    assert classify(seen, ("cx.raw.web", 0, 5)) == "replay"


@pytest.mark.parametrize(
    "other", [("cx.raw.web", 0, 6), ("cx.raw.web", 1, 5), ("cx.raw.chat", 0, 5)]
)
def test_classify_other_source_is_duplicate(other: tuple[str, int, int]) -> None:
    seen = Seen(expires_ms=T0 + DAY, source=("cx.raw.web", 0, 5), partition=2)
    assert classify(seen, other) == "duplicate"


# -------------------------------------------------------------------------------- Seen JSON


def test_seen_json_round_trip() -> None:
    seen = Seen(expires_ms=T0 + DAY, source=("cx.raw.store", 7, 123_456_789_012), partition=3)
    encoded = orjson.dumps(seen.to_json())
    assert orjson.loads(encoded) == [T0 + DAY, "cx.raw.store", 7, 123_456_789_012, 3]
    back = Seen.from_json(orjson.loads(encoded))
    assert back == seen
    assert isinstance(back.source, tuple)
    assert classify(back, ("cx.raw.store", 7, 123_456_789_012)) == "replay"


def test_seen_from_json_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="values"):
        Seen.from_json([1, "t", 0, 0])


# ----------------------------------------------------------------------------- ExpiryIndex


def _single(horizon_ms: int = DAY, max_ids: int = 10) -> ExpiryIndex:
    """An index fed by one source partition (so its watermark is that partition's latest)."""
    return ExpiryIndex(horizon_ms=horizon_ms, max_ids=max_ids)


def test_empty_index() -> None:
    index = _single()
    assert index.watermark_ms is None
    assert len(index) == 0
    assert index.expired() == []


def test_expiry_is_one_horizon_after_the_event() -> None:
    index = _single()
    index.advance(0, T0, 1)
    assert index.watermark_ms == T0
    assert index.remember("web:a", T0) == T0 + DAY
    index.advance(0, T0 + DAY, 1)
    assert index.expired() == []  # exactly one horizon later: still remembered
    index.advance(0, T0 + DAY + 1, 1)
    assert index.expired() == [("web:a", "horizon")]
    assert len(index) == 0
    assert index.expired() == []


def test_late_event_expires_a_horizon_after_the_watermark() -> None:
    """A backfilled event is remembered a full horizon past the watermark it was accepted at,
    not past its own (old) time: its re-send, read soon after, must still be caught."""
    index = _single()
    index.advance(0, T0, 1)
    assert index.remember("store:late", T0 - 5 * DAY) == T0 + DAY


def test_event_ahead_of_the_watermark_expires_a_horizon_after_itself() -> None:
    index = _single()
    index.advance(0, T0, 1)
    assert index.remember("web:ahead", T0 + HOUR) == T0 + HOUR + DAY


def test_expiry_follows_the_watermark_not_the_wall_clock() -> None:
    index = _single()
    index.advance(0, T0, 1)
    index.remember("web:a", T0)
    index.advance(0, T0 + 2 * HOUR, 1)
    index.remember("web:b", T0 + 2 * HOUR)
    index.advance(0, T0 + DAY + HOUR, 1)  # past a's horizon, not b's
    assert index.expired() == [("web:a", "horizon")]
    index.advance(0, T0 + DAY + 2 * HOUR + 1, 1)
    assert index.expired() == [("web:b", "horizon")]


def test_expired_in_expiry_order() -> None:
    index = _single(max_ids=100)
    for i, name in enumerate(["c", "a", "d", "b"]):
        index.advance(0, T0 + i * HOUR, 1)
        index.remember(f"chat:{name}", T0 + i * HOUR)
    index.advance(0, T0 + 10 * DAY, 1)
    assert index.expired() == [
        ("chat:c", "horizon"),
        ("chat:a", "horizon"),
        ("chat:d", "horizon"),
        ("chat:b", "horizon"),
    ]


def test_watermark_never_goes_back() -> None:
    index = _single()
    index.advance(0, T0, 1)
    index.advance(0, T0 - 5 * DAY, 1)  # a late (backfilled) event
    assert index.watermark_ms == T0
    index.advance(0, T0 + HOUR, 1)
    assert index.watermark_ms == T0 + HOUR


def test_late_events_do_not_expire_anything() -> None:
    index = _single()
    index.advance(0, T0, 1)
    index.remember("web:a", T0)
    index.advance(0, 0, 1)
    assert index.expired() == []
    assert len(index) == 1


def test_low_watermark_waits_for_every_source_partition() -> None:
    index = ExpiryIndex(horizon_ms=DAY, max_ids=10)
    index.advance(0, T0 + 3 * DAY, 3)
    index.remember("web:a", T0)
    assert index.watermark_ms is None  # partitions 1 and 2 not read yet
    assert index.expired() == []
    index.advance(2, T0 + 3 * DAY, 3)
    assert index.watermark_ms is None
    index.advance(1, T0, 3)  # partition 1 lags behind
    assert index.watermark_ms == T0
    assert index.expired() == []
    index.advance(1, T0 + 2 * DAY, 3)
    assert index.watermark_ms == T0 + 2 * DAY
    assert index.expired() == [("web:a", "horizon")]


def test_low_watermark_is_the_minimum_of_the_partitions() -> None:
    index = ExpiryIndex(horizon_ms=DAY, max_ids=10)
    index.advance(0, T0 + 5 * HOUR, 2)
    index.advance(1, T0 + 2 * HOUR, 2)
    assert index.watermark_ms == T0 + 2 * HOUR
    index.advance(1, T0 + 9 * HOUR, 2)
    assert index.watermark_ms == T0 + 5 * HOUR


def test_a_partition_beyond_the_count_raises_the_count() -> None:
    index = ExpiryIndex(horizon_ms=DAY, max_ids=10)
    index.advance(0, T0, 1)
    assert index.watermark_ms == T0
    index.advance(2, T0 + HOUR, 1)  # partition 2 exists, so there are at least 3
    assert index.watermark_ms is None
    index.advance(1, T0 + 2 * HOUR, 3)
    assert index.watermark_ms == T0


def test_remember_before_any_event_time() -> None:
    index = _single()
    assert index.remember("web:a", T0) == T0 + DAY


def test_capacity_evicts_oldest_first() -> None:
    index = _single(max_ids=3)
    for i in range(5):
        index.advance(0, T0 + i * HOUR, 1)
        index.remember(f"web:{i}", T0 + i * HOUR)
    assert len(index) == 5
    assert index.expired() == [("web:0", "capacity"), ("web:1", "capacity")]
    assert len(index) == 3
    assert index.expired() == []


def test_capacity_applies_without_a_watermark() -> None:
    index = ExpiryIndex(horizon_ms=DAY, max_ids=2)
    for i in range(3):
        index.remember(f"web:{i}", T0 + i)
    assert index.watermark_ms is None
    assert index.expired() == [("web:0", "capacity")]


def test_horizon_before_capacity() -> None:
    index = _single(max_ids=2)
    for i in range(4):
        index.advance(0, T0 + i * DAY, 1)
        index.remember(f"web:{i}", T0 + i * DAY)
    # watermark T0+3d: web:0 (T0+1d) and web:1 (T0+2d) are past the horizon; 2 left, within bound
    assert index.expired() == [("web:0", "horizon"), ("web:1", "horizon")]
    assert len(index) == 2


def test_restore_rebuilds_the_order() -> None:
    index = _single()
    index.restore("web:b", Seen(T0 + DAY + HOUR, ("cx.raw.web", 0, 2), 0))
    index.restore("web:a", Seen(T0 + DAY, ("cx.raw.web", 0, 1), 0))
    assert len(index) == 2
    assert index.expired() == []  # no event read yet: nothing is known to be old
    index.advance(0, T0 + DAY + 1, 1)
    assert index.expired() == [("web:a", "horizon")]
    index.advance(0, T0 + DAY + HOUR + 1, 1)
    assert index.expired() == [("web:b", "horizon")]


def test_restore_counts_against_capacity() -> None:
    index = _single(max_ids=1)
    index.restore("web:a", Seen(T0 + DAY, ("cx.raw.web", 0, 1), 0))
    index.restore("web:b", Seen(T0 + 2 * DAY, ("cx.raw.web", 0, 2), 0))
    assert index.expired() == [("web:a", "capacity")]
