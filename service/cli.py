"""`cxpulse` command line: worker, dev, simulate, bench, schemas, dlq replay, forget."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mode import ServiceT

from service.settings import Settings, SettingsError, load_settings, parse_duration

log = logging.getLogger("cxpulse")

DEV_PII_KEY = "cxpulse-dev-only-key-not-secret"


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"cxpulse: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# The cyclic collector's thresholds for a worker (Python's defaults: 700, 10, 10). Every event
# allocates a few hundred short-lived objects, nearly all freed by reference counting; with a
# young generation of 700 the collector ran ~60 times a second, and each tenth pass moved
# in-flight objects to the middle generation, whose growth set off full collections of the
# whole state. 60 000 messages, one worker, two runs each: 5.5 and 6.0 -> 1.6 s in the
# collector (of ~50 s of CPU); full collections 37-38 -> 10 (those left are Faust's own
# `gc.collect()` at a revoke and at a stop).
GC_THRESHOLDS = (20_000, 20, 10)


def tune_gc() -> None:
    """Leave what lives as long as the process out of the collector's sight, and collect the
    young generation less often (`GC_THRESHOLDS`)."""
    # Everything imported and built so far lives as long as the process: out of the
    # collector's sight, each full collection scans only the state (20 000 messages: 2.7 ->
    # 1.2 s of full collections, each pausing the event loop for ~70 ms instead of ~150 ms).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_worker(settings: Settings, *extra_services: ServiceT) -> int:
    """Run a worker (plus `extra_services`) until SIGTERM/SIGINT -> exit code."""
    from service.kafka import ensure_topics, missing_outputs
    from service.storage import DISCARDED, discard_unless_clean, mark_clean_stop
    from service.worker import build_worker, faust_worker_for

    try:
        worker = build_worker(settings)
    except SettingsError as exc:
        print(f"cxpulse: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.create_topics:
        asyncio.run(ensure_topics(settings))
    elif missing := asyncio.run(missing_outputs(settings)):
        # Checked, not discovered later: a send to a missing topic does not fail, it stalls
        # the whole producer (no commit, hundreds of errors a second) for 20 minutes.
        print(
            f"cxpulse: CX_CREATE_TOPICS=false and these topics do not exist: {', '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    tables_dir = Path(worker.app.conf.tabledir)
    if discard_unless_clean(settings.data_dir, tables_dir):

        async def say_discarded() -> None:  # once the worker's logging is set up
            log.warning(DISCARDED, extra={"tables": str(tables_dir)})

        worker.app.task(say_discarded)
    faust_worker = faust_worker_for(worker, *extra_services)
    code = 0
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        code = int(exc.code or 0)
    if code == 0:
        mark_clean_stop(settings.data_dir, worker.tables)
    return code


def cmd_worker(_: argparse.Namespace) -> int:
    """Join the configured cluster and process until SIGTERM/SIGINT."""
    return run_worker(_settings())


def cmd_schemas(args: argparse.Namespace) -> int:
    """Write schemas/ from the models, or with --check fail when they drift."""
    from service.schemas import drift, write

    directory = Path(args.dir)
    if args.check:
        stale = drift(directory)
        if stale:
            print(f"schemas out of date: {', '.join(stale)} (run `cxpulse schemas`)")
            return 1
        print("schemas up to date")
        return 0
    changed = write(directory)
    print(f"wrote {len(changed)} schema(s) to {directory}" if changed else "schemas up to date")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Publish synthetic journeys to the raw topics."""
    from service.simulate import generate, publish

    settings = _settings()
    messages = generate(
        args.count,
        customers=args.customers,
        seed=args.seed,
        now=datetime.now(UTC),
        span=parse_duration(args.span),
        dup_share=args.dup_share,
        bad_share=args.bad_share,
    )
    started = time.monotonic()
    sent = asyncio.run(publish(settings, messages, rate=args.rate))
    elapsed = time.monotonic() - started
    print(f"published {sent} messages in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):.0f}/s)")
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Re-publish dead letters to their source topics."""
    from service.dlq import replay

    settings = _settings()
    reasons = frozenset(args.reason) if args.reason else None
    report = asyncio.run(
        replay(settings, reasons=reasons, from_beginning=args.from_beginning, dry_run=args.dry_run)
    )
    verb = "would replay" if args.dry_run else "replayed"
    print(f"{verb} {report.replayed} dead letter(s), skipped {report.skipped}: {report.by_topic}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Queue the removal of a customer (timeline, profile, identity links)."""
    from service.forget import request_forget

    settings = _settings()
    asyncio.run(request_forget(settings, args.key))
    print(f"forget queued for {args.key!r}: processed after the events already in flight")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Embedded broker + worker + gentle simulated traffic, in one process, until Ctrl-C."""
    from service.broker import BrokerError, start_broker
    from service.traffic import TrafficService

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    user = _settings()
    try:
        broker = start_broker(args.port, log_file=data_dir / "broker.log")
    except BrokerError as exc:
        print(f"cxpulse dev: {exc}", file=sys.stderr)
        return 1
    try:
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap,
            # The broker is memory-only, so local state from an earlier run would be stale.
            data_dir=data_dir / f"state-{broker.port}",
            pii_key=user.pii_key or DEV_PII_KEY,
            kafka_session_timeout=timedelta(seconds=6),
            kafka_rebalance_timeout=timedelta(seconds=5),
            recovery_consistency_check=False,
            log_format=user.log_format if "log_format" in user.model_fields_set else "text",
        )
        traffic = TrafficService(
            settings, rate=args.rate, count=args.count, customers=args.customers, seed=args.seed
        )
        port, prefix = settings.http_port, settings.topic_prefix
        print(
            "\ncxpulse dev is running (Ctrl-C stops everything)\n"
            f"  broker   {broker.bootstrap}  (embedded Tansu, memory only)\n"
            f"  health   http://127.0.0.1:{port}/healthz   http://127.0.0.1:{port}/readyz\n"
            f"  metrics  http://127.0.0.1:{port}/metrics   http://127.0.0.1:{port}/v1/metrics\n"
            f"  customer http://127.0.0.1:{port}/v1/customers/{{key}}"
            f"  (keys: on {prefix}.timeline)\n"
            f"  traffic  {args.rate:g} simulated messages/s into {prefix}.raw.*\n"
            f"  outputs  {prefix}.timeline, .metrics, .alerts, .identity, .profiles, .deadletter: "
            "read them with "
            f"any Kafka client at {broker.bootstrap}\n",
            flush=True,
        )
        return run_worker(settings, traffic)
    finally:
        broker.stop()
        print("cxpulse dev stopped", flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    """Throughput against a same-run baseline, a latency run or a soak -> one JSON document
    on stdout."""
    from service.bench import latency, soak, throughput
    from service.broker import BrokerError, start_broker

    settings = _settings()
    broker = None
    if "kafka_bootstrap_servers" in settings.model_fields_set:
        bootstrap = settings.kafka_bootstrap_servers
    else:
        try:
            broker = start_broker(log_file=Path(tempfile.gettempdir()) / "cxpulse-bench-broker.log")
        except BrokerError as exc:
            print(f"cxpulse bench: {exc}", file=sys.stderr)
            return 1
        bootstrap = broker.bootstrap
    broker_pid = None if broker is None else broker.process.pid  # its CPU is measured too
    try:
        if args.soak:
            rate = args.rate or 50.0
            report = soak(settings, bootstrap, rate, parse_duration(args.soak).total_seconds())
        elif args.latency:
            rate = args.rate or 5000.0
            report = latency(
                settings,
                bootstrap,
                rate,
                args.events or int(rate * 30),
                broker_pid=broker_pid,
            )
        else:
            report = throughput(
                settings,
                bootstrap,
                args.events or 200_000,
                args.workers,
                customers=args.customers,
                broker_pid=broker_pid,
            )
    finally:
        if broker is not None:
            broker.stop()
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    report["broker"] = "embedded Tansu" if broker is not None else bootstrap
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxpulse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("worker", help="join the configured Kafka cluster and process").set_defaults(
        func=cmd_worker
    )

    dev = sub.add_parser("dev", help="embedded broker + worker + simulated traffic")
    dev.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    dev.add_argument("--rate", type=float, default=20.0, help="simulated messages per second")
    dev.add_argument("--count", type=int, default=1_000_000, help="messages to simulate")
    dev.add_argument("--customers", type=int, default=200)
    dev.add_argument("--seed", type=int, default=1)
    dev.add_argument("--data-dir", default="./data/dev", help="worker state and broker log")
    dev.set_defaults(func=cmd_dev)

    simulate = sub.add_parser("simulate", help="publish realistic synthetic journeys")
    simulate.add_argument("--count", type=int, default=10_000)
    simulate.add_argument("--rate", type=float, default=None, help="messages/s (default: max)")
    simulate.add_argument("--customers", type=int, default=1_000)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--span", default="3d", help="event times spread over this long")
    simulate.add_argument("--dup-share", type=float, default=0.02)
    simulate.add_argument("--bad-share", type=float, default=0.01)
    simulate.set_defaults(func=cmd_simulate)

    forget = sub.add_parser("forget", help="remove a customer (right to be forgotten)")
    forget.add_argument("key", help="customer key or an alias of it")
    forget.set_defaults(func=cmd_forget)

    schemas = sub.add_parser("schemas", help="write (or --check) the JSON Schemas")
    schemas.add_argument("--dir", default="schemas")
    schemas.add_argument("--check", action="store_true", help="fail if schemas/ has drifted")
    schemas.set_defaults(func=cmd_schemas)

    bench = sub.add_parser(
        "bench", help="throughput against a baseline, latency at a rate, or a soak (JSON)"
    )
    bench.add_argument(
        "--events", type=int, default=None, help="messages (default 200000; --latency: 30 s)"
    )
    bench.add_argument("--workers", type=int, default=1, help="workers to run at once")
    bench.add_argument(
        "--customers",
        type=int,
        default=None,
        help="people the messages come from (default: a sixth of them)",
    )
    bench.add_argument(
        "--latency", action="store_true", help="publish at --rate while one worker runs"
    )
    bench.add_argument("--soak", metavar="DURATION", help="soak for this long instead (e.g. 20m)")
    bench.add_argument(
        "--rate", type=float, default=None, help="messages/s (--latency: 5000, --soak: 50)"
    )
    bench.set_defaults(func=cmd_bench)
    dlq = sub.add_parser("dlq", help="dead-letter tools")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    replay = dlq_sub.add_parser("replay", help="re-publish dead letters to their source topic")
    replay.add_argument("--reason", action="append", help="only this reason (repeatable)")
    replay.add_argument("--from-beginning", action="store_true", help="also already replayed")
    replay.add_argument("--dry-run", action="store_true")
    replay.set_defaults(func=cmd_dlq_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command != "worker":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    raise SystemExit(args.func(args))
