"""Revocation as a connected client meets it, within PUSH_REVOCATION_CHECK_SECS: a
credential that is gone closes the connection (1008); a grant removed or narrowed, or
a signed subscription token that expired, ends that channel's subscription with a
FORBIDDEN error naming the channel while the connection stays open."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.test import Client, override_settings
from redis.exceptions import ConnectionError as RedisConnectionError
from rest_framework.authtoken.models import Token

from accounts.models import ChannelGrant, ServiceToken
from accounts.principals import principals_refresh
from accounts.subscription_tokens import subscription_token_issue
from common.errors import CloseCode
from push.cluster.live import LiveConnection
from push.services.publishing import message_publish
from push.services.runtime import get_node
from push.tests.sse_inprocess import InProcessStream
from push.tests.wsclient import WsClient, connected_client

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_node"),
    # Short, so each case is seen at once; the cases do not depend on its length.
    pytest.mark.usefixtures("quick_revocation_checks"),
]

# Long enough for several checks, however slow the machine.
WITHIN_SECS = 5.0


@pytest.fixture
def quick_revocation_checks() -> Any:
    with override_settings(PUSH={"REVOCATION_CHECK_SECS": 0.2}):
        yield


def _user(username: str, **grant: Any) -> User:
    user = User.objects.create_user(username, password="pw")
    if grant:
        ChannelGrant.objects.create(user=user, **grant)
    return user


# ----- the credential is gone: the connection closes ------------------------------------


def _with_token() -> tuple[dict[str, Any], Callable[[], None]]:
    user = _user("tokened", pattern="private-room", can_subscribe=True)
    key = Token.objects.create(user=user).key
    return {"token": key}, lambda: Token.objects.filter(key=key).delete()


def _with_deactivated_user() -> tuple[dict[str, Any], Callable[[], None]]:
    user = _user("leaving", pattern="private-room", can_subscribe=True)
    key = Token.objects.create(user=user).key
    return {"token": key}, lambda: User.objects.filter(pk=user.pk).update(is_active=False)


def _with_service_token() -> tuple[dict[str, Any], Callable[[], None]]:
    service, key = ServiceToken.issue("feed")
    ChannelGrant.objects.create(service_token=service, pattern="private-room", can_subscribe=True)
    return {"token": key}, service.revoke


def _with_session() -> tuple[dict[str, Any], Callable[[], None]]:
    _user("browser", pattern="private-room", can_subscribe=True)
    browser = Client()
    assert browser.login(username="browser", password="pw")
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"
    return {"headers": [(b"cookie", cookie.encode())]}, browser.logout


@pytest.mark.parametrize(
    "credential",
    [_with_token, _with_deactivated_user, _with_service_token, _with_session],
    ids=["token deleted", "user deactivated", "service token revoked", "session logged out"],
)
async def test_a_credential_that_is_gone_closes_its_connections(
    credential: Callable[[], tuple[dict[str, Any], Callable[[], None]]],
) -> None:
    connect, revoke = await sync_to_async(credential)()
    client = await connected_client(**connect)
    reply = await client.request({"type": "subscribe", "channel": "private-room"})
    assert reply["type"] == "subscribed", reply
    bystander = await connected_client()
    await sync_to_async(revoke)()
    assert await client.expect_close(timeout=WITHIN_SECS) == CloseCode.POLICY
    assert (await bystander.request({"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await bystander.close()


# ----- the grant is gone: the subscription ends, the connection stays -------------------


async def _expect_channel_ended(client: WsClient, channel: str) -> None:
    ended = await client.recv(timeout=WITHIN_SECS)
    assert ended["type"] == "error" and ended["code"] == "FORBIDDEN", ended
    assert ended["channel"] == channel and "id" not in ended


async def _publish(channel: str, data: Any) -> None:
    await sync_to_async(message_publish)(channel=channel, data=data, publisher_id=None)


@pytest.mark.parametrize("change", ["removed", "narrowed"])
async def test_a_grant_removed_or_narrowed_ends_those_subscriptions_only(
    change: str, wire_format: str
) -> None:
    def setup() -> tuple[str, int]:
        user = _user("reader")
        grant = ChannelGrant.objects.create(
            user=user, pattern="private-*", can_subscribe=True, can_publish=True
        )
        return Token.objects.create(user=user).key, grant.pk

    key, grant_id = await sync_to_async(setup)()
    client = await connected_client(token=key, subprotocol=wire_format)
    for channel in ("private-kept", "private-gone", "news"):
        reply = await client.request({"type": "subscribe", "channel": channel})
        assert reply["type"] == "subscribed", reply
    grants = ChannelGrant.objects.filter(pk=grant_id)
    if change == "removed":
        await grants.adelete()
        ended = {"private-kept", "private-gone"}
    else:
        await grants.aupdate(pattern="private-kept")
        ended = {"private-gone"}
    errors = [await client.recv(timeout=WITHIN_SECS) for _ in ended]
    assert {(e["type"], e["code"]) for e in errors} == {("error", "FORBIDDEN")}, errors
    assert {e["channel"] for e in errors} == ended
    await client.expect_nothing(0.5)
    # Still open, still receiving what it may; the rights it lost are gone for publish too.
    for channel in ("private-kept", "private-gone", "news"):
        await _publish(channel, channel)
    received = await client.recv_type("message")
    if change == "narrowed":
        assert received["channel"] == "private-kept"
        received = await client.recv_type("message")
    assert received["channel"] == "news"
    refused = await client.request({"type": "publish", "channel": "private-gone", "data": 1})
    assert refused["code"] == "FORBIDDEN"
    await client.close()


async def test_a_revoked_presence_subscription_leaves_the_member_list() -> None:
    def setup() -> tuple[str, str, int]:
        watcher = _user("watcher", pattern="presence-*", can_subscribe=True)
        member = _user("member", pattern="presence-*", can_subscribe=True)
        return (
            Token.objects.create(user=watcher).key,
            Token.objects.create(user=member).key,
            member.pk,
        )

    watcher_key, member_key, member_id = await sync_to_async(setup)()
    watcher = await connected_client(token=watcher_key)
    await watcher.request({"type": "subscribe", "channel": "presence-room"})
    await watcher.recv_type("join")
    member = await connected_client(token=member_key)
    await member.request({"type": "subscribe", "channel": "presence-room"})
    assert (await watcher.recv_type("join"))["member"]["user_id"] == member_id
    await member.recv_type("join")  # its own
    await ChannelGrant.objects.filter(user_id=member_id).adelete()
    await _expect_channel_ended(member, "presence-room")
    left = await watcher.recv_type("leave", timeout=WITHIN_SECS)
    assert left["member"]["user_id"] == member_id
    await member.close()
    await watcher.close()


# ----- a signed subscription token expires ----------------------------------------------


async def test_a_signed_token_subscription_ends_when_the_token_expires() -> None:
    client = await connected_client()
    # Two seconds: at least one whole second to subscribe before it expires.
    token = subscription_token_issue(channel="private-call", ttl_secs=2)
    reply = await client.request({"type": "subscribe", "channel": "private-call", "token": token})
    assert reply["type"] == "subscribed"
    await _expect_channel_ended(client, "private-call")
    await _publish("private-call", "after the end")
    assert (await client.request({"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await client.expect_nothing(0.3)
    await client.close()


async def test_subscribing_again_with_a_fresh_token_extends_the_subscription() -> None:
    client = await connected_client()
    short = subscription_token_issue(channel="private-call", ttl_secs=2)
    await client.request({"type": "subscribe", "channel": "private-call", "token": short})
    fresh = subscription_token_issue(channel="private-call", ttl_secs=60)
    reply = await client.request({"type": "subscribe", "channel": "private-call", "token": fresh})
    assert reply["type"] == "subscribed"
    await client.expect_nothing(3.0)  # past the first token's expiry and several checks
    await _publish("private-call", "still here")
    assert (await client.recv_type("message"))["data"] == "still here"
    await client.close()


async def _only_connection() -> LiveConnection:
    node = await get_node()
    (connection,) = node.connections.values()
    return connection


@override_settings(PUSH={"REVOCATION_CHECK_SECS": 0.2, "MAX_SUBSCRIPTIONS_PER_CONNECTION": 1})
async def test_a_token_subscribe_refused_at_the_subscription_limit_keeps_no_expiry() -> None:
    """Its expiry kept, every refused subscribe would cost memory for a channel the
    connection does not hold, and the revocation check a look at it every round."""
    client = await connected_client()
    assert (await client.request({"type": "subscribe", "channel": "news"}))["type"] == "subscribed"
    token = subscription_token_issue(channel="private-call", ttl_secs=60)
    refused = await client.request({"type": "subscribe", "channel": "private-call", "token": token})
    assert refused["code"] == "FORBIDDEN" and "limit" in refused["message"], refused
    assert not (await _only_connection()).token_expiry
    await client.close()


async def test_a_token_subscribe_whose_channel_cannot_be_joined_keeps_no_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await connected_client()
    assert (await client.request({"type": "subscribe", "channel": "news"}))["type"] == "subscribed"

    async def broker_away(channel: str) -> None:
        raise RedisConnectionError("Connection refused.")

    monkeypatch.setattr((await get_node()).broker, "join", broker_away)
    token = subscription_token_issue(channel="private-call", ttl_secs=60)
    refused = await client.request({"type": "subscribe", "channel": "private-call", "token": token})
    assert refused["code"] == "UNAVAILABLE", refused
    assert not (await _only_connection()).token_expiry
    await client.close()


# ----- SSE ------------------------------------------------------------------------------


async def test_an_sse_stream_whose_last_channel_is_revoked_ends() -> None:
    def setup() -> tuple[str, int]:
        user = _user("streamer")
        grant = ChannelGrant.objects.create(user=user, pattern="private-feed", can_subscribe=True)
        return Token.objects.create(user=user).key, grant.pk

    key, grant_id = await sync_to_async(setup)()
    stream = InProcessStream(f"channel=private-feed&token={key}")
    assert await stream.start() == 200
    assert (await stream.next_event())[0] == "connection_established"  # type: ignore[index]  # None once the stream ends
    await ChannelGrant.objects.filter(pk=grant_id).adelete()
    event, envelope = await stream.next_event(WITHIN_SECS)  # type: ignore[misc]  # None once the stream ends
    assert event == "error" and envelope["code"] == "FORBIDDEN"
    assert envelope["channel"] == "private-feed"
    assert await stream.next_event(WITHIN_SECS) is None, "the stream ends"
    await stream.close()


def test_rechecking_many_connections_costs_a_few_queries_not_one_each(
    django_assert_max_num_queries: Any,
) -> None:
    group = Group.objects.create(name="readers")
    ChannelGrant.objects.create(group=group, pattern="private-group", can_subscribe=True)
    credentials: set[tuple[str, Any]] = set()
    for n in range(5):
        user = _user(f"u{n}", pattern=f"private-{n}", can_subscribe=True)
        user.groups.add(group)
        credentials.add(("token", Token.objects.create(user=user).key))
        browser = Client()
        browser.force_login(user)
        credentials.add(("session", browser.session.session_key))
        credentials.add(("service", ServiceToken.issue(f"svc{n}")[0].pk))
    credentials.add(("token", "gone"))
    # Tokens, sessions, their users, the users' grants, service tokens and their grants.
    with django_assert_max_num_queries(6):
        fresh = principals_refresh(credentials)
    assert set(fresh) == credentials - {("token", "gone")}
    for credential, principal in fresh.items():
        if credential[0] != "service":
            patterns = {g.pattern for g in principal.grants}
            assert patterns == {f"private-{principal.name[1:]}", "private-group"}


@override_settings(PUSH={"REVOCATION_CHECK_SECS": 3600})
async def test_a_connection_opened_while_the_check_queries_is_left_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from push.cluster import node as node_module

    def setup() -> list[str]:
        return [Token.objects.create(user=_user(name)).key for name in ("early", "late")]

    early_key, late_key = await sync_to_async(setup)()
    early = await connected_client(token=early_key)
    node = await get_node()
    refresh = node_module._principals_refresh
    opened: list[WsClient] = []

    async def refresh_while_someone_connects(credentials: set[Any]) -> Any:
        opened.append(await connected_client(token=late_key))
        return await refresh(credentials)

    monkeypatch.setattr(node_module, "_principals_refresh", refresh_while_someone_connects)
    assert await node.close_revoked() == 0
    for client in (early, *opened):
        assert (await client.request({"type": "heartbeat"}))["type"] == "heartbeat_ack"
        await client.close()
