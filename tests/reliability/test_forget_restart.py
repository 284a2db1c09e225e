"""Reliability tier: a customer forgotten mid-stream stays forgotten across a restart.

One customer (three keys stitched into one by a late sign-in) is forgotten while other
customers' events keep flowing; then the worker is killed (kill -9; the graceful restart is in
tests/kafka/test_identity_kafka.py). The customer, its aliases and their timelines answer
404; the latest record of each of its keys on the compacted cx.profiles and on the identity
and customer changelogs is a tombstone; everything else is exact. Events of that person
published after the forget start a new customer holding only them (README, "Right to be
forgotten").
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from service.broker import EmbeddedBroker
from service.canonical import Identifier, IdKind
from service.identity import provisional_key
from service.pii import keyed_hash
from service.simulate import Channel, SimMessage, generate
from service.storage import DISCARDED
from tests.kafka.harness import PII_KEY, Scenario, WorkerProcess, publish, read_topic
from tests.reliability.exact import assert_exact

pytestmark = pytest.mark.reliability

GONE = "C-GONE"
ANON_ID, VISITOR_ID = "gone-anon-1", "gone-visitor-1"
EMAIL, CARD = "gone.person@example.net", "LC5550001111"


def _hashed(kind: IdKind, value: str) -> Identifier:
    return Identifier(kind=kind, value=keyed_hash(PII_KEY.encode(), kind, value))


def _member(identifier: Identifier) -> str:
    return f"i|{identifier.kind}|{identifier.value}"


# The keys the person is filed under before the sign-in links them: the web visitor's and the
# chat visitor's (e-mail + visitor id).
WEB_ALIAS = str(provisional_key([_hashed("anonymous_id", ANON_ID)]))
CHAT_ALIAS = str(provisional_key([_hashed("email", EMAIL), _hashed("visitor_id", VISITOR_ID)]))
KEYS = (GONE, WEB_ALIAS, CHAT_ALIAS)
# Identity graph records of the person (see service/identity.py).
GRAPH_KEYS = (
    f"c|{GONE}",
    f"a|{WEB_ALIAS}",
    f"a|{CHAT_ALIAS}",
    *(
        _member(i)
        for i in (
            Identifier(kind="customer_id", value=GONE),
            _hashed("anonymous_id", ANON_ID),
            _hashed("email", EMAIL),
            _hashed("visitor_id", VISITOR_ID),
            _hashed("loyalty_card", CARD),
        )
    ),
)


class Person:
    """The forgotten customer's events, with times and ids of their own."""

    def __init__(self, now: datetime, tag: str) -> None:
        self.at = now - timedelta(hours=2)
        self.tag = tag
        self.count = 0

    def _next(self) -> tuple[str, datetime]:
        self.count += 1
        self.at += timedelta(minutes=3)
        return f"gone-{self.tag}-{self.count}", self.at

    def _message(self, channel: Channel, body: dict[str, Any], source_id: str) -> SimMessage:
        value = orjson.dumps(body)
        return SimMessage(channel, None, value, "valid", f"{channel}:{source_id}")

    def web(self, kind: str = "page_view", **extra: Any) -> SimMessage:
        source_id, at = self._next()
        body = {"event_id": source_id, "type": kind, "anonymous_id": ANON_ID, **extra}
        body["sent_at"] = at.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return self._message("web", body, source_id)

    def chat(self) -> SimMessage:
        source_id, at = self._next()
        customer = {"email": EMAIL.upper(), "visitor_id": VISITOR_ID}
        body = {
            "id": source_id, "conversation_id": f"conv-{source_id}", "event": "rating",
            "timestamp": int(at.timestamp() * 1000), "customer": customer, "rating": 1,
        }  # fmt: skip
        return self._message("chat", body, source_id)

    def store(self, amount: str) -> SimMessage:
        source_id, at = self._next()
        body = {
            "txn_id": source_id, "store_id": "S001", "kind": "purchase",
            "time": int(at.timestamp()), "loyalty_card": CARD, "customer_id": GONE,
            "amount": amount, "currency": "EUR",
        }  # fmt: skip
        return self._message("store", body, source_id)

    def support(self) -> SimMessage:
        source_id, at = self._next()
        body = {
            "event_id": source_id, "ticket_id": f"T-{source_id}", "action": "survey",
            "occurred_at": at.strftime("%Y-%m-%d %H:%M:%S.000000+00:00"),
            "requester": {"email": EMAIL}, "survey": {"csat": 2, "ces": None},
        }  # fmt: skip
        return self._message("support", body, source_id)


def _status(worker: WorkerProcess, path: str) -> int:
    try:
        return worker.http(path)[0]
    except OSError:
        return 0  # busy or restarting: not an answer yet


def _json(worker: WorkerProcess, path: str) -> Any:
    status, body = worker.http(path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def _wait_for(
    condition: Callable[[], bool],
    what: str,
    within: float = 30.0,
    seen: Callable[[], object] | None = None,
) -> float:
    """Poll `condition` -> seconds it took; on timeout the error shows what `seen` returns."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    shown = "" if seen is None else f"; last seen: {seen()!r}"
    raise AssertionError(f"{what}: not within {within}s{shown}")


def _gone(worker: WorkerProcess) -> bool:
    return all(
        _status(worker, f"/v1/customers/{key}{suffix}") == 404
        for key in KEYS
        for suffix in ("", "/timeline")
    )


def _timeline_ids(worker: WorkerProcess, key: str) -> set[str]:
    status, body = worker.http(f"/v1/customers/{key}/timeline?limit=1000")
    return {e["event_id"] for e in json.loads(body)["events"]} if status == 200 else set()


def _text_key(key: bytes | None) -> str:
    """A record key -> its text; Faust changelogs carry the table keys JSON-encoded."""
    raw = key or b""
    return str(orjson.loads(raw)) if raw.startswith(b'"') else raw.decode()


def _latest(records: list[ConsumerRecord[bytes, bytes]]) -> dict[str, bytes | None]:
    """Compacted view: the last value per key."""
    return {_text_key(r.key): r.value for r in records}


def _assert_tombstones(scenario: Scenario, topic: str, keys: tuple[str, ...]) -> None:
    """The latest record of every key on `topic` is a tombstone (a value-less record)."""
    records = asyncio.run(
        read_topic(
            scenario.broker.bootstrap,
            topic,
            lambda r: all(k in _latest(r) and _latest(r)[k] is None for k in keys),
            within=20,
        )
    )
    latest = _latest(records)
    assert {k: latest.get(k, b"<none>") for k in keys} == dict.fromkeys(keys), topic


def _publish_in_background(scenario: Scenario, messages: list[SimMessage]) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: asyncio.run(publish(scenario.broker.bootstrap, scenario.prefix, messages))
    )
    thread.start()
    return thread


def _forget_over_http(worker: WorkerProcess, key: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{worker.http_port}/v1/customers/{key}", method="DELETE"
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - http://
        assert response.status == 202


def _forget_with_cli(scenario: Scenario, key: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service", "forget", key],
        env=scenario.env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()


def _run(broker: EmbeddedBroker, tmp_path: Path, stop: signal.Signals, seed: int) -> None:
    started = time.monotonic()
    scenario = Scenario.new(broker, tmp_path)
    now = datetime.now(UTC)
    others = list(
        generate(500, customers=50, seed=seed, now=now, span=timedelta(hours=12),
                 dup_share=0.03, bad_share=0.03)
    )  # fmt: skip
    person = Person(now, "before")
    early = [person.web(), person.chat()]
    linking = person.web("sign_in", user_id=GONE, email=f" {EMAIL} ")
    late = [person.store("30.00"), person.support(), person.web()]
    mine = [*early, linking, *late]
    env = {"CX_EMIT_INTERVAL": "500ms", "CX_HTTP_DELETE_ENABLED": "true"}
    worker = WorkerProcess(scenario, tmp_path / "w1.log", **env).start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, [*others[:250], *early]))
        # The person has two keys before the sign-in links them.
        _wait_for(
            lambda: all(_status(worker, f"/v1/customers/{k}") == 200 for k in KEYS[1:]), "pre"
        )
        asyncio.run(publish(broker.bootstrap, scenario.prefix, [linking, *late]))
        wanted = {m.event_id for m in mine}
        _wait_for(lambda: _timeline_ids(worker, CHAT_ALIAS) == wanted, "stitched")
        assert _json(worker, f"/v1/customers/{WEB_ALIAS}")["customer_key"] == GONE
        assert _json(worker, f"/v1/customers/{GONE}")["aliases"] == 2

        # Forget while the other customers' events flow.
        flowing = _publish_in_background(scenario, others[250:])
        forget_started = time.monotonic()
        if stop is signal.SIGTERM:
            _forget_over_http(worker, WEB_ALIAS)  # an alias names the customer too
        else:
            _forget_with_cli(scenario, GONE)
        _wait_for(lambda: _gone(worker), "forgotten")
        forgotten_in = time.monotonic() - forget_started
        if stop is signal.SIGKILL:
            assert worker.stop(signal.SIGKILL) == -signal.SIGKILL  # with events still flowing
        flowing.join(timeout=60)
        assert not flowing.is_alive()
    finally:
        if stop is signal.SIGTERM:
            assert worker.stop() == 0, worker.log_tail()
        else:
            worker.stop(signal.SIGKILL)

    restarted = time.monotonic()
    worker = WorkerProcess(scenario, tmp_path / "w2.log", **env).start()
    try:
        worker.wait_ready()
        ready_in = time.monotonic() - restarted
        # The customer stage may read again commands it had not committed, the person's last
        # events among them; the forget commands after them on the same partitions follow.
        _wait_for(lambda: _gone(worker), "forgotten after the restart", within=15)
        # Killed, the first worker may have lost changelog records its local tables kept.
        assert DISCARDED in (tmp_path / "w2.log").read_text(), "local tables not rebuilt"
        group = f"{scenario.prefix}-cxpulse"
        _assert_tombstones(scenario, scenario.topic("profiles"), KEYS)
        _assert_tombstones(scenario, f"{group}-customers-changelog", KEYS)
        _assert_tombstones(scenario, f"{group}-identity-changelog", GRAPH_KEYS)

        # The person comes back: a new customer holding only the new events.
        after = Person(now, "after")
        fresh = [after.web("sign_in", user_id=GONE, email=EMAIL), after.store("5.00")]
        asyncio.run(publish(broker.bootstrap, scenario.prefix, fresh))
        _wait_for(
            lambda: _timeline_ids(worker, GONE) == {m.event_id for m in fresh},
            "fresh",
            seen=lambda: {k: _timeline_ids(worker, k) for k in KEYS},
        )
        profile = _json(worker, f"/v1/customers/{GONE}")
        assert (profile["aliases"], profile["lifetime_value"]) == (0, "5.00"), profile
        assert sum(profile["event_counts"].values()) == 2, profile
        assert profile["csat_mean"] is None, profile
        assert _status(worker, f"/v1/customers/{WEB_ALIAS}") == 404, "the old alias is gone"
        assert _status(worker, f"/v1/customers/{CHAT_ALIAS}") == 404

        # Everything else is exact, and every other customer still answers.
        assert_exact(scenario, [*others, *mine, *fresh])
        timeline = asyncio.run(
            read_topic(broker.bootstrap, scenario.topic("timeline"), lambda r: False, within=2)
        )
        keys = {(r.key or b"").decode() for r in timeline} - set(KEYS)
        assert len(keys) >= 20, "other customers were filed"
        missing = [k for k in sorted(keys) if _status(worker, f"/v1/customers/{k}") != 200]
        assert not missing, missing[:5]
    finally:
        assert worker.stop() == 0, worker.log_tail()
    print(
        f"\nforget + {stop.name}: forgotten in {forgotten_in:.1f}s, ready again in "
        f"{ready_in:.1f}s, total {time.monotonic() - started:.1f}s"
    )


def test_forget_then_kill_9(broker: EmbeddedBroker, tmp_path: Path) -> None:
    _run(broker, tmp_path, signal.SIGKILL, seed=19)
