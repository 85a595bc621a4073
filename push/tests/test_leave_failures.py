"""A channel whose last subscriber left, let go by a node whose broker leave failed (its
group's UNSUBSCRIBE could not be written: Redis went away for a moment): the channel is
vacated all the same, and its group is not read again once the node reconnects. On a
node of this process against the test Redis; the failure is the one write that raises."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError

from push.cluster.broker import channel_group
from push.cluster.node import Node
from push.cluster.occupancy import counts_key
from push.ops.events import CHANNEL_OCCUPIED, CHANNEL_VACATED
from push.services.runtime import get_node
from push.tests.test_hub import FakeClient
from tests.waiting import QUERY_INTERVAL_SECS, wait_until

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_node"),
    pytest.mark.skipif(not settings.REDIS_URL, reason="the groups are Redis' pub/sub"),
]


def _fail_the_unsubscribe(node: Node, channel: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make the node's UNSUBSCRIBE of ``channel``'s group fail as a write to a Redis
    that went away fails. Returns the group's pub/sub name."""
    assert node.broker._subscribers is not None
    shard, group_channel = node.broker._subscribers._shard_of(channel_group(channel))
    connection = shard._connection
    assert connection is not None
    send = connection.send_command

    async def unsubscribe_fails(*args: Any, **kwargs: Any) -> None:
        if args[0] == "UNSUBSCRIBE":
            # Not sent, and the connection left open: the node must not count on
            # redis-py giving it up.
            raise RedisConnectionError("Error 104 while writing to socket. Connection reset.")
        await send(*args, **kwargs)

    monkeypatch.setattr(connection, "send_command", unsubscribe_fails)
    return group_channel


class _ChannelEvents:
    """The occupancy events of one channel in the node's stream, from when made."""

    def __init__(self, node: Node, channel: str, last_id: bytes) -> None:
        self.redis = node.directory.redis
        self.stream = f"{node.directory.prefix}:events"
        self.channel = channel
        self.last_id = last_id
        self.kinds: list[str] = []

    @classmethod
    async def from_now(cls, node: Node, channel: str) -> _ChannelEvents:
        newest = await node.directory.redis.xrevrange(f"{node.directory.prefix}:events", count=1)
        return cls(node, channel, newest[0][0] if newest else b"0-0")

    async def recorded(self, *kinds: str) -> bool:
        """Whether the channel's events so far are ``kinds``, in order (more fail)."""
        for entry_id, fields in await self.redis.xrange(self.stream, min=b"(" + self.last_id):
            self.last_id = entry_id
            event = json.loads(fields[b"event"])
            if event.get("channel") == self.channel:
                self.kinds.append(event["type"])
        assert self.kinds == list(kinds)[: len(self.kinds)], self.kinds
        return self.kinds == list(kinds)


async def _readers(node: Node, group_channel: str) -> int:
    [(_, count)] = await node.directory.redis.pubsub_numsub(group_channel)
    return int(count)


async def test_a_channel_whose_leave_failed_is_vacated_and_its_group_not_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = await get_node()
    node.hub.linger_secs = 0.05
    channel = f"leave-{uuid.uuid4().hex[:8]}"
    redis = node.directory.redis
    held = f"{node.directory.prefix}:occupancy-node:{node.server_id}"
    counts = counts_key(node.directory.prefix, node.server_id)
    client = FakeClient()
    events = await _ChannelEvents.from_now(node, channel)
    subscription = await node.hub.subscribe(client, channel, since=None, reply=client.reply)
    await wait_until(
        lambda: events.recorded(CHANNEL_OCCUPIED),
        "the channel recorded occupied",
        interval=QUERY_INTERVAL_SECS,
    )
    group_channel = _fail_the_unsubscribe(node, channel, monkeypatch)

    node.hub.unsubscribe(subscription)

    # A webhook receiver is told the channel is empty, once; and the node's occupancy
    # set no longer holds it, so no repair puts it back.
    await wait_until(
        lambda: events.recorded(CHANNEL_OCCUPIED, CHANNEL_VACATED),
        "the channel recorded vacated",
        interval=QUERY_INTERVAL_SECS,
    )
    assert channel not in node.hub.channels
    assert not await redis.sismember(held, channel)
    await node.occupancy.publish()
    assert await redis.hget(counts, channel) is None
    # Connected again, the node reads only the groups it still wants.
    await wait_until(
        lambda: node.broker.hears(channel) and node.broker._subscribers is not None,
        "the node connected to Redis again",
    )
    await node.broker.heard_all_before([channel])
    assert await _readers(node, group_channel) == 0

    # Joined again: occupied again, read once, counted once.
    again = FakeClient()
    await node.hub.subscribe(again, channel, since=None, reply=again.reply)
    await wait_until(
        lambda: events.recorded(CHANNEL_OCCUPIED, CHANNEL_VACATED, CHANNEL_OCCUPIED),
        "the channel recorded occupied again",
        interval=QUERY_INTERVAL_SECS,
    )
    assert await _readers(node, group_channel) == 1
    assert await redis.sismember(held, channel)
    await node.occupancy.publish()
    assert await redis.hget(counts, channel) == b"1"
