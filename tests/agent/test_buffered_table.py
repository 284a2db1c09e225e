"""Agent tier (Faust, no broker): a `BufferedTable` reads and writes what Faust's store would;
a partition whose changelog records were dropped is discarded locally, to be rebuilt from its
changelog alone."""

from __future__ import annotations

import tracemalloc
import weakref
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.streams import _current_event
from faust.types import TP

from service.storage import flush_changelogs, json_table

pytestmark = pytest.mark.agent


class _Event:
    """What a table reads of the event being handled: its message's topic and partition."""

    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(topic="source", partition=partition)


def _stage_table(tmp_path: Path, app_id: str) -> tuple[faust.App, Any, Any]:
    """-> (app, a two-partition RocksDB table as a stage writes it, its store)."""
    app = faust.App(app_id, broker="kafka://localhost:1", store="rocksdb://",
                    datadir=str(tmp_path))  # fmt: skip
    table = json_table(app, "customers", 2)
    table._verified_source_topics_for_partitions.add("source")  # no consumer to ask
    return app, table, table.data


async def test_a_table_reads_and_writes_the_bytes_fausts_store_would(tmp_path: Path) -> None:
    _, table, store = _stage_table(tmp_path, "t-bytes")
    value = {"a": [1, 2.5, None, "é"], "b": {"c": True}}
    event = _Event(1)
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    try:
        table["k"] = value
        table["gone"] = [1]
        del table["gone"]
        assert table["k"] == value
        assert table.get("k") == value
        assert table.get("gone") is None
        assert table.get("missing", "default") == "default"
        with pytest.raises(KeyError):
            table["missing"]
    finally:
        _current_event.reset(token)
    # in the message's partition, keyed and encoded as Faust's store and changelog have them
    key, gone = store._encode_key("k"), store._encode_key("gone")
    assert key == b'"k"'
    raw = store._db_for_partition(1).get(key)
    assert raw == store._encode_value(value)
    assert store._db_for_partition(0).get(key) is None
    assert store._db_for_partition(1).get(gone) is None
    assert table.pending == {(1, key): raw, (1, gone): None}
    assert table.get("k") == value  # outside a message: through Faust's store
    # values Faust's codec encodes through its options (non-str keys, UTC as Z) and default
    odd = {"when": datetime(2026, 1, 2, tzinfo=UTC), 7: Decimal("1.50"), "l": [{"x": 1}]}
    assert table._value_bytes(odd) == store._encode_value(odd)
    assert table._value_bytes([odd]) == store._encode_value([odd])
    assert table._key_bytes('é"\\') == store._encode_key('é"\\')


async def test_the_keys_a_message_reads_are_held_at_their_own_size(tmp_path: Path) -> None:
    """A message that reads many keys (the identity stage's first after an assignment reads
    50 000) holds each key until it is handled, at its own size: orjson's result alone keeps
    the 4 KiB buffer it was written in."""
    _, table, _ = _stage_table(tmp_path, "t-key-size")
    event = _Event(0)
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert all(table.get(f"e|{slot}") is None for slot in range(5000))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        _current_event.reset(token)
    assert len(table.exists) == 5000
    assert held < 5000 * 200, held  # 4 KiB a key: 20 MB


async def test_an_untrusted_partition_is_discarded_and_the_others_kept(tmp_path: Path) -> None:
    app = faust.App("t-untrusted", broker="kafka://localhost:1", store="rocksdb://",
                    datadir=str(tmp_path))  # fmt: skip
    table = json_table(app, "customers", 2)
    store: Any = table.data
    for partition in (0, 1):
        store._db_for_partition(partition).put(b"key", b"local write")
    table.untrusted.add(0)
    table.discard_untrusted()
    assert not store.partition_path(0).exists()
    assert table.untrusted == set()
    assert store._db_for_partition(0).get(b"key") is None  # empty: recovery reads it all
    assert store._db_for_partition(1).get(b"key") == b"local write"


async def test_a_table_writes_no_log_and_keeps_its_writes_once_released(tmp_path: Path) -> None:
    app = faust.App("t-no-wal", broker="kafka://localhost:1", store="rocksdb://",
                    datadir=str(tmp_path))  # fmt: skip
    table = json_table(app, "customers", 1)
    store: Any = table.data
    path = store.partition_path(0)
    for n in range(200):
        store._db_for_partition(0).put(f"key{n}".encode(), b"x" * 300)
    # 60 kB written, none of it to a write-ahead log
    assert sum(f.stat().st_size for f in path.glob("*.log")) == 0
    await store.stop()  # Faust drops its databases; RocksDB writes the memtables out
    again = faust.App("t-no-wal-2", broker="kafka://localhost:1", store="rocksdb://",
                      datadir=str(tmp_path))  # fmt: skip
    reopened = json_table(again, "customers", 1)
    assert reopened.data._db_for_partition(0).get(b"key199") == b"x" * 300


async def test_the_key_count_follows_every_write_once_counted(tmp_path: Path) -> None:
    app, table, store = _stage_table(tmp_path, "t-count")
    topic = table.changelog_topic.get_topic_name()
    actives = {TP(topic, 0), TP(topic, 1)}
    app.assignor.assigned_actives = lambda: actives  # type: ignore[method-assign]
    store._db_for_partition(0).put(store._encode_key("recovered"), b"[1]")  # as recovery does
    store._db_for_partition(1)
    assert table.keys_held() is None  # not counted yet
    assert table.count_keys() == 1
    sent: list[tuple[int, bytes, bytes | None]] = []

    async def send(topic: str, partition: int, key: bytes, value: bytes | None, done: Any) -> None:
        sent.append((partition, key, value))

    async def handle(partition: int, writes: Any) -> None:
        event = _Event(partition)  # held: the context keeps only a weak reference
        token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
        try:
            writes()
        finally:
            _current_event.reset(token)
        await flush_changelogs([table], send, pytest.fail)

    def first() -> None:
        table["a"] = [1]  # new, not read before
        table["a"] = [2]  # written over, in the same message
        assert table.get("b") is None
        table["b"] = [1]  # new, read before
        del table["a"]
        assert table.pop("never", None) is None  # a delete of what is not there

    def second() -> None:
        table["recovered"] = [5]  # there already, not read before in this message
        table["b2"] = [1]
        del table["recovered"]
        table["c"] = [1]

    await handle(1, first)
    assert table.keys_held() == len(store) == 2
    await handle(0, second)
    assert table.keys_held() == len(store) == 3
    await handle(1, lambda: table.pop("b"))  # read in an earlier message, gone since
    assert table.keys_held() == len(store) == 2
    assert table.exists == {}  # one message's keys only
    assert len(sent) == 6  # one changelog record per key and message
