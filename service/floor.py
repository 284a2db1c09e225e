"""The transport floor: a bench's raw messages through `hops` Faust agents that only forward
-> what the worker's transport costs with no work at all (events/s, CPU per event).

Each hop is a Faust agent with the worker's own transport (`service.worker.transport`: the
same app settings, hand-off, acknowledgement, pause, yield and fetch-wait patches, and
outbox). Hop 0 reads the raw topics, each hop forwards the value unchanged (key kept) to the
next hop's topic, and the last counts. A worker's event crosses five stages (ingest, accept,
identity, customers, metrics), each a consume and at least one produce, so five hops bound
from above what the service could reach with a free core: `cxpulse bench` reports it beside
`core_only`, the core with no transport.

Run by the bench in a child process (`python -m service.floor COUNT HOPS`, with a bench
worker's CX_ settings and a data directory in CX_DATA_DIR that the bench removes): it prints
one JSON line on stdout, then ends the process (its topics and state are thrown away with the
bench's prefix).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson

from service.bench import status_kb
from service.delivery import mark_handled
from service.settings import Settings, load_settings
from service.topics import Topics
from service.worker import _raw_topic, producer_send, transport


@dataclass
class Tally:
    """What the last hop has counted, and when the first hop took its first message."""

    expected: int
    hops: int
    count: int = 0
    started: float | None = None  # time.monotonic()
    cpu_started: float = 0.0  # time.process_time(): every thread of the process
    report: dict[str, Any] = field(default_factory=dict)

    def first(self) -> None:
        if self.started is None:
            self.started, self.cpu_started = time.monotonic(), time.process_time()

    def counted(self) -> bool:
        """One more at the last hop -> True once all are there (the report is then set)."""
        self.count += 1
        if self.count < self.expected or self.started is None:
            return False
        self.report = floor_report(
            self.count,
            time.monotonic() - self.started,
            time.process_time() - self.cpu_started,
            self.hops,
        )
        return True


def floor_report(events: int, seconds: float, cpu_seconds: float, hops: int) -> dict[str, Any]:
    """Counts and times of a floor run -> its JSON report."""
    per_event_us = cpu_seconds * 1e6 / events
    return {
        "hops": hops,
        "events": events,
        "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds),
        "cpu_us_per_event": round(per_event_us, 1),
        "cpu_us_per_hop": round(per_event_us / hops, 1),
        # VmHWM: getrusage's maximum would carry over the bench's own from before the exec.
        "peak_rss_mb": round(status_kb(os.getpid(), "VmHWM") / 1024, 1),
    }


def _sent(_first: Any, _n: int, exc: BaseException | None) -> None:
    """How a forwarded record ended (the worker's stages look at each the same way): a lost
    one would leave the floor waiting for its last message, so it ends the run."""
    if exc is not None:
        sys.stderr.write(f"floor: a forwarded record was lost: {exc!r}\n")
        os._exit(70)


def build_floor(settings: Settings, expected: int, hops: int) -> faust.App:
    """Settings of the bench's run -> a Faust app of `hops` forwarding agents on the worker's
    transport; the last prints the report and ends the process once `expected` messages
    reached it."""
    app, outbox = transport(settings)
    send = producer_send(outbox)
    prefix = settings.topic_prefix
    sources = [_raw_topic(app, *Topics(prefix).raw_topics)] + [
        _raw_topic(app, f"{prefix}.floor.{hop}", partitions=settings.partitions)
        for hop in range(1, hops)
    ]
    tally = Tally(expected, hops)

    def forward(hop: int) -> Any:
        last = hop == hops - 1

        async def run(stream: faust.StreamT[bytes]) -> None:
            async for event in stream.events():
                message = event.message
                if hop == 0:
                    tally.first()
                if not last:
                    await send(sources[hop + 1], message.key, message.value, None, _sent)
                elif tally.counted():
                    sys.stdout.write(orjson.dumps(tally.report).decode() + "\n")
                    sys.stdout.flush()
                    # Nothing of this run is kept: end here rather than stop every service.
                    os._exit(0)
                mark_handled(message)

        run.__name__ = run.__qualname__ = f"floor{hop}"
        return run

    for hop in range(hops):
        app.agent(sources[hop], name=f"floor{hop}")(forward(hop))
    return app


def main(argv: list[str]) -> int:
    """`python -m service.floor COUNT HOPS` (settings from CX_ variables) -> a JSON line."""
    expected, hops = int(argv[0]), int(argv[1])
    base = load_settings()  # CX_DATA_DIR: a directory the bench made and removes
    settings = base.model_copy(update={"group_id": f"{base.topic_prefix}-floor"})
    app = build_floor(settings, expected, hops)
    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.spinner = None  # it would set the root logger to DEBUG (see faust_worker_for)
    worker.execute_from_commandline()
    return 1  # only a failed start gets here: a finished run ends the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
