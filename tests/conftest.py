"""Shared fixtures: the embedded Tansu broker (session-wide, started only when asked for)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.broker import EmbeddedBroker, start_broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (Tansu, memory only) on a free loopback port."""
    log_dir: Path = tmp_path_factory.mktemp("broker")
    running = start_broker(log_file=log_dir / "tansu.log")
    yield running
    running.stop()
