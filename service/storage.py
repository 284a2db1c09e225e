"""Faust tables: RocksDB-backed, changelogged, with bounded memory; raw keys, JSON values."""

from __future__ import annotations

from typing import Any

import faust

# Faust's RocksDB defaults (64 MiB write buffers x3, a 2 GiB block cache) are per partition
# database: with a few dozen of them a worker could grow to gigabytes. These bound each
# database to ~16 MiB of memtables and an 8 MiB block cache.
ROCKSDB_OPTIONS = {
    "write_buffer_size": 8 << 20,
    "max_write_buffer_number": 2,
    "block_cache_size": 8 << 20,
}


def text_key(key: Any) -> str:
    """A key read back from a raw-keyed table (bytes) -> the string it was written as."""
    return key.decode() if isinstance(key, bytes) else str(key)


def json_table(app: faust.App, name: str, partitions: int) -> Any:
    """A table keyed by strings (stored raw) holding JSON values."""
    schema: faust.Schema[Any, Any] = faust.Schema(key_serializer="raw", value_serializer="json")
    return app.Table(name, partitions=partitions, schema=schema, options=ROCKSDB_OPTIONS)
