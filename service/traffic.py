"""Simulated traffic as a service that runs beside a worker (`cxpulse dev`)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import mode

from service.settings import Settings
from service.simulate import generate, publish

log = logging.getLogger(__name__)


class TrafficService(mode.Service):
    """Publishes `count` simulated messages at `rate`/s while the worker runs."""

    def __init__(
        self, settings: Settings, *, rate: float, count: int, customers: int, seed: int
    ) -> None:
        super().__init__()
        self.settings = settings
        self.rate = rate
        self.count = count
        self.customers = customers
        self.seed = seed

    @mode.Service.task
    async def _traffic(self) -> None:
        # Let the worker create topics and join its group before traffic starts.
        await self.sleep(2.0)
        messages = generate(
            self.count,
            customers=self.customers,
            seed=self.seed,
            now=datetime.now(UTC),
            span=timedelta(hours=6),
        )
        try:
            sent = await publish(self.settings, messages, rate=self.rate)
            log.info("simulated traffic done: %d messages", sent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("simulated traffic stopped: %r", exc)

    def __repr__(self) -> str:
        return f"TrafficService(rate={self.rate}, count={self.count})"
