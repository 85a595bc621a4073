"""Access control as clients meet it: grants, service tokens, signed subscription
tokens, revocation of live connections, connection limits, REST throttling, sending
to one user."""

from __future__ import annotations

import base64
import json
import logging
import resource
import time

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, User
from django.core.management import CommandError, call_command
from django.test import override_settings
from prometheus_client import REGISTRY
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import ChannelGrant, ServiceToken
from accounts.subscription_tokens import subscription_token_issue
from common.errors import CloseCode
from push.cluster.admission import connection_capacity, raise_open_file_limit
from push.services.publishing import message_publish
from push.services.runtime import get_node
from push.tests.sse_inprocess import InProcessStream
from push.tests.wsclient import communicator_for, connected_client, open_client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


def _user_token(username: str, **grant: object) -> tuple[User, str]:
    user = User.objects.create_user(username, password="x")
    if grant:
        ChannelGrant.objects.create(user=user, **grant)
    return user, Token.objects.create(user=user).key


# ----- grants -----------------------------------------------------------------------------


async def test_private_channel_needs_a_grant_and_a_group_grant_counts(wire_format: str) -> None:
    def setup() -> tuple[str, str]:
        _, outsider = _user_token("outsider")
        member, member_token = _user_token("member")
        group = Group.objects.create(name="staffroom")
        member.groups.add(group)
        ChannelGrant.objects.create(group=group, pattern="private-staff*", can_subscribe=True)
        return outsider, member_token

    outsider, member = await sync_to_async(setup)()
    for token, expected in ((outsider, "error"), (member, "subscribed")):
        client = await connected_client(token=token, subprotocol=wire_format)
        reply = await client.request({"type": "subscribe", "channel": "private-staffroom"})
        assert reply["type"] == expected, reply
        await client.close()


@pytest.mark.parametrize(
    "channel", ["PRIVATE-x", "Private-x", "presence-x", "USER:1", "user:01", "user:1.0"]
)
async def test_look_alike_reserved_names_stay_closed(wire_format: str, channel: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": channel})
    assert reply["code"] == "FORBIDDEN"
    await client.close()


# ----- service tokens ---------------------------------------------------------------------


def test_service_token_scoped_publish_over_rest() -> None:
    call_command("service_token", "create", "feed", "--scope", "publish:ticker:*", stdout=_Sink())
    key = _Sink.last
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    ok = api.post("/api/v1/channels/ticker:ACME/messages", {"data": 1}, format="json")
    assert ok.status_code == 201
    denied = api.post("/api/v1/channels/news/messages", {"data": 1}, format="json")
    assert denied.status_code == 403
    token = ServiceToken.objects.get(name="feed")
    assert token.last_used_at is not None and token.key_hash != key
    call_command("service_token", "revoke", "feed", stdout=_Sink())
    gone = api.post("/api/v1/channels/ticker:ACME/messages", {"data": 1}, format="json")
    assert gone.status_code == 401


def _service_key(*scopes: str) -> str:
    args = [arg for scope in scopes for arg in ("--scope", scope)]
    call_command("service_token", "create", f"svc-{len(scopes)}", *args, stdout=_Sink())
    return _Sink.last


def test_a_publish_scope_reads_nothing_over_rest() -> None:
    publisher = APIClient()
    publisher.credentials(HTTP_AUTHORIZATION=f"Token {_service_key('publish:ticker:*')}")
    reader = APIClient()
    reader.credentials(
        HTTP_AUTHORIZATION=f"Token {_service_key('publish:ticker:*', 'subscribe:ticker:*')}"
    )
    published = publisher.post("/api/v1/channels/ticker:A/messages", {"data": 1}, format="json")
    assert published.status_code == 201
    for channel in ("news", "ticker:A"):
        refused = publisher.get(f"/api/v1/channels/{channel}/messages")
        assert refused.status_code == 403
        assert refused.json() == {
            "type": "error",
            "code": "FORBIDDEN",
            "message": f"not allowed to subscribe to {channel!r}",
        }
        assert publisher.head(f"/api/v1/channels/{channel}/messages").status_code == 403
    assert reader.get("/api/v1/channels/news/messages").status_code == 403
    history = reader.get("/api/v1/channels/ticker:A/messages")
    assert history.status_code == 200 and history.json()["results"][0]["data"] == 1
    # Users and anonymous clients still read public channels without a grant.
    _, token = _user_token("someone")
    assert APIClient().get("/api/v1/channels/news/messages").status_code == 200
    user = APIClient()
    user.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert user.get("/api/v1/channels/news/messages").status_code == 200


def test_a_service_lists_only_the_channels_its_subscribe_scopes_name() -> None:
    for name in ("news", "ticker:A", "ticker:B", "tickers", "private-ticker:x", "user:1"):
        message_publish(channel=name, data=1)
    publisher = APIClient()
    publisher.credentials(HTTP_AUTHORIZATION=f"Token {_service_key('publish:ticker:*')}")
    reader = APIClient()
    reader.credentials(
        HTTP_AUTHORIZATION=f"Token {_service_key('publish:*', 'subscribe:ticker:?')}"
    )
    names = lambda api: [c["channel"] for c in api.get("/api/v1/channels/").json()["results"]]  # noqa: E731
    assert names(publisher) == []
    assert names(reader) == ["ticker:A", "ticker:B"]


async def test_a_publish_scope_subscribes_to_nothing_over_websocket() -> None:
    publisher = await sync_to_async(_service_key)("publish:ticker:*")
    reader = await sync_to_async(_service_key)("publish:ticker:*", "subscribe:ticker:*")
    expected = {
        (publisher, "news"): "error",
        (publisher, "ticker:A"): "error",
        (reader, "news"): "error",
        (reader, "ticker:A"): "subscribed",
    }
    for (key, channel), kind in expected.items():
        client = await connected_client(token=key)
        reply = await client.request({"type": "subscribe", "channel": channel})
        assert reply["type"] == kind, (channel, reply)
        if kind == "error":
            assert reply["code"] == "FORBIDDEN"
        await client.close()


def test_send_to_one_user_needs_staff_or_a_granted_service() -> None:
    target, _ = _user_token("target")
    _, plain = _user_token("plain", pattern="*", can_publish=True)
    service, key = ServiceToken.issue("notifier")
    ChannelGrant.objects.create(service_token=service, pattern="user:*", can_publish=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {plain}")
    url = f"/api/v1/users/{target.pk}/messages"
    assert api.post(url, {"data": "hi"}, format="json").status_code == 403
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    response = api.post(url, {"data": "hi"}, format="json")
    assert response.status_code == 201
    assert response.json()["channel"] == f"user:{target.pk}"


async def test_user_receives_what_is_sent_to_them_on_every_connection(wire_format: str) -> None:
    def setup() -> tuple[User, str, str]:
        target, token = _user_token("target")
        service, key = ServiceToken.issue("notifier")
        ChannelGrant.objects.create(service_token=service, pattern="user:*", can_publish=True)
        return target, token, key

    target, token, key = await sync_to_async(setup)()
    tabs = [await connected_client(token=token, subprotocol=wire_format) for _ in range(2)]
    for tab in tabs:
        await tab.request({"type": "subscribe", "channel": f"user:{target.pk}"})

    def send() -> int:
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        return api.post(f"/api/v1/users/{target.pk}/messages", {"data": "ping"}, format="json")

    await sync_to_async(send)()
    for tab in tabs:
        assert (await tab.recv_type("message"))["data"] == "ping"
        await tab.close()


# ----- signed subscription tokens ---------------------------------------------------------


async def test_signed_token_grants_one_private_channel(wire_format: str) -> None:
    token = subscription_token_issue(channel="private-room-7", ttl_secs=60, info={"name": "Ann"})
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": "private-room-7", "token": token})
    assert reply["type"] == "subscribed"
    other = await client.request({"type": "subscribe", "channel": "private-room-8", "token": token})
    assert other["code"] == "FORBIDDEN" and "another channel" in other["message"]
    await client.close()


@pytest.mark.parametrize(
    "tamper",
    ["expired", "signature", "payload", "garbage", "non-ASCII signature", "non-ASCII payload"],
)
async def test_bad_signed_tokens_are_forbidden(
    wire_format: str, tamper: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = subscription_token_issue(channel="private-x", ttl_secs=60)
    payload, signature = token.split(".")
    if tamper == "expired":
        token = subscription_token_issue(channel="private-x", ttl_secs=-1)
    elif tamper == "signature":
        # Change the first character: a fixed ending such as "AA" is the genuine
        # signature's own ending about once in a thousand tokens.
        token = f"{payload}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"
    elif tamper == "payload":
        forged = json.dumps({"ch": "private-x", "exp": int(time.time()) + 10**6})
        token = base64.urlsafe_b64encode(forged.encode()).rstrip(b"=").decode() + "." + signature
    elif tamper == "non-ASCII signature":
        token = f"{payload}.éé"
    elif tamper == "non-ASCII payload":
        token = f"é{payload}.{signature}"
    else:
        token = "not-a-token"
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": "private-x", "token": token})
    assert reply["code"] == "FORBIDDEN"
    await client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no server error"


# ----- revocation and limits --------------------------------------------------------------


@override_settings(PUSH={"REVOCATION_CHECK_SECS": 0.2})
async def test_revoked_token_closes_its_open_connections(wire_format: str) -> None:
    _, token = await sync_to_async(_user_token)("leaver")
    client = await connected_client(token=token, subprotocol=wire_format)
    await Token.objects.filter(key=token).adelete()
    assert await client.expect_close(timeout=5) == CloseCode.POLICY
    accepted, _, _ = await open_client(token=token, subprotocol=wire_format)
    assert not accepted, "a revoked token is refused, not downgraded to anonymous"


@override_settings(PUSH={"MAX_CONNECTIONS_PER_USER": 2})
async def test_connections_per_user_are_limited(wire_format: str) -> None:
    _, token = await sync_to_async(_user_token)("busy")
    first = await connected_client(token=token, subprotocol=wire_format)
    second = await connected_client(token=token, subprotocol=wire_format)
    accepted, third, _ = await open_client(token=token, subprotocol=wire_format)
    assert accepted
    assert await third.expect_close() == CloseCode.TRY_AGAIN_LATER
    await first.close()
    await second.close()
    node = await get_node()
    assert not node.connections


@override_settings(PUSH={"MAX_CONNECTIONS_PER_IP": 2})
async def test_connections_per_ip_are_limited() -> None:
    crowd = ("192.0.2.7", 50000)
    first = await connected_client(client_address=crowd)
    second = await connected_client(client_address=crowd)
    accepted, third, _ = await open_client(client_address=crowd)
    assert accepted, "accepted first, so the client learns why it is closed"
    assert await third.expect_close() == CloseCode.TRY_AGAIN_LATER
    elsewhere = await connected_client(client_address=("192.0.2.8", 50000))
    await first.close()
    again = await connected_client(client_address=crowd)  # a place is free again
    for client in (second, elsewhere, again):
        await client.close()


@override_settings(PUSH={"MAX_ANONYMOUS_CONNECTIONS_PER_IP": 2})
async def test_anonymous_connections_per_ip_are_limited_and_signed_in_ones_are_not() -> None:
    crowd = ("192.0.2.7", 50000)
    first = await connected_client(client_address=crowd)
    second = await connected_client(client_address=crowd)
    accepted, third, _ = await open_client(client_address=crowd)
    assert accepted
    assert await third.expect_close() == CloseCode.TRY_AGAIN_LATER
    _, token = await sync_to_async(_user_token)("behind-the-same-nat")
    member = await connected_client(token=token, client_address=crowd)
    await first.close()
    again = await connected_client(client_address=crowd)  # a place is free again
    for client in (second, member, again):
        await client.close()


@override_settings(PUSH={"MAX_CONNECTIONS": 2})
async def test_a_full_node_refuses_connections_from_anyone_until_one_closes() -> None:
    refused_before = _refused("node")
    first = await connected_client(client_address=("192.0.2.7", 50000))
    second = await connected_client(client_address=("192.0.2.8", 50000))
    accepted, third, _ = await open_client(client_address=("192.0.2.9", 50000))
    assert accepted, "accepted first, so the client learns why it is closed"
    assert await third.expect_close() == CloseCode.TRY_AGAIN_LATER
    stream = InProcessStream("channel=news")
    assert await stream.start() == 200
    event, envelope = await stream.next_event()  # type: ignore[misc]  # None once the stream ends
    assert event == "error" and envelope["code"] == "RATE_LIMITED"
    assert await stream.next_event() is None
    await stream.close()
    assert _refused("node") == refused_before + 2
    await first.close()
    again = await connected_client(client_address=("192.0.2.9", 50000))  # a place is free
    for client in (second, again):
        await client.close()


def _refused(limit: str) -> float:
    return REGISTRY.get_sample_value("push_connections_refused_total", {"limit": limit}) or 0.0


def test_a_node_keeps_a_tenth_of_its_open_files_for_its_own_sockets() -> None:
    assert connection_capacity(20_000) == 18_000
    assert connection_capacity(1_024) == 768  # at least 256 kept
    assert connection_capacity(100) == 1


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 4096) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@override_settings(PUSH={"ANONYMOUS_SUBSCRIBE": False})
async def test_anonymous_subscribe_can_be_turned_off() -> None:
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": "news"})
    assert reply["code"] == "FORBIDDEN"
    await client.close()
    stream = InProcessStream("channel=news")
    assert await stream.start() == 200
    assert (await stream.next_event())[0] == "connection_established"  # type: ignore[index]  # None once the stream ends
    event, envelope = await stream.next_event()  # type: ignore[misc]  # None once the stream ends
    assert event == "error" and envelope["code"] == "FORBIDDEN" and envelope["channel"] == "news"
    assert await stream.next_event() is None, "nothing to stream: the stream ends"
    await stream.close()
    _, token = await sync_to_async(_user_token)("member")
    member = await connected_client(token=token)
    assert (await member.request({"type": "subscribe", "channel": "news"}))["type"] == "subscribed"
    await member.close()


async def test_a_subscribe_sent_before_the_handshake_completes_is_never_served() -> None:
    await sync_to_async(message_publish)(channel="news", data="secret", publisher_id=None)
    communicator = communicator_for(token="not-a-valid-token")
    await communicator.send_input({"type": "websocket.connect"})
    await communicator.send_input(
        {"type": "websocket.receive", "text": json.dumps({"type": "subscribe", "channel": "news"})}
    )
    refused = await communicator.receive_output(5)
    assert refused == {"type": "websocket.close"}, "refused at the handshake (HTTP 403)"
    assert await communicator.receive_nothing(0.5), "the frame was never read"
    await communicator.wait(5)


@override_settings(
    REST_FRAMEWORK={
        **django_settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"principal": "3/min", "anonymous": "2/min"},
    }
)
def test_rest_is_throttled_per_credential() -> None:
    from django.core.cache import cache

    cache.clear()
    _, token = _user_token("chatty", pattern="*", can_publish=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    codes = [
        api.post("/api/v1/channels/news/messages", {"data": n}, format="json").status_code
        for n in range(4)
    ]
    assert codes == [201, 201, 201, 429]
    limited = api.post("/api/v1/channels/news/messages", {"data": 9}, format="json")
    assert limited.json()["code"] == "RATE_LIMITED"


class _Sink:
    """A stdout that remembers the last line a command wrote (the key it printed)."""

    last = ""

    def write(self, text: str) -> None:
        if text.strip():
            _Sink.last = text.strip()

    def flush(self) -> None:
        pass


def test_user_message_send_from_application_code() -> None:
    from push.models import Message
    from push.services.publishing import user_message_send

    target, _ = _user_token("someone")
    message = user_message_send(user_id=target.pk, data={"note": "hi"})
    assert message.channel == f"user:{target.pk}" and message.seq == 1
    assert Message.objects.get(channel__name=f"user:{target.pk}").seq == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "command",
    [
        ["grant", "admin-long", "x" * 101, "--publish"],
        ["service_token", "create", "svc-long", "--scope", "publish:" + "x" * 101],
        ["service_token", "create", "n" * 101, "--scope", "publish:news"],
    ],
    ids=["grant-pattern", "scope-pattern", "token-name"],
)
def test_a_command_refuses_what_the_database_cannot_hold(command: list[str]) -> None:
    # Before: a database error with its trace, for a pattern or name one character long.
    User.objects.get_or_create(username="admin-long")
    with pytest.raises(CommandError, match="at most"):
        call_command(*command, stdout=_Sink())
    assert not ServiceToken.objects.filter(name__in=["svc-long", "n" * 101]).exists()
