"""Connections recorded in the database (in batches) and shown in the admin; session
cookie authentication on the WebSocket."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client, override_settings

from accounts.models import ChannelGrant
from push.codecs import CODECS
from push.models import Connection
from push.node import get_node
from push.services import message_publish
from push.tests.wsclient import connected_client

pytestmark = pytest.mark.django_db(transaction=True)


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
    await asyncio.sleep(0.05)
    await node.registry.flush()
    closed = await Connection.objects.aget(user=user)
    assert closed.disconnected_at is not None
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
