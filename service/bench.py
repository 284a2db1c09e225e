"""`cxpulse bench`: end-to-end throughput against a same-run baseline, and a soak.

Throughput: N simulated messages are preloaded into the raw topics of a fresh prefix; a plain
aiokafka consumer that reads and `orjson.loads` every one of them is timed first (the
baseline), then K workers start from empty state and are timed until every accepted event is
on its customer's record (`cxpulse_processing_latency_seconds_count`, summed over workers,
reaches the accepted count). Soak: one worker under a steady publishing rate, its RSS sampled
along the way. Results are printed as one JSON document.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson

from service.broker import free_port
from service.metrics import WINDOWS
from service.settings import Settings
from service.simulate import SimMessage, generate, publish, topic_for
from service.topics import Topics

FILED = "cxpulse_processing_latency_seconds_count"  # one per event filed on a record
CHANNELS = ("web", "chat", "support", "store")
# The stages a worker's event is consumed by (ingest, accept, identity, customers, metrics).
FLOOR_HOPS = 5


@dataclass
class BenchWorker:
    """`python -m service worker` in a child process, with its own port and state."""

    process: subprocess.Popen[bytes]
    http_port: int
    log: IO[bytes]

    @classmethod
    def start(cls, env: dict[str, str], directory: Path, name: str) -> BenchWorker:
        port = free_port()
        log = (directory / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "worker"],
            env={
                **env,
                "CX_HTTP_PORT": str(port),
                "CX_HTTP_HOST": "127.0.0.1",
                "CX_HTTP_ADVERTISED_URL": f"http://127.0.0.1:{port}",
                "CX_DATA_DIR": str(directory / name),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return cls(process, port, log)

    def scrape(self) -> dict[str, float]:
        """/metrics -> sample name (with labels) -> value; empty while it cannot answer."""
        try:
            url = f"http://127.0.0.1:{self.http_port}/metrics"
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read().decode()
        except OSError:
            return {}
        return parse_metrics(body)

    def filed(self) -> float:
        return total(self.scrape(), FILED)

    def rss_mb(self) -> float:
        return round(status_kb(self.process.pid, "VmRSS") / 1024, 1)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def peak_rss_mb(self) -> float:
        return round(status_kb(self.process.pid, "VmHWM") / 1024, 1)

    def stop(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        return code


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for every sample."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], name: str) -> float:
    """Sum of every sample of one metric name, across labels."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def cpu_seconds(pid: int) -> float:
    """A process's user plus system CPU time so far (0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """The CPU the workers (and the embedded broker, when its pid is known) take from now on."""

    workers: list[BenchWorker]
    broker_pid: int | None
    started: float = 0.0
    workers_at_start: float = 0.0
    broker_at_start: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.workers_at_start = sum(w.cpu_seconds() for w in self.workers)
        if self.broker_pid is not None:
            self.broker_at_start = cpu_seconds(self.broker_pid)

    def report(self, events: int) -> dict[str, float | None]:
        """-> CPU per event of the workers and of the broker since the start, and the share of
        the machine's CPU time they took together (the broker's two None when not known)."""
        seconds = time.monotonic() - self.started
        workers = sum(w.cpu_seconds() for w in self.workers) - self.workers_at_start
        broker = None if self.broker_pid is None else cpu_seconds(self.broker_pid)
        if broker is not None:
            broker -= self.broker_at_start
        cores = os.cpu_count() or 1
        return {
            "worker_cpu_ms_per_event": round(workers * 1000 / events, 3),
            "broker_cpu_ms_per_event": None if broker is None else round(broker * 1000 / events, 3),
            "machine_busy": None
            if broker is None
            else round((workers + broker) / (seconds * cores), 3),
        }


def status_kb(pid: int, field: str) -> float:
    """A kB field of /proc/{pid}/status (0 where there is no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def worker_env(bootstrap: str, prefix: str) -> dict[str, str]:
    """The environment of a bench worker: this one's, less any CX_ setting, plus the run's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CX_")}
    env.update(
        CX_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        CX_TOPIC_PREFIX=prefix,
        CX_PII_KEY="cxpulse-bench-key-0123456789",
        CX_KAFKA_SESSION_TIMEOUT="6s",
        CX_KAFKA_REBALANCE_TIMEOUT="5s",
        CX_RECOVERY_CONSISTENCY_CHECK="false",
        CX_LOG_LEVEL="warning",
    )
    return env


def messages(
    count: int, seed: int, span: timedelta, customers: int | None = None
) -> list[SimMessage]:
    """Realistic simulated traffic (about 2 % duplicates, 1 % bad), ending now, from a pool of
    `customers` people (default: one per six messages)."""
    now = datetime.now(UTC)
    pool = pool_for(count) if customers is None else customers
    return list(
        generate(count, customers=pool, seed=seed, now=now, span=span,
                 dup_share=0.02, bad_share=0.01)
    )  # fmt: skip


def pool_for(messages: int) -> int:
    """The bench's default customer pool: about six messages a person."""
    return max(100, messages // 6)


def live_keys(records: Iterable[Record]) -> int:
    """The records of a compacted topic, in offset order per partition -> how many keys it
    holds a value for (a key's last record not a tombstone)."""
    last: dict[bytes | None, bool] = {}
    for record in records:
        last[record.key] = record.value is not None
    return sum(last.values())


def _reader(bootstrap: str, topics: list[str]) -> Any:
    """A groupless aiokafka consumer of `topics` from their beginning (not started)."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )


async def baseline(bootstrap: str, prefix: str, count: int) -> dict[str, float]:
    """A plain aiokafka consumer: read `count` raw messages and orjson.loads each -> timing."""
    consumer = _reader(bootstrap, [topic_for(prefix, c) for c in CHANNELS])  # type: ignore[arg-type]
    await consumer.start()
    read = 0
    first = time.monotonic()
    try:
        deadline = time.monotonic() + 600
        while read < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batches.values():
                if read == 0:
                    first = time.monotonic()
                for record in records:
                    with contextlib.suppress(orjson.JSONDecodeError):  # the bad share
                        orjson.loads(record.value or b"")
                read += len(records)
    finally:
        await consumer.stop()
    seconds = time.monotonic() - first
    return {"events": read, "seconds": round(seconds, 3), "events_per_s": round(read / seconds)}


def core_ceiling(settings: Settings, batch: list[SimMessage]) -> dict[str, Any]:
    """The pure stages each event passes through in a worker (parse, normalize, the JSON
    round trips between stages, dedup, identity, customer record, profile, alerts, metrics),
    run on `batch` in this process with no Kafka and no Faust -> events/s: what no transport,
    however fast, could exceed with this core."""
    from service.alerts import alerts_for
    from service.canonical import Arrival, Normalized, Routed, Source, Touchpoint
    from service.identity import IdentityGraph
    from service.parse import Limits
    from service.profile import profile_json
    from service.rolling import PartitionAggregator
    from service.timeline import Bounds, add_event
    from service.timeline import Record as CustomerRecord
    from service.worker import ingest_one

    limits = Limits(settings.max_payload_bytes, settings.max_clock_skew)
    bounds = Bounds(settings.timeline_max_events, settings.timeline_max_age)
    pii_key = b"cxpulse-bench-key-0123456789"
    seen: set[str] = set()
    graph = IdentityGraph({})
    records: dict[str, CustomerRecord] = {}
    metrics = PartitionAggregator()
    now = datetime.now(UTC)
    started = time.perf_counter()
    filed = 0
    for offset, message in enumerate(batch):
        source = Source(topic=topic_for("bench", message.channel), partition=0, offset=offset)
        outcome = ingest_one(message.channel, message.value, source, limits, pii_key, now)
        if not isinstance(outcome, Normalized):
            continue
        sent = outcome.model_dump_json()  # to the accept stage, which passes it on as it is
        event_id = Arrival.model_validate_json(sent).touchpoint.event_id
        if event_id in seen:
            continue
        seen.add(event_id)
        routed = Routed.model_validate(orjson.loads(sent), strict=False)  # the identity stage
        key = str(routed.touchpoint["customer_key"])
        if routed.identifiers:
            key = graph.link(routed.identifiers, event_id).key
        event = {**routed.touchpoint, "customer_key": key}
        record, _ = add_event(records.get(key), event, bounds)
        records[key] = record
        state = record["profile"]
        profile_json(key, state, int(record["aliases"]), state["last"] or 0)
        alerts_for(event, key)
        metrics.apply(Touchpoint.model_validate_json(orjson.dumps(event)))
        filed += 1
    seconds = time.perf_counter() - started
    return {"events": filed, "seconds": round(seconds, 2), "events_per_s": round(filed / seconds)}


@dataclass(frozen=True)
class Record:
    """What the latency measures need of a consumed record."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # CreateTime: set by the producer when the record was sent
    key: bytes | None
    value: bytes | None


async def read_all(bootstrap: str, topics: list[str], idle: float = 3.0) -> list[Record]:
    """Every record of `topics`, read until none came for `idle` seconds (Tansu under-reports
    end offsets, so the end is not asked for)."""
    consumer = _reader(bootstrap, topics)
    await consumer.start()
    records: list[Record] = []
    try:
        last = time.monotonic()
        while time.monotonic() - last < idle:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for batch in batches.values():
                last = time.monotonic()
                records.extend(
                    Record(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value)
                    for r in batch
                )
    finally:
        await consumer.stop()
    return records


def percentiles(values_ms: list[float], points: tuple[float, ...]) -> dict[str, float | None]:
    """Milliseconds -> {"p50_ms": ..., ...} (nearest rank); None for each when empty."""
    ordered = sorted(values_ms)
    out: dict[str, float | None] = {}
    for point in points:
        name = f"p{point:g}".replace(".", "")
        if not ordered:
            out[f"{name}_ms"] = None
            continue
        rank = max(1, math.ceil(round(point * len(ordered) / 100, 9)))  # 99.9 % of 1000 is 999
        out[f"{name}_ms"] = round(ordered[rank - 1], 1)
    return out


def filed_times(raw: list[Record], timeline: list[Record]) -> dict[str, tuple[int, int]]:
    """Per filed event id: (its raw record's publish time, its first timeline record's time).
    The timeline record names its raw record (`source`); a replayed copy counts once."""
    published: dict[tuple[Any, ...], int] = {
        (r.topic, r.partition, r.offset): r.timestamp_ms for r in raw
    }
    times: dict[str, tuple[int, int]] = {}
    for record in timeline:
        touchpoint = orjson.loads(record.value or b"{}")
        source = touchpoint.get("source") or {}
        sent = published.get((source.get("topic"), source.get("partition"), source.get("offset")))
        if sent is not None:
            earlier = times.get(touchpoint["event_id"])
            if earlier is None or record.timestamp_ms < earlier[1]:
                times[touchpoint["event_id"]] = (sent, record.timestamp_ms)
    return times


def to_timeline_ms(raw: list[Record], timeline: list[Record]) -> list[float]:
    """Per filed event: its first timeline record's time minus its raw record's publish time."""
    return [float(filed - sent) for sent, filed in filed_times(raw, timeline).values()]


def after_warmup(times: dict[str, tuple[int, int]], seconds: float) -> list[float]:
    """Per event (publish time, timeline time) -> the latencies of those published at least
    `seconds` after the first one (the first second of traffic on a fresh worker is slower:
    README, Performance)."""
    if not times:
        return []
    since = min(sent for sent, _ in times.values()) + seconds * 1000
    return [float(filed - sent) for sent, filed in times.values() if sent >= since]


def to_snapshot_ms(publish_ms: list[int], snapshots: list[Record], key: str) -> list[float]:
    """The k-th accepted event (in publishing order) is taken as reflected by the first
    snapshot of `key` counting at least k events -> per event, that snapshot's time minus its
    publish time. (Events are counted, not named, in a snapshot: this is the one measure.)"""
    ordered = sorted(publish_ms)
    latencies: list[float] = []
    counted = 0
    for record in sorted(snapshots, key=lambda r: r.timestamp_ms):
        if record.key != key.encode() or record.value is None:
            continue
        events = min(int(orjson.loads(record.value)["events"]), len(ordered))
        latencies.extend(record.timestamp_ms - ordered[k] for k in range(counted, events))
        counted = max(counted, events)
    return latencies


POLL_EVERY = 1.0  # seconds; the end of a run is known to within this


def _wait(workers: list[BenchWorker], target: float, within: float) -> float:
    """Poll the workers until their filed events add up to `target` -> seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if sum(w.filed() for w in workers) >= target:
            return time.monotonic() - started
        for w in workers:
            if w.process.poll() is not None:
                raise RuntimeError(f"a bench worker exited with {w.process.returncode}")
        # Each poll is a /metrics scrape, which the measured worker pays for: four a second
        # took 1.3 to 1.7 % of its CPU (a Prometheus server scrapes every 15 to 60 s).
        time.sleep(POLL_EVERY)
    raise TimeoutError(f"not all {target:.0f} events filed within {within:.0f}s")


def _ready(workers: list[BenchWorker], within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    for w in workers:
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{w.http_port}/readyz"
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise TimeoutError("bench worker not ready")


@contextlib.contextmanager
def running(
    bootstrap: str, prefix: str, workers: int, exit_codes: list[int]
) -> Iterator[list[BenchWorker]]:
    """`workers` bench workers on a run's topics, ready (state empty) -> stopped after, their
    exit codes appended to `exit_codes`."""
    with tempfile.TemporaryDirectory(prefix=f"cxpulse-{prefix}-") as tmp:
        env = worker_env(bootstrap, prefix)
        started = [BenchWorker.start(env, Path(tmp), f"w{n}") for n in range(workers)]
        try:
            _ready(started)
            yield started
        finally:
            exit_codes.extend(w.stop() for w in started)


def transport_floor(bootstrap: str, prefix: str, count: int, hops: int) -> dict[str, Any]:
    """The run's `count` raw messages through `hops` forwarding Faust agents with the worker's
    transport, in a child process (`service.floor`) -> its report: what the service could
    reach if its stages did no work."""
    # The bench owns the child's data directory: the child ends with os._exit once it has
    # counted (see service.floor), which would skip its own cleanup.
    with (
        tempfile.TemporaryDirectory(prefix="cxpulse-floor-") as tmp,
        tempfile.TemporaryFile() as log,
    ):
        env = {**worker_env(bootstrap, prefix), "CX_DATA_DIR": tmp}
        done = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
            [sys.executable, "-m", "service.floor", str(count), str(hops)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=max(600.0, count / 50),
            check=False,
        )
        if done.returncode != 0:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"transport floor exited {done.returncode}: {tail}")
    report: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return report


def _run_settings(settings: Settings, bootstrap: str, prefix: str) -> Settings:
    update = {"kafka_bootstrap_servers": bootstrap, "topic_prefix": prefix}
    return settings.model_copy(update=update)


def throughput(
    settings: Settings,
    bootstrap: str,
    count: int,
    workers: int,
    seed: int = 8,
    customers: int | None = None,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """Preload `count` messages (from `customers` people), time the baseline, then `workers`
    workers -> the report; with the embedded broker's `broker_pid`, its CPU as well."""
    prefix = f"bench{int(time.time())}"
    pool = pool_for(count) if customers is None else customers
    batch = messages(count, seed, timedelta(days=3), pool)
    accepted = len({m.event_id for m in batch if m.kind != "bad"})
    published_at = time.monotonic()
    run_settings = _run_settings(settings, bootstrap, prefix)
    asyncio.run(publish(run_settings, batch))
    preload = time.monotonic() - published_at
    base = asyncio.run(baseline(bootstrap, prefix, len(batch)))
    core = core_ceiling(settings, batch)
    codes: list[int] = []
    with running(bootstrap, prefix, workers, codes) as started:
        meter = CpuMeter(started, broker_pid)
        seconds = _wait(started, accepted, within=max(600.0, count / 20))
        cpu = meter.report(accepted)
        peak = max(w.peak_rss_mb() for w in started)
    rate = accepted / seconds
    # After the workers, so that its records in the broker do not slow them.
    floor = transport_floor(bootstrap, prefix, len(batch), FLOOR_HOPS)
    topics = Topics(prefix)
    raw = asyncio.run(read_all(bootstrap, list(topics.raw_topics)))
    timeline = asyncio.run(read_all(bootstrap, [topics.timeline]))
    profiles = asyncio.run(read_all(bootstrap, [topics.profiles]))
    return {
        "mode": "throughput",
        "messages": len(batch),
        "events": accepted,
        # The state the peak RSS was measured with: customers with a record (a profile on
        # the compacted topic, not merged away), of the people the simulator drew from.
        "customers_in_state": live_keys(profiles),
        "customer_pool": pool,
        "workers": workers,
        "preload_seconds": round(preload, 2),
        "seconds": round(seconds, 2),
        "events_per_s": round(rate, 1),
        "peak_rss_mb": round(peak, 1),
        # Steadier than the wall clock on a shared machine: what the workers spent per event.
        # The embedded broker runs on the same cores (None with an external one): the share of
        # the machine's CPU time the workers and it took while measured says whether more
        # workers could have gone faster at all.
        **cpu,
        "baseline": base,
        "ratio_to_baseline": round(rate / base["events_per_s"], 6),
        "core_only": core,
        "transport_floor": floor,
        # Preloaded: an event waits for those before it, so this is mostly queueing.
        "publish_to_timeline": percentiles(to_timeline_ms(raw, timeline), (50, 99)),
        "exit_codes": codes,
        "measured_from": "workers ready (state empty, all input preloaded)",
        "measured_to": "every accepted event filed on its customer's record",
    }


# Events published this long after the first are reported apart as well (steady state).
WARMUP_S = 2.0


def latency(
    settings: Settings, bootstrap: str, rate: float, count: int, broker_pid: int | None = None
) -> dict[str, Any]:
    """One worker; `count` messages published at `rate`/s while it runs -> latency
    percentiles from publish to the timeline record and to the first snapshot counting it."""
    prefix = f"latency{int(time.time())}"
    span = timedelta(seconds=max(60.0, count / rate))  # events happen now, in every window
    batch = messages(count, 13, span)
    accepted = len({m.event_id for m in batch if m.kind != "bad"})
    codes: list[int] = []
    with running(bootstrap, prefix, 1, codes) as started:
        began = time.monotonic()
        meter = CpuMeter(started, broker_pid)
        asyncio.run(publish(_run_settings(settings, bootstrap, prefix), batch, rate=rate))
        published = time.monotonic() - began
        behind = _wait(started, accepted, within=max(600.0, count / 20))
        # from the first message published until the last is filed: the publisher (this
        # process) shares the machine too, and is not counted
        cpu = meter.report(accepted)
        peak = started[0].peak_rss_mb()
        topics = Topics(prefix)
        # Read while the worker still runs: its last snapshots follow within two emit ticks.
        snapshots = asyncio.run(read_all(bootstrap, [topics.metrics], idle=5.0))
    raw = asyncio.run(read_all(bootstrap, list(topics.raw_topics)))
    timeline = asyncio.run(read_all(bootstrap, [topics.timeline]))
    times = filed_times(raw, timeline)  # one pass over the timeline serves both measures
    longest = f"all/{max(WINDOWS, key=WINDOWS.__getitem__)}"
    to_timeline = [float(filed - sent) for sent, filed in times.values()]
    steady = after_warmup(times, WARMUP_S)
    to_snapshot = to_snapshot_ms([sent for sent, _ in times.values()], snapshots, longest)
    points = (50, 99, 99.9)
    return {
        "mode": "latency",
        "rate": rate,
        "messages": len(batch),
        "events": accepted,
        "published_per_s": round(len(batch) / published, 1),
        "caught_up_after_publishing_s": round(behind, 1),
        "publish_to_timeline": {"events": len(to_timeline), **percentiles(to_timeline, points)},
        "publish_to_timeline_after_warmup": {
            "published_after_s": WARMUP_S,
            "events": len(steady),
            **percentiles(steady, points),
        },
        "publish_to_snapshot": {
            "snapshot": longest,
            "events": len(to_snapshot),
            **percentiles(to_snapshot, points),
        },
        **cpu,
        "peak_rss_mb": peak,
        "exit_codes": codes,
    }


def _steady(rate: float, seconds: float, seed: int) -> Iterator[SimMessage]:
    yield from messages(int(rate * seconds), seed, timedelta(hours=24))


def soak(
    settings: Settings, bootstrap: str, rate: float, seconds: float, every: float = 30.0
) -> dict[str, Any]:
    """One worker under `rate` messages/s for `seconds` -> RSS samples and the totals."""
    prefix = f"soak{int(time.time())}"
    run_settings = _run_settings(settings, bootstrap, prefix)
    batch = list(_steady(rate, seconds, seed=12))
    accepted = len({m.event_id for m in batch if m.kind != "bad"})
    samples: list[dict[str, float]] = []
    codes: list[int] = []
    with running(bootstrap, prefix, 1, codes) as [worker]:
        started = time.monotonic()

        async def sample() -> None:
            while True:
                samples.append(
                    {"t": round(time.monotonic() - started, 1), "rss_mb": worker.rss_mb()}
                )
                await asyncio.sleep(every)

        async def run() -> None:
            task = asyncio.create_task(sample())
            try:
                await publish(run_settings, batch, rate=rate)
            finally:
                task.cancel()

        asyncio.run(run())
        lag = _wait([worker], accepted, within=600.0)
        samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": worker.rss_mb()})
        peak = worker.peak_rss_mb()
    rss = [s["rss_mb"] for s in samples]
    return {
        "mode": "soak",
        "rate": rate,
        "seconds": seconds,
        "messages": len(batch),
        "events": accepted,
        "caught_up_after_publishing_s": round(lag, 1),
        "rss_mb": {"start": rss[0], "middle": rss[len(rss) // 2], "end": rss[-1], "peak": peak},
        "samples": samples,
        "exit_code": codes[0],
    }
