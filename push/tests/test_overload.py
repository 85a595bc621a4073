"""The node's overload signal (push/cluster/overload.py): a lag of its event loop past
the limit marks it overloaded for the hold, and nothing else does; newcomers are still
admitted at a bounded rate meanwhile, and subscriptions to channels the node carries
are not deferred."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.test import override_settings

from push.cluster.overload import PROBE_SECS, RELEASED_PER_PROBE, LoopLag
from push.services.runtime import get_node
from push.tests.wsclient import connected_client


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


def test_while_overloaded_newcomers_are_admitted_at_the_admission_rate() -> None:
    lag = LoopLag(limit_secs=0.02, hold_secs=60, admit_per_sec=3)
    assert [lag.shed("websocket") for _ in range(5)] == [False] * 5, "not overloaded"
    lag.observe(0.05)
    # A second's worth at once (the bucket stayed full while the loop kept up), then
    # the rest wait for the refill.
    assert [lag.shed("websocket") for _ in range(5)] == [False, False, False, True, True]
    time.sleep(0.4)  # 1.2 admissions' worth
    assert [lag.shed("sse") for _ in range(2)] == [False, True]


def test_an_admission_rate_of_zero_admits_nobody_while_overloaded() -> None:
    lag = LoopLag(limit_secs=0.02, hold_secs=60, admit_per_sec=0)
    lag.observe(0.05)
    assert lag.shed("rest")


async def test_waiting_work_goes_in_turn_at_the_admission_rate_then_all_at_the_end() -> None:
    lag = LoopLag(limit_secs=0.02, hold_secs=0.3, admit_per_sec=2)
    assert await lag.admitted("subscribe", 1), "not overloaded: at once"
    lag.observe(0.05)
    assert await lag.admitted("subscribe", 1) and await lag.admitted("subscribe", 1), "a burst"
    waiting = [asyncio.ensure_future(lag.admitted("subscribe", 5)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiting)
    await asyncio.sleep(0.5)  # one admission's worth refilled; the overload is not over
    lag.observe(0.05)
    await asyncio.sleep(0)
    assert [w.done() for w in waiting] == [True, False, False], "the oldest first"
    await asyncio.sleep(0.35)  # the hold is over
    lag.observe(0.0)
    assert await asyncio.gather(*waiting) == [True, True, True]


async def test_work_that_waited_too_long_is_refused() -> None:
    lag = LoopLag(limit_secs=0.02, hold_secs=60, admit_per_sec=0)
    lag.observe(0.05)
    assert not await lag.admitted("subscribe", 0.05)
    lag.observe(0.05)  # its turn is dropped, not handed to nobody


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_node")
@override_settings(
    PUSH={"OVERLOAD_LAG_MS": 25, "OVERLOAD_HOLD_SECS": 1, "OVERLOAD_ADMIT_PER_SEC": 0}
)
async def test_an_overloaded_node_defers_anonymous_subscriptions_only_to_channels_it_lacks() -> (
    None
):
    """A channel the node carries costs a subscription neither a broker join nor a read
    of its recent messages, so an anonymous client is let in to it; a new channel's
    subscription waits until the overload is over, and is then answered."""
    node = await get_node()
    first = await connected_client()
    assert (await first.request({"type": "subscribe", "channel": "carried"}))[
        "type"
    ] == "subscribed"
    second = await connected_client()
    node.overload.observe(1.0)
    overloaded_at = time.monotonic()

    joined = await second.request({"type": "subscribe", "channel": "carried"})
    assert joined["type"] == "subscribed"
    assert time.monotonic() - overloaded_at < 0.5
    waited = await second.request({"type": "subscribe", "channel": "not-carried"})
    assert waited["type"] == "subscribed"
    assert time.monotonic() - overloaded_at >= 0.9
    await first.close()
    await second.close()


async def test_a_long_queue_is_let_in_a_probe_at_a_time_after_the_overload() -> None:
    """All at once, a long queue of subscriptions would be one loop turn long enough to
    start the overload again."""
    # A hold long enough for the 120 to start waiting within it on a loaded machine
    # (started after it, each was let in at once, and the test measured nothing).
    hold_secs = 1.0
    lag = LoopLag(limit_secs=0.02, hold_secs=hold_secs, admit_per_sec=0)
    overloaded_at = time.monotonic()
    lag.observe(0.05)
    waiting = [asyncio.ensure_future(lag.admitted("subscribe", 5)) for _ in range(120)]
    await asyncio.sleep(0)  # each has started, and waits
    assert not any(w.done() for w in waiting)
    await asyncio.sleep(max(overloaded_at + hold_secs - time.monotonic(), 0) + 0.01)
    assert not lag.overloaded()
    lag.observe(0.0)
    await asyncio.sleep(0)
    assert sum(w.done() for w in waiting) == RELEASED_PER_PROBE
    lag.observe(0.0)
    lag.observe(0.0)
    assert await asyncio.gather(*waiting) == [True] * 120
