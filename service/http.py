"""Worker services: HTTP (/healthz, /readyz, /metrics on CX_HTTP_PORT, up from the first
moment of a worker) and the shutdown watchdog."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import mode
from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.timeline import events

Readiness = Callable[[], bool]
MAX_HOPS = 4
_HOPS_HEADER = "X-Cx-Hops"
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000


class Customers(Protocol):
    """What the customer endpoints need from a worker."""

    @property
    def delete_enabled(self) -> bool:
        """Whether DELETE /v1/customers/{key} may forget customers."""

    def owner_url(self, key: str) -> str | None:
        """Base URL of the worker holding `key`, None when it is this one."""

    def record(self, key: str) -> dict[str, Any] | None:
        """The local record of `key`: a customer, {"alias_of": key}, or None."""

    def profile(self, key: str, record: dict[str, Any], now_ms: int) -> dict[str, Any]:
        """A customer's profile as JSON, churn evaluated at `now_ms`."""

    async def forget(self, key: str) -> None:
        """Queue the removal of a customer."""


class Snapshots(Protocol):
    """What GET /v1/metrics needs from a worker."""

    def owner_url(self) -> str | None:
        """Base URL of the worker that merges the metrics, None when it is this one."""

    def snapshots(self) -> list[dict[str, Any]]:
        """The latest snapshot of every scope/window, as JSON."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_web_app(
    registry: CollectorRegistry,
    ready: Readiness,
    customers: Customers | None = None,
    snapshots: Snapshots | None = None,
) -> web.Application:
    """(metrics registry, readiness probe, customer and snapshot access) -> the aiohttp
    application."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        is_ready = ready()
        return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if customers is not None:
        _customer_routes(app, customers)
    if snapshots is not None:
        _snapshot_routes(app, snapshots)
    return app


def _snapshot_routes(app: web.Application, snapshots: Snapshots) -> None:
    async def get_metrics(request: web.Request) -> web.Response:
        owner = snapshots.owner_url()
        hops = _hops(request)
        if owner is not None and hops < MAX_HOPS:
            return await _forward(f"{owner}/v1/metrics", request, hops + 1)
        return web.json_response({"snapshots": snapshots.snapshots()})

    app.router.add_get("/v1/metrics", get_metrics)


def _customer_routes(app: web.Application, customers: Customers) -> None:
    async def find(
        request: web.Request, key: str, suffix: str
    ) -> web.Response | tuple[str, dict[str, Any]]:
        """Follow aliases and owners -> (surviving key, record), or the response to send
        (a forwarded answer, 404, 503)."""
        hops = _hops(request)
        for _ in range(MAX_HOPS * 4):
            owner = customers.owner_url(key)
            if owner is not None:
                if hops >= MAX_HOPS:
                    return _error(503, "customer partitions are moving; retry")
                return await _forward(
                    f"{owner}/v1/customers/{quote(key, safe='')}{suffix}", request, hops + 1
                )
            record = customers.record(key)
            if record is None:
                return _error(404, "unknown customer")
            if "alias_of" not in record:
                return key, record
            key = str(record["alias_of"])
        return _error(503, "alias chain too long")

    async def get_customer(request: web.Request) -> web.Response:
        found = await find(request, request.match_info["key"], "")
        if isinstance(found, web.Response):
            return found
        key, record = found
        now_ms = int(time.time() * 1000)
        return web.json_response(customers.profile(key, record, now_ms))

    async def get_timeline(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"limit must be 1..{MAX_LIMIT}")
        found = await find(request, request.match_info["key"], f"/timeline?limit={limit}")
        if isinstance(found, web.Response):
            return found
        key, record = found
        return web.json_response({"customer_key": key, "events": events(record, key, limit)})

    async def delete_customer(request: web.Request) -> web.Response:
        if not customers.delete_enabled:
            return _error(405, "DELETE is disabled (CX_HTTP_DELETE_ENABLED=false)")
        await customers.forget(request.match_info["key"])
        return web.json_response({"status": "forget queued"}, status=202)

    app.router.add_get("/v1/customers/{key}", get_customer)
    app.router.add_get("/v1/customers/{key}/timeline", get_timeline)
    app.router.add_delete("/v1/customers/{key}", delete_customer)


def _hops(request: web.Request) -> int:
    """How many workers have forwarded this request already (a bad header counts as many)."""
    text = request.headers.get(_HOPS_HEADER, "0")
    return int(text) if text.isdigit() and len(text) < 4 else MAX_HOPS


async def _forward(url: str, request: web.Request, hops: int) -> web.Response:
    """Ask the worker that holds the key; pass its answer through."""
    timeout = ClientTimeout(total=10)
    try:
        async with (
            ClientSession(timeout=timeout) as session,
            session.get(url, headers={_HOPS_HEADER: str(hops)}) as answer,
        ):
            body = await answer.read()
            return web.Response(body=body, status=answer.status, content_type="application/json")
    except (ClientError, TimeoutError) as exc:
        return _error(503, f"owner unreachable: {type(exc).__name__}")


class HttpService(mode.Service):
    """Serves `make_web_app` for the lifetime of a worker."""

    def __init__(self, web_app: web.Application, host: str, port: int) -> None:
        super().__init__()
        self.web_app = web_app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        self._runner = web.AppRunner(self.web_app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.log.info("HTTP on %s:%s", self.host, self.port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class ShutdownWatchdog(mode.Service):
    """Ends the process if a graceful stop takes longer than `timeout` seconds (a broker that
    is gone can hold a final commit forever). Uncommitted input is read again on restart."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    async def on_stop(self) -> None:
        timer = threading.Timer(self.timeout, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        self.log.error("graceful stop took over %ss; exiting now", self.timeout)
        os._exit(1)
