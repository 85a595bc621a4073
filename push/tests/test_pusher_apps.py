"""The Pusher apps the node reads from the database (push/services/pusher_apps.py) for a
pusher-js handshake and a signed HTTP API request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import override_settings
from redis.exceptions import RedisError

from push.models import PusherApp as PusherAppRow
from push.services import pusher_apps
from push.services.pusher_apps import PusherApp, app_by_key_async, app_cache
from push.services.pusher_http import api_app
from push.services.runtime import get_node
from push.tests.backends import terminate_backends
from push.tests.wsclient import ConnectionClosed, open_client

pytestmark = pytest.mark.django_db(transaction=True)

Lookup = Callable[[PusherAppRow], Awaitable[PusherApp | None]]

# How the node looks an app up: a pusher-js handshake by its key, an HTTP API request by
# the app id in its path.
LOOKUPS: dict[str, Lookup] = {
    "handshake": lambda row: app_by_key_async(row.key),
    "http-api": lambda row: api_app(app_id=row.app_id, params={}),
}


@pytest.fixture(autouse=True)
def _apps_read_afresh() -> Iterator[None]:
    """Each test reads the apps of its own database, and leaves none of them cached."""
    app_cache.forget()
    yield
    app_cache.forget()


def _new_app(name: str, app_id: str) -> PusherAppRow:
    return PusherAppRow.objects.create(name=name, app_id=app_id, key=f"{name}-key", secret="s")


@pytest.mark.parametrize("lookup", LOOKUPS.values(), ids=LOOKUPS.keys())
async def test_apps_are_read_again_after_postgresql_ended_the_connection_they_were_read_on(
    monkeypatch: pytest.MonkeyPatch, lookup: Lookup
) -> None:
    """Read on a thread of the loop's own executor, the apps kept its connection out of
    the pool for good; once PostgreSQL had ended it (a restart), every later read failed
    on it, and an app made afterwards was never served."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's backends")
    read_on: list[int] = []  # the backend of each read of the apps
    read_apps = pusher_apps._read_apps

    def reading() -> list[PusherApp]:
        apps = read_apps()
        read_on.append(connection.connection.info.backend_pid)  # the reading thread's
        return apps

    monkeypatch.setattr(pusher_apps, "_read_apps", reading)
    first = await sync_to_async(_new_app)("first", "1001")
    served = await lookup(first)
    assert served is not None and served.app_id == "1001"
    await asyncio.to_thread(terminate_backends, read_on[-1])
    second = await sync_to_async(_new_app)("second", "1002")
    app_cache.forget()  # as the admin does when it saves an app
    found = await lookup(second)
    assert found is not None and found.app_id == "1002"
    assert read_on[-1] != read_on[0]


@pytest.mark.usefixtures("fresh_node")
async def test_a_draining_node_tells_a_pusher_client_to_back_off_not_to_come_straight_back() -> (
    None
):
    """pusher-js reconnects at once after a 42xx code and a second later after a 41xx
    one. A node that is stopping refuses new connections: with 4200 every client that
    a load balancer sends back to it would reconnect in a loop as fast as the network
    goes, for as long as the node drains; with 4100 once a second."""
    row = await sync_to_async(_new_app)("draining", "4242")
    node = await get_node()
    node.draining = True
    try:
        accepted, client, _ = await open_client(path=f"/app/{row.key}?protocol=7")
        assert accepted
        refusal = await client.recv()
        assert refusal["event"] == "pusher:error" and refusal["data"]["code"] == 4100
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert client.close_code == 4100
    finally:
        node.draining = False


@pytest.mark.usefixtures("fresh_node")
async def test_subscribes_past_the_frame_rate_wait_for_it_rather_than_being_lost() -> None:
    """pusher-js subscribes to all its channels at once when it connects, and again on
    every reconnect, and never retries a subscribe that got ``pusher:error``: past the
    frame rate's burst, those channels stayed silent with nothing telling the app.
    They are paced at the rate instead; other frames past it are still refused."""
    row = await sync_to_async(_new_app)("paced", "4343")
    with override_settings(PUSH={"RATE_BURST": 5, "RATE_PER_SEC": 20}):
        accepted, client, _ = await open_client(path=f"/app/{row.key}?protocol=7")
        assert accepted
        assert (await client.recv())["event"] == "pusher:connection_established"
        channels = [f"paced-{n}" for n in range(20)]
        for channel in channels:
            await client.send({"event": "pusher:subscribe", "data": {"channel": channel}})
        answers = [await client.recv() for _ in channels]
        assert [(a["event"], a.get("channel")) for a in answers] == [
            ("pusher_internal:subscription_succeeded", channel) for channel in channels
        ]
        # 30 pings at once: past the burst of 5 however slow the machine.
        for _ in range(30):
            await client.send({"event": "pusher:ping", "data": {}})
        answers = [(await client.recv())["event"] for _ in range(30)]
        assert "pusher:error" in answers
        await client.close()


@pytest.mark.usefixtures("fresh_node")
async def test_a_presence_subscribe_that_fails_after_joining_leaves_no_member_behind() -> None:
    """The member is recorded, then the join's announcement fails (Redis): the client
    gets ``subscription_error`` and holds no subscription, so nothing would ever make
    that member leave; the others would list it for as long as the node runs."""
    row = await sync_to_async(_new_app)("presence", "4444")
    app = PusherApp(app_id=row.app_id, key=row.key, secret=row.secret)
    node = await get_node()
    announce = node.announce_presence

    async def announce_fails(kind: str, channel: str, member: dict[str, object]) -> None:
        if kind == "join":
            raise RedisError("announcement lost")
        await announce(kind, channel, member)

    node.announce_presence = announce_fails  # type: ignore[method-assign]  # a failing Redis
    accepted, client, _ = await open_client(path=f"/app/{row.key}?protocol=7")
    assert accepted
    socket_id = json.loads((await client.recv())["data"])["socket_id"]
    channel = "presence-ghost"
    channel_data = json.dumps({"user_id": "ghost"})
    auth = pusher_apps.channel_auth(app, socket_id, channel, channel_data)
    await client.send(
        {
            "event": "pusher:subscribe",
            "data": {"channel": channel, "auth": auth, "channel_data": channel_data},
        }
    )
    refused = await client.recv()
    assert refused["event"] == "pusher:subscription_error" and refused["channel"] == channel
    # Answered after the member left (or would never leave).
    assert await node.presence.members(channel) == []
    await client.close()
