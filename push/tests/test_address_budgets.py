"""The per-address budget table (push/cluster/address_budgets.py) without a node: its
buckets, its keys, and that it stays bounded under a flood of made-up addresses.
Refusals as clients see them are tested against real nodes in
tests/test_address_budgets.py."""

from __future__ import annotations

import asyncio
import sys

import pytest

from common.addresses import address_block
from push.cluster.address_budgets import (
    AddressBudgets,
    Budget,
    ByteBucket,
    NoLimit,
    subscription_allowed,
)
from push.transport.limits import AddressBoundRate, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock, *, max_entries: int = 1000, **budgets: Budget) -> AddressBudgets:
    defaults = {
        "handshakes": Budget(3, 1),
        "frames": Budget(10, 5),
        "subscribes": Budget(4, 2),
        "rest": Budget(2, 1),
        "history_bytes": Budget(1000, 1000),
        "frame_bytes": Budget(1000, 1000),
    }
    return AddressBudgets(**{**defaults, **budgets}, max_entries=max_entries, clock=clock)


def test_handshakes_are_a_budget_per_address_that_refills() -> None:
    clock = Clock()
    budgets = table(clock)
    assert [budgets.handshake_allowed("192.0.2.1") for _ in range(4)] == [True] * 3 + [False]
    assert budgets.handshake_allowed("192.0.2.2")
    clock.now += 1.0
    assert budgets.handshake_allowed("192.0.2.1")
    assert not budgets.handshake_allowed("192.0.2.1")


def test_rest_refusal_says_how_long_to_wait() -> None:
    clock = Clock()
    budgets = table(clock)
    assert budgets.rest_refused("192.0.2.1") is None
    assert budgets.rest_refused("192.0.2.1") is None
    assert budgets.rest_refused("192.0.2.1") == pytest.approx(1.0)
    clock.now += 0.5
    assert budgets.rest_refused("192.0.2.1") == pytest.approx(0.5)


async def test_history_bytes_are_charged_once_read_and_refused_while_in_debt() -> None:
    """A page's size is known once it is read: the address reads while it has budget
    left, may go below zero by that page, and waits until it refilled past zero."""
    clock = Clock()
    budgets = table(clock)

    async def refused(address: str = "192.0.2.1") -> float | None:
        retry_after = await budgets.history_admitted(address, 0, patience=1.0)
        budgets.history_read(address, 0)
        return retry_after

    assert await refused() is None
    budgets.history_read("192.0.2.1", 900)
    assert await refused() is None
    budgets.history_read("192.0.2.1", 400)  # 1000 - 900 - 400: 300 in debt
    assert await refused() == pytest.approx(0.301)
    assert await refused("192.0.2.2") is None
    clock.now += 0.3
    assert await refused() == pytest.approx(0.001)
    clock.now += 0.002
    assert await refused() is None
    clock.now += 3600
    budgets.history_read("192.0.2.1", 1000)  # the refill stops at the burst
    assert await refused() is not None


async def test_history_reads_in_flight_together_wait_for_room_in_the_budget() -> None:
    """Each read reserves its most while it is in flight: reads started before any
    finished cannot take the budget many times over; the others wait for one to
    finish instead of being refused, and a read gives back what it did not use."""
    clock = Clock()
    budgets = table(clock)  # 1,000 bytes at once
    admissions = [
        asyncio.ensure_future(budgets.history_admitted("192.0.2.1", 400, patience=5.0))
        for _ in range(5)
    ]
    await asyncio.sleep(0.01)  # let in while there is room: 1,000 - 800 held
    assert [a.done() for a in admissions] == [True, True, True, False, False]
    budgets.history_read("192.0.2.1", 100, reserved=400)  # 1,000 - 100 - 800 held
    await asyncio.sleep(0.01)
    assert [a.done() for a in admissions] == [True, True, True, True, False]
    budgets.history_read("192.0.2.1", 100, reserved=400)
    budgets.history_read("192.0.2.1", 100, reserved=400)  # 700 left, 0 held
    assert await asyncio.gather(*admissions) == [None] * 5
    entry = budgets.get("192.0.2.1")
    assert entry is not None and isinstance(entry.history_bytes, ByteBucket)
    assert entry.history_bytes.reserved == 800
    budgets.history_read("192.0.2.1", 0, reserved=10_000)  # more given back than held
    assert (entry.history_bytes.reserved, entry.history_bytes.tokens) == (0, 700)


async def test_a_history_read_waiting_for_room_is_refused_after_its_patience() -> None:
    budgets = table(Clock())
    assert await budgets.history_admitted("192.0.2.1", 1000, patience=0.05) is None
    assert await budgets.history_admitted("192.0.2.1", 1000, patience=0.05) == 0.05


async def test_a_history_read_whose_client_left_while_waiting_holds_nothing() -> None:
    """A client that leaves while its read waits for room (the view is cancelled) takes
    no reservation: the budget is as the reads in flight left it."""
    budgets = table(Clock())
    assert await budgets.history_admitted("192.0.2.1", 1000, patience=5.0) is None
    waiting = asyncio.ensure_future(budgets.history_admitted("192.0.2.1", 1000, patience=5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    budgets.history_read("192.0.2.1", 100, reserved=1000)
    entry = budgets.get("192.0.2.1")
    assert entry is not None and isinstance(entry.history_bytes, ByteBucket)
    assert (entry.history_bytes.reserved, entry.history_bytes.tokens) == (0, 900)


async def test_a_history_read_is_refused_at_once_while_its_address_is_in_debt() -> None:
    budgets = table(Clock())
    assert await budgets.history_admitted("192.0.2.1", 500, patience=60) is None
    budgets.history_read("192.0.2.1", 1500, reserved=500)
    assert await asyncio.wait_for(
        budgets.history_admitted("192.0.2.1", 500, patience=60), 1.0
    ) == pytest.approx(0.501)


def test_no_address_and_a_zero_rate_budget_nothing() -> None:
    budgets = table(Clock(), handshakes=Budget(1, 0))
    assert budgets.get(None) is None
    assert all(budgets.handshake_allowed("192.0.2.1") for _ in range(100))
    assert all(budgets.rest_refused(None) is None for _ in range(100))
    entry = budgets.get("192.0.2.1")
    assert entry is not None and isinstance(entry.handshakes, NoLimit)


def test_connections_of_one_address_share_its_frame_bucket() -> None:
    clock = Clock()
    budgets = table(clock)
    entries = [budgets.acquire("192.0.2.1") for _ in range(3)]
    assert entries[0] is entries[1] is entries[2] and entries[0] is not None
    limiters = [AddressBoundRate(TokenBucket(100, 50, clock), entries[0].frames) for _ in range(3)]
    # 10 frames for the three together, however they are spread.
    passed = sum(limiter.take() for _ in range(5) for limiter in limiters)
    assert passed == 10
    other = budgets.acquire("192.0.2.2")
    assert other is not None and AddressBoundRate(TokenBucket(100, 50, clock), other.frames).take()


def test_a_connections_own_bucket_is_spent_before_the_address() -> None:
    clock = Clock()
    budgets = table(clock)
    entry = budgets.acquire("192.0.2.1")
    assert entry is not None
    flooding = AddressBoundRate(TokenBucket(2, 0.001, clock), entry.frames)
    assert [flooding.take() for _ in range(5)] == [True, True, False, False, False]
    # What the flooding connection's own bucket refused left the address's budget.
    quiet = AddressBoundRate(TokenBucket(100, 50, clock), entry.frames)
    assert sum(quiet.take() for _ in range(20)) == 8


def test_subscriptions_take_from_the_budget_a_connection_holds() -> None:
    budgets = table(Clock())
    entry = budgets.acquire("192.0.2.1")
    assert [subscription_allowed(entry) for _ in range(5)] == [True] * 4 + [False]
    assert subscription_allowed(None)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not:an:address", "not:an:address"),
    ],
)
def test_ipv6_addresses_share_a_budget_per_64(address: str, key: str) -> None:
    assert address_block(address) == key


def test_one_ipv6_host_cannot_escape_by_changing_address() -> None:
    budgets = table(Clock())
    allowed = [budgets.handshake_allowed(f"2001:db8:1:2::{n:x}") for n in range(1, 6)]
    assert allowed == [True] * 3 + [False] * 2


def test_idle_entries_are_dropped_once_they_would_be_full_again() -> None:
    clock = Clock()
    budgets = table(clock)  # the slowest bucket fills in 3 s (handshakes: 3 at 1/s)
    for n in range(50):
        budgets.handshake_allowed(f"192.0.2.{n}")
    assert len(budgets) == 50
    clock.now += 2.9
    budgets.handshake_allowed("198.51.100.1")
    assert len(budgets) == 51
    clock.now += 0.1
    budgets.handshake_allowed("198.51.100.2")
    assert len(budgets) == 2


def test_an_entry_held_by_a_connection_stays_until_released() -> None:
    clock = Clock()
    budgets = table(clock)
    held = budgets.acquire("192.0.2.1")
    assert held is not None
    for _ in range(3):
        held.handshakes.take()
    clock.now += 60.0
    for n in range(10):
        budgets.handshake_allowed(f"198.51.100.{n}")
    assert budgets.get("192.0.2.1") is held
    budgets.release(held)
    clock.now += 3.0
    for n in range(10):
        budgets.handshake_allowed(f"203.0.113.{n}")
    assert budgets.get("192.0.2.1") is not held


def test_a_flood_of_made_up_addresses_keeps_the_table_at_its_size() -> None:
    clock = Clock()
    budgets = table(clock, max_entries=1000)
    held = [budgets.acquire(f"10.0.0.{n}") for n in range(5)]
    for n in range(100_000):
        clock.now += 0.00001  # 100,000 a second: none is idle yet
        budgets.handshake_allowed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        assert len(budgets) <= 1000 + len(held)
    # The entries connections hold were never dropped.
    assert all(budgets.get(f"10.0.0.{n}") is held[n] for n in range(5))


def test_an_entry_is_small() -> None:
    """The size the setting's meaning states (about 1 KB per address), measured."""
    budgets = table(Clock())
    entry = budgets.get("2001:db8:1:2::1")
    assert entry is not None
    buckets = [entry.handshakes, entry.frames, entry.subscribes, entry.rest, entry.history_bytes]
    parts = [entry, entry.key, entry.last_used, *buckets]
    parts += [value for bucket in buckets for value in (bucket.tokens, bucket.updated)]  # type: ignore[union-attr]  # every budget is on here
    # Plus the table's own slot for it (a dict entry, ~100 bytes).
    assert sum(sys.getsizeof(part) for part in parts) + 100 < 1024
