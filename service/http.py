"""Worker services: HTTP (/healthz, /readyz, /metrics on CX_HTTP_PORT, up from the first
moment of a worker) and the shutdown watchdog."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import mode
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Readiness = Callable[[], bool]


def make_web_app(registry: CollectorRegistry, ready: Readiness) -> web.Application:
    """(metrics registry, readiness probe) -> the aiohttp application."""

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
    return app


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
