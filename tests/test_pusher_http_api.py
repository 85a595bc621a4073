"""The Pusher HTTP API and the authorization endpoints on a real node, driven by the
official Pusher server library (pusher-http-python) as a back-end would drive them,
with subscribers of our own protocol on the same channels: an event triggered through
Pusher's API is a stored, numbered message of ours, ``{"event", "data"}``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pusher
import pytest
from pusher.errors import PusherBadAuth, PusherBadRequest, PusherBadStatus
from pusher.http import make_query_string
from pusher.signature import sign

from tests.pusherclient import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    ENCRYPTION_MASTER_KEY,
    PusherClient,
    shared_pusher_env,
    signed_post,
)
from tests.servers import ServerNode, create_token, manage
from tests.waiting import QUERY_INTERVAL_SECS, wait_until
from tests.wsclient import collect_messages, subscribe

pytestmark = [pytest.mark.asyncio, pytest.mark.e2e]

SOCKET = "123.456"
# Counts are published once a second by each node; a few rounds is plenty.
COUNT_WAIT_SECS = 15.0


@pytest.fixture(scope="module")
def env(e2e_env: dict[str, str]) -> dict[str, str]:
    """The shared Pusher nodes' environment (``ph-recent-*`` channels are recent-only)."""
    return shared_pusher_env(e2e_env)


@pytest.fixture(scope="module")
def nodes(pusher_nodes: tuple[ServerNode, ServerNode]) -> tuple[ServerNode, ServerNode]:
    """The shared Pusher nodes (tests/conftest.py), the uvicorn one first: the library
    and the authorization endpoints talk to it, the daphne one is the other node."""
    daphne, uvicorn = pusher_nodes
    return uvicorn, daphne


@pytest.fixture(scope="module")
def node(nodes: tuple[ServerNode, ServerNode]) -> ServerNode:
    return nodes[0]


def library(node: ServerNode, *, app_id: str = APP_ID, secret: str = APP_SECRET) -> pusher.Pusher:
    return pusher.Pusher(
        app_id=app_id, key=APP_KEY, secret=secret, host="127.0.0.1", port=node.port, ssl=False
    )


@pytest.fixture
def backend(node: ServerNode) -> pusher.Pusher:
    return library(node)


@pytest.fixture
async def http(node: ServerNode) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as client:
        yield client


async def call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """A call of the library (sync, over requests) off the test's loop."""
    return await asyncio.to_thread(method, *args, **kwargs)


def pusher_event(message: dict[str, Any]) -> tuple[str, Any]:
    return message["data"]["event"], message["data"]["data"]


async def history(http: httpx.AsyncClient, channel: str) -> list[dict[str, Any]]:
    response = await http.get(f"/api/v1/channels/{channel}/messages", params={"since": 0})
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


# ----- triggering ---------------------------------------------------------------------------


async def test_a_triggered_event_is_a_message_of_our_protocol(
    node: ServerNode, backend: pusher.Pusher, http: httpx.AsyncClient
) -> None:
    ws, subscribed = await subscribe(node.ws_url, "ph-one")
    try:
        assert await call(backend.trigger, "ph-one", "greeting", {"text": "hi"}) == {}
        assert await call(backend.trigger, "ph-one", "greeting", "plain text") == {}
        messages = await collect_messages(ws, 2)
    finally:
        await ws.close()
    assert [pusher_event(m) for m in messages] == [
        ("greeting", '{"text": "hi"}'),
        ("greeting", "plain text"),
    ]
    assert [m["seq"] for m in messages] == [subscribed["seq"] + 1, subscribed["seq"] + 2]
    stored = await history(http, "ph-one")
    assert [(m["seq"], m["data"]) for m in stored] == [(m["seq"], m["data"]) for m in messages]


async def test_one_trigger_to_several_channels(
    node: ServerNode, backend: pusher.Pusher, http: httpx.AsyncClient
) -> None:
    channels = ["ph-many-a", "ph-many-b", "ph-many-c"]
    subscribers = [await subscribe(node.ws_url, c) for c in channels]
    try:
        for n in range(3):
            await call(backend.trigger, channels, "tick", str(n))
        received = [await collect_messages(ws, 3) for ws, _ in subscribers]
    finally:
        for ws, _ in subscribers:
            await ws.close()
    for messages in received:
        assert [pusher_event(m) for m in messages] == [("tick", "0"), ("tick", "1"), ("tick", "2")]
        assert [m["seq"] for m in messages] == [1, 2, 3]
    # One transaction per trigger: each trigger's messages share one commit's time.
    stored = [await history(http, c) for c in channels]
    for n in range(3):
        assert len({s[n]["timestamp"] for s in stored}) == 1


async def test_batch_events_arrive_in_order_with_consecutive_seqs(
    node: ServerNode, backend: pusher.Pusher, http: httpx.AsyncClient
) -> None:
    ws_a, _ = await subscribe(node.ws_url, "ph-batch-a")
    ws_b, _ = await subscribe(node.ws_url, "ph-batch-b")
    batch = [
        {"channel": "ph-batch-a", "name": "one", "data": "1"},
        {"channel": "ph-batch-b", "name": "two", "data": {"n": 2}},
        {"channel": "ph-batch-a", "name": "three", "data": "3"},
    ]
    try:
        assert await call(backend.trigger_batch, batch) == {}
        got_a = await collect_messages(ws_a, 2)
        got_b = await collect_messages(ws_b, 1)
    finally:
        await ws_a.close()
        await ws_b.close()
    assert [(m["seq"], *pusher_event(m)) for m in got_a] == [(1, "one", "1"), (2, "three", "3")]
    assert [(m["seq"], *pusher_event(m)) for m in got_b] == [(1, "two", '{"n": 2}')]
    assert [m["seq"] for m in await history(http, "ph-batch-a")] == [1, 2]


async def test_batch_events_with_info_answer_each_events_counts(
    node: ServerNode, http: httpx.AsyncClient
) -> None:
    ws, _ = await subscribe(node.ws_url, "ph-batch-info")
    try:
        await wait_for_count(node, "ph-batch-info", 1)
        body = {
            "batch": [
                {
                    "channel": "ph-batch-info",
                    "name": "e",
                    "data": "1",
                    "info": "subscription_count",
                },
                {"channel": "ph-batch-info", "name": "e", "data": "2"},
            ]
        }
        response = await signed_post(http, f"/apps/{APP_ID}/batch_events", body)
    finally:
        await ws.close()
    assert response.status_code == 200, response.text
    assert response.json() == {"batch": [{"subscription_count": 1}, {}]}


async def test_a_trigger_with_a_recent_only_channel_among_others(
    node: ServerNode, backend: pusher.Pusher, http: httpx.AsyncClient
) -> None:
    ws, _ = await subscribe(node.ws_url, "ph-recent-1")
    try:
        await call(backend.trigger, ["ph-durable", "ph-recent-1"], "e", "d")
        messages = await collect_messages(ws, 1)
    finally:
        await ws.close()
    assert [pusher_event(m) for m in messages] == [("e", "d")]
    assert len(await history(http, "ph-durable")) == 1


async def test_a_trigger_refused_for_one_channel_publishes_on_none(
    http: httpx.AsyncClient,
) -> None:
    """A name Pusher allows and we do not (``=``) refuses the whole trigger: the
    recent-only channel named before it used to be published all the same, and the
    back-end's retry (without the bad name) published it a second time."""
    tag = uuid.uuid4().hex[:8]
    named = [f"ph-recent-refused-{tag}", f"ph-refused-{tag}", f"ph-refused={tag}"]
    body = {"name": "e", "data": "d", "channels": named}
    refused = await signed_post(http, f"/apps/{APP_ID}/events", body)
    assert refused.status_code == 400, refused.text
    assert [await history(http, c) for c in named[:2]] == [[], []]
    retried = await signed_post(http, f"/apps/{APP_ID}/events", {**body, "channels": named[:2]})
    assert retried.status_code == 200, retried.text
    assert [len(await history(http, c)) for c in named[:2]] == [1, 1]


async def test_a_triggers_durable_channels_share_one_commit_around_a_recent_one(
    backend: pusher.Pusher, http: httpx.AsyncClient
) -> None:
    tag = uuid.uuid4().hex[:8]
    durable = [f"ph-around-a-{tag}", f"ph-around-b-{tag}"]
    await call(backend.trigger, [durable[0], f"ph-recent-around-{tag}", durable[1]], "e", "d")
    stored = [await history(http, c) for c in durable]
    assert [len(s) for s in stored] == [1, 1]
    # One transaction: both messages carry its commit's time.
    assert stored[0][0]["timestamp"] == stored[1][0]["timestamp"]


async def test_the_triggering_socket_does_not_get_its_own_event(
    node: ServerNode, backend: pusher.Pusher
) -> None:
    sender = await PusherClient.connect(node.pusher_url)
    other = await PusherClient.connect(node.pusher_url)
    ours, _ = await subscribe(node.ws_url, "ph-socket")
    try:
        for client in (sender, other):
            assert (await client.subscribe("ph-socket"))["event"] == (
                "pusher_internal:subscription_succeeded"
            )
        await call(backend.trigger, "ph-socket", "moved", "x", socket_id=sender.socket_id)
        await call(
            backend.trigger_batch,
            [
                {
                    "channel": "ph-socket",
                    "name": "batched",
                    "data": "y",
                    "socket_id": sender.socket_id,
                },
                {"channel": "ph-socket", "name": "for-all", "data": "z"},
            ],
        )
        assert await other.receive_event("moved") == {
            "event": "moved",
            "channel": "ph-socket",
            "data": "x",
        }
        assert (await other.receive_event("batched"))["data"] == "y"
        assert (await other.receive_event("for-all"))["data"] == "z"
        # The sender gets only the event its socket id did not exclude.
        assert (await sender.receive())["event"] == "for-all"
        await sender.nothing_for(0.5)
        messages = await collect_messages(ours, 3)
        assert [pusher_event(m) for m in messages] == [
            ("moved", "x"),
            ("batched", "y"),
            ("for-all", "z"),
        ]
        assert [m["seq"] for m in messages] == [1, 2, 3]
    finally:
        await sender.close()
        await other.close()
        await ours.close()


async def test_a_trigger_checked_as_pusher_checks_it(http: httpx.AsyncClient) -> None:
    refused = await signed_post(
        http, f"/apps/{APP_ID}/events", {"name": "e", "data": "d", "channel": "no spaces"}
    )
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith("text/plain")
    assert "Invalid channel name" in refused.text


# ----- channels ------------------------------------------------------------------------------


async def wait_for_count(node: ServerNode, channel: str, count: int) -> None:
    backend = library(node)

    async def counted() -> bool:
        info = await call(backend.channel_info, channel, ["subscription_count"])
        return bool(info.get("subscription_count") == count)

    await wait_until(
        counted,
        f"{channel} to count {count} subscribers",
        timeout=COUNT_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )


async def wait_for_listing(
    backend: pusher.Pusher, prefix: str, info: list[str], expected: dict[str, Any]
) -> None:
    """The channel list is read from a snapshot a node keeps for a second (its counts
    are a second behind anyway): an earlier test's listing may still be served."""

    async def listed() -> bool:
        return bool(await call(backend.channels_info, prefix, info) == expected)

    await wait_until(
        listed,
        f"{prefix}* listed as {expected}",
        timeout=COUNT_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )


async def test_channel_info_and_list(node: ServerNode, backend: pusher.Pusher) -> None:
    assert await call(backend.channel_info, "ph-info-x", ["subscription_count"]) == {
        "occupied": False,
        "subscription_count": 0,
    }
    subscribers = [await subscribe(node.ws_url, "ph-info-x") for _ in range(2)]
    try:
        await wait_for_count(node, "ph-info-x", 2)
        assert await call(backend.channel_info, "ph-info-x") == {"occupied": True}
        await wait_for_listing(
            backend,
            "ph-info-",
            ["subscription_count"],
            {"channels": {"ph-info-x": {"subscription_count": 2}}},
        )
        assert await call(backend.channels_info, "ph-info-") == {"channels": {"ph-info-x": {}}}
        with pytest.raises(PusherBadRequest):
            await call(backend.channel_info, "ph-info-x", ["user_count"])
        with pytest.raises(PusherBadRequest):
            await call(backend.channels_info, "ph-info-", ["user_count"])
    finally:
        for ws, _ in subscribers:
            await ws.close()


async def test_presence_users_and_counts(
    node: ServerNode, backend: pusher.Pusher, env: dict[str, str]
) -> None:
    alice = make_user(env, "ph-alice", ("presence-ph-*", True))
    channel = "presence-ph-room"
    # Two connections of one user are one member.
    subscribers = [
        await subscribe(node.ws_url, channel, token=alice["token"]),
        await subscribe(node.ws_url, channel, token=alice["token"]),
    ]
    try:
        await wait_for_count(node, channel, 2)
        users = await call(backend.users_info, channel)
        assert users == {"users": [{"id": alice["id"]}]}
        info = await call(backend.channel_info, channel, ["user_count", "subscription_count"])
        assert info == {"occupied": True, "user_count": 1, "subscription_count": 2}
        await wait_for_listing(
            backend, "presence-ph-", ["user_count"], {"channels": {channel: {"user_count": 1}}}
        )
        with pytest.raises(PusherBadRequest):
            await call(backend.users_info, "ph-not-presence")
    finally:
        for ws, _ in subscribers:
            await ws.close()


async def test_terminate_closes_every_connection_signed_in_as_the_user(
    nodes: tuple[ServerNode, ServerNode],
    backend: pusher.Pusher,
    http: httpx.AsyncClient,
    bob: dict[str, str],
) -> None:
    # Signed in through /pusher/user-auth, on both nodes; another user stays.
    clients = [await PusherClient.connect(n.pusher_url) for n in (*nodes, nodes[0])]
    bystander = clients.pop()
    for client in clients:
        response = await http.post(
            "/pusher/user-auth",
            data={"socket_id": client.socket_id},
            headers=token_header(bob),
        )
        await client.send("pusher:signin", response.json())
        assert (await client.receive())["event"] == "pusher:signin_success"
    try:
        # pusher-http-python sends it without /apps/<id>, Pusher documents it with.
        assert await call(backend.terminate_user_connections, bob["id"]) == {}
        for client in clients:
            frame = await client.receive_event("pusher:error")
            assert frame["data"]["code"] == 4009
            await client.ws.wait_closed()
            assert client.ws.close_code == 4009
        await bystander.send("pusher:ping", {})
        assert (await bystander.receive())["event"] == "pusher:pong"
        client = backend._pusher_client
        documented = pusher.http.Request(
            client, "POST", f"/apps/{APP_ID}/users/someone/terminate_connections", {}
        )
        assert await call(client.http.send_request, documented) == {}
    finally:
        for client in (*clients, bystander):
            await client.close()


async def test_a_pusher_client_on_one_node_and_the_library_on_the_other(
    nodes: tuple[ServerNode, ServerNode], http: httpx.AsyncClient, bob: dict[str, str]
) -> None:
    node_a, node_b = nodes
    client = await PusherClient.connect(node_a.pusher_url)
    token = token_header(bob)
    try:
        # Authorized by /pusher/auth, as pusher-js would ask it.
        for channel in ("private-ph-two", "presence-ph-two"):
            signed = await http.post(
                "/pusher/auth",
                data={"socket_id": client.socket_id, "channel_name": channel},
                headers=token,
            )
            assert signed.status_code == 200, signed.text
            answer = await client.subscribe(
                channel, auth=signed.json()["auth"], channel_data=signed.json().get("channel_data")
            )
            assert answer["event"] == "pusher_internal:subscription_succeeded", answer
        backend_b = library(node_b)
        await call(backend_b.trigger, ["private-ph-two", "presence-ph-two"], "hello", {"n": 1})
        frames = [await client.receive_event("hello") for _ in range(2)]
        assert sorted(f["channel"] for f in frames) == ["presence-ph-two", "private-ph-two"]
        assert {f["data"] for f in frames} == {'{"n": 1}'}
        await wait_for_count(node_b, "presence-ph-two", 1)
        assert await call(backend_b.users_info, "presence-ph-two") == {"users": [{"id": bob["id"]}]}
    finally:
        await client.close()


# ----- refusals ------------------------------------------------------------------------------


async def test_a_wrong_secret_is_refused(node: ServerNode) -> None:
    with pytest.raises(PusherBadAuth, match="Invalid signature"):
        await call(library(node, secret="wrong").trigger, "ph-refused", "e", "d")


async def test_an_unknown_app_is_404(node: ServerNode) -> None:
    with pytest.raises(PusherBadStatus, match="404"):
        await call(library(node, app_id="999").trigger, "ph-refused", "e", "d")


async def test_a_stale_timestamp_is_refused(backend: pusher.Pusher) -> None:
    client = backend._pusher_client
    request = client.trigger.make_request("ph-refused", "e", "d")
    # Signed as the library signs, with a timestamp of eleven minutes ago.
    params = {k: v for k, v in request.query_params.items() if k != "auth_signature"}
    params["auth_timestamp"] = str(int(time.time()) - 660)
    string_to_sign = "\n".join([request.method, request.path, make_query_string(params)])
    request.query_params = {**params, "auth_signature": sign(APP_SECRET, string_to_sign)}
    with pytest.raises(PusherBadAuth, match="Timestamp expired"):
        await call(client.http.send_request, request)


async def test_a_tampered_body_is_refused(
    backend: pusher.Pusher, http: httpx.AsyncClient, node: ServerNode
) -> None:
    request = backend._pusher_client.trigger.make_request("ph-tampered", "e", "small")
    sent = await http.post(request.signed_path, content=request.body, headers=request.headers)
    assert sent.status_code == 200, sent.text
    tampered = request.body.replace(b"small", b"large")
    refused = await http.post(request.signed_path, content=tampered, headers=request.headers)
    assert (refused.status_code, refused.text) == (401, "body_md5 does not match the body")
    assert [m["data"]["data"] for m in await history(http, "ph-tampered")] == ["small"]


# ----- /pusher/auth and /pusher/user-auth -----------------------------------------------------


def make_user(env: dict[str, str], username: str, *grants: tuple[str, bool]) -> dict[str, str]:
    """A user with subscribe grants (pattern, with the presence right), an API token
    and a signed-in session; their id, token and session key."""
    grant_lines = "".join(
        f"ChannelGrant.objects.get_or_create(user=u, pattern={pattern!r},"
        f" defaults={{'can_subscribe': True, 'can_presence': {presence}}});"
        for pattern, presence in grants
    )
    script = (
        "from django.contrib.auth.models import User;"
        "from django.test import Client;"
        "from rest_framework.authtoken.models import Token;"
        "from accounts.models import ChannelGrant;"
        f"u, _ = User.objects.get_or_create(username={username!r});"
        + grant_lines
        + "c = Client(); c.force_login(u);"
        "print('ID=%s' % u.pk);"
        "print('TOKEN=' + Token.objects.get_or_create(user=u)[0].key);"
        "print('SESSION=' + c.cookies['sessionid'].value)"
    )
    output = manage(env, "shell", "-c", script)
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return {"id": values["ID"], "token": values["TOKEN"], "session": values["SESSION"]}


@pytest.fixture(scope="module")
def bob(env: dict[str, str]) -> dict[str, str]:
    return make_user(env, "ph-bob", ("private-ph-*", False), ("presence-ph-*", True))


def expected_auth(string_to_sign: str, secret: str = APP_SECRET, key: str = APP_KEY) -> str:
    digest = hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{key}:{digest}"


def session_headers(node: ServerNode, user: dict[str, str]) -> dict[str, str]:
    return {"Cookie": f"sessionid={user['session']}", "Origin": node.http_url}


def token_header(user: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Token {user['token']}"}


async def authorize(
    http: httpx.AsyncClient, channel: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """``POST /pusher/auth`` for ``channel`` and the socket ``SOCKET``, as pusher-js posts it."""
    return await http.post(
        "/pusher/auth", data={"socket_id": SOCKET, "channel_name": channel}, headers=headers
    )


async def test_auth_for_a_session_user(
    http: httpx.AsyncClient, node: ServerNode, bob: dict[str, str]
) -> None:
    response = await authorize(http, "private-ph-a", session_headers(node, bob))
    assert response.status_code == 200, response.text
    assert response.json() == {"auth": expected_auth(f"{SOCKET}:private-ph-a")}


async def test_auth_for_a_token_user_on_a_presence_channel(
    http: httpx.AsyncClient, bob: dict[str, str]
) -> None:
    response = await authorize(http, "presence-ph-room", token_header(bob))
    assert response.status_code == 200, response.text
    body = response.json()
    assert json.loads(body["channel_data"]) == {
        "user_id": bob["id"],
        "user_info": {"username": "ph-bob"},
    }
    assert body["auth"] == expected_auth(f"{SOCKET}:presence-ph-room:{body['channel_data']}")


async def test_auth_for_an_encrypted_channel_gives_pushers_shared_secret(
    http: httpx.AsyncClient, node: ServerNode, bob: dict[str, str]
) -> None:
    response = await authorize(http, "private-ph-encrypted-x", token_header(bob))
    assert response.status_code == 200, response.text
    # Not an encrypted channel: "private-encrypted-" is the prefix.
    assert "shared_secret" not in response.json()
    response = await authorize(http, "private-encrypted-ph", token_header(bob))
    # bob's grant is private-ph-*: this channel is not his.
    assert response.status_code == 403, response.text
    staff_token = create_token(node.env, "ph-staff", staff=True, grant=False)
    response = await authorize(
        http, "private-encrypted-ph", {"Authorization": f"Token {staff_token}"}
    )
    assert response.status_code == 200, response.text
    encrypting = pusher.Pusher(
        app_id=APP_ID,
        key=APP_KEY,
        secret=APP_SECRET,
        encryption_master_key_base64=ENCRYPTION_MASTER_KEY,
    )
    expected = encrypting.authenticate(channel="private-encrypted-ph", socket_id=SOCKET)
    assert response.json() == {
        "auth": expected["auth"],
        "shared_secret": expected["shared_secret"].decode(),
    }


async def test_more_query_parameters_than_django_reads_are_refused_400(
    http: httpx.AsyncClient,
) -> None:
    # One more than DATA_UPLOAD_MAX_NUMBER_FIELDS: refused before the signature is read.
    query = "&".join(f"p{i}=1" for i in range(1001))
    response = await http.get(f"/apps/{APP_ID}/channels?{query}")
    assert response.status_code == 400, response.text
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in response.text


async def test_auth_refuses_anonymous(http: httpx.AsyncClient) -> None:
    response = await authorize(http, "private-ph-a")
    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


async def test_auth_refuses_a_channel_without_a_grant(
    http: httpx.AsyncClient, node: ServerNode, bob: dict[str, str]
) -> None:
    for channel in ("private-elsewhere", "presence-elsewhere"):
        response = await authorize(http, channel, session_headers(node, bob))
        assert response.status_code == 403, response.text


async def test_auth_refuses_presence_without_the_presence_right(
    http: httpx.AsyncClient, env: dict[str, str]
) -> None:
    carol = make_user(env, "ph-carol", ("presence-ph-*", False))
    response = await authorize(http, "presence-ph-room", token_header(carol))
    assert response.status_code == 403, response.text


async def test_auth_refuses_bad_input(http: httpx.AsyncClient, bob: dict[str, str]) -> None:
    headers = token_header(bob)
    for data in (
        {"socket_id": "nope", "channel_name": "private-ph-a"},
        {"socket_id": SOCKET},
        {"socket_id": SOCKET, "channel_name": "ph-public"},
    ):
        response = await http.post("/pusher/auth", data=data, headers=headers)
        assert response.status_code == 400, (data, response.text)


async def test_auth_refuses_a_session_from_another_origin(
    http: httpx.AsyncClient, node: ServerNode, bob: dict[str, str]
) -> None:
    data = {"socket_id": SOCKET, "channel_name": "private-ph-a"}
    cookie = {"Cookie": f"sessionid={bob['session']}"}
    for headers in (
        {**cookie, "Origin": "https://attacker.example"},
        {**cookie, "Referer": "https://attacker.example/page"},
        cookie,
    ):
        response = await http.post("/pusher/auth", data=data, headers=headers)
        assert response.status_code == 403, (headers, response.text)
    # A page of the server itself, named by Referer alone (an older browser).
    response = await http.post(
        "/pusher/auth", data=data, headers={**cookie, "Referer": f"{node.http_url}/page"}
    )
    assert response.status_code == 200, response.text


async def test_an_invalid_token_is_refused(http: httpx.AsyncClient) -> None:
    response = await authorize(http, "private-ph-a", {"Authorization": "Token not-a-token"})
    assert response.status_code == 403


async def test_user_auth_for_session_and_token_users(
    http: httpx.AsyncClient, node: ServerNode, bob: dict[str, str]
) -> None:
    for headers in (session_headers(node, bob), token_header(bob)):
        response = await http.post("/pusher/user-auth", data={"socket_id": SOCKET}, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert json.loads(body["user_data"]) == {
            "id": bob["id"],
            "user_info": {"username": "ph-bob"},
        }
        assert body["auth"] == expected_auth(f"{SOCKET}::user::{body['user_data']}")


async def test_user_auth_refuses_anonymous(http: httpx.AsyncClient) -> None:
    response = await http.post("/pusher/user-auth", data={"socket_id": SOCKET})
    assert response.status_code == 403


async def test_with_two_apps_the_request_names_one_or_gets_the_environments(
    http: httpx.AsyncClient, node: ServerNode, bob: dict[str, str]
) -> None:
    manage(
        node.env,
        "shell",
        "-c",
        "from push.models import PusherApp;"
        "PusherApp.objects.create(name='second', app_id='2002', key='second-key',"
        " secret='second-secret')",
    )
    data = {"socket_id": SOCKET, "channel_name": "private-ph-a"}
    headers = token_header(bob)

    async def signed_by(key: str) -> Any:
        response = await http.post("/pusher/auth", data={**data, "app_key": key}, headers=headers)
        return response.status_code == 200 and response.json()

    try:
        # The node reads the apps again on an unknown key once its last read is a
        # second old (pusher_apps.MISS_REREAD_SECS): the new app signs within that.
        await wait_until(lambda: signed_by("second-key"), "the new app known to the node")
        for key, secret in ((APP_KEY, APP_SECRET), ("second-key", "second-secret")):
            assert await signed_by(key) == {
                "auth": expected_auth(f"{SOCKET}:private-ph-a", secret=secret, key=key)
            }
        # A plain pusher-js configuration names no app: the environment's signs.
        plain = await http.post("/pusher/auth", data=data, headers=headers)
        assert plain.json() == {"auth": expected_auth(f"{SOCKET}:private-ph-a")}
        unknown = await http.post("/pusher/auth", data={**data, "app_key": "nope"}, headers=headers)
        assert unknown.status_code == 404
    finally:
        manage(
            node.env,
            "shell",
            "-c",
            "from push.models import PusherApp; PusherApp.objects.filter(app_id='2002').delete()",
        )


async def test_one_user_is_one_presence_member_on_both_protocols(
    nodes: tuple[ServerNode, ServerNode], http: httpx.AsyncClient, bob: dict[str, str]
) -> None:
    """bob on our own protocol (node B) and on Pusher (node A, signed by /pusher/auth):
    one member, whom both protocols show, and no member_added for his second connection."""
    node_a, node_b = nodes
    channel = "presence-ph-both"
    watcher = await PusherClient.connect(node_a.pusher_url)
    await watcher.subscribe(channel, channel_data=json.dumps({"user_id": "watcher"}))
    ours, _subscribed = await subscribe(node_b.ws_url, channel, token=bob["token"])
    added = await watcher.receive_event("pusher_internal:member_added")
    assert json.loads(added["data"])["user_id"] == bob["id"]
    client = await PusherClient.connect(node_a.pusher_url)
    try:
        signed = await http.post(
            "/pusher/auth",
            data={"socket_id": client.socket_id, "channel_name": channel},
            headers=token_header(bob),
        )
        answer = await client.subscribe(
            channel, auth=signed.json()["auth"], channel_data=signed.json()["channel_data"]
        )
        presence = json.loads(answer["data"])["presence"]
        assert sorted(presence["ids"]) == sorted([bob["id"], "watcher"]), presence
        assert presence["count"] == 2
        await watcher.nothing_for(0.5)
        await ours.send(json.dumps({"type": "presence", "channel": channel, "id": 1}))
        while (members := json.loads(await ours.recv()))["type"] != "presence":
            pass  # the join and leave frames that came before the answer
        assert sorted(str(m["user_id"]) for m in members["members"]) == sorted(
            [bob["id"], "watcher"]
        )
    finally:
        await client.close()
        await ours.close()
        await watcher.close()


async def test_authorization_draws_on_the_rest_budget_of_its_credential(
    env: dict[str, str],
) -> None:
    # A user of its own: the budget is the credential's across nodes, and bob spent
    # some of his in this minute.
    carol = make_user(env, f"ph-carol-{time.time_ns()}", ("private-ph-*", False))
    node = ServerNode({**env, "PUSH_REST_RATE": "3/min"}, name="pusher-auth-budget").start()
    try:
        async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:
            statuses = [
                (await authorize(http, "private-ph-a", token_header(carol))).status_code
                for _ in range(5)
            ]
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429], statuses
    finally:
        node.stop()
