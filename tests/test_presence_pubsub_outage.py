"""Presence across a cut in one node's Redis pub/sub connection, with real nodes and a
redis-server of the test's own: joins and leaves made elsewhere while the node could not
hear them reach its subscribers once it hears again, each exactly as their lists need.

Node A reaches Redis as a user of its own. The cut: that user is turned off (its open
connections stay, a new one is refused) and A's pub/sub connections are killed, so A
keeps serving its clients from its pooled connections but cannot subscribe again until
the user is turned on."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from websockets.exceptions import ConnectionClosed

from devtools.processes import OwnedProcess
from tests.pusherclient import PusherClient, presence_data, pusher_env
from tests.servers import ServerNode, start_together
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

NODE_A_USER = "node-a"
NODE_A_PASSWORD = "node-a-secret"
# Generous: two nodes on a loaded two-core machine, reconnecting every half second.
EVENT_TIMEOUT_SECS = 30.0


@pytest.fixture(scope="module")
def admin(own_redis: OwnedProcess) -> redis.Redis:
    client = redis.Redis(port=own_redis.port, decode_responses=True)
    _add_node_a_user(client)
    return client


def _add_node_a_user(admin: redis.Redis) -> None:
    admin.acl_setuser(
        NODE_A_USER,
        enabled=True,
        passwords=[f"+{NODE_A_PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )


@pytest.fixture(scope="module")
def nodes(
    e2e_env: dict[str, str], own_redis: OwnedProcess, admin: redis.Redis
) -> Iterator[tuple[ServerNode, ServerNode]]:
    env = pusher_env({**e2e_env, "REDIS_URL": f"redis://127.0.0.1:{own_redis.port}/0"})
    node_a_url = f"redis://{NODE_A_USER}:{NODE_A_PASSWORD}@127.0.0.1:{own_redis.port}/0"
    pair = (
        ServerNode({**env, "REDIS_URL": node_a_url}, name="presence-cut-a"),
        ServerNode(env, name="presence-cut-b"),
    )
    try:
        start_together(pair)
        yield pair
    finally:
        for node in pair:
            node.stop()


def _node_a_subscribers(admin: redis.Redis) -> list[dict[str, Any]]:
    return [c for c in admin.client_list(_type="pubsub") if c.get("user") == NODE_A_USER]


async def _cut(admin: redis.Redis) -> None:
    admin.acl_setuser(NODE_A_USER, enabled=False)
    admin.execute_command("CLIENT", "KILL", "USER", NODE_A_USER, "TYPE", "pubsub")
    await wait_until(lambda: not _node_a_subscribers(admin), "node A's pub/sub cut")


async def _restore(admin: redis.Redis) -> None:
    admin.acl_setuser(NODE_A_USER, enabled=True)
    await wait_until(
        lambda: _node_a_subscribers(admin), "node A subscribed again", timeout=EVENT_TIMEOUT_SECS
    )


def _names(frame: dict[str, Any], event: str, user_id: str) -> bool:
    """Whether ``frame`` is Pusher's ``event`` (added or removed) for ``user_id``."""
    return bool(
        frame["event"] == f"pusher_internal:{event}"
        and json.loads(frame["data"])["user_id"] == user_id
    )


def _members_key(env: dict[str, str], channel: str) -> str:
    return f"{env['REDIS_PREFIX']}:presence:{channel}:members"


class Watcher:
    """A Pusher subscriber of a presence channel and its member list as its frames make
    it, failing on a join of a member it lists or a leave of one it does not."""

    def __init__(self, client: PusherClient, succeeded: dict[str, Any]) -> None:
        self.client = client
        self.members = set(json.loads(succeeded["data"])["presence"]["ids"])
        self.frames: list[dict[str, Any]] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def join(cls, node: ServerNode, channel: str, user_id: str) -> Watcher:
        client = await PusherClient.connect(node.pusher_url)
        succeeded = await client.subscribe(channel, channel_data=presence_data(user_id))
        assert succeeded["event"] == "pusher_internal:subscription_succeeded", succeeded
        return cls(client, succeeded)

    @classmethod
    async def join_retrying(cls, node: ServerNode, channel: str, user_id: str) -> Watcher:
        """``join`` on node A while it is cut, trying again after a 503 as a client would:
        a new Redis connection it needs meanwhile is refused too."""

        async def joined() -> Watcher | None:
            client = await PusherClient.connect(node.pusher_url)
            answer = await client.subscribe(channel, channel_data=presence_data(user_id))
            if answer["event"] == "pusher_internal:subscription_succeeded":
                return cls(client, answer)
            assert json.loads(answer["data"])["status"] == 503, answer
            await client.close()
            return None

        return await wait_until(joined, f"{user_id} subscribed", timeout=EVENT_TIMEOUT_SECS)

    async def _read(self) -> None:
        while True:
            try:
                frame = await self.client.receive(timeout=3600)
            except ConnectionClosed:  # closed (the test's end): what it read is kept
                return
            self.frames.append(frame)
            user_id = json.loads(frame["data"] or "{}").get("user_id")
            if frame["event"] == "pusher_internal:member_added":
                assert user_id not in self.members, f"a second join of {user_id}: {self.frames}"
                self.members.add(user_id)
            elif frame["event"] == "pusher_internal:member_removed":
                assert user_id in self.members, f"a leave of absent {user_id}: {self.frames}"
                self.members.discard(user_id)

    async def lists(self, expected: set[str]) -> None:
        def listed() -> bool:
            if self.task.done():
                self.task.result()  # its assertion, if it failed
            return self.members == expected

        await wait_until(
            listed, f"members {expected}, listing {self.members}", timeout=EVENT_TIMEOUT_SECS
        )

    async def close(self) -> None:
        self.task.cancel()
        await self.client.close()


async def test_members_changed_while_a_node_could_not_hear_reach_its_subscribers(
    nodes: tuple[ServerNode, ServerNode], admin: redis.Redis, e2e_env: dict[str, str]
) -> None:
    node_a, node_b = nodes
    channel = f"presence-cut-{uuid.uuid4().hex[:8]}"
    watcher = await Watcher.join(node_a, channel, "watcher")
    alice = await Watcher.join(node_b, channel, "alice")
    await watcher.lists({"watcher", "alice"})

    await _cut(admin)
    try:
        await alice.close()  # leaves, and bob joins, where A cannot hear it
        bob = await Watcher.join(node_b, channel, "bob")
        await wait_until(
            lambda: set(admin.hkeys(_members_key(e2e_env, channel))) == {'"watcher"', '"bob"'},
            "alice gone and bob there in Redis",
        )
        # Subscribed while its node cannot hear: its list is the node's, put right too.
        late = await Watcher.join_retrying(node_a, channel, "late")
        assert late.members == {"watcher", "alice", "late"}, "the node's view, and itself"
    finally:
        await _restore(admin)

    everyone = {"watcher", "bob", "late"}
    for subscriber in (watcher, late, bob):
        await subscriber.lists(everyone)
    # Nothing more was owed: the next change is the next frame each one gets.
    carol = await Watcher.join(node_b, channel, "carol")
    for subscriber in (watcher, late, bob):
        await subscriber.lists(everyone | {"carol"})
    assert [f["event"] for f in watcher.frames[-1:]] == ["pusher_internal:member_added"]
    for subscriber in (watcher, late, bob, carol):
        await subscriber.close()


async def test_after_redis_restarted_empty_every_subscriber_lists_who_is_there(
    nodes: tuple[ServerNode, ServerNode], admin: redis.Redis, own_redis: OwnedProcess
) -> None:
    """Redis restarts without its data, and a member left while it was down: the nodes
    put their members back (``PresenceStore.repair``), and each subscriber, on either
    node, ends listing those there, told of no join of a member it lists."""
    node_a, node_b = nodes
    channel = f"presence-restart-{uuid.uuid4().hex[:8]}"
    watcher = await Watcher.join(node_a, channel, "watcher")
    alice = await Watcher.join(node_b, channel, "alice")
    bob = await Watcher.join(node_b, channel, "bob")
    await watcher.lists({"watcher", "alice", "bob"})

    own_redis.stop(signal.SIGKILL)
    try:
        await alice.close()
        await wait_until(
            lambda: f"presence leave on {channel} failed" in node_b.log(),
            "alice's leave tried while Redis is down",
            timeout=EVENT_TIMEOUT_SECS,
        )
    finally:
        own_redis.launch()
        await asyncio.to_thread(own_redis.wait_answering)
        _add_node_a_user(admin)  # lost with the rest

    for subscriber in (watcher, bob):
        await subscriber.lists({"watcher", "bob"})
    # Its node put it back in Redis before it read the members again: never told that
    # it left itself.
    assert not [f for f in watcher.frames if _names(f, "member_removed", "watcher")]
    carol = await Watcher.join(node_a, channel, "carol")
    assert carol.members == {"watcher", "bob", "carol"}
    for subscriber in (watcher, bob):
        await subscriber.lists({"watcher", "bob", "carol"})
    for subscriber in (watcher, bob, carol):
        await subscriber.close()
