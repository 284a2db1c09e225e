"""Faust tables: RocksDB-backed, changelogged after each message, with bounded memory; string
keys, JSON values; local tables discarded after a run that did not stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, cast

import faust
import orjson
import rocksdict
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import RecordMetadata
from faust.stores import rocksdb as faust_rocksdb
from faust.stores.base import SerializedStore
from faust.streams import current_event
from faust.tables.recovery import Recovery
from faust.types import TP
from faust.utils import json as faust_json

from service.buffers import own_size
from service.fence import Fenced, refuse_if_stale
from service.outbox import Done

log = logging.getLogger(__name__)

# Faust's RocksDB defaults (64 MiB write buffers x3, a 2 GiB block cache) are per partition
# database: with a few dozen of them a worker could grow to gigabytes. These bound each
# database to ~2 MiB of memtables and a 1 MiB block cache (26 databases with 8 partitions):
# 8 MiB each cost 44 MB of RSS at 20 000 messages, with no measurable throughput gain.
ROCKSDB_OPTIONS = {
    "write_buffer_size": 1 << 20,
    "max_write_buffer_number": 2,
    "block_cache_size": 1 << 20,
}


def text_key(key: Any) -> str:
    """A key read back from a raw-keyed table (bytes) -> the string it was written as."""
    return key.decode() if isinstance(key, bytes) else str(key)


_MISSING = object()


_ANY_KEYS = orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z


def _faust_json(value: Any) -> bytes:
    """A str, dict or list -> the bytes Faust's "json" codec makes of it (its registry's
    lookups and calls skipped: `faust.utils.json.dumps` with orjson). Faust encodes these
    tables' keys with it too: their schema's "raw" key serializer does not reach the table."""
    try:
        # Faust's option for keys that are not strings costs orjson every dict: a 2.3 kB
        # customer record took 3.3 µs with it, 1.8 without. The same bytes when every key
        # is a string; any other key raises, and is encoded as Faust does.
        return orjson.dumps(value, default=faust_json.on_default, option=orjson.OPT_UTC_Z)
    except orjson.JSONEncodeError:
        return orjson.dumps(value, default=faust_json.on_default, option=_ANY_KEYS)


# (changelog topic, partition, key, value or None to delete, told how the record ended)
ChangelogSend = Callable[[str, int, bytes, bytes | None, Done], Awaitable[None]]


class BufferedTable(faust.Table[Any, Any]):
    """A Faust table whose changelog records wait until the stage that wrote them flushes
    (`flush_changelogs`, after each message): one record per key, the last value, sent
    straight to the producer. Faust's own path built a FutureMessage and went through its
    producer buffer for every write (about an eighth of the worker's CPU here).

    A write outside a stage has no partition (Faust raises, as before); a write while the
    session is stale raises `Fenced` before the store changes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # (partition, encoded key) -> encoded value (None: deleted), in the order of the last
        # write; encoded as Faust encodes them, for its recovery to read them back
        self.pending: dict[tuple[int, bytes], bytes | None] = {}
        self._persisted: dict[int, int] = {}  # partition -> newest delivered changelog offset
        # Partitions whose changelog records were dropped unsent (`fence.gate_producer`): the
        # local store holds writes their changelog never will.
        self.untrusted: set[int] = set()
        # Keys in the databases of the active partitions, kept by every write once counted
        # (`count_keys`, after each assignment); None until then. A gauge refresh that scanned
        # and decoded every key instead took 2.4 µs a key, the event loop held all the while.
        self.key_count: int | None = None
        # Encoded keys read or written in the message being handled -> whether they exist:
        # a write knows what it replaces without reading it again.
        self.exists: dict[bytes, bool] = {}

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        db = self._message_db()
        if db is None:  # no message (an HTTP read), or the memory store (agent tests)
            try:
                return self.data[key]
            except KeyError:
                return default
        raw_key = self._key_bytes(key)
        raw = db.get(raw_key)
        self.exists[raw_key] = raw is not None
        if raw is None:
            return default
        return orjson.loads(raw)

    def __setitem__(self, key: Any, value: Any) -> None:
        store = self.data
        if isinstance(store, SerializedStore):  # encoded once, for the store and the changelog
            raw_key = self._key_bytes(key)
            raw = self._value_bytes(value)
            self._write(store, self._pend(key, raw_key, raw), raw_key, raw)
        else:  # the memory store (agent tests) keeps the objects themselves
            self.on_key_set(key, value)
            store[key] = value

    def __delitem__(self, key: Any) -> None:
        store = self.data
        if isinstance(store, SerializedStore):
            raw_key = self._key_bytes(key)
            self._write(store, self._pend(key, raw_key, None), raw_key, None)
        else:
            self.on_key_del(key)
            del store[key]

    def _write(
        self, store: SerializedStore[Any, Any], partition: int, raw_key: bytes, raw: bytes | None
    ) -> None:
        """A write (None: a delete) -> the store, in the partition `_pend` found for it (the
        message's, where Faust's store would look it up again), and the key count."""
        if type(store) is faust_rocksdb.Store:
            db = store._db_for_partition(partition)
            if self.key_count is not None:
                existed = self.exists.get(raw_key)
                if existed is None:  # a write without a read before it in this message
                    existed = db.get(raw_key) is not None
                self.key_count += (raw is not None) - existed
            self.exists[raw_key] = raw is not None
            if raw is None:
                db.delete(raw_key)
            else:
                db.put(raw_key, raw)
        elif raw is None:
            store._del(raw_key)
        else:
            store._set(raw_key, raw)

    def _message_db(self) -> Any:
        """The RocksDB database of the partition of the message being handled, for a read;
        None with no message, or with the memory store of the agent tests.

        What Faust's store does for such a table (its partition is the message's), without
        its codec registry and the key index it keeps for reads outside a message (an LRU
        update under a lock per read and write). A read of a 780-byte record, decoded: 8.6 to
        9.0 µs before, 4.4 to 4.7 µs so (the database's own read 1.6 µs); a write with its
        changelog entry 11.5 -> 8.8 to 9.1 µs (20 000 keys, here). Reads outside a message
        go through Faust's store, which finds a key without that index too, in every
        partition's database."""
        store = self.data
        if type(store) is not faust_rocksdb.Store:
            return None
        event = current_event()
        if event is None:
            return None
        return store._db_for_partition(event.message.partition)

    def _key_bytes(self, key: Any) -> bytes:
        if type(key) is str and self.key_serializer == "json":
            # A message's keys are kept (`exists`, `pending`) until it is handled. The
            # identity stage's first message after an assignment reads its 50 000 filed-key
            # slots: 200 MB held for a moment in orjson's buffers, the peak RSS of every
            # steady run (283 MB).
            return own_size(_faust_json(key))
        return self.encode_key(key)

    def _value_bytes(self, value: Any) -> bytes | None:
        if type(value) in (dict, list) and self.value_serializer == "json":
            return _faust_json(value)
        return self.encode_value(value)

    def on_key_set(self, key: Any, value: Any) -> None:
        self._pend(key, self.encode_key(key), self.encode_value(value))

    def on_key_del(self, key: Any) -> None:
        self._pend(key, self.encode_key(key), None)

    def _pend(self, key: Any, raw_key: bytes, raw: bytes | None) -> int:
        """A write (None: a delete) -> its changelog record pending; -> its partition."""
        refuse_if_stale(self.app)  # before the store changes
        partition = self.partition_for_key(key)
        if partition is None:  # never for these tables: keys live where their event came from
            raise TypeError(f"table {self.name}: no partition for a write outside a stage")
        self.pending.pop((partition, raw_key), None)  # the newest write goes last
        self.pending[(partition, raw_key)] = raw
        return partition

    def encode_key(self, key: Any) -> bytes:
        encoded = self.app.serializers.dumps_key(self.key_type, key, serializer=self.key_serializer)
        if encoded is None:
            raise TypeError(f"table {self.name}: a key cannot be None")
        return encoded

    def encode_value(self, value: Any) -> bytes | None:
        """A value -> its changelog bytes; None (a delete) -> a tombstone."""
        if value is None:
            return None
        return self.app.serializers.dumps_value(
            self.value_type, value, serializer=self.value_serializer
        )

    def count_keys(self) -> int:
        """-> the keys in the active partitions' databases, counted from the stores (their
        encoded keys, not decoded); from then on each write keeps `key_count`. Synchronous:
        no write can come between the count and the writes it tracks."""
        self.exists.clear()
        self.key_count = len(self.data)
        return self.key_count

    def keys_held(self) -> int | None:
        """-> the keys in local state: `key_count` for RocksDB, None until counted; the size
        of the memory store (agent tests), which keeps its objects."""
        if type(self.data) is faust_rocksdb.Store:
            return self.key_count
        return len(self.data)

    async def on_rebalance(
        self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0
    ) -> None:
        # Partitions come and go, and recovery writes the stores without us: counted again.
        self.key_count = None
        self.exists.clear()
        self.discard_untrusted()
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)

    def discard_untrusted(self) -> None:
        """Remove the local database of every partition whose changelog records were dropped,
        so that recovery rebuilds it from its changelog alone: a message whose writes stay
        only in the local store would, read again here, find itself handled and never write
        them to the changelog."""
        dbs = getattr(self.data, "_dbs", None)  # the memory store (agent tests) has none
        for partition in sorted(self.untrusted):
            self._persisted.pop(partition, None)
            if dbs is not None:
                db = dbs.pop(partition, None)
                if db is not None:
                    db.close()  # RocksDB refuses to open a path this process still has open
                shutil.rmtree(cast(Any, self.data).partition_path(partition), ignore_errors=True)
            log.warning(
                "local table partition discarded, to be rebuilt from its changelog: records "
                "of it were dropped when the session expired",
                extra={"table": self.name, "partition": partition},
            )
        self.untrusted.clear()

    def delivered(self, partition: int, offset: int) -> None:
        """Keep the newest changelog offset delivered; the store learns it once per loop turn
        (Faust's recovery starts reading the changelog there). Not later: written up to a
        second late (tried, to save a RocksDB write per loop turn), a worker restarted after
        a clean stop published re-sent duplicates of events it had accepted before the stop
        (tests/kafka/test_ingest_kafka.py failed in 10 of 11 runs)."""
        if not self._persisted:
            asyncio.get_running_loop().call_soon(self._persist)
        self._persisted[partition] = max(offset, self._persisted.get(partition, -1))

    def _persist(self) -> None:
        topic = self.changelog_topic.get_topic_name()
        # A partition revoked since has its database closed: writing would open it again.
        # (The memory store of the agent tests keeps no databases.)
        open_dbs = getattr(self.data, "_dbs", None)
        for partition, offset in self._persisted.items():
            if open_dbs is None or partition in open_dbs:
                self.data.set_persisted_offset(TP(topic, partition), offset)
        self._persisted.clear()


def skip_write_ahead_log() -> None:
    """Open every table partition's RocksDB without its write-ahead log (once per process).

    The log makes a write survive a crash of the process; these stores do not need that:
    after a run that did not stop cleanly they are discarded and rebuilt from their
    changelogs (`discard_unless_clean`), and a store closed cleanly writes its memtables out
    when it is closed. Without a log, a crash keeps a prefix of the writes at worst, the
    partition's persisted changelog offset among them, so recovery would still replay from
    an offset the store holds. A put cost 4.2 µs with the log and 0.7 µs without (300-byte
    values, measured here)."""
    options = faust_rocksdb.RocksDBOptions
    if getattr(options, "_cx_no_wal", False):
        return
    original = options.open

    def open_without_log(self: Any, path: Path, *, read_only: bool = False) -> Any:
        db = original(self, path, read_only=read_only)
        if self.use_rocksdict:
            write = rocksdict.WriteOptions()
            # a property at run time, though rocksdict's stubs declare a method
            setattr(write, "disable_wal", True)  # noqa: B010
            db.set_write_options(write)
        return db

    setattr(options, "open", open_without_log)  # noqa: B010 - monkeypatch on purpose
    setattr(options, "_cx_no_wal", True)  # noqa: B010


def json_table(app: faust.App, name: str, partitions: int) -> Any:
    """A table keyed by strings holding JSON values, changelogged after each message."""
    skip_write_ahead_log()
    schema: faust.Schema[Any, Any] = faust.Schema(key_serializer="raw", value_serializer="json")
    table = BufferedTable(
        app,
        name=name,
        partitions=partitions,
        schema=schema,
        options=ROCKSDB_OPTIONS,
        beacon=app.tables.beacon,
    )
    return app.tables.add(table)


async def flush_changelogs(
    tables: Iterable[BufferedTable],
    send: ChangelogSend,
    on_failed: Callable[[BaseException], None],
) -> None:
    """Send every table's pending changelog records (one per key), in write order.

    Called by a stage after each message and before its acknowledgement: a commit flushes
    the producer, not these buffers."""
    for table in tables:
        table.exists.clear()  # one message's keys only: bounded, and the next may be elsewhere
        if not table.pending:
            continue
        pending, table.pending = table.pending, {}
        topic = table.changelog_topic.get_topic_name()
        for (partition, key), value in pending.items():
            done = partial(_on_delivered, table, on_failed, partition)
            await send(topic, partition, key, value, done)


def _on_delivered(
    table: BufferedTable,
    on_failed: Callable[[BaseException], None],
    partition: int,
    first: RecordMetadata | None,
    n: int,
    exc: BaseException | None,
) -> None:
    """How a changelog record ended (a `Done`) -> the table told its offset, or the failure."""
    if isinstance(exc, Fenced):  # dropped unsent (fence.gate_producer); its message is read again
        table.untrusted.add(partition)
        return
    if exc is not None:
        on_failed(exc)  # a lost changelog record must stop the worker before it commits
        return
    if first is not None:
        table.delivered(partition, first.offset + n)


# In the data directory: written when a worker stopped cleanly, removed when one starts.
CLEAN_STOP = "clean-stop"
DISCARDED = "the last run did not stop cleanly: local tables discarded, rebuilt from the changelogs"


def discard_unless_clean(data_dir: Path, tables_dir: Path) -> bool:
    """Local tables left by a run that did not stop cleanly -> removed (True).

    Faust writes a table change to the local store at once and to its changelog a little
    later. A crash (kill -9, a fatal error, the shutdown watchdog) can lose the changelog's
    last records while the local store keeps them. The input behind them is read again (its
    offset was not committed), but a stage that finds its change already made writes nothing
    new, so the changelog would never get it: whoever rebuilds the table from its changelog
    later (another worker taking the partition over, or this one after losing its disk) would
    miss it; a forgotten customer could come back. Rebuilt from the changelogs now, the tables
    hold what the changelogs hold, and the replay writes the changes again. The mark is
    removed in either case: this run sets it again when it stops cleanly."""
    mark = data_dir / CLEAN_STOP
    clean = mark.exists()
    mark.unlink(missing_ok=True)
    if clean or not tables_dir.exists():
        return False
    shutil.rmtree(tables_dir)
    return True


def mark_clean_stop(data_dir: Path, tables: Iterable[BufferedTable] = ()) -> bool:
    """Record that this run stopped cleanly: its local tables match their changelogs -> True.
    Not when one of `tables` has a partition whose changelog records were dropped (a stop
    while the session was stale, `BufferedTable.untrusted`): it holds writes its changelog
    lacks, so the next start rebuilds the tables from their changelogs -> False."""
    if any(table.untrusted for table in tables):
        return False
    (data_dir / CLEAN_STOP).write_text("local tables match their changelogs\n")
    return True


_CLIENT_KWARGS: weakref.WeakKeyDictionary[faust.App, dict[str, Any]] = weakref.WeakKeyDictionary()


async def true_end_offsets(
    client_kwargs: dict[str, Any], reported: Mapping[Any, int | None], within: float = 10.0
) -> dict[TopicPartition, int]:
    """End offsets as a broker reported them -> the real ends, found by reading each partition
    from its last reported record on. On Apache Kafka that read finds nothing further (one
    small fetch per partition); the embedded Tansu broker reports the base offset of the last
    batch + 1, and the read finds the rest of that batch."""
    ends = {TopicPartition(tp.topic, tp.partition): end or 0 for tp, end in reported.items()}
    probed = [tp for tp, end in ends.items() if end > 0]
    if not probed:
        return ends
    consumer = AIOKafkaConsumer(
        **client_kwargs,
        enable_auto_commit=False,
        auto_offset_reset="latest",  # a record gone since (compaction): nothing more to find
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        consumer.assign(probed)
        for tp in probed:
            consumer.seek(tp, ends[tp] - 1)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                ends[tp] = max(ends[tp], records[-1].offset + 1)
            # Done once every partition was read past its last reported record (or had none
            # left to read) and one more reading found nothing further.
            if not batches and all([await consumer.position(tp) >= ends[tp] for tp in probed]):
                break
    finally:
        await consumer.stop()
    return ends


class _TrueEnds:
    """A Faust consumer whose `highwaters` are the real end offsets (`true_end_offsets`)."""

    def __init__(self, consumer: Any, client_kwargs: dict[str, Any]) -> None:
        self.consumer = consumer
        self.client_kwargs = client_kwargs

    async def highwaters(self, *tps: Any) -> Mapping[Any, int | None]:
        reported: Mapping[Any, int | None] = await self.consumer.highwaters(*tps)
        try:
            ends = await true_end_offsets(self.client_kwargs, reported)
        except Exception as exc:  # the reported ends: right on Apache Kafka, short on Tansu
            log.warning("could not read the changelogs' real end offsets: %r", exc)
            return reported
        return {tp: ends[TopicPartition(tp.topic, tp.partition)] for tp in reported}


def recover_to_true_ends(app: faust.App, client_kwargs: dict[str, Any]) -> None:
    """Make table recovery read every changelog to its real end.

    Faust restores a table until the changelog's end offset as ListOffsets reports it. Where
    that is short (Tansu, see `true_end_offsets`) recovery ended at the first record of the
    last batch: the rest of that batch, read after the end, stayed in Faust's recovery buffer
    unapplied (then, at the next rebalance, applied over newer writes). A table rebuilt from
    its changelog missed its latest writes. Faust's check that local state is not ahead of its
    changelog compares with the same, now real, ends."""
    _CLIENT_KWARGS[app] = client_kwargs
    if getattr(Recovery, "_cx_patched", False):
        return
    original = Recovery._build_highwaters

    async def build(self: Recovery, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        kwargs = _CLIENT_KWARGS.get(cast(faust.App, self.app))
        if kwargs is not None:
            consumer = _TrueEnds(consumer, kwargs)
        await original(self, consumer, tps, destination, title)

    setattr(Recovery, "_build_highwaters", build)  # noqa: B010 - monkeypatch on purpose
    setattr(Recovery, "_cx_patched", True)  # noqa: B010
