"""Presence member events in the event stream, across nodes: a user's member_added and
member_removed reach the stream (and so the webhook receivers) in the order the
cluster made them, whichever node made each and however late a node writes its other
events; each once, a leave whose answer was lost or that Redis lost included."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.test import override_settings
from rest_framework.authtoken.models import Token

from accounts.models import ChannelGrant
from push.cluster import presence
from push.cluster.node import Node
from push.cluster.presence import leave_presence, member
from push.ops.event_worker import EventWorker
from push.ops.events import CHANNEL_OCCUPIED, MEMBER_ADDED, MEMBER_REMOVED
from push.ops.webhooks import deliver_webhooks
from push.services.runtime import get_node
from push.services.subscriptions import subscriptions_revoke
from push.tests.wsclient import WsClient, connected_client
from tests.event_sink import WebhookReceiver
from tests.waiting import wait_until, wait_until_blocking

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


@pytest.fixture
def room() -> str:
    return f"presence-order-{uuid.uuid4().hex[:8]}"


def _member_token(username: str) -> tuple[int, str]:
    user = User.objects.create_user(username, password="x")
    ChannelGrant.objects.create(user=user, pattern="presence-*", can_subscribe=True)
    return user.pk, Token.objects.create(user=user).key


async def _join(token: str, room: str) -> WsClient:
    client = await connected_client(token=token)
    reply = await client.request({"type": "subscribe", "channel": room})
    assert reply["type"] == "subscribed", reply
    return client


@pytest.fixture
async def other_node() -> AsyncIterator[Node]:
    """A second node of the cluster, in this process: its presence store and event log as
    a node elsewhere has them (its scripts send to the channel's nodes as this one's do).
    Not started: its event log writes when the test says."""
    node = await get_node()
    other = Node(
        server_id=f"presence-b-{uuid.uuid4().hex[:8]}", revoke_subscriptions=subscriptions_revoke
    )
    other.presence.relay = node.presence.relay
    yield other
    await other.directory.close()


class _Receiver:
    """A webhook receiver of the events added to the node's stream from now on, through a
    worker group of its own (other tests' events share the stream)."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.group = f"order-{uuid.uuid4().hex[:8]}"
        self.client = redis.Redis.from_url(settings.REDIS_URL)
        self.client.xgroup_create(stream, self.group, id="$", mkstream=True)

    def received(self, room: str) -> list[dict[str, Any]]:
        """Every event of ``room`` a webhook receiver gets, in the order it gets them."""
        worker = EventWorker(
            self.client,
            stream=self.stream,
            group=self.group,
            consumer="in-process",
            handlers=[deliver_webhooks],
            max_attempts=2,
            retry_idle_ms=10_000,
            concurrency=4,
        )
        with WebhookReceiver() as receiver:
            with override_settings(PUSH={"WEBHOOK_URLS": [receiver.url()]}):
                wait_until_blocking(
                    lambda: (
                        worker.step() >= 0
                        and not self.client.xpending(self.stream, self.group)["pending"]
                    ),
                    "every event handled",
                    timeout=60,
                )
            bodies = [r.json() for r in receiver.accepted]
        return [b for b in bodies if b.get("channel") == room]

    def close(self) -> None:
        self.client.xgroup_destroy(self.stream, self.group)
        self.client.close()


@pytest.fixture
async def receiver() -> AsyncIterator[_Receiver]:
    node = await get_node()
    made = _Receiver(node.events.stream)
    yield made
    made.close()


def _members_events(received: list[dict[str, Any]], user_id: Any) -> list[str]:
    return [
        e["type"]
        for e in received
        if e["type"] in (MEMBER_ADDED, MEMBER_REMOVED) and e["user_id"] == str(user_id)
    ]


async def _conns(node: Node, room: str) -> int:
    return int(await node.presence.redis.hlen(f"{node.presence.prefix}:presence:{room}:conns"))


async def test_a_users_join_on_one_node_reaches_the_stream_before_its_leave_on_another(
    other_node: Node, receiver: _Receiver, room: str
) -> None:
    """A user's first connection joined here, its other one on another node; the first
    closed, then the other. This node wrote its member_added with its next batch, the
    other node its member_removed with its own, which came first: the receiver got the
    user removed, then added, and took the user for present for good."""
    node = await get_node()
    _, ann = await sync_to_async(_member_token)("ann")
    bob_id, bob = await sync_to_async(_member_token)("bob")
    watcher = await _join(ann, room)
    await watcher.recv_type("join")
    await node.events.flush()
    # This node's event writer is held (its loop busy, Redis slow to answer it).
    await node.events._flushing.acquire()
    try:
        bob_here = await _join(bob, room)
        assert (await watcher.recv_type("join"))["member"]["user_id"] == bob_id
        bob_member = member(bob_id, {"username": "bob"})
        assert not await other_node.presence.join(room, "bob-there", bob_member)
        await bob_here.close()
        await wait_until(lambda: _conns_are(node, room, 2), "bob's leave here made")
        await leave_presence(other_node.presence, other_node.announce_presence, "bob-there", [room])
        assert (await watcher.recv_type("leave"))["member"]["user_id"] == bob_id
        await other_node.events.flush()
    finally:
        node.events._flushing.release()
    await node.events.flush()
    received = await asyncio.to_thread(receiver.received, room)
    assert _members_events(received, bob_id) == [MEMBER_ADDED, MEMBER_REMOVED]
    await watcher.close()


async def _conns_are(node: Node, room: str, count: int) -> bool:
    return await _conns(node, room) == count


async def test_a_channels_first_member_comes_after_its_channel_occupied(
    receiver: _Receiver, room: str
) -> None:
    """The member events go to the stream as the presence scripts make them, the node's
    other events with its next batch: a channel's first member must not be told before
    the channel is occupied, nor its user's events split by another user's."""
    ann_id, ann = await sync_to_async(_member_token)("ann")
    watcher = await _join(ann, room)
    await watcher.recv_type("join")
    await watcher.close()
    node = await get_node()
    await wait_until(lambda: _conns_are(node, room, 0), "ann's leave made")
    await node.events.flush()
    # The channel's own events (its connections' subscribe events follow those).
    received = [
        e
        for e in await asyncio.to_thread(receiver.received, room)
        if e["type"] in (CHANNEL_OCCUPIED, MEMBER_ADDED, MEMBER_REMOVED)
    ]
    assert [e["type"] for e in received] == [CHANNEL_OCCUPIED, MEMBER_ADDED, MEMBER_REMOVED]
    assert [e["user_id"] for e in received[1:]] == [str(ann_id)] * 2
    assert received[1]["node"] == node.server_id


@pytest.mark.parametrize("made", [True, False], ids=["answer-lost", "redis-lost-its-data"])
async def test_a_leave_that_failed_is_in_the_stream_once(
    receiver: _Receiver, room: str, made: bool
) -> None:
    """A member's leave failed: Redis made it (and wrote its member_removed) but its
    answer never came, or it never reached Redis, which then restarted without its
    data. The node's repair tells the subscribers, and writes the member_removed when no
    script did, never a second one."""
    node = await get_node()
    _, ann = await sync_to_async(_member_token)("ann")
    bob_id, bob = await sync_to_async(_member_token)("bob")
    watcher = await _join(ann, room)
    await watcher.recv_type("join")
    bob_tab = await _join(bob, room)
    await watcher.recv_type("join")
    store = node.presence
    leave_script = store._leave

    async def failing(**kwargs: Any) -> Any:
        if made:
            await leave_script(**kwargs)
        raise ConnectionError("Redis is away")

    store._leave = failing
    try:
        await bob_tab.close()
        await wait_until(lambda: store._leaving, "the leave failed")
    finally:
        store._leave = leave_script
    if not made:  # Redis restarted without its data
        keys = [k async for k in store.redis.scan_iter(match=f"{store.prefix}:presence*{room}*")]
        await store.redis.delete(*keys, store.node_index(store.server_id))
    await store.repair(node.announce_presence)
    assert (await watcher.recv_type("leave"))["member"]["user_id"] == bob_id
    await watcher.expect_nothing(0.3)
    await node.events.flush()
    received = await asyncio.to_thread(receiver.received, room)
    assert _members_events(received, bob_id) == [MEMBER_ADDED, MEMBER_REMOVED]
    await watcher.close()


async def test_a_dead_nodes_members_are_removed_after_they_were_added(
    other_node: Node, receiver: _Receiver, room: str
) -> None:
    """A member on a node that died is removed by the node that reaps it, after its
    member_added (written by the dead node's join), once."""
    node = await get_node()
    _, ann = await sync_to_async(_member_token)("ann")
    watcher = await _join(ann, room)
    await watcher.recv_type("join")
    assert await other_node.presence.join(room, "zed-there", member("zed", {}))
    assert (await watcher.recv_type("join"))["member"]["user_id"] == "zed"
    await node._reap_presence(other_node.server_id)
    assert (await watcher.recv_type("leave"))["member"]["user_id"] == "zed"
    received = await asyncio.to_thread(receiver.received, room)
    zeds = [e for e in received if e.get("user_id") == "zed"]
    assert [e["type"] for e in zeds] == [MEMBER_ADDED, MEMBER_REMOVED]
    assert [e["node"] for e in zeds] == [other_node.server_id, node.server_id]
    await watcher.close()


async def test_without_events_no_member_event_is_written(room: str, settings: Any) -> None:
    """PUSH_EVENTS off: the presence scripts write nothing to the stream."""
    settings.PUSH = {"EVENTS": False}
    node = await get_node()
    receiver = _Receiver(node.events.stream)
    try:
        _, ann = await sync_to_async(_member_token)("ann")
        watcher = await _join(ann, room)
        await watcher.recv_type("join")
        await watcher.close()
        await wait_until(lambda: _conns_are(node, room, 0), "ann's leave made")
        assert await asyncio.to_thread(receiver.received, room) == []
    finally:
        receiver.close()


async def test_the_leave_receipts_a_node_keeps_are_bounded(
    room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user churning a presence subscription leaves a receipt per leave: at most
    ``LEAVE_RECEIPTS_KEPT`` of them stay, the newest, in one key of the node's that
    expires with the last."""
    monkeypatch.setattr(presence, "LEAVE_RECEIPTS_KEPT", 3)
    node = await get_node()
    _, ann = await sync_to_async(_member_token)("ann")
    for _ in range(5):
        client = await _join(ann, room)
        await client.close()

        async def left() -> bool:
            return await _conns(node, room) == 0

        await wait_until(left, "the leave")
    store = node.presence
    receipts = f"{store.prefix}:presence-left:{store.server_id}"
    assert await store.redis.zcard(receipts) == 3
    assert 0 < await store.redis.pttl(receipts) <= presence.LEAVE_RECEIPT_SECS * 1000
