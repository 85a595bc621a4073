"""Keys, addresses and floods: one key per signing purpose, the longest a subscription
token may live, webhook timestamps, the client's address behind trusted proxies, the
Host check of streams, failed-authentication throttling, session look-ups off the
shared thread, and who may run the admin's actions."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.util
import json
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings
from django.utils import timezone
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts import throttling
from accounts.models import ChannelGrant, ServiceToken
from accounts.subscription_tokens import (
    subscription_token_issue,
    subscription_token_secret,
    subscription_token_verify,
)
from common.errors import CloseCode, PushError
from push.models import Connection, PusherApp
from push.ops.webhooks import _headers, webhook_secret
from push.tests.sse_inprocess import InProcessStream
from push.tests.wsclient import connected_client, open_client
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

ROOT = Path(__file__).resolve().parents[2]


def _client_signing() -> ModuleType:
    """The Python client's ``pushclient.signing`` from this source tree (standard library
    only), whatever copy of the client the environment has installed."""
    path = ROOT / "clients" / "python" / "pushclient" / "signing.py"
    spec = importlib.util.spec_from_file_location("pushclient_signing_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


signing = _client_signing()


async def _subscribe_with(token: str, channel: str = "private-room") -> dict[str, Any]:
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": channel, "token": token})
    await client.close()
    return reply


# ----- one key per purpose ----------------------------------------------------------------


@override_settings(PUSH={})
async def test_the_webhook_key_cannot_mint_subscription_tokens(settings: Any) -> None:
    """A webhook receiver holds the webhook key; neither it nor SECRET_KEY signs tokens."""
    for key in (webhook_secret(), settings.SECRET_KEY):
        forged = signing.subscription_token("private-room", ttl_secs=60, secret=key)
        reply = await _subscribe_with(forged)
        assert reply["code"] == "FORBIDDEN" and "bad signature" in reply["message"], reply
    genuine = signing.subscription_token(
        "private-room", ttl_secs=60, secret=subscription_token_secret()
    )
    assert (await _subscribe_with(genuine))["type"] == "subscribed"
    assert webhook_secret() != subscription_token_secret() != settings.SECRET_KEY


def test_a_webhook_signature_does_not_verify_as_a_subscription_token() -> None:
    body = json.dumps({"ch": "private-room", "exp": int(time.time()) + 60}).encode()
    headers = _headers({"id": "event-1"}, body)
    forged = signing._b64(body) + "." + headers["X-Push-Signature"].removeprefix("sha256=")
    with pytest.raises(PushError) as refused:
        subscription_token_verify(forged, channel="private-room")
    assert refused.value.code.value == "FORBIDDEN"


@override_settings(PUSH={"SUBSCRIPTION_TOKEN_SECRET": "explicit", "WEBHOOK_SECRET": "hooks"})
def test_explicit_secrets_are_used_as_given() -> None:
    assert subscription_token_secret() == "explicit" and webhook_secret() == "hooks"


# ----- the longest a subscription token lives ---------------------------------------------


@pytest.mark.parametrize("claims", ["iat now, exp in a year", "no iat, exp in a year"])
async def test_a_token_for_a_year_is_refused(claims: str) -> None:
    now = int(time.time())
    payload: dict[str, Any] = {"ch": "private-room", "exp": now + 365 * 86_400}
    if claims.startswith("iat"):
        payload["iat"] = now
    encoded = signing._b64(json.dumps(payload).encode())
    mac = hmac.new(subscription_token_secret().encode(), encoded.encode(), hashlib.sha256)
    token = encoded + "." + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()
    reply = await _subscribe_with(token)
    assert reply["code"] == "FORBIDDEN" and "lives longer than 3600 s" in reply["message"]


async def test_a_token_whose_iat_is_long_before_exp_is_refused() -> None:
    """An old token re-dated by nobody: issued two hours before it expires."""
    with override_settings(PUSH={"SUBSCRIPTION_TOKEN_MAX_TTL_SECS": 7200}):
        token = subscription_token_issue(channel="private-room", ttl_secs=7200)
    reply = await _subscribe_with(token)
    assert reply["code"] == "FORBIDDEN" and "lives longer" in reply["message"]


async def test_tokens_within_the_lifetime_and_from_the_client_are_accepted() -> None:
    ours = subscription_token_issue(channel="private-room", ttl_secs=3600)
    theirs = signing.subscription_token(
        "private-room", ttl_secs=600, secret=subscription_token_secret()
    )
    for token in (ours, theirs):
        assert (await _subscribe_with(token))["type"] == "subscribed"
    with pytest.raises(ValueError, match="SUBSCRIPTION_TOKEN_MAX_TTL_SECS"):
        subscription_token_issue(channel="private-room", ttl_secs=3601)


# ----- webhook timestamps -----------------------------------------------------------------


def test_webhook_signatures_cover_a_timestamp_and_stale_ones_fail() -> None:
    body = b'{"id":"e1","type":"connect"}'
    headers = _headers({"id": "e1"}, body)
    sent_at = int(headers["X-Push-Timestamp"])
    assert abs(sent_at - time.time()) < 5
    key = webhook_secret()
    assert signing.webhook_verify(body, headers, secret=key)
    lowercase = {name.lower(): value for name, value in headers.items()}
    assert signing.webhook_verify(body, lowercase, secret=key)
    # Replayed ten minutes later: refused, though the signature is genuine.
    assert not signing.webhook_verify(body, headers, secret=key, now=sent_at + 600)
    # The timestamp moved forward to look fresh: the signature no longer matches.
    assert not signing.webhook_verify(
        body, {**headers, "X-Push-Timestamp": str(sent_at + 1)}, secret=key, now=sent_at
    )
    assert not signing.webhook_verify(body + b" ", headers, secret=key)
    assert not signing.webhook_verify(body, headers, secret=subscription_token_secret())


# ----- the client's address -----------------------------------------------------------------


@override_settings(
    REST_FRAMEWORK={
        **django_settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"principal": "1000/min", "anonymous": "3/min"},
    }
)
def test_varying_x_forwarded_for_does_not_escape_the_anonymous_throttle() -> None:
    # This run's own address: counters of earlier runs this minute outlive them.
    address = f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"
    client = APIClient(REMOTE_ADDR=address)
    statuses = [
        client.get("/api/v1/channels/", HTTP_X_FORWARDED_FOR=f"10.0.0.{i}").status_code
        for i in range(5)
    ]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]


@override_settings(
    REST_FRAMEWORK={
        **django_settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"principal": "1000/min", "anonymous": "3/min"},
    }
)
def test_anonymous_rest_is_throttled_per_ipv6_64() -> None:
    """A host picks any address of its /64: counted per exact address, it sent each
    request from a new one and was never throttled."""
    block = f"2001:db8:{uuid.uuid4().int % 0xFFFF:x}"  # this run's own: counters outlive it
    client = APIClient()
    statuses = [
        client.get("/api/v1/channels/", REMOTE_ADDR=f"{block}::{i}").status_code
        for i in range(1, 6)
    ]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    other = client.get("/api/v1/channels/", REMOTE_ADDR=f"{block}:1::1")
    assert other.status_code == 200


def test_pusher_authorization_with_redis_down_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its REST budget's counter could not be counted: a 500 with a trace, where the
    REST API answers 503 ``UNAVAILABLE``."""

    def down(*args: Any, **kwargs: Any) -> int:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379")

    monkeypatch.setattr(throttling, "count", down)
    answer = Client().post("/pusher/auth", {"socket_id": "1.2", "channel_name": "private-x"})
    assert answer.status_code == 503 and answer.json()["code"] == "UNAVAILABLE"
    rest = APIClient().get("/api/v1/channels/")
    assert rest.status_code == 503 and rest.json()["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("trusted_proxies", [0, 1])
async def test_per_ip_limits_believe_forwarded_addresses_only_behind_trusted_proxies(
    trusted_proxies: int,
) -> None:
    """Two clients behind one proxy send different X-Forwarded-For: one address unless a
    proxy is trusted, then each its own."""
    with override_settings(PUSH={"MAX_CONNECTIONS_PER_IP": 1, "TRUSTED_PROXIES": trusted_proxies}):
        first = await connected_client(
            headers=[(b"x-forwarded-for", b"203.0.113.1")], client_address=("10.0.0.9", 1)
        )
        accepted, second, _ = await open_client(
            headers=[(b"x-forwarded-for", b"spoofed, 203.0.113.2")],
            client_address=("10.0.0.9", 2),
        )
        assert accepted
        if trusted_proxies:
            await second.recv_type("connection_established")
        else:
            assert (await second.expect_close()) == CloseCode.TRY_AGAIN_LATER
        await first.close()
        await second.close()


def test_forwarded_address_is_the_one_the_trusted_proxy_appended() -> None:
    from push.transport.origin import forwarded_client, forwarded_scheme

    scope = {
        "type": "http",
        "scheme": "http",
        "client": ("10.0.0.9", 5000),
        "headers": [(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"x-forwarded-proto", b"https")],
    }
    assert forwarded_client(scope, 0) == ("10.0.0.9", 5000)
    assert forwarded_client(scope, 1) == ("2.2.2.2", 0)
    assert forwarded_client(scope, 2) == ("1.1.1.1", 0)
    assert forwarded_client(scope, 5) == ("1.1.1.1", 0)
    # Proxies that append the client's port: the address is still the client's.
    ported = {**scope, "headers": [(b"x-forwarded-for", b"1.1.1.1:443, [2001:db8::7]:51000")]}
    assert forwarded_client(ported, 1) == ("2001:db8::7", 0)
    assert forwarded_client(ported, 2) == ("1.1.1.1", 0)
    garbage = {**scope, "headers": [(b"x-forwarded-for", b"<script>")]}
    assert forwarded_client(garbage, 1) == ("10.0.0.9", 5000), "no address: the peer's"
    assert forwarded_scheme(scope) == "https"
    assert forwarded_scheme({**scope, "type": "websocket"}) == "wss"


# ----- Host ---------------------------------------------------------------------------------


async def test_websocket_and_sse_refuse_a_host_not_allowed() -> None:
    foreign = [(b"host", b"rebound.attacker.example")]
    accepted, _, _ = await open_client(headers=foreign)
    assert not accepted  # closed before the accept: HTTP 403 from the server
    ok = await connected_client(headers=[(b"host", b"localhost:8000")])
    await ok.close()
    stream = InProcessStream("channel=news", headers=foreign)
    assert await stream.start() == 400
    body = await stream.communicator.receive_output()
    assert b"Host not allowed" in body["body"]
    allowed = InProcessStream("channel=news", headers=[(b"host", b"127.0.0.1:8000")])
    assert await allowed.start() == 200
    await allowed.close()


# ----- failed authentications ---------------------------------------------------------------


@override_settings(PUSH={"AUTH_FAILURES_PER_MIN": 3})
def test_bad_rest_tokens_are_throttled_per_address() -> None:
    user = User.objects.create_user("valid", password="x")
    valid = Token.objects.create(user=user).key
    client = APIClient()
    bad = [
        client.get("/api/v1/channels/", HTTP_AUTHORIZATION=f"Token bad{i}").status_code
        for i in range(4)
    ]
    assert bad == [401, 401, 401, 429]
    refused = client.get("/api/v1/channels/", HTTP_AUTHORIZATION=f"Token {valid}")
    assert refused.status_code == 429 and refused.json()["code"] == "RATE_LIMITED"
    other = client.get(
        "/api/v1/channels/", HTTP_AUTHORIZATION=f"Token {valid}", REMOTE_ADDR="192.0.2.7"
    )
    assert other.status_code == 200


@override_settings(PUSH={"AUTH_FAILURES_PER_MIN": 3})
def test_unknown_rest_sessions_are_throttled_per_address() -> None:
    """A made-up session cookie cost REST a session look-up, uncounted, as often as the
    address's REST budget let it, where streams count it (and a bad token) as a failure."""
    user = User.objects.create_user("valid-session", password="x")
    valid = Token.objects.create(user=user).key
    address = "192.0.2.44"
    client = APIClient()
    statuses = []
    for i in range(4):
        client.cookies[django_settings.SESSION_COOKIE_NAME] = f"{i:032d}"
        statuses.append(client.get("/api/v1/channels/", REMOTE_ADDR=address).status_code)
    assert statuses == [200, 200, 200, 429]
    client.cookies.clear()
    refused = client.get(
        "/api/v1/channels/", HTTP_AUTHORIZATION=f"Token {valid}", REMOTE_ADDR=address
    )
    assert refused.status_code == 429 and refused.json()["code"] == "RATE_LIMITED"
    # A session that exists is no failure.
    signed_in = APIClient()
    signed_in.force_login(user)
    for _ in range(4):
        assert signed_in.get("/api/v1/channels/", REMOTE_ADDR="192.0.2.45").status_code == 200


@override_settings(PUSH={"AUTH_FAILURES_PER_MIN": 3})
async def test_bad_stream_tokens_and_unknown_sessions_are_throttled_per_address() -> None:
    def valid_token() -> str:
        return Token.objects.create(user=User.objects.create_user("ws", password="x")).key

    valid = await sync_to_async(valid_token)()
    address = ("198.51.100.4", 1)
    for i in range(3):
        accepted, _, _ = await open_client(token=f"bad{i}", client_address=address)
        assert not accepted
    # Past the budget even a valid token is not checked: try again later, not "invalid".
    accepted, client, _ = await open_client(token=valid, client_address=address)
    assert accepted and (await client.expect_close()) == CloseCode.TRY_AGAIN_LATER
    stream = InProcessStream(f"channel=news&token={valid}")
    stream.communicator.scope["client"] = address
    assert await stream.start() == 429
    # Made-up (well-formed) session keys count as well, from another address.
    other = ("198.51.100.5", 1)
    for i in range(3):
        cookie = [(b"cookie", f"sessionid={i:032d}".encode())]
        anonymous = await connected_client(headers=cookie, client_address=other)
        await anonymous.close()
    accepted, client, _ = await open_client(
        headers=[(b"cookie", b"sessionid=" + b"9" * 32)], client_address=other
    )
    assert accepted and (await client.expect_close()) == CloseCode.TRY_AGAIN_LATER


@override_settings(PUSH={"AUTH_FAILURES_PER_MIN": 3})
async def test_failed_authentications_count_per_ipv6_64() -> None:
    """A host picks any address of its /64: counted per exact address, it could send a
    new made-up token from each, and each cost a look-up on the database threads (the
    handshake budget is checked only after authentication)."""

    def valid_token() -> str:
        return Token.objects.create(user=User.objects.create_user("ws6", password="x")).key

    valid = await sync_to_async(valid_token)()
    for i in range(3):
        accepted, _, _ = await open_client(token=f"bad{i}", client_address=(f"2001:db8:6::{i}", 1))
        assert not accepted
    accepted, client, _ = await open_client(token=valid, client_address=("2001:db8:6::ff", 1))
    assert accepted and (await client.expect_close()) == CloseCode.TRY_AGAIN_LATER
    other = await connected_client(token=valid, client_address=("2001:db8:7::1", 1))
    await other.close()


@override_settings(PUSH={"AUTH_FAILURES_PER_MIN": 2})
async def test_a_token_holding_a_nul_is_invalid_and_counted() -> None:
    """``?token=%00``: PostgreSQL refuses the query, which was taken for the database
    being down (1013, SSE 503), with a warning logged and no failure counted, so an
    address could send them without end. No key holds a NUL: it is an invalid token."""
    address = ("198.51.100.9", 1)
    for _ in range(2):
        accepted, _, _ = await open_client(token="ab%00cd", client_address=address)
        assert not accepted
    stream = InProcessStream("channel=news&token=ab%00cd")
    stream.communicator.scope["client"] = address
    assert await stream.start() == 429, "the failures were counted"


@override_settings(PUSH={"MAX_CONNECTIONS_PER_IP": 1})
async def test_connections_per_ip_count_per_ipv6_64() -> None:
    first = await connected_client(client_address=("2001:db8:8::1", 1))
    accepted, second, _ = await open_client(client_address=("2001:db8:8::2", 1))
    assert accepted and (await second.expect_close()) == CloseCode.TRY_AGAIN_LATER
    elsewhere = await connected_client(client_address=("2001:db8:9::1", 1))
    await first.close()
    await elsewhere.close()


def _session_lookups() -> float:
    return (
        REGISTRY.get_sample_value("push_database_call_seconds_count", {"call": "session_principal"})
        or 0.0
    )


async def test_a_malformed_session_cookie_never_reaches_the_database() -> None:
    before = _session_lookups()
    for cookie in (b"sessionid=" + b"A" * 32, b"sessionid=short", b"sessionid=" + b"a" * 33):
        client = await connected_client(headers=[(b"cookie", cookie)])
        assert client is not None
        await client.close()
    assert _session_lookups() == before
    client = await connected_client(headers=[(b"cookie", b"sessionid=" + b"a" * 32)])
    await client.close()
    assert _session_lookups() == before + 1


async def test_session_handshakes_do_not_wait_for_the_shared_thread() -> None:
    """Channels' database_sync_to_async runs everything on one thread: while it is busy
    (here for 3 s), a signed-in browser still gets in at once."""

    def login_cookie() -> bytes:
        User.objects.create_user("browser", password="pw")
        browser = Client()
        assert browser.login(username="browser", password="pw")
        return f"sessionid={browser.cookies['sessionid'].value}".encode()

    cookie = await sync_to_async(login_cookie)()
    holding = threading.Event()

    def hold_the_thread() -> None:
        holding.set()
        time.sleep(3)

    busy = asyncio.ensure_future(sync_to_async(hold_the_thread, thread_sensitive=True)())
    await wait_until(holding.is_set, "the shared thread to be busy")
    started = time.monotonic()
    client = await connected_client(headers=[(b"cookie", cookie)])
    elapsed = time.monotonic() - started
    await client.close()
    await busy
    assert elapsed < 1.5, f"the handshake waited {elapsed:.1f} s for the shared thread"


# ----- the admin ----------------------------------------------------------------------------


def _staff(username: str, *codenames: str) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    browser = Client()
    assert browser.login(username=username, password="pw")
    return browser


def test_view_only_staff_cannot_run_the_admin_actions() -> None:
    # The change list offers actions only when it lists something.
    Connection.objects.create(
        connection_id=uuid.uuid4(), server_id="node-1", connected_at=timezone.now()
    )
    viewer = _staff("viewer", "view_connection", "view_servicetoken")
    page = viewer.get("/admin/push/connection/")
    assert page.status_code == 200 and b"disconnect_connections" not in page.content
    token, _ = ServiceToken.issue("feed")
    viewer.post(
        "/admin/accounts/servicetoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    token.refresh_from_db()
    assert token.revoked_at is None
    changer = _staff("changer", "view_connection", "change_connection", "change_servicetoken")
    assert b"disconnect_connections" in changer.get("/admin/push/connection/").content
    changer.post(
        "/admin/accounts/servicetoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_the_admin_s_node_pages_need_the_view_permission_on_connections() -> None:
    """Any staff account, one allowed nothing at all, read every node's busiest
    channels and the dead-letter events (client events' data, users, channels)."""
    nobody = _staff("nobody")
    viewer = _staff("connviewer", "view_connection")
    for page in ("/admin/push/connection/nodes/", "/admin/push/connection/events/dead/"):
        assert nobody.get(page).status_code == 403, page
        assert viewer.get(page).status_code == 200, page


def test_the_admin_shows_a_user_token_s_key_only_when_it_is_made() -> None:
    """Staff allowed to view tokens read every user's key in full (a superuser's among
    them) on the list, the change page and the history, and could act as that user."""
    root = User.objects.create_superuser("root", "root@example.com", "pw")
    key = Token.objects.create(user=root).key
    viewer = _staff("tokenviewer", "view_tokenproxy")
    listed = viewer.get("/admin/authtoken/tokenproxy/")
    assert listed.status_code == 200 and b"root" in listed.content
    assert key.encode() not in listed.content
    for page in (f"/admin/authtoken/tokenproxy/{root.pk}/change/", "/admin/"):
        shown = viewer.get(page)
        assert shown.status_code == 200 and key.encode() not in shown.content
    admin = Client()
    assert admin.login(username="root", password="pw")
    holder = User.objects.create_user("holder", password="x")
    added = admin.post("/admin/authtoken/tokenproxy/add/", {"user": holder.pk}, follow=True)
    new = Token.objects.get(user=holder).key
    assert added.status_code == 200 and new.encode() in added.content  # shown once
    for page in (
        "/admin/authtoken/tokenproxy/",
        f"/admin/authtoken/tokenproxy/{holder.pk}/change/",
        f"/admin/authtoken/tokenproxy/{holder.pk}/history/",
        "/admin/",
    ):
        shown = admin.get(page)
        assert shown.status_code == 200 and new.encode() not in shown.content, page


def test_the_admin_shows_a_pusher_app_s_secret_only_when_it_is_made() -> None:
    """Anyone allowed to view Pusher apps read each app's secret on its page, and could
    sign any channel authorization and publish through the HTTP API with it
    (``manage.py pusher_app`` prints it once and never lists it)."""
    User.objects.create_superuser("root", "root@example.com", "pw")
    admin = Client()
    assert admin.login(username="root", password="pw")
    added = admin.post("/admin/push/pusherapp/add/", {"name": "Shop", "enabled": "on"}, follow=True)
    app = PusherApp.objects.get(name="Shop")
    assert added.status_code == 200 and app.secret.encode() in added.content  # shown once
    viewer = _staff("appviewer", "view_pusherapp")
    for browser in (admin, viewer):
        for page in (f"/admin/push/pusherapp/{app.pk}/change/", "/admin/push/pusherapp/"):
            shown = browser.get(page)
            assert shown.status_code == 200 and app.key.encode() in shown.content
            assert app.secret.encode() not in shown.content, page


def test_an_admin_grant_starts_with_no_right_and_needs_one() -> None:
    User.objects.create_superuser("root", "root@example.com", "pw")
    holder = User.objects.create_user("holder", password="x")
    admin = Client()
    assert admin.login(username="root", password="pw")
    form = admin.get("/admin/accounts/channelgrant/add/").content.decode()
    assert 'name="can_subscribe"' in form and 'name="can_subscribe" checked' not in form
    refused = admin.post(
        "/admin/accounts/channelgrant/add/", {"pattern": "private-*", "user": holder.pk}
    )
    assert refused.status_code == 200 and b"Choose at least one right" in refused.content
    assert not ChannelGrant.objects.exists()
    admin.post(
        "/admin/accounts/channelgrant/add/",
        {"pattern": "private-*", "user": holder.pk, "can_publish": "on"},
    )
    grant = ChannelGrant.objects.get()
    assert grant.can_publish and not grant.can_subscribe and not grant.can_presence


# ----- REST bodies --------------------------------------------------------------------------


def test_a_deeply_nested_rest_body_is_invalid_json_not_a_server_error() -> None:
    user = User.objects.create_user("deep", password="x", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    body = '{"data":' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post("/api/v1/channels/news/messages", body, content_type="application/json")
    assert response.status_code == 400 and response.json()["code"] == "INVALID_JSON"


def test_the_session_cookie_is_read_as_django_reads_it_among_other_cookies() -> None:
    from accounts.middleware import session_key

    def key(*cookies: bytes) -> str | None:
        return session_key({"headers": [(b"cookie", c) for c in cookies]})

    assert key(b"a=1; sessionid=abc; b=2") == "abc"
    assert key(b"a=1", b"sessionid=abc") == "abc"  # a second Cookie header
    assert key(b"xsessionid=abc; sessionidx=1") is None  # its name only within others'
    assert key(b";" * 15_000) is None
    assert key(b";" * 15_000 + b"sessionid=abc") == "abc"
