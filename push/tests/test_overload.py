"""The node's overload signal (push/cluster/overload.py): a lag of its event loop past
the limit marks it overloaded for the hold, and nothing else does."""

from __future__ import annotations

import asyncio
import time

from push.cluster.overload import PROBE_SECS, LoopLag


def hold_the_loop(secs: float) -> None:
    """Work that keeps the event loop from running anything else (what overload is)."""
    time.sleep(secs)


def test_a_lag_past_the_limit_marks_overload_for_the_hold() -> None:
    lag = LoopLag(limit_secs=0.02, hold_secs=0.05)
    lag.observe(0.019)
    assert not lag.overloaded()
    lag.observe(0.021)
    assert lag.overloaded()
    time.sleep(0.06)
    assert not lag.overloaded()


async def test_a_blocked_loop_is_seen_by_the_probe() -> None:
    lag = LoopLag(limit_secs=0.02, hold_secs=60)
    probe = asyncio.ensure_future(lag.run())
    try:
        await asyncio.sleep(PROBE_SECS / 2)
        hold_the_loop(PROBE_SECS + 0.05)  # the probe wakes 50 ms late
        async with asyncio.timeout(1):
            while not lag.overloaded():
                await asyncio.sleep(0.005)
    finally:
        probe.cancel()


async def test_shedding_counts_only_while_overloaded() -> None:
    lag = LoopLag(limit_secs=0.02, hold_secs=60)
    assert not lag.shed("rest")
    lag.observe(0.05)
    assert lag.shed("rest")


async def test_a_limit_of_zero_turns_the_probe_off() -> None:
    lag = LoopLag(limit_secs=0, hold_secs=60)
    await asyncio.wait_for(lag.run(), 1)
    hold_the_loop(0.05)
    assert not lag.overloaded()
