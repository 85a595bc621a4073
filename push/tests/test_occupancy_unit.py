"""``push.cluster.occupancy`` without Redis (one process): counts follow the hub's
subscriptions, watchers hear each change once, and ended subscriptions are forgotten."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from push.cluster.occupancy import Occupancy
from push.tests.test_hub import FakeClient, MemoryHistory, make_hub
from tests.waiting import wait_until


def _counts(client: FakeClient) -> list[int]:
    return [e["subscribers"] for e in client.sent if e.get("type") == "occupancy"]


async def test_watchers_hear_the_count_on_subscribe_and_each_change_once() -> None:
    hub, _ = await make_hub(MemoryHistory())
    occupancy = Occupancy(None, "t", "node-a", hub=hub)
    watcher = FakeClient()
    subscription = await hub.subscribe(watcher, "room", since=None, reply=watcher.reply)
    await occupancy.watch(subscription)
    await wait_until(lambda: _counts(watcher) == [1], "the count on subscribe")
    others: list[Any] = []
    for _ in range(3):
        client = FakeClient()
        others.append(await hub.subscribe(client, "room", since=None, reply=client.reply))
    await occupancy.tick()
    await occupancy.tick()  # nothing changed since: nothing sent
    hub.unsubscribe(others[0])
    await occupancy.tick()
    await wait_until(lambda: _counts(watcher) == [1, 4, 3], "each change once")
    assert occupancy.local_count("room") == 3
    hub.unsubscribe(subscription)
    await occupancy.tick()
    assert occupancy._watchers == {}


async def test_only_channels_whose_count_changed_are_published() -> None:
    hub, _ = await make_hub(MemoryHistory())
    occupancy = Occupancy(None, "t", "node-a", hub=hub)
    client = FakeClient()
    first = await hub.subscribe(client, "a", since=None, reply=client.reply)
    await hub.subscribe(client, "b", since=None, reply=client.reply)
    assert hub.counts_changed == {"a", "b"}
    await occupancy.publish()
    assert hub.counts_changed == set() and occupancy._published == {"a": 1, "b": 1}
    hub.unsubscribe(first)
    await occupancy.publish()
    assert occupancy._published == {"b": 1}


def test_the_occupied_list_reads_the_cluster_at_most_once_a_second(
    settings: Any, monkeypatch: Any
) -> None:
    """Listing occupied channels reads every node's hash: requests within a second share
    one read, so asking many times a second costs the node no more than asking once."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    from common.redis_client import redis_prefix, redis_sync
    from push.cluster import occupancy
    from push.cluster.directory import nodes_key

    client = redis_sync()
    node = f"list-test-{uuid.uuid4().hex[:8]}"
    key = occupancy.counts_key(redis_prefix(), node)
    client.zadd(nodes_key(), {node: time.time()})
    client.hset(key, mapping={"snap-a": 2})
    reads: list[int] = []
    read = occupancy._read_cluster_totals
    monkeypatch.setattr(occupancy, "_snapshot", None)
    monkeypatch.setattr(occupancy, "_read_cluster_totals", lambda: reads.append(1) or read())
    try:
        assert occupancy.occupied_channels("snap-", local=None) == {"snap-a": 2}
        client.hset(key, "snap-b", 1)
        assert occupancy.occupied_channels("snap-", local=None) == {"snap-a": 2}
        assert len(reads) == 1
        monkeypatch.setattr(occupancy, "LIST_SNAPSHOT_SECS", 0.0)  # the second has passed
        assert occupancy.occupied_channels("snap-", local=None) == {"snap-a": 2, "snap-b": 1}
        assert len(reads) == 2
    finally:
        client.zrem(nodes_key(), node)
        client.delete(key)
        client.close()


async def test_counts_redis_lost_are_written_again_even_when_one_changed_meanwhile(
    settings: Any,
) -> None:
    """Redis restarted without this node's hash of counts: the next round writes them
    all again, even when a count changed in that round too (writing that one made the
    hash exist again, which hid the loss of the others: they read as 0 everywhere)."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    import redis.asyncio as aioredis

    from push.cluster.occupancy import counts_key

    redis = aioredis.Redis.from_url(settings.REDIS_URL)
    prefix = f"counts{uuid.uuid4().hex[:8]}"
    hub, _ = await make_hub(MemoryHistory())
    occupancy = Occupancy(redis, prefix, "node-a", hub=hub)
    client = FakeClient()
    try:
        await hub.subscribe(client, "a", since=None, reply=client.reply)
        await hub.subscribe(client, "b", since=None, reply=client.reply)
        await occupancy.publish()
        assert await redis.hgetall(counts_key(prefix, "node-a")) == {b"a": b"1", b"b": b"1"}
        await redis.delete(counts_key(prefix, "node-a"))  # Redis restarted
        await hub.subscribe(FakeClient(), "b", since=None, reply=client.reply)
        await occupancy.publish()
        assert await redis.hgetall(counts_key(prefix, "node-a")) == {b"a": b"1", b"b": b"2"}
    finally:
        await redis.delete(counts_key(prefix, "node-a"))
        await redis.aclose()


async def test_a_node_restarted_under_its_name_drops_the_counts_it_left(settings: Any) -> None:
    """A node given a fixed NODE_ID that crashed and came back within the counts' expiry:
    its first round replaces the hash its previous run left, whose channels it no longer
    serves, instead of keeping their counts alive (and counted everywhere) for good."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    import redis.asyncio as aioredis

    from push.cluster.occupancy import counts_key

    redis = aioredis.Redis.from_url(settings.REDIS_URL)
    prefix = f"counts{uuid.uuid4().hex[:8]}"
    key = counts_key(prefix, "node-a")
    await redis.hset(key, mapping={"old": 40, "a": 3})
    hub, _ = await make_hub(MemoryHistory())
    occupancy = Occupancy(redis, prefix, "node-a", hub=hub)
    client = FakeClient()
    try:
        await hub.subscribe(client, "a", since=None, reply=client.reply)
        await occupancy.publish()
        assert await redis.hgetall(key) == {b"a": b"1"}
        await occupancy.publish()
        assert await redis.hgetall(key) == {b"a": b"1"}
    finally:
        await redis.delete(key)
        await redis.aclose()
