"""The hand-off of each fetched record from Faust's consumer to its streams, without a race of
four tasks per record.

Faust's `Consumer._drain_messages` hands every record to the conductor as
`await self.wait_first(callback(message), self.suspend_flow.wait())`: four tasks (the hand-off,
the flow's suspension, the consumer's stop and crash), an `asyncio.wait`, then three
cancellations, so that a hand-off blocked on a full stream buffer gives way when a rebalance
suspends the flow. That cost 47 µs a record here, against 0.14 µs for the hand-off itself,
and each event is consumed about five times on its way through the stages.

A hand-off almost never waits: it puts the record on its streams' queues. So `handoff` runs it
at once, and only one that would wait (a full buffer, flow control, a full producer buffer),
or one that starts while the flow is suspended, goes through Faust's race, from where it
stopped. What the race decides is unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING, Consumer
from mode import Service, ServiceT

# Faust's `_drain_messages`, which `drain` below copies (faust-streaming 0.15.3):
# a Faust that changes it fails tests/unit/test_handoff.py until the copy is checked again.
FAUST_DRAIN_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


def faust_drain_digest() -> str:
    """-> the SHA-256 of the source of Faust's own `Consumer._drain_messages`."""
    original = getattr(Consumer, "_cx_original_drain", Consumer._drain_messages)
    return hashlib.sha256(inspect.getsource(original).encode()).hexdigest()


async def handoff(
    consumer: Service,
    callback: Callable[[Any], Coroutine[Any, Any, None]],
    message: Any,
    suspended: asyncio.Event,
) -> None:
    """Run `callback(message)`; when it would wait, or the flow is suspended, race it against
    the flow's suspension (and the consumer's stop) as Faust does."""
    work = callback(message)
    if suspended.is_set():
        await consumer.wait_first(work, suspended.wait())
        return
    try:
        waiting_on = work.send(None)
    except StopIteration:
        return  # done without waiting: the common case
    await consumer.wait_first(_resume(work, waiting_on), suspended.wait())


async def _resume(work: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Drive a coroutine that stopped at `await waiting_on` to its end, as a task would: wait
    until what it waits on is done, then step it again; a cancellation goes into it."""
    while True:
        try:
            if waiting_on is None:  # a bare yield (sleep(0)): step again on the next turn
                await asyncio.sleep(0)
            else:
                waiting_on._asyncio_future_blocking = False
                await asyncio.wait((waiting_on,))
        except asyncio.CancelledError as exc:
            if waiting_on is not None:
                waiting_on.cancel()
            try:
                waiting_on = work.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting_on = work.send(None)
        except StopIteration:
            return


async def drain(self: Any, fetcher: ServiceT) -> None:  # pragma: no cover - Faust's loop
    """Faust's `Consumer._drain_messages`, with `handoff` in place of its per-record race."""
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = cast(Service, self)._stopped.is_set
    fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

    get_read_offset = self._read_offset.__getitem__
    # delivery's read offsets keep a floor for a message sought back to until it is read
    set_read_offset = getattr(self._read_offset, "read", self._read_offset.__setitem__)
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            ait = cast(AsyncIterator[Any], getmany(timeout=1.0))

            # Sleeping because sometimes getmany is called in a loop
            # never releasing to the event loop
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0

                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        # We have a gap in income messages
                        if gap > 1 and r_offset:
                            acks_enabled = acks_enabled_for(message.topic)
                            if acks_enabled:
                                await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        await handoff(self, callback, message, self.suspend_flow)
                        set_read_offset(tp, offset)
                    else:
                        self.log.dev(
                            "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                            offset,
                            message.key,
                            message.value,
                        )
                unset_flag(flag_consumer_fetching)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)


def install() -> None:
    """Replace Faust's `Consumer._drain_messages` with `drain` (once per process)."""
    if getattr(Consumer, "_cx_original_drain", None) is not None:
        return
    setattr(Consumer, "_cx_original_drain", Consumer._drain_messages)  # noqa: B010
    setattr(Consumer, "_drain_messages", drain)  # noqa: B010 - monkeypatch on purpose
