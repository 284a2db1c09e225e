"""Settings for a worker built without a broker: defaults only (the environment's `CX_*`
variables removed, so they cannot change topic names), a test PII key and data directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings, load_settings


def offline_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Settings:
    """-> Settings for a worker whose broker is never reached (`localhost:1`)."""
    for name in [name for name in os.environ if name.upper().startswith("CX_")]:
        monkeypatch.delenv(name)
    return load_settings(
        kafka_bootstrap_servers="localhost:1",
        pii_key="test-pii-key-0123456789",
        data_dir=tmp_path,
        **overrides,
    )
