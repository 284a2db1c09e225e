"""service/cli.py: the worker process's collector settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.cli import GC_THRESHOLDS

pytestmark = pytest.mark.unit


def test_tune_gc_freezes_what_is_loaded_and_sets_the_thresholds() -> None:
    # In a process of its own: freezing and the thresholds are process-wide.
    probe = (
        "import gc, json; from service.cli import tune_gc; before = gc.get_freeze_count(); "
        "tune_gc(); print(json.dumps([gc.get_threshold(), before, gc.get_freeze_count()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    thresholds, before, after = json.loads(out)
    assert tuple(thresholds) == GC_THRESHOLDS
    assert before == 0
    assert after > 10_000  # every module imported, out of the collector's sight
