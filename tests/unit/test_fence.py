"""Unit tier: `service.fence.SessionFence`, on a clock the test moves."""

from __future__ import annotations

import pytest

from service.fence import Fenced, SessionFence

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stale_only_after_a_session_without_confirmation() -> None:
    clock = Clock()
    fence = SessionFence(10.0, clock)
    assert not fence.stale()  # not in a group yet: nothing to fence
    fence.confirm()
    clock.now += 10.0
    assert not fence.stale()
    clock.now += 0.5
    assert fence.stale()
    fence.confirm()
    assert not fence.stale()


async def test_wait_returns_once_confirmed_and_raises_on_a_rebalance() -> None:
    clock = Clock()
    fence = SessionFence(1.0, clock)
    fence.confirm()
    clock.now += 5
    polls: list[int] = []

    def rebalancing() -> bool:
        polls.append(1)
        if len(polls) == 3:
            fence.confirm()  # a heartbeat answered meanwhile
        return False

    await fence.wait_current(rebalancing, poll=0)
    assert len(polls) == 3
    clock.now += 5
    with pytest.raises(Fenced):
        await fence.wait_current(lambda: True, poll=0)
