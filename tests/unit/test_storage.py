"""Local tables across restarts: kept after a clean stop, discarded after any other end."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.storage import CLEAN_STOP, discard_unless_clean, mark_clean_stop

pytestmark = pytest.mark.unit


def _tables(data_dir: Path) -> Path:
    tables = data_dir / "v1" / "tables"
    (tables / "customers-0.db").mkdir(parents=True)
    (tables / "customers-0.db" / "000001.log").write_bytes(b"state")
    return tables


def test_tables_after_a_clean_stop_are_kept(tmp_path: Path) -> None:
    tables = _tables(tmp_path)
    mark_clean_stop(tmp_path)
    assert not discard_unless_clean(tmp_path, tables)
    assert (tables / "customers-0.db" / "000001.log").read_bytes() == b"state"
    assert not (tmp_path / CLEAN_STOP).exists(), "this run must mark its own clean stop"


def test_tables_without_the_mark_are_discarded(tmp_path: Path) -> None:
    tables = _tables(tmp_path)
    assert discard_unless_clean(tmp_path, tables)
    assert not tables.exists()
    assert (tmp_path / "v1").exists(), "only the tables go"


def test_a_crash_after_a_clean_restart_is_caught(tmp_path: Path) -> None:
    tables = _tables(tmp_path)
    mark_clean_stop(tmp_path)
    assert not discard_unless_clean(tmp_path, tables)  # started; then killed: no new mark
    assert discard_unless_clean(tmp_path, tables)


def test_a_first_start_has_nothing_to_discard(tmp_path: Path) -> None:
    assert not discard_unless_clean(tmp_path, tmp_path / "v1" / "tables")
    assert list(tmp_path.iterdir()) == []
