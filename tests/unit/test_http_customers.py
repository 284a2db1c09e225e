"""The customer endpoints (contract section 8): profile, timeline, DELETE, aliases answered as
their surviving key, and forwarding to the worker that holds a key."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from prometheus_client import CollectorRegistry

from service import profile as profiles
from service.canonical import Ratings, Source, Touchpoint
from service.http import make_web_app
from service.timeline import Bounds, add_event

pytestmark = pytest.mark.unit

T0 = datetime(2026, 2, 2, 9, 0, tzinfo=UTC)
BOUNDS = Bounds(max_events=1000, max_age=timedelta(days=3650))
HOPS = "X-Cx-Hops"


def tp(n: int, channel: str = "web", kind: str = "page_view", **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event_id": f"{channel}:{n}",
        "channel": channel,
        "kind": kind,
        "occurred_at": T0 + timedelta(minutes=n),
        "customer_key": "anon-provisional",
        "thread_id": None,
        "ratings": Ratings(nps=None, csat=None, ces=None),
        "text": None,
        "sentiment": None,
        "amount": None,
        "currency": None,
        "source": Source(topic=f"cx.raw.{channel}", partition=0, offset=n),
    }
    return Touchpoint(**(fields | extra)).model_dump(mode="json")


def record_of(*touchpoints: dict[str, Any], aliases: int = 0) -> dict[str, Any]:
    record: dict[str, Any] | None = None
    for touchpoint in touchpoints:
        record, _ = add_event(record, touchpoint, BOUNDS)
    assert record is not None
    return record | {"aliases": aliases}


class FakeCustomers:
    """The `Customers` protocol over plain dicts, recording what it was asked."""

    def __init__(self, records: dict[str, dict[str, Any]], delete_enabled: bool = False) -> None:
        self.records = records
        self.owners: dict[str, str] = {}
        self.delete_enabled = delete_enabled
        self.forgotten: list[str] = []
        self.now_ms: list[int] = []
        self.asked: list[str] = []

    def owner_url(self, key: str) -> str | None:
        return self.owners.get(key)

    def record(self, key: str) -> dict[str, Any] | None:
        self.asked.append(key)
        return self.records.get(key)

    def profile(self, key: str, record: dict[str, Any], now_ms: int) -> dict[str, Any]:
        self.now_ms.append(now_ms)
        state = record["profile"]
        view = profiles.profile(key, state, int(record["aliases"]), state["last"])
        return view.model_dump(mode="json")

    async def forget(self, key: str) -> None:
        self.forgotten.append(key)


def client_for(customers: FakeCustomers) -> TestClient[web.Request, web.Application]:
    return TestClient(TestServer(make_web_app(CollectorRegistry(), lambda: True, customers)))


ANA = record_of(
    tp(1),
    tp(2, "store", "purchase", amount="12.50", currency="EUR", thread_id="txn-2"),
    tp(3, "chat", "survey_response", ratings=Ratings(nps=None, csat=4, ces=None)),
    tp(4, "web", "survey_response", ratings=Ratings(nps=9, csat=None, ces=None)),
    aliases=2,
)


async def test_profile() -> None:
    customers = FakeCustomers({"C1": ANA})
    async with client_for(customers) as client:
        before = time.time() * 1000
        answer = await client.get("/v1/customers/C1")
        after = time.time() * 1000
        assert answer.status == 200
        body = await answer.json()
    assert body["customer_key"] == "C1"
    assert body["aliases"] == 2
    assert body["event_counts"] == {"web": 2, "chat": 1, "support": 0, "store": 1}
    assert body["channels"] == ["web", "chat", "store"]
    assert body["lifetime_value"] == "12.50"
    assert (body["last_nps"], body["csat_mean"]) == (9, 4.0)
    assert body["first_seen"] == "2026-02-02T09:01:00.000Z"
    assert body["last_seen"] == "2026-02-02T09:04:00.000Z"
    # Churn is evaluated at the time of the request.
    (now_ms,) = customers.now_ms
    assert before - 1 <= now_ms <= after + 1


async def test_alias_is_answered_as_its_surviving_key() -> None:
    records = {"C1": ANA, "anon-b": {"alias_of": "C1"}, "anon-a": {"alias_of": "anon-b"}}
    async with client_for(FakeCustomers(records)) as client:
        for key in ("anon-a", "anon-b"):
            answer = await client.get(f"/v1/customers/{key}")
            assert answer.status == 200
            assert (await answer.json())["customer_key"] == "C1"
            timeline = await client.get(f"/v1/customers/{key}/timeline")
            assert timeline.status == 200
            body = await timeline.json()
            assert body["customer_key"] == "C1"
            assert [e["event_id"] for e in body["events"]] == [
                "web:4",
                "chat:3",
                "store:2",
                "web:1",
            ]
            assert {e["customer_key"] for e in body["events"]} == {"C1"}


async def test_unknown_customer_is_404() -> None:
    records = {"C1": ANA, "anon-gone": {"alias_of": "C-forgotten"}}
    async with client_for(FakeCustomers(records)) as client:
        for path in (
            "/v1/customers/nobody",
            "/v1/customers/nobody/timeline",
            "/v1/customers/anon-gone",  # an alias of a customer since forgotten
        ):
            answer = await client.get(path)
            assert answer.status == 404, path
            assert "error" in await answer.json()


async def test_alias_loop_is_503_not_a_hang() -> None:
    records = {"anon-a": {"alias_of": "anon-b"}, "anon-b": {"alias_of": "anon-a"}}
    async with client_for(FakeCustomers(records)) as client:
        answer = await client.get("/v1/customers/anon-a")
        assert answer.status == 503


async def test_timeline_limit() -> None:
    many = record_of(*(tp(n) for n in range(60)))
    async with client_for(FakeCustomers({"C1": many})) as client:
        default = await (await client.get("/v1/customers/C1/timeline")).json()
        assert len(default["events"]) == 50
        assert [e["event_id"] for e in default["events"]] == [f"web:{n}" for n in range(59, 9, -1)]
        assert default["customer_key"] == "C1"
        assert {e["customer_key"] for e in default["events"]} == {"C1"}

        three = await client.get("/v1/customers/C1/timeline", params={"limit": "3"})
        assert three.status == 200
        assert [e["event_id"] for e in (await three.json())["events"]] == [
            "web:59",
            "web:58",
            "web:57",
        ]
        everything = await client.get("/v1/customers/C1/timeline", params={"limit": "1000"})
        assert len((await everything.json())["events"]) == 60
        one = await (await client.get("/v1/customers/C1/timeline?limit=1")).json()
        assert one["events"][0] == {**many["timeline"][0], "customer_key": "C1"}

        for bad in ("0", "-1", "1001", "ten", "", "2.5"):
            answer = await client.get("/v1/customers/C1/timeline", params={"limit": bad})
            assert answer.status == 400, bad
            assert "limit" in (await answer.json())["error"]


async def test_delete_disabled_is_405() -> None:
    customers = FakeCustomers({"C1": ANA}, delete_enabled=False)
    async with client_for(customers) as client:
        answer = await client.delete("/v1/customers/C1")
        assert answer.status == 405
    assert customers.forgotten == []


async def test_delete_enabled_queues_forget() -> None:
    customers = FakeCustomers({"C1": ANA}, delete_enabled=True)
    async with client_for(customers) as client:
        answer = await client.delete("/v1/customers/C1")
        assert answer.status == 202
        assert (await answer.json())["status"]
        assert customers.forgotten == ["C1"]
        # Still readable until the forget has gone through the pipeline.
        assert (await client.get("/v1/customers/C1")).status == 200


# ---------------------------------------------------------------------------- forwarding

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def app_recording_hops(customers: FakeCustomers, seen: list[str | None]) -> web.Application:
    app = make_web_app(CollectorRegistry(), lambda: True, customers)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.headers.get(HOPS))
        return await handler(request)

    app.middlewares.append(record)
    return app


def base_url(server: BaseTestServer) -> str:
    return f"http://{server.host}:{server.port}"


async def test_forwarded_to_the_owner() -> None:
    owner_seen: list[str | None] = []
    owner = FakeCustomers({"C1": ANA, "anon-b": {"alias_of": "C1"}})
    front = FakeCustomers({})
    async with TestServer(app_recording_hops(owner, owner_seen)) as owner_server:
        front.owners = {"C1": base_url(owner_server), "anon-b": base_url(owner_server)}
        async with client_for(front) as client:
            answer = await client.get("/v1/customers/C1")
            assert answer.status == 200
            assert answer.content_type == "application/json"
            body = await answer.json()
            assert body["customer_key"] == "C1"
            assert body["lifetime_value"] == "12.50"
            assert owner_seen == ["1"]

            # A caller that is itself a forwarder: the count goes on from its header.
            again = await client.get("/v1/customers/C1", headers={HOPS: "2"})
            assert again.status == 200
            assert owner_seen == ["1", "3"]

            timeline = await client.get("/v1/customers/anon-b/timeline", params={"limit": "2"})
            assert timeline.status == 200
            body = await timeline.json()
            assert body["customer_key"] == "C1"
            assert [e["event_id"] for e in body["events"]] == ["web:4", "chat:3"]
            assert owner_seen[-1] == "1"

            missing = await client.get("/v1/customers/C1/timeline", params={"limit": "0"})
            assert missing.status == 400  # checked before forwarding
    assert front.asked == []  # the front never looked in its own records
    assert owner.asked.count("anon-b") == 1


async def test_alias_whose_survivor_lives_elsewhere_is_forwarded() -> None:
    owner = FakeCustomers({"C1": ANA})
    front = FakeCustomers({"anon-b": {"alias_of": "C1"}})
    seen: list[str | None] = []
    async with TestServer(app_recording_hops(owner, seen)) as owner_server:
        front.owners = {"C1": base_url(owner_server)}
        async with client_for(front) as client:
            answer = await client.get("/v1/customers/anon-b/timeline?limit=1")
            assert answer.status == 200
            body = await answer.json()
    assert body["customer_key"] == "C1"
    assert [e["event_id"] for e in body["events"]] == ["web:4"]
    assert owner.asked == ["C1"]
    assert seen == ["1"]


async def test_forwarded_key_is_quoted() -> None:
    key = "cust 7/é"
    owner = FakeCustomers({key: ANA})
    front = FakeCustomers({})
    async with TestServer(app_recording_hops(owner, [])) as owner_server:
        front.owners = {key: base_url(owner_server)}
        async with client_for(front) as client:
            answer = await client.get("/v1/customers/cust%207%2F%C3%A9")
            assert answer.status == 200
            assert (await answer.json())["customer_key"] == key


async def test_owner_answer_passes_through() -> None:
    owner = FakeCustomers({})
    front = FakeCustomers({})
    async with TestServer(app_recording_hops(owner, [])) as owner_server:
        front.owners = {"C404": base_url(owner_server)}
        async with client_for(front) as client:
            answer = await client.get("/v1/customers/C404")
            assert answer.status == 404
            assert "error" in await answer.json()


async def test_hop_limit_gives_503() -> None:
    owner_seen: list[str | None] = []
    owner = FakeCustomers({"C1": ANA})
    front = FakeCustomers({})
    async with TestServer(app_recording_hops(owner, owner_seen)) as owner_server:
        front.owners = {"C1": base_url(owner_server)}
        async with client_for(front) as client:
            answer = await client.get("/v1/customers/C1", headers={HOPS: "4"})
            assert answer.status == 503
            assert "error" in await answer.json()
            assert owner_seen == []
            assert (await client.get("/v1/customers/C1", headers={HOPS: "3"})).status == 200
            assert owner_seen == ["4"]


async def test_owners_pointing_at_each_other_give_503() -> None:
    """Two workers that each think the other holds the key (a rebalance in progress)."""
    seen_a: list[str | None] = []
    seen_b: list[str | None] = []
    a, b = FakeCustomers({}), FakeCustomers({})
    async with (
        TestServer(app_recording_hops(a, seen_a)) as server_a,
        TestServer(app_recording_hops(b, seen_b)) as server_b,
    ):
        a.owners = {"C1": base_url(server_b)}
        b.owners = {"C1": base_url(server_a)}
        client: TestClient[web.Request, Any] = TestClient(server_a)
        async with client:
            answer = await client.get("/v1/customers/C1")
            assert answer.status == 503
    assert seen_a == [None, "2", "4"]
    assert seen_b == ["1", "3"]


async def test_unreachable_owner_is_503() -> None:
    front = FakeCustomers({})
    async with TestServer(web.Application()) as gone:
        url = base_url(gone)
    front.owners = {"C1": url}  # the server is closed: connection refused
    async with client_for(front) as client:
        answer = await client.get("/v1/customers/C1")
        assert answer.status == 503
        assert "unreachable" in (await answer.json())["error"]


async def test_malformed_hops_header_is_not_a_server_error() -> None:
    async with client_for(FakeCustomers({"C1": ANA})) as client:
        answer = await client.get("/v1/customers/C1", headers={HOPS: "x"})
        assert answer.status < 500
