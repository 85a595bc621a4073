"""The Pusher protocol endpoint (``/app/<key>``) against two real nodes (``pusher_nodes``,
a daphne and a uvicorn one, in tests/conftest.py), frame by frame:
the handshake and its refusals, public, private, presence and cache channels, client
events, sign-in, ping, and the bridge from our own protocol's publishes to Pusher
events. pusher-js and Laravel Echo drive the same endpoint in tests/test_pusher_js.py."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import psycopg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.pusherclient import (
    APP_KEY,
    PusherClient,
    channel_auth,
    presence_data,
    pusher_env,
    receive,
    sign,
)
from tests.servers import Database, ServerNode, manage, publish_rest
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


def _channel(prefix: str = "") -> str:
    return f"{prefix}pt-{uuid.uuid4().hex[:8]}"


async def test_connection_established_names_a_socket_id_and_the_activity_timeout(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    assert client.socket_id.count(".") == 1 and client.socket_id.replace(".", "").isdigit()
    assert client.activity_timeout == 120
    await client.send("pusher:ping", {})
    assert (await client.receive())["event"] == "pusher:pong"
    await client.close()


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/app/unknown-key?protocol=7", 4001),
        (f"/app/{APP_KEY}", 4008),
        (f"/app/{APP_KEY}?protocol=x", 4006),
        # Digits to isdigit() that int() refuses, and more than int() reads.
        (f"/app/{APP_KEY}?protocol=%C2%B2", 4006),
        (f"/app/{APP_KEY}?protocol={'7' * 5000}", 4006),
        (f"/app/{APP_KEY}?protocol=99", 4007),
    ],
)
async def test_a_refused_handshake_says_why_with_pushers_code(
    pusher_nodes: tuple[ServerNode, ServerNode], path: str, code: int
) -> None:
    ws = await connect(pusher_nodes[0].pusher_url + path)
    frame = await receive(ws)
    assert frame == {
        "event": "pusher:error",
        "data": {"code": code, "message": frame["data"]["message"]},
    }
    with pytest.raises(ConnectionClosed):
        await receive(ws)
    assert ws.close_code == code


async def test_messages_of_our_protocol_reach_pusher_clients_as_events(
    pusher_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    node_a, node_b = pusher_nodes
    channel = _channel()
    client = await PusherClient.connect(node_a.pusher_url)
    succeeded = await client.subscribe(channel)
    assert succeeded == {
        "event": "pusher_internal:subscription_succeeded",
        "channel": channel,
        "data": "{}",
    }
    await publish_rest(node_b, publisher_token, channel, {"price": 1})
    await publish_rest(
        node_b, publisher_token, channel, {"event": "order-created", "data": {"id": 7}}
    )
    await publish_rest(node_b, publisher_token, channel, {"event": "note", "data": "plain text"})
    frames = [await client.receive() for _ in range(3)]
    assert frames == [
        {"event": "message", "channel": channel, "data": '{"price":1}'},
        {"event": "order-created", "channel": channel, "data": '{"id":7}'},
        {"event": "note", "channel": channel, "data": "plain text"},
    ]
    await client.send("pusher:unsubscribe", {"channel": channel})
    await asyncio.sleep(0.2)
    await publish_rest(node_b, publisher_token, channel, {"after": True})
    await client.nothing_for(0.5)
    await client.close()


async def test_private_channels_need_the_apps_signature(
    pusher_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = _channel("private-")
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    refused = await client.subscribe(channel, auth=f"{APP_KEY}:{sign('wrong', 'nope')}")
    assert refused["event"] == "pusher:subscription_error"
    assert json.loads(refused["data"])["status"] == 403
    other = await PusherClient.connect(pusher_nodes[0].pusher_url)
    # A signature for another socket is no signature for this one.
    stolen = channel_auth(other.socket_id, channel)
    assert (await client.subscribe(channel, auth=stolen))["event"] == "pusher:subscription_error"
    assert (await client.subscribe(channel))["event"] == "pusher_internal:subscription_succeeded"
    await publish_rest(pusher_nodes[1], publisher_token, channel, {"event": "secret", "data": "s"})
    assert await client.receive() == {"event": "secret", "channel": channel, "data": "s"}
    await client.close()
    await other.close()


async def test_public_channels_follow_the_servers_permissions(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    # user:<id> channels belong to one user of our own protocol: an anonymous Pusher
    # client may not read them, signature or not (the name is no Pusher private channel).
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    refused = await client.subscribe("user:1")
    assert refused["event"] == "pusher:subscription_error"
    assert json.loads(refused["data"])["status"] == 403
    bad = await client.subscribe("bad name!")
    assert json.loads(bad["data"])["status"] == 400
    await client.close()


async def test_presence_members_across_nodes_one_per_user(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    node_a, node_b = pusher_nodes
    channel = _channel("presence-")
    alice = await PusherClient.connect(node_a.pusher_url)
    alice_data = presence_data("alice", {"name": "Alice"})
    succeeded = await alice.subscribe(channel, channel_data=alice_data)
    presence = json.loads(succeeded["data"])["presence"]
    assert presence == {"ids": ["alice"], "hash": {"alice": {"name": "Alice"}}, "count": 1}

    bob_data = presence_data("bob", {"name": "Bob"})
    bob = await PusherClient.connect(node_b.pusher_url)
    presence = json.loads((await bob.subscribe(channel, channel_data=bob_data))["data"])["presence"]
    assert sorted(presence["ids"]) == ["alice", "bob"] and presence["count"] == 2
    added = await alice.receive_event("pusher_internal:member_added")
    assert json.loads(added["data"]) == {"user_id": "bob", "user_info": {"name": "Bob"}}

    # A second connection of bob's is no second member: nobody hears of it.
    bob_again = await PusherClient.connect(node_a.pusher_url)
    await bob_again.subscribe(channel, channel_data=bob_data)
    await bob_again.close()
    await alice.nothing_for(0.5)

    # Presence data that the signature does not cover is refused.
    mallory = await PusherClient.connect(node_a.pusher_url)
    forged = channel_auth(mallory.socket_id, channel, presence_data("mallory"))
    refused = await mallory.subscribe(channel, auth=forged, channel_data=presence_data("alice"))
    assert refused["event"] == "pusher:subscription_error"
    await mallory.close()

    await bob.close()
    removed = await alice.receive_event("pusher_internal:member_removed")
    assert json.loads(removed["data"]) == {"user_id": "bob"}
    await alice.close()


@pytest.mark.parametrize("prefix", ["cache-", "private-cache-", "presence-cache-"])
async def test_cache_channel_sends_the_last_event_or_a_cache_miss(
    pusher_nodes: tuple[ServerNode, ServerNode], publisher_token: str, prefix: str
) -> None:
    channel = _channel(prefix)
    member = presence_data("first") if prefix.startswith("presence-") else None
    first = await PusherClient.connect(pusher_nodes[0].pusher_url)
    succeeded = await first.subscribe(channel, channel_data=member)
    assert succeeded["event"] == "pusher_internal:subscription_succeeded"
    assert await first.receive() == {"event": "pusher:cache_miss", "channel": channel}
    # Subscribing again is answered, but is no new subscriber: no second cache miss
    # (the pong, answered after it, comes next).
    succeeded = await first.subscribe(channel, channel_data=member)
    assert succeeded["event"] == "pusher_internal:subscription_succeeded"
    await first.send("pusher:ping", {})
    assert (await first.receive())["event"] == "pusher:pong"
    for n in (1, 2):
        await publish_rest(
            pusher_nodes[1], publisher_token, channel, {"event": "price", "data": str(n)}
        )
    assert [(await first.receive())["data"] for _ in range(2)] == ["1", "2"]
    later = await PusherClient.connect(pusher_nodes[0].pusher_url)
    succeeded = await later.subscribe(channel, channel_data=member and presence_data("later"))
    assert succeeded["event"] == "pusher_internal:subscription_succeeded"
    assert await later.receive() == {"event": "price", "channel": channel, "data": "2"}
    await later.nothing_for(0.3)
    await first.close()
    await later.close()


async def test_a_cache_channel_whose_last_event_expired_sends_a_cache_miss(
    pusher_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    """Retention removed the channel's only message (``cache-expiring-*`` keeps them a
    second): a subscriber is told of the miss, as when there never was one. It used to
    get nothing after ``subscription_succeeded``, neither the event nor the miss."""
    channel = _channel("cache-expiring-")
    await publish_rest(pusher_nodes[1], publisher_token, channel, {"event": "e", "data": "1"})
    http = httpx.AsyncClient(base_url=pusher_nodes[0].http_url, timeout=10)

    async def expired() -> bool:
        response = await http.get(f"/api/v1/channels/{channel}/messages", params={"since": 0})
        return response.status_code == 200 and response.json()["results"] == []

    try:
        await wait_until(expired, f"{channel}'s message to expire", interval=0.2)
    finally:
        await http.aclose()
    for node in pusher_nodes:
        client = await PusherClient.connect(node.pusher_url)
        succeeded = await client.subscribe(channel)
        assert succeeded["event"] == "pusher_internal:subscription_succeeded"
        await client.send("pusher:ping", {})
        assert await client.receive() == {"event": "pusher:cache_miss", "channel": channel}
        await client.close()


async def test_client_events_reach_the_others_and_never_the_sender(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    node_a, node_b = pusher_nodes
    channel = _channel("presence-")
    sender = await PusherClient.connect(node_a.pusher_url)
    await sender.subscribe(channel, channel_data=presence_data("sender"))
    near = await PusherClient.connect(node_a.pusher_url)
    await near.subscribe(channel, channel_data=presence_data("near"))
    far = await PusherClient.connect(node_b.pusher_url)
    await far.subscribe(channel, channel_data=presence_data("far"))
    await asyncio.sleep(0.3)
    for client in (sender, near):
        while True:  # the member_added frames of those who came later
            try:
                await client.receive(0.3)
            except TimeoutError:
                break
    await sender.send("client-typing", {"text": "hi"}, channel=channel)
    expected = {
        "event": "client-typing",
        "channel": channel,
        "data": '{"text":"hi"}',
        "user_id": "sender",
    }
    assert await near.receive() == expected
    assert await far.receive_event("client-typing") == expected
    await sender.nothing_for(0.3)

    # Only on a subscribed private or presence channel.
    public = _channel()
    await sender.subscribe(public)
    await sender.send("client-typing", {}, channel=public)
    assert (await sender.receive())["event"] == "pusher:error"
    await sender.send("client-typing", {}, channel=_channel("private-"))
    assert (await sender.receive())["event"] == "pusher:error"

    # Past the rate (10 a second), refused with 4301; the connection stays.
    answers = []
    for _ in range(15):
        await sender.send("client-burst", "x", channel=channel)
    while True:
        try:
            answers.append(await sender.receive(0.5))
        except TimeoutError:
            break
    assert any(a["event"] == "pusher:error" and a["data"]["code"] == 4301 for a in answers)
    await sender.send("pusher:ping", {})
    assert (await sender.receive_event("pusher:pong"))["event"] == "pusher:pong"
    for client in (sender, near, far):
        await client.close()


async def test_client_events_are_refused_when_the_app_does_not_allow_them(
    pusher_nodes: tuple[ServerNode, ServerNode], e2e_env: dict[str, str]
) -> None:
    output = manage(pusher_env(e2e_env), "pusher_app", "create", f"quiet-{uuid.uuid4().hex[:6]}")
    values = dict(line.split("=", 1) for line in output.strip().splitlines())
    client = await PusherClient.connect(pusher_nodes[0].pusher_url, key=values["key"])
    channel = _channel("private-")
    auth = f"{values['key']}:{sign(f'{client.socket_id}:{channel}', values['secret'])}"
    assert (await client.subscribe(channel, auth=auth))[
        "event"
    ] == "pusher_internal:subscription_succeeded"
    await client.send("client-x", {}, channel=channel)
    error = await client.receive()
    assert error["event"] == "pusher:error" and "not enabled" in error["data"]["message"]
    await client.close()


async def test_encrypted_channels_are_relayed_as_private_without_client_events(
    pusher_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = _channel("private-encrypted-")
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    assert (await client.subscribe(channel))["event"] == "pusher_internal:subscription_succeeded"
    ciphertext = json.dumps({"nonce": "bm9uY2U=", "ciphertext": "Y2lwaGVy"})
    await publish_rest(
        pusher_nodes[1], publisher_token, channel, {"event": "sealed", "data": ciphertext}
    )
    assert await client.receive() == {"event": "sealed", "channel": channel, "data": ciphertext}
    await client.send("client-x", {}, channel=channel)
    assert "encrypted" in (await client.receive())["data"]["message"]
    await client.close()


async def test_signin_needs_the_apps_signature(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    user_data = json.dumps({"id": "u-1", "user_info": {"name": "U"}})
    auth = f"{APP_KEY}:{sign(f'{client.socket_id}::user::{user_data}')}"
    await client.send("pusher:signin", {"auth": auth, "user_data": user_data})
    success = await client.receive()
    assert success == {
        "event": "pusher:signin_success",
        "data": json.dumps({"user_data": user_data}, separators=(",", ":")),
    }
    forger = await PusherClient.connect(pusher_nodes[0].pusher_url)
    await forger.send("pusher:signin", {"auth": auth, "user_data": user_data})
    assert (await forger.receive())["data"]["code"] == 4009
    with pytest.raises(ConnectionClosed):
        await forger.receive()
    assert forger.ws.close_code == 4009
    await client.close()


async def test_bad_frames_get_an_error_and_the_connection_stays(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    for frame in (
        "not json",
        "[]",
        '{"event": 5}',
        '{"event": "pusher:nonsense"}',
        '{"event":"pusher:subscribe","data":"\\ud800"}',
    ):
        await client.ws.send(frame)
        assert (await client.receive())["event"] in ("pusher:error", "pusher:subscription_error")
    await client.send("pusher:ping", {})
    assert (await client.receive())["event"] == "pusher:pong"
    await client.close()


async def test_a_quiet_client_is_pinged_then_closed_with_4201(e2e_env: dict[str, str]) -> None:
    env = {
        **pusher_env(e2e_env),
        "PUSHER_ACTIVITY_TIMEOUT": "1",
        "PUSHER_PONG_TIMEOUT": "1",
        # The node's silence check runs every third of this (at most every 5 s).
        "PUSH_HEARTBEAT_TIMEOUT_SECS": "3",
    }
    node = ServerNode(env, name="pusher-quiet").start()
    try:
        answering = await PusherClient.connect(node.pusher_url)
        quiet = await PusherClient.connect(node.pusher_url)
        assert answering.activity_timeout == 1
        ping = await answering.receive(8)
        assert ping["event"] == "pusher:ping"
        await answering.send("pusher:pong", {})
        assert (await quiet.receive(8))["event"] == "pusher:ping"
        error = await quiet.receive(8)
        assert error["data"]["code"] == 4201
        with pytest.raises(ConnectionClosed):
            await quiet.receive(5)
        assert quiet.ws.close_code == 4201
        # The one that answered is still served (pinged again, as it stays quiet).
        assert (await answering.receive(8))["event"] == "pusher:ping"
        await answering.close()
    finally:
        node.stop()


async def test_a_client_that_answers_pings_while_its_subscribe_waits_stays_connected(
    e2e_env: dict[str, str], e2e_database: Database
) -> None:
    """A subscribe waits on PostgreSQL when the node joins the channel (its recent
    messages) or sends a cache channel's last one; here the tables are locked, as a
    migration or a stalled disk would leave them. The client answers the server's pings
    meanwhile, as pusher-js does: it was closed 4201 (no pong) mid-subscribe, its pongs
    unread behind the subscribe; under uvicorn, a frame left unread also stops its
    keepalive pongs being read (1011 after 40 s). Its own ping is answered after the
    subscription, in the order sent."""
    env = {
        **pusher_env(e2e_env),
        "PUSHER_ACTIVITY_TIMEOUT": "1",
        "PUSHER_PONG_TIMEOUT": "1",
        "PUSH_HEARTBEAT_TIMEOUT_SECS": "3",  # the silence check runs every second
    }
    node = ServerNode(env, server="uvicorn", name="pusher-slow-subscribe").start()
    try:
        client = await PusherClient.connect(node.pusher_url)
        channel = _channel("cache-")
        answered_pings = 0
        with psycopg.connect(e2e_database.url) as locking:
            locking.execute("LOCK TABLE push_channel, push_message IN ACCESS EXCLUSIVE MODE")
            await client.send("pusher:subscribe", {"channel": channel})
            await client.send("pusher:ping", {})
            deadline = asyncio.get_running_loop().time() + 5
            while asyncio.get_running_loop().time() < deadline:
                try:
                    frame = await client.receive(0.2)  # pusher:error 4201 before
                except TimeoutError:
                    continue
                assert frame["event"] == "pusher:ping", frame
                await client.send("pusher:pong", {})
                answered_pings += 1
        assert answered_pings >= 2
        events = []
        while len(events) < 3:
            frame = await client.receive()
            if frame["event"] == "pusher:ping":
                await client.send("pusher:pong", {})
            else:
                events.append((frame["event"], frame.get("channel")))
        assert events == [
            ("pusher_internal:subscription_succeeded", channel),
            ("pusher:cache_miss", channel),
            ("pusher:pong", None),
        ]
        await client.close()
    finally:
        node.stop()


async def test_what_one_client_sends_is_bounded_in_bytes(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    channel = _channel("presence-")
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    big_member = presence_data("big", {"bio": "x" * 2000})
    refused = await client.subscribe(channel, channel_data=big_member)
    assert json.loads(refused["data"])["status"] == 413
    long_id = presence_data("u" * 129)
    assert (await client.subscribe(channel, channel_data=long_id))["event"] == (
        "pusher:subscription_error"
    )
    await client.subscribe(channel, channel_data=presence_data("ok"))
    await client.send("client-big", "x" * 10_241, channel=channel)
    assert "larger than" in (await client.receive())["data"]["message"]
    await client.ws.send(
        '{"event":"client-odd","channel":"%s","data":"\\ud800"}' % channel  # noqa: UP031
    )
    assert "surrogate" in (await client.receive())["data"]["message"]
    await client.close()


async def test_a_signed_in_user_gets_its_own_channel_and_nobody_elses(
    pusher_nodes: tuple[ServerNode, ServerNode],
) -> None:
    client = await PusherClient.connect(pusher_nodes[0].pusher_url)
    assert (await client.subscribe("#server-to-user-u-2"))["event"] == "pusher:subscription_error"
    user_data = json.dumps({"id": "u-2"})
    auth = f"{APP_KEY}:{sign(f'{client.socket_id}::user::{user_data}')}"
    await client.send("pusher:signin", {"auth": auth, "user_data": user_data})
    assert (await client.receive())["event"] == "pusher:signin_success"
    succeeded = await client.subscribe("#server-to-user-u-2")
    assert succeeded["event"] == "pusher_internal:subscription_succeeded"
    refused = await client.subscribe("#server-to-user-u-3")
    assert refused["event"] == "pusher:subscription_error"
    await client.close()
