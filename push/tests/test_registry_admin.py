"""Connections recorded in the database (in batches: opens, closes, subscriptions and
heartbeats) and shown in the admin, whose actions close them; session cookie
authentication on the WebSocket."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client, override_settings
from django.utils import timezone

from accounts.models import ChannelGrant
from push.cluster import group_subscriber
from push.cluster.directory import connections_disconnect
from push.cluster.node import Node
from push.cluster.registry import close_node_connections
from push.models import Connection
from push.services.publishing import message_publish
from push.services.runtime import get_node
from push.tests.redis_proxy import proxied_settings
from push.tests.wsclient import WsClient, connected_client, open_client
from push.wire.codecs import CODECS
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


async def test_connections_are_recorded_with_user_node_and_close(wire_format: str) -> None:
    user = await sync_to_async(User.objects.create_user)("carol", password="pw")
    from rest_framework.authtoken.models import Token

    token = (await Token.objects.acreate(user=user)).key
    client = await connected_client(token=token)
    anonymous = await connected_client(subprotocol=wire_format)
    node = await get_node()
    await node.registry.flush()
    rows = [row async for row in Connection.objects.order_by("connected_at")]
    assert len(rows) == 2
    assert rows[0].user_id == user.pk and rows[1].user_id is None
    assert {r.server_id for r in rows} == {settings.NODE_ID}
    assert rows[1].wire_format == CODECS[wire_format].name
    assert all(r.disconnected_at is None and r.last_heartbeat is not None for r in rows)
    await client.close()
    await _until_recorded_closed(node, user=user)
    await anonymous.close()


@override_settings(PUSH={"REGISTRY_FLUSH_SECS": 60})
async def test_many_connections_cost_one_batch_not_a_write_each() -> None:
    clients = [await connected_client() for _ in range(50)]
    assert await Connection.objects.acount() == 0, "nothing is written synchronously"
    node = await get_node()
    await node.registry.flush()
    assert await Connection.objects.filter(disconnected_at__isnull=True).acount() == 50
    for client in clients:
        await client.close()


@override_settings(PUSH={"REGISTRY_FLUSH_SECS": 60})
async def test_a_node_started_again_under_its_name_closes_what_its_previous_run_left_open() -> None:
    """A node with a fixed NODE_ID, killed and started again before another node took it
    for dead, is never taken for dead: the rows of the connections its previous run held
    stayed open for good, and their disconnect events were never sent."""
    left_open = [
        await Connection.objects.acreate(
            connection_id=uuid.uuid4(),
            server_id=settings.NODE_ID,
            wire_format="json",
            connected_at=timezone.now() - timedelta(minutes=5),
            subscriptions=["news"],
        )
        for _ in range(3)
    ]
    client, connection_id = await _client_and_id()
    node = await get_node()
    await node.registry.flush()
    rows = {str(row.connection_id): row async for row in Connection.objects.all()}
    assert rows[connection_id].disconnected_at is None, "this run's own connection is open"
    for previous in left_open:
        row = rows[str(previous.connection_id)]
        assert row.disconnected_at is not None and row.close_code == 1011
        assert row.subscriptions == []
    await node.events.flush()
    stream = await node.directory.redis.xrange(node.events.stream)
    disconnects = [json.loads(fields[b"event"]) for _, fields in stream]
    closed_ids = {e["connection_id"] for e in disconnects if e["type"] == "disconnect"}
    assert {str(previous.connection_id) for previous in left_open} <= closed_ids
    await client.close()


@override_settings(
    PUSH={"REGISTRY_FLUSH_SECS": 60, "CLUSTER_ANNOUNCE_SECS": 0.2, "NODE_DEAD_AFTER_SECS": 60}
)
async def test_a_node_taken_for_dead_while_alive_opens_its_live_rows_again() -> None:
    """Cut off from Redis longer than the dead age (the others still reach it), a node is
    taken for dead: another node marks its rows closed. Its clients stayed: once it is
    back in the directory its live connections' rows said closed for good, and their
    subscription changes and heartbeats were no longer written."""
    client, connection_id = await _client_and_id()
    node = await get_node()
    await node.registry.flush()
    # What the node that took it for dead does (push.cluster.node, ``_cluster_loop``).
    await sync_to_async(close_node_connections)(node.server_id, 1011)
    await node.directory.forget(node.server_id)
    assert (await client.request({"type": "subscribe", "channel": "news"}))["type"] == (
        "subscribed"
    )

    async def open_again() -> Connection | None:
        await node.registry.flush()
        row = await Connection.objects.aget(connection_id=connection_id)
        return row if row.disconnected_at is None else None

    row = await wait_until(open_again, "the live connection's row open again")
    assert row.close_code is None and row.subscriptions == ["news"]
    await client.close()
    await _until_recorded_closed(node, connection_id=connection_id)


async def _until_recorded_closed(node: Node, **lookup: object) -> Connection:
    """The connection's row once a flush has written its close (the close reaches the
    registry when the server has run the consumer's disconnect)."""

    async def closed_row() -> Connection | None:
        await node.registry.flush()
        row = await Connection.objects.aget(**lookup)
        return row if row.disconnected_at is not None else None

    return await wait_until(closed_row, f"the close of the connection {lookup} to be written")


async def _client_and_id(**kwargs: object) -> tuple[WsClient, str]:
    accepted, client, _ = await open_client(**kwargs)  # type: ignore[arg-type]  # kwargs passed through
    assert accepted
    hello = await client.recv_type("connection_established")
    return client, hello["connection_id"]


def _admin_browser() -> Client:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    browser = Client()
    assert browser.login(username="admin", password="pw")
    return browser


@override_settings(PUSH={"REGISTRY_FLUSH_SECS": 60})
async def test_subscriptions_are_recorded_in_the_batches_and_searchable() -> None:
    client, connection_id = await _client_and_id()
    other, _ = await _client_and_id()
    for channel in ("news", "sport"):
        assert (await client.request({"type": "subscribe", "channel": channel}))["type"] == (
            "subscribed"
        )
    node = await get_node()
    await node.registry.flush()
    row = await Connection.objects.aget(connection_id=connection_id)
    assert row.subscriptions == ["news", "sport"], "written with the open, in one INSERT"

    assert (await client.request({"type": "unsubscribe", "channel": "news"}))["type"] == (
        "unsubscribed"
    )
    row = await Connection.objects.aget(connection_id=connection_id)
    assert row.subscriptions == ["news", "sport"], "nothing is written per unsubscribe"
    await node.registry.flush()
    row = await Connection.objects.aget(connection_id=connection_id)
    assert row.subscriptions == ["sport"]

    browser = await sync_to_async(_admin_browser)()
    found = await sync_to_async(browser.get)("/admin/push/connection/?q=sport")
    assert connection_id.encode() in found.content and b"sport" in found.content
    assert b"1 result" in found.content, "the other connection holds no channel"

    await client.close()
    row = await _until_recorded_closed(node, connection_id=connection_id)
    assert row.subscriptions == []
    await other.close()


@override_settings(PUSH={"REGISTRY_FLUSH_SECS": 60, "REGISTRY_HEARTBEAT_SECS": 0.2})
async def test_last_heartbeat_advances_only_for_connections_that_talk() -> None:
    silent, silent_id = await _client_and_id()
    talking, talking_id = await _client_and_id()
    node = await get_node()
    await node.registry.flush()
    opened = (await Connection.objects.aget(connection_id=talking_id)).connected_at
    stamps: list[object] = [opened]

    async def stamped_again() -> object:
        await node.registry.flush()  # stamps once REGISTRY_HEARTBEAT_SECS have passed
        stamp = (await Connection.objects.aget(connection_id=talking_id)).last_heartbeat
        return stamp if stamp != stamps[-1] else None

    for _ in range(2):
        assert (await talking.request({"type": "heartbeat"}))["type"] == "heartbeat_ack"
        stamps.append(await wait_until(stamped_again, "the talking client's heartbeat stamp"))
        quiet = await Connection.objects.aget(connection_id=silent_id)
        assert quiet.last_heartbeat == quiet.connected_at, "a silent client is not stamped"
    assert opened < stamps[1] < stamps[2], "each round of frames moves it on"
    # The point is a window without frames longer than REGISTRY_HEARTBEAT_SECS (0.2 s):
    # a flush after it must not stamp the talking client again.
    await asyncio.sleep(0.3)
    await node.registry.flush()
    row = await Connection.objects.aget(connection_id=talking_id)
    assert row.last_heartbeat == stamps[2], "no frame since the last stamp: not stamped again"
    for client in (silent, talking):
        await client.close()


@pytest.mark.parametrize(
    ("action", "closed"),
    [
        ("disconnect_connections", {"carol_a"}),
        ("disconnect_users", {"carol_a", "carol_b"}),
    ],
)
async def test_admin_actions_close_the_chosen_clients(action: str, closed: set[str]) -> None:
    carol = await sync_to_async(User.objects.create_user)("carol", password="pw")
    from rest_framework.authtoken.models import Token

    token = (await Token.objects.acreate(user=carol)).key
    clients = {
        "carol_a": await _client_and_id(token=token),
        "carol_b": await _client_and_id(token=token),
        "bystander": await _client_and_id(),
    }
    node = await get_node()
    await node.registry.flush()
    selected = await Connection.objects.aget(connection_id=clients["carol_a"][1])

    def run_action() -> int:
        browser = _admin_browser()
        data = {"action": action, "_selected_action": [selected.pk]}
        return browser.post("/admin/push/connection/", data).status_code

    assert await sync_to_async(run_action)() == 302
    for name, (client, _) in clients.items():
        if name in closed:
            assert await client.expect_close() == 1008, name
        else:
            assert (await client.request({"type": "heartbeat"}))["type"] == "heartbeat_ack"
            await client.close()


async def test_a_disconnect_reaches_a_node_whose_idle_redis_connection_was_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node read the control group (the admin's and the Pusher HTTP API's
    disconnects) on the channel layer's pub/sub connection, which is idle and sends
    nothing: once a NAT or firewall forgot it, the disconnects silently never arrived
    and nothing noticed. It is read, as the channels' groups are, on a connection that
    a PING checks and that is opened again when the PING goes unanswered."""
    monkeypatch.setattr(group_subscriber, "PING_SECS", 0.2)
    async with proxied_settings() as proxy:
        client, connection_id = await _client_and_id()
        proxy.drop_open()

        async def disconnected() -> bool:
            # Sent again until it arrives: one sent before the node noticed is lost,
            # as anything published to a connection that is gone.
            await sync_to_async(connections_disconnect)(connection_ids=[connection_id])
            if await client.communicator.receive_nothing(0.5):
                return False
            return await client.expect_close() == 1008

        await wait_until(disconnected, "the disconnect to reach the node", timeout=15)


async def test_session_cookie_authenticates_the_websocket(wire_format: str) -> None:
    dave = await sync_to_async(User.objects.create_user)("dave", password="pw")
    await ChannelGrant.objects.acreate(user=dave, pattern="news", can_publish=True)

    def login_cookie() -> str:
        browser = Client()
        assert browser.login(username="dave", password="pw")
        return browser.cookies[settings.SESSION_COOKIE_NAME].value

    session = await sync_to_async(login_cookie)()
    cookie = f"{settings.SESSION_COOKIE_NAME}={session}".encode()
    client = await connected_client(headers=[(b"cookie", cookie)], subprotocol=wire_format)
    reply = await client.request({"type": "publish", "channel": "news", "data": 1})
    assert reply["type"] == "published", "a logged-in browser may publish"
    await client.close()


def test_admin_lists_connections_messages_and_channels() -> None:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    message_publish(channel="news", data={"a": 1})
    browser = Client()
    browser.login(username="admin", password="pw")
    for path in (
        "/admin/push/connection/",
        "/admin/push/connection/?state=live",
        "/admin/push/message/?q=news",
        "/admin/push/channel/",
        "/admin/push/connection/nodes/",
        "/admin/push/connection/events/dead/",
        "/admin/accounts/channelgrant/",
        "/admin/accounts/servicetoken/",
    ):
        response = browser.get(path)
        assert response.status_code == 200, path
    assert b"news" in browser.get("/admin/push/channel/").content
    # History is read-only: no add, change or delete.
    assert browser.get("/admin/push/message/add/").status_code == 403


@override_settings(PUSH={"REGISTRY_CLOSED_RETENTION_SECS": 3600})
def test_closed_connections_rows_expire_with_trim_history() -> None:
    now = timezone.now()

    def row(closed_ago: timedelta | None) -> Connection:
        return Connection.objects.create(
            connection_id=uuid.uuid4(),
            server_id="gone-node",
            connected_at=now - timedelta(days=30),
            disconnected_at=None if closed_ago is None else now - closed_ago,
        )

    old = row(timedelta(hours=2))
    recent = row(timedelta(minutes=10))
    live = row(None)
    out = io.StringIO()
    call_command("trim_history", stdout=out)
    assert "deleted 1 closed connections" in out.getvalue()
    remaining = set(Connection.objects.values_list("connection_id", flat=True))
    assert remaining == {recent.connection_id, live.connection_id}
    assert old.connection_id not in remaining
