"""Kafka tier: identity stitching, customer endpoints, two workers, forget across a restart."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.broker import EmbeddedBroker
from service.forget import request_forget
from service.settings import load_settings
from service.simulate import SimMessage, generate
from tests.kafka.harness import PII_KEY, Scenario, WorkerProcess, publish, read_topic

pytestmark = pytest.mark.kafka

NOW = datetime.now(UTC).replace(microsecond=0)


def _at(minutes: int) -> datetime:
    return NOW - timedelta(hours=2) + timedelta(minutes=minutes)


def _msg(channel: str, body: dict[str, Any], event_id: str) -> SimMessage:
    return SimMessage(channel, None, orjson.dumps(body), "valid", event_id)  # type: ignore[arg-type]


def _journey() -> tuple[list[SimMessage], SimMessage]:
    """One person on four channels whose identifiers only connect through a late sign-in."""
    web = {"type": "page_view", "anonymous_id": "anon-dev-1", "session_id": "s-1"}
    early = [
        _msg("web", {**web, "event_id": "w1", "sent_at": _iso(_at(0))}, "web:w1"),
        _msg("web", {**web, "event_id": "w2", "sent_at": _iso(_at(1))}, "web:w2"),
        _msg(
            "chat",
            {
                "id": "c1", "conversation_id": "conv-1", "event": "rating",
                "timestamp": _ms(_at(5)), "rating": 2,
                "customer": {"visitor_id": "vis-1", "email": " Ana.Perez@Shop.test "},
            },
            "chat:c1",
        ),
        _msg(
            "support",
            {
                "event_id": "t1", "ticket_id": "T-1", "action": "created",
                "occurred_at": _at(10).strftime("%Y-%m-%d %H:%M:%S.000000+00:00"),
                "requester": {"email": "ana.perez@shop.test"},
            },
            "support:t1",
        ),
        _msg(
            "store",
            {
                "txn_id": "p1", "store_id": "st-1", "kind": "purchase", "time": _s(_at(20)),
                "loyalty_card": "LC0099887766", "amount": "42.50", "currency": "EUR",
            },
            "store:p1",
        ),
    ]  # fmt: skip
    linking = _msg(
        "web",
        {
            **web, "event_id": "w3", "type": "sign_in", "sent_at": _iso(_at(30)),
            "user_id": "C-ANA", "email": "ana.perez@shop.test",
        },
        "web:w3",
    )  # fmt: skip
    # The loyalty card meets the customer id at the till, after the sign-in.
    till = _msg(
        "store",
        {
            "txn_id": "p2", "store_id": "st-1", "kind": "purchase", "time": _s(_at(40)),
            "loyalty_card": "LC0099887766", "customer_id": "C-ANA", "amount": "10.00",
            "currency": "EUR",
        },
        "store:p2",
    )  # fmt: skip
    return [*early, till], linking


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _s(moment: datetime) -> int:
    return int(moment.timestamp())


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _json(worker: WorkerProcess, path: str) -> tuple[int, Any]:
    status, body = worker.http(path)
    return status, json.loads(body)


def _wait_for(condition: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_late_linking_event_stitches_one_customer(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    early, linking = _journey()
    worker = WorkerProcess(scenario, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, early))
        before = asyncio.run(
            read_topic(broker.bootstrap, scenario.topic("timeline"), lambda r: len(r) >= 6)
        )
        keys_before = {r.key.decode() for r in before if r.key}
        assert len(keys_before) >= 3, "before the sign-in, the channels do not connect"

        asyncio.run(publish(broker.bootstrap, scenario.prefix, [linking]))
        _wait_for(lambda: _json(worker, "/v1/customers/C-ANA/timeline?limit=100")[0] == 200)
        _wait_for(
            lambda: len(_json(worker, "/v1/customers/C-ANA/timeline?limit=100")[1]["events"]) == 7
        )
        status, timeline = _json(worker, "/v1/customers/C-ANA/timeline?limit=100")
        events = timeline["events"]
        assert {e["event_id"] for e in events} == {m.event_id for m in [*early, linking]}
        assert [e["occurred_at"] for e in events] == sorted(
            (e["occurred_at"] for e in events), reverse=True
        )
        assert all(e["customer_key"] == "C-ANA" for e in events)

        # Every key the events were filed under before now answers as the surviving customer.
        for old in keys_before - {"C-ANA"}:
            status, profile = _json(worker, f"/v1/customers/{old}")
            assert (status, profile["customer_key"]) == (200, "C-ANA")
        status, profile = _json(worker, "/v1/customers/C-ANA")
        assert profile["channels"] == ["web", "chat", "support", "store"]
        assert profile["lifetime_value"] == "52.50"
        assert profile["open_tickets"] == 1
        assert profile["csat_mean"] == 2.0
        assert "low_csat" in profile["churn_risk"]["reasons"]
        assert profile["aliases"] >= 2

        announced = asyncio.run(
            read_topic(
                broker.bootstrap,
                scenario.topic("identity"),
                lambda r: (
                    {json.loads(x.value)["alias"] for x in r if x.value} >= keys_before - {"C-ANA"}
                ),
                within=20,
            )
        )
        merges = [json.loads(r.value) for r in announced if r.value]
        assert {m["alias"] for m in merges} >= keys_before - {"C-ANA"}
        assert all(m["customer_key"] for m in merges)
        assert _json(worker, "/v1/customers/nobody-at-all")[0] == 404

        # Right to be forgotten: gone from state, HTTP and the compacted profiles topic,
        # and still gone after a restart.
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap, topic_prefix=scenario.prefix, pii_key=PII_KEY
        )
        asyncio.run(request_forget(settings, "C-ANA"))
        _wait_for(lambda: _json(worker, "/v1/customers/C-ANA")[0] == 404)
        for old in keys_before:
            assert _json(worker, f"/v1/customers/{old}")[0] == 404
    finally:
        assert worker.stop() == 0, worker.log_tail()

    worker = WorkerProcess(scenario, tmp_path / "worker-2.log").start()
    try:
        worker.wait_ready()
        assert _json(worker, "/v1/customers/C-ANA")[0] == 404
        for old in keys_before:
            assert _json(worker, f"/v1/customers/{old}")[0] == 404
    finally:
        assert worker.stop() == 0, worker.log_tail()
    profiles = asyncio.run(
        read_topic(broker.bootstrap, scenario.topic("profiles"), lambda r: False, within=3)
    )
    last: dict[bytes, bytes | None] = {}
    for record in profiles:
        assert record.key is not None
        last[record.key] = record.value
    assert last[b"C-ANA"] is None, "a tombstone closes the forgotten customer's profile"


def _components(messages: list[SimMessage]) -> set[frozenset[str]]:
    """Reference stitching, independent of the service: union-find over raw identifiers."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    fields = {
        "web": [("customer_id", ("user_id",)), ("email", ("email",)), ("anon", ("anonymous_id",))],
        "chat": [
            ("customer_id", ("customer", "customer_id")),
            ("email", ("customer", "email")),
            ("visitor", ("customer", "visitor_id")),
        ],
        "support": [
            ("customer_id", ("requester", "customer_id")),
            ("email", ("requester", "email")),
        ],
        "store": [("customer_id", ("customer_id",)), ("card", ("loyalty_card",))],
    }
    event_ids: dict[str, str] = {}
    for message in messages:
        if message.kind != "valid" or message.event_id is None:
            continue
        body = orjson.loads(message.value)
        ids = []
        for kind, path in fields[message.channel]:
            value: Any = body
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if value:
                ids.append(f"{kind}:{value.strip().lower() if kind == 'email' else value}")
        for other in ids[1:]:
            parent[find(other)] = find(ids[0])
        event_ids[message.event_id] = ids[0]
    groups: dict[str, set[str]] = {}
    for event_id, identifier in event_ids.items():
        groups.setdefault(find(identifier), set()).add(event_id)
    return {frozenset(group) for group in groups.values()}


def _service_components(
    worker: WorkerProcess, timeline: list[Any]
) -> tuple[set[frozenset[str]], dict[str, str]]:
    surviving: dict[str, str] = {}
    groups: dict[str, set[str]] = {}
    for record in timeline:
        key = record.key.decode()
        if key not in surviving:
            status, body = _json(worker, f"/v1/customers/{key}/timeline?limit=1")
            assert status == 200, (key, body)
            surviving[key] = body["customer_key"]
        event_id = json.loads(record.value)["event_id"]
        groups.setdefault(surviving[key], set()).add(event_id)
    return {frozenset(group) for group in groups.values()}, surviving


def test_two_workers_stitch_like_the_reference(broker: EmbeddedBroker, tmp_path: Path) -> None:
    scenario = Scenario.new(broker, tmp_path)
    messages = list(
        generate(1200, customers=40, seed=21, now=datetime.now(UTC), span=timedelta(hours=12))
    )
    valid = {m.event_id for m in messages if m.kind != "bad"}
    first = WorkerProcess(scenario, tmp_path / "worker-a.log", name="a").start()
    second = WorkerProcess(scenario, tmp_path / "worker-b.log", name="b").start()
    try:
        first.wait_ready()
        second.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        timeline = asyncio.run(
            read_topic(
                broker.bootstrap,
                scenario.topic("timeline"),
                lambda r: len({json.loads(x.value)["event_id"] for x in r}) >= len(valid),
                within=120,
            )
        )
        expected = _components(messages)
        time.sleep(2)  # let the last merges settle
        seen_by_first, keys_first = _service_components(first, timeline)
        seen_by_second, keys_second = _service_components(second, timeline)
        assert seen_by_first == seen_by_second
    finally:
        assert first.stop() == 0, first.log_tail()
        assert second.stop() == 0, second.log_tail()
    assert keys_first == keys_second, "both workers answer every key the same"
    assert seen_by_first == expected
    assert len(expected) < len({r.key for r in timeline}), "the workload does merge customers"
