"""Each channel's time format -> aware datetime -> UTC, millisecond precision."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.canonical import _utc_millis_only, format_utc_millis, to_utc_millis
from service.raw._common import (
    parse_epoch_ms,
    parse_epoch_s,
    parse_helpdesk_time,
    parse_rfc3339,
)

pytestmark = pytest.mark.unit

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
INSTANT = datetime(2026, 11, 20, 10, 15, 30, tzinfo=UTC)


# --------------------------------------------------------------------------- RFC 3339 (web)


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-11-20T10:15:30Z", INSTANT),
        ("2026-11-20T10:15:30z", INSTANT),
        ("2026-11-20t10:15:30Z", INSTANT),
        ("2026-11-20T10:15:30+00:00", INSTANT),
        ("2026-11-20T10:15:30-00:00", INSTANT),
        ("2026-11-21T00:15:30+14:00", INSTANT),
        ("2026-11-19T22:15:30-12:00", INSTANT),
        ("2026-11-20T16:00:30+05:45", INSTANT),
        ("2026-11-20T05:45:30-04:30", INSTANT),
        ("2026-11-20T11:15:30+01:00", INSTANT),
    ],
)
def test_rfc3339_offsets(text: str, utc: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed.tzinfo is not None
    assert parsed == utc
    assert to_utc_millis(parsed) == utc
    assert to_utc_millis(parsed).tzinfo is UTC
    assert format_utc_millis(parsed) == "2026-11-20T10:15:30.000Z"


def test_rfc3339_keeps_the_written_offset() -> None:
    parsed = parse_rfc3339("2026-11-20T16:00:30+05:45")
    assert parsed.utcoffset() == timedelta(hours=5, minutes=45)
    assert parsed.hour == 16


@pytest.mark.parametrize(
    ("fraction", "micro", "millis"),
    [
        ("", 0, "000"),
        (".1", 100_000, "100"),
        (".12", 120_000, "120"),
        (".123", 123_000, "123"),
        (".1234", 123_400, "123"),
        (".12345", 123_450, "123"),
        (".999999", 999_999, "999"),
        (".9999995", 999_999, "999"),
        (".99999999", 999_999, "999"),
        (".999999999", 999_999, "999"),
        (".000000001", 0, "000"),
        (".0009", 900, "000"),
    ],
)
def test_rfc3339_fraction_truncated_never_rounded(fraction: str, micro: int, millis: str) -> None:
    parsed = parse_rfc3339(f"2026-12-31T23:59:59{fraction}Z")
    assert parsed.microsecond == micro
    # Never rounded up into the next second (or the next year).
    assert format_utc_millis(parsed) == f"2026-12-31T23:59:59.{millis}Z"
    assert to_utc_millis(parsed).microsecond == int(millis) * 1000


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-30T10:00:00Z",  # Feb 30
        "2025-02-29T10:00:00Z",  # not a leap year
        "2026-13-01T10:00:00Z",
        "2026-00-10T10:00:00Z",
        "2026-11-20T24:00:00Z",  # hour 24
        "2026-11-20T10:60:00Z",
        "2026-11-20T10:15:61Z",
        "2026-11-20T10:15:30+24:00",  # offset out of range
        "2026-11-20T10:15:30-24:00",
        "2026-11-20T10:15:30+05:60",
        "2026-11-20T10:15:30",  # no offset
        "2026-11-20T10:15:30.123",
        "2026-11-20",  # date only
        "2026-11-20Z",
        "2026-11-20 10:15:30Z",  # space instead of T
        "2026-11-20T10:15Z",  # no seconds
        "2026-11-20T10:15:30.Z",
        "2026-11-20T10:15:30.1234567890Z",  # 10 fraction digits
        "2026-11-20T10:15:30+0100",
        "2026-11-20T10:15:30+01",
        "20261120T101530Z",
        " 2026-11-20T10:15:30Z",
        "2026-11-20T10:15:30Z ",
        "",
    ],
)
def test_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_rfc3339(text)


@pytest.mark.parametrize("value", [None, 1795169730, 1795169730.5, b"2026-11-20T10:15:30Z", True])
def test_rfc3339_rejects_non_strings(value: Any) -> None:
    with pytest.raises(ValueError, match="string"):
        parse_rfc3339(value)


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (parse_rfc3339, "2026-11-20T10:15:30Z\n"),
        (parse_helpdesk_time, "2026-11-20 10:15:30+01:00\n"),
    ],
)
def test_trailing_newline_rejected(parser: Callable[[Any], datetime], text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parser(text)


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (parse_rfc3339, "\uff12\uff10\uff12\uff16-11-20T10:15:30Z"),
        (parse_helpdesk_time, "2026-11-20 \u0661\u0660:15:30+01:00"),
    ],
)
def test_non_ascii_digits_rejected(parser: Callable[[Any], datetime], text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parser(text)


# ----------------------------------------------------------------- DST (same instant, 2 offsets)


@pytest.mark.parametrize(
    ("text", "local"),
    [
        # Europe/Berlin, spring forward 2026-03-29 02:00 CET -> 03:00 CEST.
        ("2026-03-29T01:59:59.999+01:00", datetime(2026, 3, 29, 1, 59, 59, 999000, tzinfo=BERLIN)),
        ("2026-03-29T03:00:00+02:00", datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN)),
        # Europe/Berlin, fall back 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 happens twice.
        ("2026-10-25T02:30:00+02:00", datetime(2026, 10, 25, 2, 30, fold=0, tzinfo=BERLIN)),
        ("2026-10-25T02:30:00+01:00", datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN)),
    ],
)
def test_berlin_dst_offsets(text: str, local: datetime) -> None:
    # Ambiguous local times never compare equal across zones (PEP 495): compare in UTC.
    expected = local.astimezone(UTC)
    assert parse_rfc3339(text).astimezone(UTC) == expected
    assert to_utc_millis(parse_rfc3339(text)) == expected


def test_berlin_spring_forward_gap_is_one_millisecond() -> None:
    before = to_utc_millis(parse_rfc3339("2026-03-29T01:59:59.999+01:00"))
    after = to_utc_millis(parse_rfc3339("2026-03-29T03:00:00+02:00"))
    assert after - before == timedelta(milliseconds=1)
    assert format_utc_millis(after) == "2026-03-29T01:00:00.000Z"


def test_berlin_fall_back_repeated_hour_is_two_instants() -> None:
    summer = to_utc_millis(parse_rfc3339("2026-10-25T02:30:00+02:00"))
    winter = to_utc_millis(parse_rfc3339("2026-10-25T02:30:00+01:00"))
    assert winter - summer == timedelta(hours=1)
    assert format_utc_millis(summer) == "2026-10-25T00:30:00.000Z"
    assert format_utc_millis(winter) == "2026-10-25T01:30:00.000Z"


@pytest.mark.parametrize(
    ("berlin", "new_york"),
    [
        # One instant, each city's own offset (New York leaves DST a week later).
        ("2026-10-25T02:30:00+01:00", "2026-10-24T21:30:00-04:00"),
        ("2026-11-01T06:30:00+01:00", "2026-11-01T01:30:00-04:00"),
        ("2026-11-01T07:30:00+01:00", "2026-11-01T01:30:00-05:00"),
        ("2026-03-08T08:30:00+01:00", "2026-03-08T03:30:00-04:00"),
    ],
)
def test_same_instant_written_in_two_zones(berlin: str, new_york: str) -> None:
    a, b = parse_rfc3339(berlin), parse_rfc3339(new_york)
    assert a == b
    assert format_utc_millis(a) == format_utc_millis(b)
    assert a.astimezone(BERLIN).utcoffset() == a.utcoffset()
    assert b.astimezone(NEW_YORK).utcoffset() == b.utcoffset()


def test_new_york_fall_back_repeated_hour() -> None:
    first = datetime(2026, 11, 1, 1, 30, fold=0, tzinfo=NEW_YORK).astimezone(UTC)
    second = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NEW_YORK).astimezone(UTC)
    assert to_utc_millis(parse_rfc3339("2026-11-01T01:30:00-04:00")) == first
    assert to_utc_millis(parse_rfc3339("2026-11-01T01:30:00-05:00")) == second
    assert format_utc_millis(first) == "2026-11-01T05:30:00.000Z"
    assert format_utc_millis(second) == "2026-11-01T06:30:00.000Z"


def test_to_utc_millis_accepts_zoneinfo_datetimes() -> None:
    local = datetime(2026, 10, 25, 2, 30, 0, 123456, fold=1, tzinfo=BERLIN)
    utc = to_utc_millis(local)
    assert utc == datetime(2026, 10, 25, 1, 30, 0, 123000, tzinfo=UTC)
    assert utc.tzinfo is UTC


# --------------------------------------------------------------------- help-desk (support)


@pytest.mark.parametrize(
    ("text", "utc_text"),
    [
        ("2026-11-20 10:15:30+00:00", "2026-11-20T10:15:30.000Z"),
        ("2026-11-20 11:15:30.1+01:00", "2026-11-20T10:15:30.100Z"),
        ("2026-11-20 11:15:30.123456+01:00", "2026-11-20T10:15:30.123Z"),
        ("2026-11-20 11:15:30.999999+01:00", "2026-11-20T10:15:30.999Z"),
        ("2026-11-20 05:15:30.5-05:00", "2026-11-20T10:15:30.500Z"),
        ("2026-11-21 00:15:30+14:00", "2026-11-20T10:15:30.000Z"),
        ("2026-11-19 22:15:30-12:00", "2026-11-20T10:15:30.000Z"),
        ("2026-11-20 16:00:30+05:45", "2026-11-20T10:15:30.000Z"),
        ("2026-10-25 02:30:00+02:00", "2026-10-25T00:30:00.000Z"),
        ("2026-10-25 02:30:00+01:00", "2026-10-25T01:30:00.000Z"),
    ],
)
def test_helpdesk_times(text: str, utc_text: str) -> None:
    assert format_utc_millis(parse_helpdesk_time(text)) == utc_text


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-20T10:15:30+01:00",  # T, not space
        "2026-11-20 10:15:30",  # no offset
        "2026-11-20 10:15:30Z",  # Z is not this format
        "2026-11-20 10:15:30.1234567+01:00",  # 7 fraction digits
        "2026-02-30 10:15:30+01:00",
        "2026-11-20 24:00:00+01:00",
        "2026-11-20 10:15:30+24:00",
        "2026-11-20",
        "2026-11-20 10:15+01:00",
    ],
)
def test_helpdesk_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_helpdesk_time(text)


@pytest.mark.parametrize("value", [None, 0, 1795169730.0])
def test_helpdesk_rejects_non_strings(value: Any) -> None:
    with pytest.raises(ValueError, match="string"):
        parse_helpdesk_time(value)


# --------------------------------------------------------------------- epoch (chat, store)


def test_epoch_ms() -> None:
    assert parse_epoch_ms(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_epoch_ms(1) == datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)
    assert parse_epoch_ms(1_795_169_730_123) == datetime(
        2026, 11, 20, 10, 15, 30, 123000, tzinfo=UTC
    )
    assert parse_epoch_ms(1_795_169_730_123).utcoffset() == timedelta(0)


def test_epoch_s() -> None:
    assert parse_epoch_s(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_epoch_s(1_795_169_730) == INSTANT
    assert parse_epoch_s(4_070_908_800) == datetime(2099, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("parser", [parse_epoch_ms, parse_epoch_s])
@pytest.mark.parametrize("value", [-1, -1_795_169_730])
def test_epoch_negative_rejected(parser: Callable[[Any], datetime], value: int) -> None:
    with pytest.raises(ValueError, match="1970"):
        parser(value)


@pytest.mark.parametrize("parser", [parse_epoch_ms, parse_epoch_s])
@pytest.mark.parametrize("value", [True, False, 1.0, 1795169730.5, "1795169730", None])
def test_epoch_non_integers_rejected(parser: Callable[[Any], datetime], value: Any) -> None:
    with pytest.raises(ValueError, match="integer"):
        parser(value)


@pytest.mark.parametrize("parser", [parse_epoch_ms, parse_epoch_s])
@pytest.mark.parametrize("value", [10**15, 2**63, 2**64 - 1, 10**30])
def test_epoch_beyond_year_9999_is_far_future(
    parser: Callable[[Any], datetime], value: int
) -> None:
    """Unrepresentable times are read as 'far in the future', not as an error."""
    parsed = parser(value)
    assert parsed.year == 9999
    assert parsed.tzinfo is not None


# ------------------------------------------------------------------------ canonical format


def test_to_utc_millis_rejects_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        to_utc_millis(datetime(2026, 11, 20, 10, 15, 30))  # noqa: DTZ001


def test_format_utc_millis_shape() -> None:
    value = datetime(2026, 1, 2, 3, 4, 5, 6789, tzinfo=timezone(timedelta(hours=-3)))
    assert format_utc_millis(value) == "2026-01-02T06:04:05.006Z"
    assert format_utc_millis(datetime(1970, 1, 1, tzinfo=UTC)) == "1970-01-01T00:00:00.000Z"


def test_to_utc_millis_crosses_the_date_line() -> None:
    value = parse_rfc3339("2027-01-01T05:00:00.999999+14:00")
    assert to_utc_millis(value) == datetime(2026, 12, 31, 15, 0, 0, 999000, tzinfo=UTC)


_OFFSETS = st.sampled_from([UTC, timezone(timedelta(0)), timezone(timedelta(hours=-3)),
                            timezone(timedelta(hours=5, minutes=45)), BERLIN])  # fmt: skip
# Wall times, given their zone below (hypothesis takes naive bounds)
_MOMENTS = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30))  # noqa: DTZ001


@settings(max_examples=300)
@given(moment=_MOMENTS, zone=_OFFSETS)  # fmt: skip
def test_format_utc_millis_is_the_utc_instant_in_every_zone(moment: datetime, zone: Any) -> None:
    """Any aware datetime -> its UTC instant, truncated to the millisecond; the same text
    whatever zone it is written in (UTC itself takes a shorter path)."""
    value = moment.replace(tzinfo=zone)
    utc = value.astimezone(UTC)
    expected = f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"
    assert format_utc_millis(value) == expected
    assert format_utc_millis(utc) == expected
    assert format_utc_millis(utc.astimezone(timezone(timedelta(0)))) == expected


@settings(max_examples=300)
@given(moment=_MOMENTS, zone=_OFFSETS, to_the_milli=st.booleans())  # fmt: skip
def test_a_utc_millis_field_takes_only_utc_to_the_millisecond(
    moment: datetime, zone: Any, to_the_milli: bool
) -> None:
    """A `UtcMillis` field -> the same instant in `UTC`; refused unless the value is at
    offset zero and to the millisecond."""
    if to_the_milli:
        moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    value = moment.replace(tzinfo=zone)
    if value.utcoffset() == timedelta(0) and value.microsecond % 1000 == 0:
        kept = _utc_millis_only(value)
        assert kept == value
        assert kept.tzinfo is UTC
    else:
        with pytest.raises(ValueError, match="millisecond"):
            _utc_millis_only(value)
