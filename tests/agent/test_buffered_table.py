"""Agent tier (Faust, no broker): a `BufferedTable` partition whose changelog records were
dropped is discarded locally, to be rebuilt from its changelog alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
import pytest

from service.storage import json_table

pytestmark = pytest.mark.agent


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
