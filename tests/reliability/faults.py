"""Fault injection into a worker process: one stage raises for one event id.

`install()` reads `CXPULSE_TEST_FAULT="{fault}:{event id}"` and patches the named function of
`service` to raise `InjectedFault` whenever it handles that event. A worker process gets it
through a `sitecustomize.py` on its PYTHONPATH (`fault_env`); agent-tier tests use `patch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import service.worker
from service.identity import IdentityGraph
from service.rolling import Merger, PartitionAggregator

if TYPE_CHECKING:  # the worker process that imports this module needs no pytest
    import pytest

ENV = "CXPULSE_TEST_FAULT"
REPO = Path(__file__).resolve().parents[2]
# Fault -> the stage whose code raises. At ingest the message becomes a processing_error dead
# letter and the worker goes on; in any other stage the worker must stop.
FAULTS: dict[str, str] = {
    "parse": "ingest",
    "normalize": "ingest",
    "identity": "identity",
    "timeline": "customers",
    "alerts": "customers",
    "metrics": "metrics",
    "merger": "merger",  # raises for every minute aggregate: agent tier only
}


class InjectedFault(RuntimeError):
    """The unexpected error a test injects."""


def _raise(fault: str, event_id: str) -> NoReturn:
    raise InjectedFault(f"injected {fault} fault for {event_id}")


Setter = Callable[[object, str, Any], None]


def inject(fault: str, event_id: str, setattr_: Setter = setattr) -> None:
    """Make `fault`'s function raise for `event_id` (patched with `setattr_`, e.g. a
    monkeypatch's, so that a test can undo it)."""
    worker: Any = service.worker
    if fault == "parse":
        parse = worker.parse

        def parse_raising(channel: str, value: bytes | None, *args: Any) -> Any:
            result = parse(channel, value, *args)
            if f"{channel}:{getattr(result, 'source_id', '')}" == event_id:
                _raise(fault, event_id)
            return result

        setattr_(worker, "parse", parse_raising)
    elif fault == "normalize":
        normalize = worker.normalize

        def normalize_raising(event: Any, *args: Any) -> Any:
            if f"{event.channel}:{event.source_id}" == event_id:
                _raise(fault, event_id)
            return normalize(event, *args)

        setattr_(worker, "normalize", normalize_raising)
    elif fault == "identity":
        link = IdentityGraph.link

        def link_raising(self: IdentityGraph, identifiers: Any, linking: str) -> Any:
            if linking == event_id:
                _raise(fault, event_id)
            return link(self, identifiers, linking)

        setattr_(IdentityGraph, "link", link_raising)
    elif fault in ("timeline", "alerts"):
        name = "add_event" if fault == "timeline" else "alerts_for"
        original = getattr(worker, name)

        def raising(*args: Any) -> Any:
            result = original(*args)
            if args[1 if fault == "timeline" else 0]["event_id"] == event_id:
                _raise(fault, event_id)
            return result

        setattr_(worker, name, raising)
    elif fault == "metrics":
        apply = PartitionAggregator.apply

        def apply_raising(self: PartitionAggregator, touchpoint: Any) -> Any:
            if touchpoint.event_id == event_id:
                _raise(fault, event_id)
            return apply(self, touchpoint)

        setattr_(PartitionAggregator, "apply", apply_raising)
    elif fault == "merger":

        def receive_raising(self: Merger, *args: Any) -> None:
            _raise(fault, "every minute aggregate")

        setattr_(Merger, "receive", receive_raising)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def install() -> None:
    """Inject the fault named in the environment, if any (from sitecustomize)."""
    spec = os.environ.get(ENV)
    if spec:
        fault, _, event_id = spec.partition(":")
        inject(fault, event_id)


def fault_env(tmp_path: Path, fault: str, event_id: str) -> dict[str, str]:
    """Environment for a WorkerProcess that carries the fault."""
    site = tmp_path / "fault-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "from tests.reliability.faults import install\n\ninstall()\n"
    )
    path = [str(site), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {ENV: f"{fault}:{event_id}", "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def patch(monkeypatch: pytest.MonkeyPatch, fault: str, event_id: str) -> None:
    """`inject` undone at the end of the test."""
    inject(fault, event_id, monkeypatch.setattr)
