"""FiledKeys: the key each recent event was first filed under, in a bounded ring of slots."""

from __future__ import annotations

from typing import Any

import pytest

from service.identity import FiledKeys

pytestmark = pytest.mark.unit


def test_first_key_is_kept_and_a_later_one_ignored() -> None:
    filed = FiledKeys({}, capacity=4)
    assert filed.first("web:1", "anon-a") == "anon-a"
    assert filed.first("web:1", "C1") == "anon-a"
    assert filed.first("web:2", "C1") == "C1"


def test_only_the_last_capacity_events_are_kept() -> None:
    store: dict[str, Any] = {}
    filed = FiledKeys(store, capacity=3)
    for n in range(5):
        filed.first(f"web:{n}", f"k{n}")
    assert sorted(store) == ["e|0", "e|1", "e|2"]  # one slot per kept event
    assert [filed.first(f"web:{n}", "new") for n in range(2, 5)] == ["k2", "k3", "k4"]
    assert filed.first("web:0", "new") == "new"  # forgotten: remembered anew, evicting web:2
    assert filed.first("web:2", "newer") == "newer"


def test_rebuilt_from_the_store_after_a_reset_or_in_another_worker() -> None:
    store: dict[str, Any] = {}
    filed = FiledKeys(store, capacity=3)
    for n in range(4):
        filed.first(f"web:{n}", f"k{n}")
    filed.reset()
    assert filed.first("web:3", "new") == "k3"
    other = FiledKeys(dict(store), capacity=3)
    assert [other.first(f"web:{n}", "new") for n in (1, 2, 3)] == ["k1", "k2", "k3"]
    other.first("web:4", "k4")  # goes on after the newest: the oldest (web:1) makes room
    assert other.first("web:2", "new") == "k2"
    assert other.first("web:1", "new") == "new"


def test_forget_keeps_the_ids_of_the_forgotten_keys_events_without_their_key() -> None:
    store: dict[str, Any] = {}
    filed = FiledKeys(store, capacity=4)
    filed.first("web:1", "anon-a")
    filed.first("web:2", "C1")
    filed.first("web:3", "anon-b")
    filed.forget({"anon-a", "C1"})
    assert store == {
        "e|0": {"id": "web:1", "key": None, "n": 0},
        "e|1": {"id": "web:2", "key": None, "n": 1},
        "e|2": {"id": "web:3", "key": "anon-b", "n": 2},
    }
    assert [filed.forgotten(f"web:{n}") for n in (1, 2, 3, 4)] == [True, True, False, False]
    other = FiledKeys(dict(store), capacity=4)  # rebuilt elsewhere: still forgotten
    assert [other.forgotten(f"web:{n}") for n in (1, 2, 3)] == [True, True, False]
    filed.first("web:4", "k4")
    filed.first("web:5", "k5")  # slot 0 (web:1, forgotten) makes room; web:3 still kept
    assert not filed.forgotten("web:1")
    assert filed.first("web:3", "new") == "anon-b"


def test_a_forgotten_event_filed_again_is_remembered_anew() -> None:
    store: dict[str, Any] = {}
    filed = FiledKeys(store, capacity=4)
    filed.first("web:1", "anon-a")
    filed.forget({"anon-a"})
    assert filed.first("web:1", "anon-z") == "anon-z"
    assert not filed.forgotten("web:1")
    other = FiledKeys(dict(store), capacity=4)  # two slots hold web:1: the newer one counts
    assert other.first("web:1", "new") == "anon-z"
    assert not other.forgotten("web:1")
