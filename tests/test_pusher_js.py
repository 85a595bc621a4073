"""pusher-js and Laravel Echo from npm, unmodified, in Node against real nodes' Pusher
endpoint (``/app/<key>``): public channels fed by our REST API (the bridge between the
protocols), private channels authorized by ``POST /pusher/auth``, presence member lists
across connections of one user, private-encrypted channels, cache channels, client
events with and without the app's permission, and two nodes (the client on one, the
publisher on the other). The scripts print every frame they exchange, so a failure shows
the conversation (``PusherScript.transcript``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.pusher_clients import (
    ECHO_CLIENT,
    PUSHER_CLIENT,
    PusherScript,
    PusherSite,
    api_tokens,
    pusher_site,
    require_pusher_js,
)
from tests.pusherclient import APP_KEY, ENCRYPTION_MASTER_KEY, pusher_env
from tests.servers import ServerNode, publish_rest

pytestmark = pytest.mark.e2e


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def nodes(pusher_nodes: tuple[ServerNode, ServerNode]) -> tuple[ServerNode, ServerNode]:
    """The shared Pusher nodes (tests/conftest.py): an app that allows client events."""
    require_pusher_js()
    return pusher_nodes


@pytest.fixture(scope="module")
def closed_node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    """A node whose app does not allow client events."""
    env = {
        **pusher_env(e2e_env, client_events=False),
        "PUSHER_APP_ENCRYPTION_MASTER_KEY": ENCRYPTION_MASTER_KEY,
    }
    node = ServerNode(env, name="pusher-js-closed").start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def tokens(e2e_env: dict[str, str]) -> dict[str, str]:
    return api_tokens(e2e_env, granted=["pjs-alice", "pjs-bob"], refused=["pjs-nobody"])


@pytest.fixture(scope="module")
def site(nodes: tuple[ServerNode, ServerNode]) -> Iterator[PusherSite]:
    with pusher_site(nodes[0], APP_KEY) as running:
        yield running


@asynccontextmanager
async def connected(
    script: Path, node: ServerNode, token: str | None = None, **config: Any
) -> AsyncIterator[PusherScript]:
    """A connected client of ``script``, printing every frame; at the end it disconnects
    and must exit 0."""
    client = await PusherScript.launch(script, node, APP_KEY, token=token, frames=True, **config)
    try:
        await client.connected()
        yield client
    finally:
        await client.finish()


def pusher_js(node: ServerNode, token: str | None = None, **config: Any) -> Any:
    return connected(PUSHER_CLIENT, node, token, **config)


def echo(node: ServerNode, token: str | None = None) -> Any:
    return connected(ECHO_CLIENT, node, token)


# ----- public channels and the bridge from our protocol --------------------------------------


async def test_pusher_js_on_one_node_gets_what_our_rest_api_publishes_on_the_other(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    node_a, node_b = nodes
    channel = _name("orders-")
    async with pusher_js(node_a) as client:
        await client.subscribed(channel)
        await publish_rest(node_b, tokens["pjs-alice"], channel, {"n": 1})
        assert await client.event(channel, "message") == {"n": 1}
        await publish_rest(node_b, tokens["pjs-alice"], channel, "just text")
        assert await client.event(channel, "message") == "just text"
        order = {"event": "order-created", "data": {"id": 7, "total": "9.50"}}
        await publish_rest(node_b, tokens["pjs-alice"], channel, order)
        assert await client.event(channel, "order-created") == {"id": 7, "total": "9.50"}
        # A string data is the event's data as it is (pusher-js parses JSON text only).
        plain = {"event": "note", "data": "not json"}
        await publish_rest(node_a, tokens["pjs-alice"], channel, plain)
        assert await client.event(channel, "note") == "not json"


async def test_an_unknown_app_key_is_refused_with_4001(
    nodes: tuple[ServerNode, ServerNode],
) -> None:
    script = await PusherScript.launch(PUSHER_CLIENT, nodes[0], "no-such-key", frames=True)
    try:
        # pusher-js reads a pusher:error in place of connection_established as a refused
        # handshake: it reports the error and gives up (no reconnect for 4000-4099).
        line = await script.line_having("connection_error")
        assert line["connection_error"]["error"]["data"]["code"] == 4001, script.transcript()
        await script.line_with(state="disconnected")
    finally:
        await script.finish()


# ----- private channels -----------------------------------------------------------------------


async def test_a_private_channel_authorized_by_the_node_gets_its_messages(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    node_a, node_b = nodes
    channel = _name("private-orders-")
    async with pusher_js(node_a, tokens["pjs-alice"]) as client:
        await client.subscribed(channel)
        await publish_rest(node_b, tokens["pjs-bob"], channel, {"event": "paid", "data": {"id": 3}})
        assert await client.event(channel, "paid") == {"id": 3}


async def test_a_private_channel_without_a_grant_is_a_subscription_error(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    channel = _name("private-orders-")
    async with pusher_js(nodes[0], tokens["pjs-nobody"]) as refused:
        await refused.send("subscribe", channel=channel)
        error = await refused.event(channel, "pusher:subscription_error")
        assert error["status"] == 403, refused.transcript()
    async with pusher_js(nodes[0]) as anonymous:
        await anonymous.send("subscribe", channel=channel)
        error = await anonymous.event(channel, "pusher:subscription_error")
        assert error["status"] in (401, 403), anonymous.transcript()


async def test_a_forged_signature_is_refused_by_the_node(
    nodes: tuple[ServerNode, ServerNode], site: PusherSite
) -> None:
    channel = _name("private-orders-")
    forged = f"{site.url}/pusher/forged-auth"
    async with pusher_js(nodes[0], authEndpoint=forged) as client:
        await client.send("subscribe", channel=channel)
        error = await client.event(channel, "pusher:subscription_error")
        assert error["status"] == 403, client.transcript()
        assert any(line.get("sent", {}).get("event") == "pusher:subscribe" for line in client.lines)


async def test_user_sign_in_through_the_nodes_user_auth(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    """``pusher.signin()``: /pusher/user-auth signs the request's user, the node answers
    ``pusher:signin_success``, and pusher-js then subscribes (without auth) to the
    user's ``#server-to-user-<id>``, which the node accepts from that socket. Without a
    user the sign-in is refused."""
    async with pusher_js(nodes[0], tokens["pjs-alice"]) as client:
        await client.send("signin")
        user = (await client.line_having("signin"))["signin"]
        assert user and user["id"] and user["user_info"], client.transcript()
        own = f"#server-to-user-{user['id']}"
        line = await client.until(
            f"the answer to subscribing {own}",
            lambda line: line.get("frame", {}).get("channel") == own,
        )
        assert line["frame"]["event"] == "pusher_internal:subscription_succeeded", (
            client.transcript()
        )
    async with pusher_js(nodes[0]) as anonymous:
        await anonymous.send("signin")
        assert (await anonymous.line_having("signin"))["signin"] is None
        assert any("signin_error" in line for line in anonymous.lines), anonymous.transcript()


# ----- presence ----------------------------------------------------------------------------


def _member_ids(data: dict[str, Any]) -> set[str]:
    return set(data["members"])


async def test_presence_members_one_per_user_across_connections_and_nodes(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    node_a, node_b = nodes
    channel = _name("presence-room-")
    async with pusher_js(node_a, tokens["pjs-alice"]) as alice:
        first = await alice.subscribed(channel)
        alice_id = first["me"]["id"]
        assert first["count"] == 1 and _member_ids(first) == {alice_id}, alice.transcript()
        async with pusher_js(node_b, tokens["pjs-bob"]) as bob:
            seen_by_bob = await bob.subscribed(channel)
            bob_id = seen_by_bob["me"]["id"]
            assert bob_id != alice_id
            assert _member_ids(seen_by_bob) == {alice_id, bob_id}, bob.transcript()
            assert seen_by_bob["count"] == 2
            added = await alice.event(channel, "pusher:member_added")
            assert added["id"] == bob_id, alice.transcript()
            # Alice again, on the other node: still one member, nobody told of a join.
            async with pusher_js(node_b, tokens["pjs-alice"]) as alice_again:
                again = await alice_again.subscribed(channel)
                assert again["count"] == 2 and _member_ids(again) == {alice_id, bob_id}
                await bob.quiet("a second connection of alice is no new member", _member_event)
            # ... and her leaving that connection removes no member.
            await bob.quiet("alice still has a connection", _member_event)
        removed = await alice.event(channel, "pusher:member_removed")
        assert removed["id"] == bob_id, alice.transcript()
        assert (await _members(alice, channel))["count"] == 1, alice.transcript()


async def test_a_publisher_cannot_pass_for_pusher_itself(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    """Whoever may publish on a presence channel (our REST API, our protocol) cannot
    make pusher-js take a message for one of Pusher's own events: a forged member, a
    forged sign-in. Such a message reaches it as event ``message``, as any other."""
    node_a, node_b = nodes
    channel = _name("presence-forged-")
    async with pusher_js(node_a, tokens["pjs-alice"]) as alice:
        await alice.subscribed(channel)
        forged = [
            {"event": "pusher_internal:member_added", "data": {"user_id": "x", "user_info": {}}},
            {"event": "pusher:member_added", "data": {"id": "x", "info": {}}},
            {"event": "pusher:signin_success", "data": {"user_data": '{"id":"x"}'}},
        ]
        for data in forged:
            await publish_rest(node_b, tokens["pjs-bob"], channel, data)
        for data in forged:
            assert await alice.event(channel, "message") == data, alice.transcript()
        members = await _members(alice, channel)
        assert members["count"] == 1 and "x" not in _member_ids(members), alice.transcript()


def _member_event(line: dict[str, Any]) -> bool:
    return line.get("event") in ("pusher:member_added", "pusher:member_removed")


# ----- private-encrypted channels ------------------------------------------------------------


async def test_an_encrypted_channel_relays_what_a_back_end_sealed(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    """The node relays the sealed payload as it is (the contract: relayed as private);
    pusher-js opens it with the shared secret that /pusher/auth gave it."""
    channel = _name("private-encrypted-vault-")
    async with pusher_js(nodes[0], tokens["pjs-alice"]) as client:
        await client.subscribed(channel)
        secret = {"pin": "1234"}
        await client.send("encrypt", channel=channel, data=secret)
        sealed = await client.line_with(op="encrypt")
        payload = json.dumps({"nonce": sealed["nonce"], "ciphertext": sealed["ciphertext"]})
        await publish_rest(
            nodes[1], tokens["pjs-bob"], channel, {"event": "opened", "data": payload}
        )
        assert await client.event(channel, "opened") == secret
        # pusher-js itself refuses client events here, before anything is sent.
        await client.send("trigger", channel=channel, event="client-peek", data={})
        refused = await client.line_with(op="trigger")
        assert "failed" in refused, client.transcript()


# ----- cache channels ------------------------------------------------------------------------


async def test_a_cache_channel_sends_its_last_event_on_subscribe_or_a_cache_miss(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    node_a, node_b = nodes
    warm, cold = _name("cache-price-"), _name("cache-price-")
    for value in (1, 2):
        await publish_rest(
            node_b, tokens["pjs-alice"], warm, {"event": "price", "data": {"v": value}}
        )
    async with pusher_js(node_a) as client:
        await client.subscribed(warm)
        assert await client.event(warm, "price") == {"v": 2}
        await client.quiet("only the last event", lambda line: line.get("event") == "price")
        await client.subscribed(cold)
        await client.event(cold, "pusher:cache_miss")


# ----- client events -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["private-chat-", "presence-chat-"])
async def test_client_events_reach_the_others_and_never_the_sender(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str], prefix: str
) -> None:
    node_a, node_b = nodes
    channel = _name(prefix)
    async with (
        pusher_js(node_a, tokens["pjs-alice"]) as alice,
        pusher_js(node_b, tokens["pjs-bob"]) as bob,
        pusher_js(node_a, tokens["pjs-bob"]) as bob_here,
    ):
        for client in (alice, bob, bob_here):
            await client.subscribed(channel)
        await alice.send("trigger", channel=channel, event="client-typing", data={"who": "alice"})
        for client in (bob, bob_here):
            assert await client.event(channel, "client-typing") == {"who": "alice"}
        if prefix.startswith("presence-"):
            # pusher-js hands a presence channel's client event its sender's user id.
            line = await bob.until(
                "the frame", lambda line: line.get("frame", {}).get("event") == "client-typing"
            )
            frame = line["frame"]
            alice_id = (await _members(alice, channel))["me"]["id"]
            assert frame.get("user_id") == alice_id, bob.transcript()
        await alice.quiet("the sender got its own client event", _client_event)


async def _members(client: PusherScript, channel: str) -> dict[str, Any]:
    """pusher-js's member list of ``channel`` (count, me, members)."""
    await client.send("members", channel=channel)
    return dict((await client.line_with(op="members"))["members"])


@pytest.mark.parametrize(
    ("node_fixture", "prefix"),
    [("nodes", "lobby-"), ("closed_node", "private-chat-")],
    ids=["public-channel", "app-without-client-events"],
)
async def test_client_events_are_refused_where_they_are_not_allowed(
    request: pytest.FixtureRequest, tokens: dict[str, str], node_fixture: str, prefix: str
) -> None:
    """On a public channel, and on any channel of an app that does not allow them: the
    others never get it, the sender gets a ``pusher:error``."""
    node = request.getfixturevalue(node_fixture)
    node = node[0] if isinstance(node, tuple) else node
    channel = _name(prefix)
    async with (
        pusher_js(node, tokens["pjs-alice"]) as alice,
        pusher_js(node, tokens["pjs-bob"]) as bob,
    ):
        for client in (alice, bob):
            await client.subscribed(channel)
        await alice.send("trigger", channel=channel, event="client-typing", data={})
        await bob.quiet("a refused client event reached another client", _client_event)
        await _pusher_error(alice)


def _client_event(line: dict[str, Any]) -> bool:
    """A client event received (not the sender's own report of its trigger)."""
    return "op" not in line and str(line.get("event", "")).startswith("client-")


async def _pusher_error(client: PusherScript) -> dict[str, Any]:
    line = await client.until(
        "a pusher:error", lambda line: line.get("frame", {}).get("event") == "pusher:error"
    )
    return dict(line["frame"])


# ----- Laravel Echo ---------------------------------------------------------------------------


async def test_echo_listens_to_public_and_private_channels(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    node_a, node_b = nodes
    name = _name("orders-")
    publisher = tokens["pjs-bob"]
    async with echo(node_a, tokens["pjs-alice"]) as client:
        await client.send("listen", kind="channel", channel=name, event=".order-created")
        await client.send("listen", kind="channel", channel=name, event="OrderShipped")
        await client.send("listen", kind="private", channel=name, event=".status")
        private = f"private-{name}"
        await client.line_with(channel=name, subscribed=True)
        await client.line_with(channel=private, subscribed=True)
        await publish_rest(node_b, publisher, name, {"event": "order-created", "data": {"id": 1}})
        line = await client.line_with(event=".order-created")
        assert line["data"] == {"id": 1}
        # Without the leading dot Echo listens for the event under its namespace.
        shipped = {"event": "App\\Events\\OrderShipped", "data": {"id": 2}}
        await publish_rest(node_b, publisher, name, shipped)
        line = await client.line_with(event="OrderShipped")
        assert line["data"] == {"id": 2}
        await publish_rest(node_b, publisher, private, {"event": "status", "data": {"id": 3}})
        line = await client.line_with(event=".status")
        assert line["data"] == {"id": 3} and line["channel"] == private


async def test_echo_presence_here_joining_leaving_and_whispers(
    nodes: tuple[ServerNode, ServerNode], tokens: dict[str, str]
) -> None:
    node_a, node_b = nodes
    room = _name("room-")
    channel = f"presence-{room}"
    async with echo(node_a, tokens["pjs-alice"]) as alice:
        await alice.send("join", channel=room)
        await alice.send("listenForWhisper", kind="join", channel=room, event="typing")
        here = await alice.line_having("here")
        assert len(here["here"]) == 1, alice.transcript()
        async with echo(node_b, tokens["pjs-bob"]) as bob:
            await bob.send("join", channel=room)
            both = await bob.line_having("here")
            assert len(both["here"]) == 2, bob.transcript()
            joining = await alice.line_having("joining")
            assert joining["joining"] in both["here"] and joining["joining"] not in here["here"]
            typing = {"who": "bob"}
            await bob.send("whisper", kind="join", channel=room, event="typing", data=typing)
            whisper = await alice.line_having("whisper")
            assert whisper == {"channel": channel, "whisper": "typing", "data": typing}
        leaving = await alice.line_having("leaving")
        assert leaving["leaving"] == joining["joining"]
