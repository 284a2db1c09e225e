"""The Faust app takes its configuration from Settings only, never from other variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import load_settings
from service.worker import build_worker

pytestmark = pytest.mark.unit


def test_faust_ignores_its_own_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [name for name in os.environ if name.upper().startswith("CX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WEB_PORT", "tcp://10.0.0.7:80")  # Kubernetes, for a service named web
    monkeypatch.setenv("TOPIC_PARTITIONS", "1")
    monkeypatch.setenv("PRODUCER_REQUEST_TIMEOUT", "7")
    settings = load_settings(pii_key="test-pii-key-0123456789", data_dir=tmp_path, partitions=4)
    conf = build_worker(settings).app.conf
    assert conf.topic_partitions == 4
    assert conf.producer_request_timeout == 1200.0  # Faust's default
