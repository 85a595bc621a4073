"""The Pusher endpoint (``push.transport.pusher``) in this process: what one client may
make it hold and do.

While a subscribe waits (on PostgreSQL or Redis, here on a gate), the frames its client
sends are read and held, within the same bounds as our own protocol's resumes, and
answered after it, in the order sent; a client that leaves meanwhile ends the
subscribe. A frame over the size limit closes the connection, as in our own protocol."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from push.services.pusher_apps import app_cache
from push.tests.wsclient import WsClient, open_client
from push.transport.consumers import HELD_MAX_CHARS, HELD_MAX_FRAMES

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

APP_KEY = "held-key"
APP_SECRET = "held-secret"
SUCCEEDED = "pusher_internal:subscription_succeeded"
PING = {"event": "pusher:ping", "data": {}}


async def _pusher_client() -> tuple[WsClient, str]:
    """A Pusher client of a fresh app past its ``connection_established``, and its
    socket id."""
    from push.models import PusherApp

    await sync_to_async(PusherApp.objects.get_or_create)(
        key=APP_KEY, defaults={"name": "held", "app_id": "78", "secret": APP_SECRET}
    )
    # Made behind the node's back, as the admin's save would not be: an earlier test's
    # lookup may have cached the apps without it (a miss reads them again only so often).
    app_cache.forget()
    accepted, client, _ = await open_client(path=f"/app/{APP_KEY}?protocol=7")
    assert accepted
    hello = await client.recv()
    assert hello["event"] == "pusher:connection_established", hello
    return client, json.loads(hello["data"])["socket_id"]


def _subscribe(channel: str, **data: Any) -> dict[str, Any]:
    return {"event": "pusher:subscribe", "data": {"channel": channel, **data}}


def _unread(client: WsClient) -> int:
    """Frames sent that the server has not read yet."""
    return client.communicator.input_queue.qsize()


class Gate:
    """Holds back the step a test patches until ``open``."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.reached = asyncio.Event()

    async def wait(self) -> None:
        self.reached.set()
        await self.opened.wait()

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def slow_subscribes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Every Pusher subscribe waits for the gate before it subscribes (as one waits for
    PostgreSQL when the node joins a channel, or for a cache channel's last message)."""
    from push.services import pusher_sessions

    gate = Gate()
    subscribe = pusher_sessions.channel_subscribe

    async def waiting(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await subscribe(*args, **kwargs)

    monkeypatch.setattr(pusher_sessions, "channel_subscribe", waiting)
    yield gate
    gate.open()


async def test_frames_sent_while_a_subscribe_waits_are_read_and_answered_after_it(
    slow_subscribes: Gate,
) -> None:
    client, _ = await _pusher_client()
    await client.send(_subscribe("slow-a"))
    await client.send(PING)
    await client.send(_subscribe("slow-b"))
    await client.send(PING)
    await client.expect_nothing(0.3)  # nothing answered out of order
    assert _unread(client) == 0  # but read: each counts as the client heard from
    slow_subscribes.open()
    answers = [await client.recv() for _ in range(4)]
    assert [(a["event"], a.get("channel")) for a in answers] == [
        (SUCCEEDED, "slow-a"),
        ("pusher:pong", None),
        (SUCCEEDED, "slow-b"),
        ("pusher:pong", None),
    ]
    await client.expect_nothing()
    await client.close()


@pytest.mark.parametrize(
    ("frames", "pad_chars", "left_unread"),
    [
        (HELD_MAX_FRAMES + 8, 0, 8),  # stops at the count
        (3, HELD_MAX_CHARS * 5 // 8, 1),  # stops once the size is passed
    ],
    ids=["frames", "bytes"],
)
async def test_what_is_held_while_a_subscribe_waits_is_bounded_and_nothing_is_lost(
    slow_subscribes: Gate, frames: int, pad_chars: int, left_unread: int
) -> None:
    client, _ = await _pusher_client()
    await client.send(_subscribe("slow"))
    for index in range(frames):
        await client.send({"event": "pusher:ping", "data": {"n": index, "pad": "x" * pad_chars}})
    await client.expect_nothing(0.3)
    assert _unread(client) == left_unread  # then the server stopped reading
    slow_subscribes.open()
    assert (await client.recv())["event"] == SUCCEEDED
    for _ in range(frames):
        assert (await client.recv())["event"] == "pusher:pong"
    await client.expect_nothing()
    await client.close()


async def test_a_client_that_leaves_while_its_presence_subscribe_waits_is_no_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The subscribe joined presence and waits for the member list: the client's
    disconnect is read meanwhile, and the subscribe ends at once, its member gone,
    instead of staying listed for as long as the read waits."""
    from push.cluster.presence import PresenceStore
    from push.services.runtime import get_node

    gate = Gate()
    read_members = PresenceStore.members

    async def waiting(self: PresenceStore, channel: str) -> list[dict[str, Any]]:
        await gate.wait()
        return await read_members(self, channel)

    monkeypatch.setattr(PresenceStore, "members", waiting)
    client, socket_id = await _pusher_client()
    room = "presence-held"
    channel_data = json.dumps({"user_id": "ann"})
    signed = f"{socket_id}:{room}:{channel_data}".encode()
    auth = f"{APP_KEY}:" + hmac.new(APP_SECRET.encode(), signed, hashlib.sha256).hexdigest()
    await client.send(_subscribe(room, auth=auth, channel_data=channel_data))
    await asyncio.wait_for(gate.reached.wait(), 5)
    presence = (await get_node()).presence
    monkeypatch.setattr(PresenceStore, "members", read_members)
    assert [m["user_id"] for m in await presence.members(room)] == ["ann"]
    await client.communicator.send_input({"type": "websocket.disconnect", "code": 1000})
    for _ in range(50):
        if not await presence.members(room):
            break
        await asyncio.sleep(0.05)
    assert await presence.members(room) == []
    gate.open()
    await client.communicator.wait(5)


FRAME_LIMIT = 2000


def _ping_of(size: int) -> str:
    head, tail = '{"event":"pusher:ping","data":"', '"}'
    return head + "x" * (size - len(head) - len(tail)) + tail


@override_settings(PUSH={"MAX_FRAME_BYTES": FRAME_LIMIT})
async def test_a_frame_over_the_size_limit_closes_the_connection() -> None:
    """Answered with the connection left open, a client sent frames of up to four
    times the limit (what the server passes) at its frame rate, never charged to its
    address's byte budget, as many as it liked."""
    client, _ = await _pusher_client()
    await client.send_payload(_ping_of(FRAME_LIMIT))  # exactly the limit: accepted
    assert (await client.recv())["event"] == "pusher:pong"
    await client.send_payload(_ping_of(FRAME_LIMIT + 1))
    refused = await client.recv()
    assert refused["event"] == "pusher:error"
    assert refused["data"]["code"] == 4009
    assert f"larger than {FRAME_LIMIT} bytes" in refused["data"]["message"]
    assert await client.expect_close() == 4009
