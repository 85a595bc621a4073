"""The admin as an operator uses it: connections filtered by state, node and user;
history searched by channel and in seq order; nothing in history editable."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.admin import site as admin_site
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client, RequestFactory
from django.utils import timezone

from push.models import Channel, Connection, Message
from push.services.publishing import message_publish

pytestmark = pytest.mark.django_db


@pytest.fixture
def browser() -> Client:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.login(username="admin", password="pw")
    return client


def _connection(user: User | None, server_id: str, *, closed: bool) -> Connection:
    now = timezone.now()
    return Connection.objects.create(
        connection_id=uuid.uuid4(),
        user=user,
        ip="127.0.0.1",
        server_id=server_id,
        connected_at=now - timedelta(minutes=5),
        disconnected_at=now if closed else None,
        close_code=1000 if closed else None,
    )


def _listed_ids(browser: Client, query: str) -> set[str]:
    page = browser.get(f"/admin/push/connection/{query}").content.decode()
    return set(re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", page))


def test_connections_filter_by_state_node_and_user(browser: Client) -> None:
    alice = User.objects.create_user("alice")
    live_a = _connection(alice, "node-a", closed=False)
    closed_a = _connection(alice, "node-a", closed=True)
    live_b = _connection(None, "node-b", closed=False)
    ids = {c: str(c.connection_id) for c in (live_a, closed_a, live_b)}
    assert _listed_ids(browser, "?state=live") == {ids[live_a], ids[live_b]}
    assert _listed_ids(browser, "?state=closed") == {ids[closed_a]}
    assert _listed_ids(browser, "?server_id=node-b") == {ids[live_b]}
    assert _listed_ids(browser, f"?user__id__exact={alice.pk}") == {ids[live_a], ids[closed_a]}
    assert _listed_ids(browser, f"?state=live&user__id__exact={alice.pk}") == {ids[live_a]}


def test_history_is_searched_by_channel_and_listed_in_seq_order(browser: Client) -> None:
    for n in range(3):
        message_publish(channel="orders", data={"n": n})
    message_publish(channel="news", data={"n": 9})
    page = browser.get("/admin/push/message/?q=orders").content.decode()
    listed = [
        str(m.message_id) for m in Message.objects.filter(channel__name="orders").order_by("seq")
    ]
    positions = [page.index(message_id) for message_id in listed]
    assert positions == sorted(positions), "messages must be listed in seq order"
    news_id = str(Message.objects.get(channel__name="news").message_id)
    assert news_id not in page


@pytest.mark.parametrize("model", ["message", "channel", "connection"])
def test_history_and_the_registry_cannot_be_edited(browser: Client, model: str) -> None:
    message = message_publish(channel="orders", data={"n": 1})
    objects = {
        "message": Message.objects.get(message_id=message.message_id),
        "channel": Channel.objects.get(name="orders"),
        "connection": _connection(None, "node-a", closed=False),
    }
    pk = objects[model].pk
    base = f"/admin/push/{model}"
    assert browser.get(f"{base}/add/").status_code == 403
    assert browser.post(f"{base}/add/", {}).status_code == 403
    assert browser.post(f"{base}/{pk}/delete/", {"post": "yes"}).status_code == 403
    # The change page shows the row read-only; a POST to it changes nothing.
    browser.post(f"{base}/{pk}/change/", {"seq": 99, "name": "renamed", "server_id": "x"})
    type(objects[model]).objects.get(pk=pk)  # still there
    assert Message.objects.get(message_id=message.message_id).seq == 1
    assert Channel.objects.filter(name="orders").exists()


def test_the_channel_list_shows_the_oldest_kept_seq_without_reading_every_message(
    browser: Client,
) -> None:
    for n in range(5):
        message_publish(channel="trimmed", data=n)
    message_publish(channel="other", data=0)
    Message.objects.filter(channel__name="trimmed", seq__lte=2).delete()
    Channel.objects.create(name="empty")
    page = browser.get("/admin/push/channel/").content.decode()
    rows = {
        name: re.sub(r"<[^>]+>", " ", row).split()
        for name, row in re.findall(r'<tr>.*?<a href="[^"]*">([\w-]+)</a>(.*?)</tr>', page, re.S)
    }
    assert rows["trimmed"][:2] == ["5", "3"] and rows["other"][:2] == ["1", "1"]
    assert rows["empty"][:2] == ["0", "-"]
    if connection.vendor != "postgresql":
        return
    from push.admin import ChannelAdmin

    listed = ChannelAdmin(Channel, admin_site).get_queryset(RequestFactory().get("/"))
    plan = listed.order_by("name")[:100].explain()
    assert "Seq Scan on push_message" not in plan and "Aggregate" not in plan, plan
