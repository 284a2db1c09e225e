"""Local tables across restarts: kept after a clean stop, discarded after any other end; what
a changelog delivery does to its table."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import RecordMetadata, TopicPartition
from faust.serializers import codecs
from hypothesis import given
from hypothesis import strategies as st

from service.fence import Fenced
from service.storage import (
    CLEAN_STOP,
    _faust_json,
    _on_delivered,
    discard_unless_clean,
    mark_clean_stop,
)

pytestmark = pytest.mark.unit


def _tables(data_dir: Path) -> Path:
    tables = data_dir / "v1" / "tables"
    (tables / "customers-0.db").mkdir(parents=True)
    (tables / "customers-0.db" / "000001.log").write_bytes(b"state")
    return tables


def test_tables_after_a_clean_stop_are_kept(tmp_path: Path) -> None:
    tables = _tables(tmp_path)
    mark_clean_stop(tmp_path)
    assert not discard_unless_clean(tmp_path, tables)
    assert (tables / "customers-0.db" / "000001.log").read_bytes() == b"state"
    assert not (tmp_path / CLEAN_STOP).exists(), "this run must mark its own clean stop"


def test_tables_without_the_mark_are_discarded(tmp_path: Path) -> None:
    tables = _tables(tmp_path)
    assert discard_unless_clean(tmp_path, tables)
    assert not tables.exists()
    assert (tmp_path / "v1").exists(), "only the tables go"


def test_a_crash_after_a_clean_restart_is_caught(tmp_path: Path) -> None:
    tables = _tables(tmp_path)
    mark_clean_stop(tmp_path)
    assert not discard_unless_clean(tmp_path, tables)  # started; then killed: no new mark
    assert discard_unless_clean(tmp_path, tables)


def test_a_stop_with_dropped_changelog_records_is_not_clean(tmp_path: Path) -> None:
    """Stopped while its session was stale: the gate dropped changelog records of partition 1,
    whose local database holds writes its changelog lacks."""
    tables = _tables(tmp_path)
    table = Delivered()
    table.untrusted.add(1)
    assert not mark_clean_stop(tmp_path, [cast(Any, Delivered()), cast(Any, table)])
    assert discard_unless_clean(tmp_path, tables)
    assert mark_clean_stop(tmp_path, [cast(Any, Delivered())])


def test_a_first_start_has_nothing_to_discard(tmp_path: Path) -> None:
    assert not discard_unless_clean(tmp_path, tmp_path / "v1" / "tables")
    assert list(tmp_path.iterdir()) == []


class Delivered:
    """A table's view of its changelog deliveries."""

    def __init__(self) -> None:
        self.offsets: list[tuple[int, int]] = []
        self.untrusted: set[int] = set()

    def delivered(self, partition: int, offset: int) -> None:
        self.offsets.append((partition, offset))


def _first(partition: int, offset: int) -> RecordMetadata:
    """The metadata of a delivered batch's first record."""
    tp = TopicPartition("cx.customers-changelog", partition)
    return RecordMetadata(tp.topic, partition, tp, offset, -1, 0, 0)


def test_a_delivery_moves_the_table_on_and_a_failure_is_fatal() -> None:
    table, failures = Delivered(), list[BaseException]()
    _on_delivered(cast(Any, table), failures.append, 2, _first(2, 5), 2, None)  # third of a batch
    assert table.offsets == [(2, 7)]
    error = KafkaTimeoutError()
    _on_delivered(cast(Any, table), failures.append, 2, None, 0, error)
    assert failures == [error]


def test_a_record_dropped_by_the_fence_is_neither_delivered_nor_fatal() -> None:
    table, failures = Delivered(), list[BaseException]()
    _on_delivered(cast(Any, table), failures.append, 2, None, 0, Fenced("dropped"))
    assert table.offsets == []
    assert failures == []
    assert table.untrusted == {2}  # its local database is rebuilt at the next rebalance


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.datetimes(timezones=st.just(UTC))
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text() | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(_VALUES)
def test_table_values_are_encoded_as_faust_encodes_them(value: Any) -> None:
    """Faust's recovery decodes the changelog with its own codec: ours must match it byte for
    byte, string keys (the fast path) or not (the fallback)."""
    try:
        expected = codecs.get_codec("json").dumps(value)
    except TypeError:  # an integer beyond 64 bits: refused the same way
        with pytest.raises(TypeError):
            _faust_json(value)
        return
    assert _faust_json(value) == expected


def test_a_key_that_is_not_a_string_takes_faust_s_option() -> None:
    value = {"when": datetime(2026, 1, 2, tzinfo=UTC), 7: Decimal("1.50")}
    assert _faust_json(value) == b'{"when":"2026-01-02T00:00:00Z","7":"1.50"}'
