"""Thousands of channels joined or left on a node at once (clients reconnecting after a
restart; a client that held a thousand subscriptions leaving, whose channels' lingers
end together): the node's Redis work for them queues on a bounded set of connections,
its occupancy changes go out in its event batches, and the channels are recorded
occupied and vacated all the same."""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import urlsplit

import psutil
import pytest
import redis.asyncio as aioredis
from django.conf import settings

from push.cluster.directory import NODE_REDIS_CONNECTIONS
from push.cluster.node import Node
from push.ops.events import CHANNEL_OCCUPIED, CHANNEL_VACATED, CONNECT, DISCONNECT, EventLog
from push.services.runtime import get_node
from push.tests.test_hub import FakeClient
from tests.waiting import QUERY_INTERVAL_SECS, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

CHANNELS = 300
# The channel layer's own connections (its pub/sub and its sends) may open meanwhile.
LAYER_CONNECTIONS = 2


class _StreamReader:
    """The node's event stream from where it ended when made: each look reads only what
    was appended since the last. The stream holds every earlier test's events in this
    process, tens of thousands by the end of a run; read whole at every poll they took
    the loop the node runs on for seconds."""

    def __init__(self, node: Node, last_id: bytes) -> None:
        self.redis = node.directory.redis
        self.stream = f"{node.directory.prefix}:events"
        self.last_id = last_id
        self.seen: dict[str, set[str]] = {}

    @classmethod
    async def from_now(cls, node: Node) -> _StreamReader:
        newest = await node.directory.redis.xrevrange(f"{node.directory.prefix}:events", count=1)
        return cls(node, newest[0][0] if newest else b"0-0")

    async def all_recorded(self, kind: str, channels: set[str]) -> bool:
        entries = await self.redis.xrange(self.stream, min=b"(" + self.last_id)
        for entry_id, fields in entries:
            self.last_id = entry_id
            event = json.loads(fields[b"event"])
            self.seen.setdefault(event["type"], set()).add(event.get("channel"))
        return self.seen.get(kind, set()) >= channels


def _redis_connections() -> int:
    """This process's TCP connections to Redis (the node runs in it)."""
    port = urlsplit(settings.REDIS_URL).port or 6379
    connections = psutil.Process().net_connections(kind="tcp")
    return sum(1 for c in connections if c.raddr and c.raddr.port == port)


def _channels(count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"burst-{run}-{n}" for n in range(count)]


async def test_channels_joined_at_once_share_the_nodes_bounded_redis_connections() -> None:
    node = await get_node()
    channels = _channels(CHANNELS)
    client = FakeClient()
    events = await _StreamReader.from_now(node)
    before = _redis_connections()
    await asyncio.gather(
        *(node.hub.subscribe(client, c, since=None, reply=client.reply) for c in channels)
    )
    await wait_until(
        lambda: events.all_recorded(CHANNEL_OCCUPIED, set(channels)),
        "every channel recorded occupied",
        interval=QUERY_INTERVAL_SECS,
    )
    # Each join reads the channel's recent history from Redis: once a connection each.
    assert _redis_connections() - before <= NODE_REDIS_CONNECTIONS + LAYER_CONNECTIONS


async def test_channels_emptied_at_once_are_vacated_without_a_connection_each() -> None:
    node = await get_node()
    node.hub.linger_secs = 0.05
    channels = _channels(CHANNELS)
    client = FakeClient()
    events = await _StreamReader.from_now(node)
    subscriptions = [
        await node.hub.subscribe(client, channel, since=None, reply=client.reply)
        for channel in channels
    ]
    await wait_until(
        lambda: events.all_recorded(CHANNEL_OCCUPIED, set(channels)),
        "every channel recorded occupied",
        interval=QUERY_INTERVAL_SECS,
    )
    before = _redis_connections()
    for subscription in subscriptions:
        node.hub.unsubscribe(subscription)
    await wait_until(
        lambda: events.all_recorded(CHANNEL_VACATED, set(channels)),
        "every channel recorded vacated",
        interval=QUERY_INTERVAL_SECS,
    )
    # Each leave once recorded its vacancy on a connection of its own.
    assert _redis_connections() - before <= LAYER_CONNECTIONS


async def test_occupancy_changes_go_out_with_the_events_in_order() -> None:
    """One flush writes the events and the occupancy changes between them as they came:
    a channel's occupied before its vacated, and the node's sets updated."""
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    prefix = f"burst{uuid.uuid4().hex[:8]}"
    log = EventLog(client, prefix, "node-a", maxlen=1000)
    try:
        log.emit(CONNECT, connection_id="c-1")
        log.occupied("news")
        log.vacated("news")
        log.occupied("news")
        log.emit(DISCONNECT, connection_id="c-1")
        await log.flush()
        entries = await client.xrange(f"{prefix}:events")
        kinds = [json.loads(fields[b"event"])["type"] for _, fields in entries]
        assert kinds == [CONNECT, CHANNEL_OCCUPIED, CHANNEL_VACATED, CHANNEL_OCCUPIED, DISCONNECT]
        assert await client.smembers(f"{prefix}:occupancy:news") == {b"node-a"}
        assert await client.smembers(f"{prefix}:occupancy-node:node-a") == {b"news"}
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_occupancy_events_stay_once_each_after_redis_lost_its_sets() -> None:
    """Redis restarted without its data while node-a held a channel: once node-a has
    put back what it holds, node-b joining and leaving the channel announces nothing
    (node-a is still there), and node-a leaving last announces the vacancy, once."""
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    prefix = f"burst{uuid.uuid4().hex[:8]}"
    node_a = EventLog(client, prefix, "node-a", maxlen=1000)
    node_b = EventLog(client, prefix, "node-b", maxlen=1000)

    async def kinds() -> list[str]:
        entries = await client.xrange(f"{prefix}:events")
        return [json.loads(fields[b"event"])["type"] for _, fields in entries]

    async def lose_everything() -> None:
        await client.delete(*[k async for k in client.scan_iter(match=f"{prefix}:*")])

    try:
        node_a.occupied("news")
        await node_a.flush()
        assert await kinds() == [CHANNEL_OCCUPIED]
        await lose_everything()
        await node_a.repair()
        await node_a.flush()
        node_b.occupied("news")
        node_b.vacated("news")
        await node_b.flush()
        assert await kinds() == [], "node-a still holds the channel"
        node_a.vacated("news")
        await node_a.flush()
        assert await kinds() == [CHANNEL_VACATED]
        await node_a.repair()  # nothing to put back: the sets say what the nodes hold
        await node_a.flush()
        assert await kinds() == [CHANNEL_VACATED]
        assert await client.smembers(f"{prefix}:occupancy-node:node-a") == set()
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
