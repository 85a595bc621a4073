"""A node's occupancy changes in the event stream: channels that empty at once (their
linger ends together, as after a client that held a thousand subscriptions left) are
recorded in the node's batches, not with a Redis connection each."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from push.cluster.node import Node
from push.ops.events import CHANNEL_OCCUPIED, CHANNEL_VACATED
from push.services.runtime import get_node
from push.tests.test_hub import FakeClient
from tests.waiting import QUERY_INTERVAL_SECS, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

CHANNELS = 300


async def _all_recorded(node: Node, kind: str, channels: set[str]) -> bool:
    entries = await node.directory.redis.xrange(f"{node.directory.prefix}:events")
    events = [json.loads(fields[b"event"]) for _, fields in entries]
    return {e.get("channel") for e in events if e["type"] == kind} >= channels


async def _connections_of(node: Node) -> int:
    name = f"{node.directory.prefix}:node:{node.server_id}"
    clients: list[dict[str, Any]] = await node.directory.redis.client_list()
    return sum(1 for client in clients if client.get("name") == name)


async def test_channels_emptied_at_once_are_vacated_without_a_connection_each() -> None:
    node = await get_node()
    node.hub.linger_secs = 0.05
    run = uuid.uuid4().hex[:8]
    channels = {f"churn-{run}-{n}" for n in range(CHANNELS)}
    client = FakeClient()
    subscriptions = [
        await node.hub.subscribe(client, channel, since=None, reply=client.reply)
        for channel in sorted(channels)
    ]
    await wait_until(
        lambda: _all_recorded(node, CHANNEL_OCCUPIED, channels),
        "every channel recorded occupied",
        interval=QUERY_INTERVAL_SECS,
    )
    for subscription in subscriptions:
        node.hub.unsubscribe(subscription)
    await wait_until(
        lambda: _all_recorded(node, CHANNEL_VACATED, channels),
        "every channel recorded vacated",
        interval=QUERY_INTERVAL_SECS,
    )
    # A few: the batches', the node's other work, and ones of earlier nodes of this
    # process (same name) still closing. Each leave once took its own: 300 here.
    assert await _connections_of(node) < 20
