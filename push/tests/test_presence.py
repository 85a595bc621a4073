"""Presence on presence-* channels: one member per user however many connections,
join with the first, leave with the last, member lists over WebSocket and REST."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

import push
from accounts.models import ChannelGrant
from push.services.runtime import get_node
from push.tests.sse_inprocess import InProcessStream
from push.tests.wsclient import WsClient, connected_client
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

ROOM = "presence-lobby"


def _member_token(username: str) -> tuple[int, str]:
    user = User.objects.create_user(username, password="x")
    ChannelGrant.objects.create(user=user, pattern="presence-*", can_subscribe=True)
    return user.pk, Token.objects.create(user=user).key


async def _join(token: str, wire_format: str = "v1.json") -> WsClient:
    client = await connected_client(token=token, subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": ROOM})
    assert reply["type"] == "subscribed", reply
    return client


async def test_one_member_per_user_join_first_leave_last(wire_format: str) -> None:
    ann_id, ann = await sync_to_async(_member_token)("ann")
    bob_id, bob = await sync_to_async(_member_token)("bob")
    watcher = await _join(ann, wire_format)
    joined = await watcher.recv_type("join")
    assert joined["member"]["user_id"] == ann_id
    bob_tabs = [await _join(bob) for _ in range(3)]
    joined = await watcher.recv_type("join")
    assert joined == {
        "type": "join",
        "channel": ROOM,
        "member": {"user_id": bob_id, "info": {"username": "bob"}},
    }
    await watcher.expect_nothing(0.3)  # the second and third tab are the same member
    listing = await watcher.request({"type": "presence", "channel": ROOM, "id": 1})
    assert listing["id"] == 1
    assert sorted(m["user_id"] for m in listing["members"]) == sorted([ann_id, bob_id])
    for tab in bob_tabs[:2]:
        await tab.close()
    await watcher.expect_nothing(0.3)
    await bob_tabs[2].request({"type": "unsubscribe", "channel": ROOM})
    left = await watcher.recv_type("leave")
    assert left["member"]["user_id"] == bob_id
    await bob_tabs[2].close()
    await watcher.close()


async def test_member_list_needs_membership_or_presence_right(wire_format: str) -> None:
    _, ann = await sync_to_async(_member_token)("ann")
    outsider = await connected_client(subprotocol=wire_format)
    reply = await outsider.request({"type": "presence", "channel": ROOM})
    assert reply["code"] == "FORBIDDEN"
    reply = await outsider.request({"type": "presence", "channel": "news"})
    assert reply["code"] in {"FORBIDDEN", "INVALID_MESSAGE"}
    member = await _join(ann, wire_format)
    assert (await member.request({"type": "presence", "channel": ROOM}))["type"] in {
        "join",
        "presence",
    }
    await outsider.close()
    await member.close()


async def test_presence_over_rest(wire_format: str) -> None:
    ann_id, ann = await sync_to_async(_member_token)("ann")
    member = await _join(ann, wire_format)
    await member.recv_type("join")

    def listing(token: str) -> tuple[int, dict]:
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        response = api.get(f"/api/v1/channels/{ROOM}/presence")
        return response.status_code, response.json()

    def watcher_token() -> str:
        user = User.objects.create_user("watcher", password="x")
        ChannelGrant.objects.create(
            user=user, pattern="presence-*", can_subscribe=True, can_presence=True
        )
        return Token.objects.create(user=user).key

    status, body = await sync_to_async(listing)(await sync_to_async(watcher_token)())
    assert status == 200
    assert [m["user_id"] for m in body["members"]] == [ann_id]
    status, _ = await sync_to_async(listing)(ann)  # a member without the presence right
    assert status == 403
    await member.close()


async def test_member_lists_asked_together_share_a_read_and_a_change_is_seen_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member list is read whole, so a member asking for it as fast as its rate allows
    on a big channel would cost the node a read and its decoding each time: requests
    share a read until the members change, and a change is never hidden by it."""
    from push.cluster.presence import PresenceStore

    reads: list[str] = []
    read_members = PresenceStore._read_members
    read_many = PresenceStore.members_of

    async def counted(self: PresenceStore, channel: str) -> list[dict]:
        reads.append(channel)
        return await read_members(self, channel)

    async def counted_many(self: PresenceStore, channels: list[str]) -> dict[str, list[dict]]:
        reads.extend(channels)
        return await read_many(self, channels)

    monkeypatch.setattr(PresenceStore, "_read_members", counted)
    # The node's view of the channel (push.cluster.presence_views) is read once too.
    monkeypatch.setattr(PresenceStore, "members_of", counted_many)
    ann_id, ann = await sync_to_async(_member_token)("ann")
    bob_id, bob = await sync_to_async(_member_token)("bob")
    watcher = await _join(ann)
    await watcher.recv_type("join")
    for n in range(20):
        listing = await watcher.request({"type": "presence", "channel": ROOM, "id": n})
        assert [m["user_id"] for m in listing["members"]] == [ann_id]
    # The view's read, and one shared by the answers asked before it was made.
    assert len(reads) <= 2
    newcomer = await _join(bob)
    await newcomer.recv_type("join")
    await watcher.recv_type("join")
    # Asked by the newcomer at once, and by the watcher: both see it.
    for client in (newcomer, watcher):
        listing = await client.request({"type": "presence", "channel": ROOM, "id": "after"})
        assert sorted(m["user_id"] for m in listing["members"]) == sorted([ann_id, bob_id])
    await newcomer.close()
    await watcher.recv_type("leave")
    listing = await watcher.request({"type": "presence", "channel": ROOM, "id": "left"})
    assert [m["user_id"] for m in listing["members"]] == [ann_id]
    await watcher.close()


async def test_a_signed_tokens_user_id_names_the_member_and_a_bad_one_is_refused() -> None:
    """A back-end that signs subscription tokens names who each holder is: two tabs with
    tokens for one user_id are one member, with the token's info; a user_id that is not
    a short string or integer is refused, whoever signed it."""
    from accounts.subscription_tokens import subscription_token_issue

    def token(user_id: object) -> str:
        return subscription_token_issue(
            channel=ROOM,
            ttl_secs=60,
            info={"name": "Ann"},
            user_id=user_id,  # type: ignore[arg-type]  # a bad user_id on purpose
        )

    tabs = [await connected_client() for _ in range(2)]
    for tab in tabs:
        reply = await tab.request({"type": "subscribe", "channel": ROOM, "token": token("u-7")})
        assert reply["type"] == "subscribed", reply
    assert (await tabs[0].recv_type("join"))["member"] == {
        "user_id": "u-7",
        "info": {"name": "Ann"},
    }
    # (The second tab may hear the join too, if it came after its subscribe.)
    await tabs[1].send({"type": "presence", "channel": ROOM, "id": 1})
    listing = await tabs[1].recv()
    if listing["type"] == "join":
        listing = await tabs[1].recv()
    assert listing["members"] == [{"user_id": "u-7", "info": {"name": "Ann"}}]
    outsider = await connected_client()
    for bad in ("", "x" * 129, True, {"id": 7}, 1.5):
        reply = await outsider.request({"type": "subscribe", "channel": ROOM, "token": token(bad)})
        assert reply["code"] == "FORBIDDEN" and "user_id" in reply["message"], bad
    for client in (*tabs, outsider):
        await client.close()


async def test_shared_member_lists_are_not_held_past_their_time_or_their_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the shared reads hold is bounded: at most MEMBERS_REUSE_MAX_CHANNELS lists,
    none kept once its time is over and another read comes."""
    from push.cluster import presence
    from push.services.runtime import get_node

    store = (await get_node()).presence
    monkeypatch.setattr(presence, "MEMBERS_REUSE_MAX_CHANNELS", 2)
    for n in range(4):
        await store.members(f"presence-bound-{n}")
    assert list(store._listed) == ["presence-bound-2", "presence-bound-3"]
    monkeypatch.setattr(presence, "MEMBERS_REUSE_SECS", 0.0)
    await asyncio.sleep(0.01)
    await store.members("presence-bound-4")
    assert list(store._listed) == ["presence-bound-4"]


def _presence_joins_fail(node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis fails every presence join (an outage): the script's call, after the node
    recorded the member for its repair to put back, as a real outage leaves it."""

    async def redis_away(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Redis connection lost")

    monkeypatch.setattr(node.presence, "_join", redis_away)


async def _member_ids_once_redis_is_back(node: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The members of ROOM after the outage, once the node's repair has run."""
    monkeypatch.undo()
    await node.presence.repair(node.announce_presence)
    return [m["user_id"] for m in await node.presence.members(ROOM)]


async def _stream_told_its_presence_join_failed(
    node: Any, monkeypatch: pytest.MonkeyPatch, username: str, *others: str
) -> InProcessStream:
    """A member's stream of ROOM (and ``others``) while Redis fails every presence
    join, past its ``connection_established`` and ROOM's ``UNAVAILABLE`` error."""
    _, token = await sync_to_async(_member_token)(username)
    _presence_joins_fail(node, monkeypatch)
    channels = "".join(f"channel={c}&" for c in (ROOM, *others))
    stream = InProcessStream(f"{channels}token={token}")
    assert await stream.start() == 200
    assert (await stream.next_event() or ("",))[0] == "connection_established"
    kind, error = await stream.next_event() or ("", {})
    assert (kind, error["channel"], error["code"]) == ("error", ROOM, "UNAVAILABLE")
    return stream


async def test_an_sse_stream_whose_presence_join_fails_goes_on_with_its_other_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis fails the presence join of one channel of a stream (an outage): that channel
    gets an ``UNAVAILABLE`` error event naming it, and the stream goes on with its other
    channels, as a WebSocket's other subscriptions do. The failure used to escape the
    stream, which broke off without a word, its other channels with it, on every
    reconnect while the outage lasted. Then the channel failed was streamed all the
    same, and its member put back by the node's repair once Redis answered: now it is
    neither (SSE has no ``subscribed`` that could say it stands)."""
    node = await get_node()
    stream = await _stream_told_its_presence_join_failed(node, monkeypatch, "dee", "news")
    assert await _member_ids_once_redis_is_back(node, monkeypatch) == []
    await sync_to_async(push.publish)(ROOM, "not streamed")
    await sync_to_async(push.publish)("news", "after")
    kind, message = await stream.next_event() or ("", {})
    assert (kind, message["channel"], message["data"]) == ("message", "news", "after")
    await stream.close()


async def test_an_sse_stream_whose_only_channel_cannot_join_presence_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = await get_node()
    stream = await _stream_told_its_presence_join_failed(node, monkeypatch, "fay")
    assert await stream.next_event() is None, "the stream ends"
    assert await _member_ids_once_redis_is_back(node, monkeypatch) == []
    await stream.close()


async def _presence_keys_lost() -> None:
    """What a Redis restarted without its data holds of presence: nothing."""
    from push.services.runtime import get_node

    node = await get_node()
    redis = node.presence.redis
    keys = [key async for key in redis.scan_iter(match=f"{node.presence.prefix}:presence*")]
    assert keys
    await redis.delete(*keys)


async def test_members_come_back_when_redis_lost_them_and_a_failed_leave_is_put_right(
    settings: Any,
) -> None:
    """Redis restarted without its data (or took this node for dead and reaped it):
    the members still connected are members again within a cluster announcement (their
    subscribers, who list them already, are told nothing); a leave that did not reach
    Redis is made later, and heard, instead of leaving the member there for good."""
    from push.cluster.presence import presence_members_sync
    from push.services.runtime import get_node

    settings.PUSH = {"CLUSTER_ANNOUNCE_SECS": 0.2, "NODE_DEAD_AFTER_SECS": 30}
    ann_id, ann = await sync_to_async(_member_token)("ann")
    bob_id, bob = await sync_to_async(_member_token)("bob")
    watcher = await _join(ann)
    await watcher.recv_type("join")
    bob_tab = await _join(bob)
    await watcher.recv_type("join")

    async def member_ids() -> list[Any]:
        listing = await watcher.request({"type": "presence", "channel": ROOM})
        return sorted(m["user_id"] for m in listing["members"])

    def listed_in_redis() -> list[Any]:
        return sorted(m["user_id"] for m in presence_members_sync(ROOM, local=None))

    await _presence_keys_lost()
    await wait_until(
        sync_to_async(listed_in_redis), "the members back in Redis", timeout=10
    )  # an empty list is false
    assert await sync_to_async(listed_in_redis)() == sorted([ann_id, bob_id])
    await watcher.expect_nothing(0.5)
    assert await member_ids() == sorted([ann_id, bob_id])

    store = (await get_node()).presence
    leave_script = store._leave
    failures = []

    async def failing_once(**kwargs: Any) -> Any:
        if not failures:
            failures.append(kwargs)
            raise ConnectionError("Redis is away")
        return await leave_script(**kwargs)

    store._leave = failing_once
    await bob_tab.close()
    left = await watcher.recv_type("leave")
    assert failures, "the first leave failed"
    assert left["member"]["user_id"] == bob_id
    assert await member_ids() == [ann_id]
    await watcher.close()


async def _pusher_subscribe(user_id: str) -> tuple[Any, dict[str, Any]]:
    """A Pusher client of a fresh app subscribing to ROOM as ``user_id``: the client and
    the answer it got."""
    from push.models import PusherApp
    from push.tests.wsclient import RECEIVE_TIMEOUT_SECS, communicator_for

    await sync_to_async(PusherApp.objects.get_or_create)(
        key="presence-key", defaults={"name": "app", "app_id": "77", "secret": "presence-secret"}
    )
    client = communicator_for(path="/app/presence-key?protocol=7")
    assert (await client.connect(timeout=RECEIVE_TIMEOUT_SECS))[0]
    hello = json.loads((await client.receive_output(RECEIVE_TIMEOUT_SECS))["text"])
    data = hello["data"]
    socket_id = (json.loads(data) if isinstance(data, str) else data)["socket_id"]
    channel_data = json.dumps({"user_id": user_id})
    signed = f"{socket_id}:{ROOM}:{channel_data}".encode()
    auth = "presence-key:" + hmac.new(b"presence-secret", signed, hashlib.sha256).hexdigest()
    subscribe = {"channel": ROOM, "auth": auth, "channel_data": channel_data}
    await client.send_to(text_data=json.dumps({"event": "pusher:subscribe", "data": subscribe}))
    return client, json.loads((await client.receive_output(RECEIVE_TIMEOUT_SECS))["text"])


async def test_a_pusher_presence_subscribe_that_fails_after_joining_leaves_no_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Pusher subscription joins first, then reads the member list: when that read
    fails (Redis away for a moment) the client is told the subscription failed, and
    the member it joined leaves again instead of staying listed for good."""
    from push.cluster.presence import PresenceStore
    from push.services.runtime import get_node

    read_members = PresenceStore.members

    async def failing(self: PresenceStore, channel: str) -> list[dict]:
        monkeypatch.setattr(PresenceStore, "members", read_members)
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(PresenceStore, "members", failing)
    client, answer = await _pusher_subscribe("ann")
    assert answer["event"] == "pusher:subscription_error", answer
    assert await (await get_node()).presence.members(ROOM) == []
    await client.disconnect()


async def test_a_pusher_presence_subscribe_over_its_address_budget_announces_nobody(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Pusher subscription refused for its address's subscription budget (or the
    node's overload) is refused before its presence join: the channel's members hear
    no join and leave of someone who never subscribed, and the back-end no
    member_added and member_removed, however often the client asks."""
    from push.services import subscriptions

    _, ann = await sync_to_async(_member_token)("ann")
    watcher = await _join(ann)
    await watcher.recv_type("join")
    monkeypatch.setattr(subscriptions, "subscription_allowed", lambda budget: False)
    client, answer = await _pusher_subscribe("mallory")
    assert answer["event"] == "pusher:subscription_error", answer
    assert json.loads(answer["data"])["status"] == 429
    await watcher.expect_nothing(0.5)
    await client.disconnect()
    await watcher.close()


async def test_without_redis_a_channel_everyone_left_is_forgotten() -> None:
    """One process without Redis keeps presence in memory: a member going through
    thousands of presence channels must not leave an entry behind for each of them."""
    from push.cluster.presence import PresenceStore, member

    store = PresenceStore(None, "t", "node-a")
    for n in range(100):
        channel = f"presence-passing-{n}"
        assert await store.join(channel, "c-1", member("u-1", {}))
        assert await store.leave(channel, "c-1") == member("u-1", {})
    assert store._memory == {}


async def test_a_node_restarted_under_its_name_lets_the_members_it_left_go() -> None:
    """A node given a fixed NODE_ID that crashed and came back before it was judged dead
    is never reaped: its first repair makes the members of its previous run leave."""
    from push.cluster.presence import PresenceStore, member
    from push.services.runtime import get_node

    node = await get_node()
    channel = "presence-restarted"
    before = PresenceStore(node.presence.redis, node.presence.prefix, "fixed-node")
    assert await before.join(channel, "c-1", member("u-1", {"n": 1}))
    after = PresenceStore(node.presence.redis, node.presence.prefix, "fixed-node")
    heard: list[tuple[str, str, Any]] = []

    async def announce(kind: str, channel: str, left: dict[str, Any]) -> None:
        heard.append((kind, channel, left))

    await after.repair(announce)
    assert heard == [("leave", channel, member("u-1", {"n": 1}))]
    assert await after.members(channel) == []
    assert await after.entries_of("fixed-node") == []


async def test_a_connection_closed_while_it_subscribes_leaves_no_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server closes a connection (an admin's disconnect, a drain, a revocation)
    while its subscribe to a presence channel is still under way, before its join: the
    close lets go of its channels at once, so the join that follows must not stay."""
    from common.errors import CloseCode
    from push.cluster.occupancy import Occupancy
    from push.cluster.presence import presence_members_sync
    from push.services.runtime import get_node
    from push.services.subscriptions import channel_subscribe
    from push.transport import consumers

    watch = Occupancy.watch

    async def closed_meanwhile(self: Occupancy, subscription: Any) -> None:
        for connection in list((await get_node()).connections.values()):
            connection.close(CloseCode.POLICY)
        await asyncio.sleep(0.1)  # what the close started runs first
        await watch(self, subscription)

    subscribed = asyncio.Event()

    async def subscribe(*args: Any, **kwargs: Any) -> None:
        try:
            await channel_subscribe(*args, **kwargs)
        finally:
            subscribed.set()

    monkeypatch.setattr(Occupancy, "watch", closed_meanwhile)
    monkeypatch.setattr(consumers, "channel_subscribe", subscribe)
    _, ann = await sync_to_async(_member_token)("ann")
    client = await connected_client(token=ann)
    await client.send({"type": "subscribe", "channel": ROOM, "occupancy": True})
    assert await client.expect_close() == CloseCode.POLICY
    await asyncio.wait_for(subscribed.wait(), 10)
    members = await sync_to_async(presence_members_sync)(ROOM, local=None)
    assert members == []


async def test_a_repair_that_fails_midway_is_made_whole_next_time() -> None:
    """A repair cut short (Redis away again) compares entry by entry next time, even
    when the counts happen to agree by then."""
    from push.cluster.presence import PresenceStore, member
    from push.services.runtime import get_node

    node = await get_node()
    store = PresenceStore(node.presence.redis, node.presence.prefix, "repairing-node")
    channel = "presence-repairing"
    assert await store.join(channel, "c-1", member("u-1", {}))
    await node.presence.redis.delete(*store._keys(channel, "repairing-node"))
    redis = store.redis

    class Away:
        def __getattr__(self, name: str) -> Any:
            return getattr(redis, name)

        async def smembers(self, key: str) -> Any:
            raise ConnectionError("Redis is away")

    store.redis = Away()
    heard: list[str] = []

    async def announce(kind: str, channel: str, joined: dict[str, Any]) -> None:
        heard.append(kind)

    with pytest.raises(ConnectionError):
        await store.repair(announce)
    store.redis = redis
    # An entry of this node's name whose channel Redis lost makes the counts agree.
    stale = "presence-x|repairing-node|stale"
    await node.presence.redis.sadd(store.node_index("repairing-node"), stale)
    await store.repair(announce)
    assert [m["user_id"] for m in await store.members(channel)] == ["u-1"]
    await store.leave(channel, "c-1")
    await store.repair(announce)
    assert await store.entries_of("repairing-node") == []


async def test_a_presence_subscribe_whose_join_fails_is_answered_once_and_stands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis fails the presence join after ``subscribed`` went out (an outage): the
    subscription stands and messages come, and the node's repair puts the member back
    later. The request used to be answered twice, ``subscribed`` and then an
    ``UNAVAILABLE`` error under the same id, which a client takes for a refusal."""
    _, token = await sync_to_async(_member_token)("eve")
    node = await get_node()

    async def failing(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionError("Redis connection lost")

    monkeypatch.setattr(node.presence, "join", failing)
    client = await connected_client(token=token)
    reply = await client.request({"type": "subscribe", "channel": ROOM, "id": "s"})
    assert (reply["type"], reply["id"]) == ("subscribed", "s")
    ack = await client.request({"type": "heartbeat", "id": "h"})
    assert (ack["type"], ack["id"]) == ("heartbeat_ack", "h"), ack
    await sync_to_async(push.publish)(ROOM, "after")
    message = await client.recv_type("message")
    assert message["data"] == "after"
    await client.close()


async def _pusher_members_seen(client: Any, answer: dict[str, Any]) -> set[str]:
    """The members a Pusher client knows once its events stop coming: those of its
    ``subscription_succeeded``, with each ``member_added`` / ``member_removed`` after."""
    from push.tests.wsclient import RECEIVE_TIMEOUT_SECS

    known = set(json.loads(answer["data"])["presence"]["ids"])
    while not await client.receive_nothing(0.5):
        frame = json.loads((await client.receive_output(RECEIVE_TIMEOUT_SECS))["text"])
        user_id = json.loads(frame["data"]).get("user_id")
        if frame["event"] == "pusher_internal:member_added":
            known.add(user_id)
        elif frame["event"] == "pusher_internal:member_removed":
            known.discard(user_id)
    return known


def _changed_while_read(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Every member list read returns what Redis held, but only once ``change`` (a join
    or leave made by another node) has been made and announced: as when a read is slow,
    or the node joins the channel's group meanwhile."""
    from push.cluster.presence import PresenceStore
    from push.cluster.presence_views import PresenceViews

    read_members = PresenceStore.members
    read_view = PresenceViews.members

    async def changed_meanwhile(self: PresenceStore, channel: str, **kwargs: Any) -> list[dict]:
        listed = await read_members(self, channel, **kwargs)
        await change()
        await asyncio.sleep(0.3)  # the announcement reaches this node
        return listed

    async def view_changed_meanwhile(self: PresenceViews, channel: str) -> list[dict] | None:
        listed = await read_view(self, channel)
        if listed is not None:
            await change()
            await asyncio.sleep(0.3)
        return listed

    monkeypatch.setattr(PresenceStore, "members", changed_meanwhile)
    # Where the node answers from its view of the channel, it changes after that.
    monkeypatch.setattr(PresenceViews, "members", view_changed_meanwhile)


async def _another_node_member(node: Any) -> tuple[Any, Any]:
    """A member "zed" on another node, and a function making its next change there
    (join or leave, announced) once."""
    from push.cluster.presence import PresenceStore, member

    other = PresenceStore(node.presence.redis, node.presence.prefix, "presence-other-node")
    other.relay = node.presence.relay  # as that node's own would be
    zed = member("zed", {})
    changes: list[str] = []

    async def change(kind: str) -> None:
        if kind in changes:
            return
        changes.append(kind)
        if kind == "join":
            assert await other.join(ROOM, "c-zed", zed)
            await node.announce_presence("join", ROOM, zed)
        else:
            assert await other.leave(ROOM, "c-zed") == zed
            await node.announce_presence("leave", ROOM, zed)

    return other, change


@pytest.mark.parametrize("served", [False, True], ids=["new-to-node", "served"])
@pytest.mark.parametrize("kind", ["join", "leave"])
async def test_a_pusher_member_list_misses_no_join_or_leave_made_as_it_subscribes(
    monkeypatch: pytest.MonkeyPatch, served: bool, kind: str
) -> None:
    """A Pusher subscription's member list was read before the subscription received
    the channel's events: a member joining or leaving in between (on a node that
    starts serving the channel, while it joins its group and reads its recent
    messages) was in neither, and the client listed a member gone for good, or lacked
    one there, for as long as it stayed."""
    from push.cluster.presence import presence_members_sync

    node = await get_node()
    other, change = await _another_node_member(node)
    watcher = None
    if served:  # the node serves the channel already
        _, ann = await sync_to_async(_member_token)("ann")
        watcher = await _join(ann)
        await watcher.recv_type("join")
    if kind == "leave":
        await change("join")
    _changed_while_read(monkeypatch, lambda: change(kind))
    client, answer = await _pusher_subscribe("pat")
    try:
        assert answer["event"] == "pusher_internal:subscription_succeeded", answer
        listed = await sync_to_async(presence_members_sync)(ROOM, local=None)
        expected = {str(m["user_id"]) for m in listed}
        assert ("zed" in expected) is (kind == "join")
        assert await _pusher_members_seen(client, answer) == expected
    finally:
        await client.disconnect()
        await other.leave(ROOM, "c-zed")
        if watcher is not None:
            await watcher.close()


@pytest.mark.parametrize("kind", ["join", "leave"])
async def test_a_member_list_answer_holds_the_joins_and_leaves_sent_before_it(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A member list read before a join or leave, and answered after the subscriber
    was sent that event, contradicted it: the subscriber listed a member that had left,
    or lacked one that had joined, until it asked again."""
    node = await get_node()
    other, change = await _another_node_member(node)
    ann_id, ann = await sync_to_async(_member_token)("ann")
    watcher = await _join(ann)
    await watcher.recv_type("join")
    if kind == "leave":
        await change("join")
        await watcher.recv_type("join")
    _changed_while_read(monkeypatch, lambda: change(kind))
    try:
        await watcher.send({"type": "presence", "channel": ROOM, "id": 1})
        assert (await watcher.recv_type(kind))["member"]["user_id"] == "zed"
        listing = await watcher.recv_type("presence")
        expected = [ann_id, "zed"] if kind == "join" else [ann_id]
        assert sorted(str(m["user_id"]) for m in listing["members"]) == sorted(map(str, expected))
    finally:
        await other.leave(ROOM, "c-zed")
        await watcher.close()


async def test_a_pusher_subscription_whose_members_cannot_be_read_again_stands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node starts serving the channel for this subscription, so it reads the
    members again once the subscription is live: when Redis fails that read, the
    subscription stands as answered, with no second answer (an error) for it."""
    from push.cluster.presence import PresenceStore

    read_members = PresenceStore.members

    async def second_read_fails(self: PresenceStore, channel: str, **kwargs: Any) -> list[dict]:
        if kwargs.get("read_since") is not None:
            raise ConnectionError("Redis is away")
        return await read_members(self, channel, **kwargs)

    monkeypatch.setattr(PresenceStore, "members", second_read_fails)
    client, answer = await _pusher_subscribe("pat")
    assert answer["event"] == "pusher_internal:subscription_succeeded", answer
    assert await client.receive_nothing(0.5)
    monkeypatch.undo()
    listed = await (await get_node()).presence.members(ROOM)
    assert [m["user_id"] for m in listed] == ["pat"]
    await client.disconnect()


async def test_a_leave_redis_lost_with_its_data_is_announced_once_it_is_back() -> None:
    """A member whose leave could not reach Redis, which then restarted without its data:
    the repair put the remaining members back, and nothing
    said the one that left had gone: its subscribers listed it for as long as they
    stayed."""
    node = await get_node()
    ann_id, ann = await sync_to_async(_member_token)("ann")
    bob_id, bob = await sync_to_async(_member_token)("bob")
    watcher = await _join(ann)
    await watcher.recv_type("join")
    bob_tab = await _join(bob)
    await watcher.recv_type("join")
    store = node.presence
    leave_script = store._leave

    async def redis_away(**kwargs: Any) -> Any:
        raise ConnectionError("Redis is away")

    store._leave = redis_away
    await bob_tab.close()
    await asyncio.sleep(0.2)  # its leave is tried, and fails
    await _presence_keys_lost()
    store._leave = leave_script
    await store.repair(node.announce_presence)
    heard = await watcher.recv()
    assert (heard["type"], heard["member"]["user_id"]) == ("leave", bob_id)
    # Ann was put back too, and was listed all along: no join is sent for her.
    await watcher.expect_nothing(0.3)
    assert [m["user_id"] for m in await store.members(ROOM)] == [ann_id]
    await watcher.close()


async def test_a_leave_announced_late_by_its_node_does_not_undo_a_later_join() -> None:
    """A member's last connection closed on another node, whose loop was then busy
    before it announced the leave; meanwhile the member came back here (a page reloaded
    onto another node). The leave, announced after the join, told every subscriber the
    member had gone, though it was there, and they listed it gone for good."""
    from push.cluster.presence import presence_members_sync

    node = await get_node()
    assert node.presence.relay is not None, "the layer lets scripts send"
    other, change = await _another_node_member(node)
    ann_id, ann = await sync_to_async(_member_token)("ann")
    watcher = await _join(ann)
    await watcher.recv_type("join")
    await change("join")
    await watcher.recv_type("join")
    zed = {"user_id": "zed", "info": {}}
    left = await other.leave(ROOM, "c-zed")  # the other node's loop is busy now
    assert await node.presence.join(ROOM, "c-back", zed)
    await node.announce_presence("join", ROOM, zed)
    await node.announce_presence("leave", ROOM, left)  # the other node's, late
    try:
        known = {ann_id, "zed"}
        while not await watcher.communicator.receive_nothing(0.5):
            event = await watcher.recv()
            if event["type"] == "join":
                known.add(event["member"]["user_id"])
            else:
                known.discard(event["member"]["user_id"])
        listed = await sync_to_async(presence_members_sync)(ROOM, local=None)
        assert {m["user_id"] for m in listed} == {ann_id, "zed"}
        assert known == {ann_id, "zed"}
    finally:
        await node.presence.leave(ROOM, "c-back")
        await watcher.close()
