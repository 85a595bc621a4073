"""Webhooks in Pusher's format (push.services.pusher_webhooks), through real nodes, the
event stream and the worker, each request verified with the official ``pusher`` server
library as a back-end verifies it: channel_occupied once when a channel's first
subscriber comes on either of two nodes and channel_vacated once when its last leaves;
member_added / member_removed once per user however many connections on however many
nodes; every enabled app with URLs receiving every channel's events, signed with its
own secret; a receiver that fails first receiving the event later (at least once); a
body signed with another secret refused."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pusher
import pytest
import redis
from django.test import override_settings

from push.ops import events
from push.ops.events import event
from push.services.pusher_apps import app_cache
from push.services.pusher_webhooks import deliver_pusher_webhooks, pusher_webhook_event
from tests.event_sink import Received, WebhookReceiver
from tests.pusherclient import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    PusherClient,
    presence_data,
    pusher_env,
)
from tests.servers import ServerNode, manage, node_pair, start_event_worker
from tests.waiting import QUERY_INTERVAL_SECS, wait_until
from tests.wsclient import open_ws, request, subscribe

pytestmark = pytest.mark.e2e

# Vacated comes once the last node lets the channel go, the hub's linger (10 s) after
# its last subscriber left.
VACATED_WAIT_SECS = 40.0
# A webhook goes through a node's event buffer, the stream, a worker and an HTTP call:
# well under a second here, but past 10 s on a machine busy with two test workers.
WEBHOOK_WAIT_SECS = 30.0


@dataclass(frozen=True)
class App:
    app_id: str
    key: str
    secret: str

    def client(self, *, secret: str | None = None) -> pusher.Pusher:
        """The official server library, as the app's back-end sets it up."""
        return pusher.Pusher(app_id=self.app_id, key=self.key, secret=secret or self.secret)

    def verified(self, received: Received) -> dict[str, Any]:
        """The body of ``received`` as ``validate_webhook`` returns it, or fail."""
        headers = {name.lower(): value for name, value in received.headers.items()}
        assert headers["content-type"] == "application/json"
        body = self.client().validate_webhook(
            headers["x-pusher-key"], headers["x-pusher-signature"], received.body
        )
        assert body is not None, f"not a valid webhook of {self.key}: {received}"
        return body


# The environment's app, whose credentials the raw Pusher client signs with.
ENV_APP = App(APP_ID, APP_KEY, APP_SECRET)
# Pusher's app ids are numbers (the library refuses any other).
ROW_APP = App(
    str(secrets.randbelow(10**9)),
    "pwrowkey" + uuid.uuid4().hex[:12],
    "pwrowsecret" + uuid.uuid4().hex,
)
DISABLED_APP = App(
    str(secrets.randbelow(10**9)),
    "pwoffkey" + uuid.uuid4().hex[:12],
    "pwoffsecret" + uuid.uuid4().hex,
)


def _pusher_env(e2e_env: dict[str, str], receiver: WebhookReceiver) -> dict[str, str]:
    return {
        **pusher_env(e2e_env, client_events=True),
        "REDIS_PREFIX": f"pw{uuid.uuid4().hex[:8]}",
        "PUSH_EVENT_RETRY_SECS": "1",
        "PUSHER_WEBHOOK_URLS": receiver.url(),
    }


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    worker.wait(10)


@dataclass
class Cluster:
    env: dict[str, str]
    nodes: tuple[ServerNode, ServerNode]
    # One receiver per app: the environment's, an app row's, a disabled app row's.
    hooks: dict[App, WebhookReceiver]


def _app_rows(env: dict[str, str], receivers: dict[App, WebhookReceiver]) -> None:
    rows = [(app, app is not DISABLED_APP, receivers[app].url()) for app in (ROW_APP, DISABLED_APP)]
    script = "from push.models import PusherApp;" + "".join(
        f"PusherApp.objects.create(name={app.app_id!r}, app_id={app.app_id!r},"
        f" key={app.key!r}, secret={app.secret!r}, enabled={enabled}, webhook_urls={url!r});"
        for app, enabled, url in rows
    )
    manage(env, "shell", "-c", script)


def _forget_app_rows(env: dict[str, str]) -> None:
    """The database outlives this module: a worker of another test must not find these
    apps and POST to receivers that are gone."""
    ids = [ROW_APP.app_id, DISABLED_APP.app_id]
    manage(
        env,
        "shell",
        "-c",
        f"from push.models import PusherApp;PusherApp.objects.filter(app_id__in={ids!r}).delete()",
    )


@pytest.fixture(scope="module")
def cluster(e2e_env: dict[str, str]) -> Iterator[Cluster]:
    """Two nodes and a worker; the environment's app and an app row with webhook URLs,
    a disabled app row with one."""
    receivers = {app: WebhookReceiver() for app in (ENV_APP, ROW_APP, DISABLED_APP)}
    for receiver in receivers.values():
        receiver.__enter__()
    env = _pusher_env(e2e_env, receivers[ENV_APP])
    _app_rows(env, receivers)
    try:
        with node_pair(env, f"pw-{uuid.uuid4().hex[:4]}") as nodes:
            worker = start_event_worker(env, f"pw-{uuid.uuid4().hex[:4]}")
            try:
                yield Cluster(env, nodes, receivers)
            finally:
                _stop(worker)
    finally:
        _forget_app_rows(env)
        for receiver in receivers.values():
            receiver.__exit__()


def _entries(app: App, receiver: WebhookReceiver, channel: str) -> list[dict[str, Any]]:
    """The events of ``channel`` that ``receiver`` accepted, each request verified as
    ``app``'s and holding one event."""
    found = []
    for received in list(receiver.accepted):
        body = app.verified(received)
        assert len(body["events"]) == 1, body
        found.extend(e for e in body["events"] if e.get("channel") == channel)
    return found


def _names(app: App, receiver: WebhookReceiver, channel: str) -> list[str]:
    return [e["name"] for e in _entries(app, receiver, channel)]


def _stream_names(env: dict[str, str], channel: str) -> list[str]:
    """The events of ``channel`` in the stream that are Pusher webhooks too."""
    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        entries = client.xrange(f"{env['REDIS_PREFIX']}:events")
    finally:
        client.close()
    found = (json.loads(fields[b"event"]) for _, fields in entries)
    return [
        e["type"]
        for e in found
        if e.get("channel") == channel and pusher_webhook_event(e) is not None
    ]


def _occupancy_nodes(env: dict[str, str], channel: str) -> set[bytes]:
    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        return client.smembers(f"{env['REDIS_PREFIX']}:occupancy:{channel}")  # type: ignore[return-value]  # redis-py types sync and asyncio replies alike
    finally:
        client.close()


def _every_app_got_the_same(cluster: Cluster, channel: str) -> None:
    hooks = cluster.hooks
    expected = _entries(ENV_APP, hooks[ENV_APP], channel)
    assert _entries(ROW_APP, hooks[ROW_APP], channel) == expected, "every app, every channel"
    assert hooks[DISABLED_APP].accepted == [], "a disabled app gets no webhook"


async def test_occupied_once_on_the_first_node_vacated_once_by_the_last(
    cluster: Cluster,
) -> None:
    env, (node_a, node_b), hooks = cluster.env, cluster.nodes, cluster.hooks
    channel = f"pw-occ-{uuid.uuid4().hex[:6]}"
    on_a = [(await subscribe(node_a.ws_url, channel))[0] for _ in range(2)]
    await wait_until(
        lambda: _names(ENV_APP, hooks[ENV_APP], channel) == ["channel_occupied"],
        "channel_occupied",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    on_b = [(await subscribe(node_b.ws_url, channel))[0] for _ in range(2)]
    await wait_until(
        lambda: len(_occupancy_nodes(env, channel)) == 2,
        "both nodes serving the channel",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    for ws in on_a:
        await ws.close()
    # Node A lets the channel go (after its linger) while B still serves it: no event.
    await wait_until(
        lambda: len(_occupancy_nodes(env, channel)) == 1,
        "node A to let the channel go",
        timeout=VACATED_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    assert _stream_names(env, channel) == ["channel_occupied"]
    for ws in on_b:
        await ws.close()
    await wait_until(
        lambda: "channel_vacated" in _names(ENV_APP, hooks[ENV_APP], channel),
        "channel_vacated",
        timeout=VACATED_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    # Nothing can follow: no node serves the channel any more.
    assert _stream_names(env, channel) == ["channel_occupied", "channel_vacated"]
    assert _entries(ENV_APP, hooks[ENV_APP], channel) == [
        {"name": "channel_occupied", "channel": channel},
        {"name": "channel_vacated", "channel": channel},
    ]
    # Each with its place in the event stream, what a receiver orders them by.
    places = [
        tuple(int(n) for n in r.headers["X-Push-Event-Stream-Id"].split("-"))
        for r in hooks[ENV_APP].accepted
        if channel.encode() in r.body
    ]
    assert len(places) == 2 and places[0] < places[1]
    await wait_until(
        lambda: len(_entries(ROW_APP, hooks[ROW_APP], channel)) == 2,
        "the app row's two webhooks",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    _every_app_got_the_same(cluster, channel)


def _members(env: dict[str, str], names: list[str]) -> dict[str, tuple[str, str]]:
    """Users allowed on presence channels: name -> (API token, Pusher user id)."""
    script = (
        "from accounts.models import ChannelGrant;"
        "from django.contrib.auth.models import User;"
        "from rest_framework.authtoken.models import Token;"
        f"names = {names!r};"
        "users = [User.objects.create(username=n) for n in names];"
        "[ChannelGrant.objects.create(user=u, pattern='presence-*', can_subscribe=True)"
        " for u in users];"
        "[print('MEMBER', u.username, Token.objects.create(user=u).key, u.pk) for u in users]"
    )
    output = manage(env, "shell", "-c", script)
    rows = [line.split()[1:] for line in output.splitlines() if line.startswith("MEMBER ")]
    return {name: (token, user_id) for name, token, user_id in rows}


async def _join(node: ServerNode, room: str, token: str) -> Any:
    ws = await open_ws(node.ws_url, token=token)
    reply = await request(ws, {"type": "subscribe", "channel": room})
    assert reply["type"] == "subscribed", reply
    return ws


async def test_members_added_and_removed_once_per_user_across_nodes(cluster: Cluster) -> None:
    env, (node_a, node_b), hooks = cluster.env, cluster.nodes, cluster.hooks
    room = f"presence-pw-{uuid.uuid4().hex[:6]}"
    tag = uuid.uuid4().hex[:6]
    members = await asyncio.to_thread(_members, env, [f"roamer-{tag}", f"loner-{tag}"])
    (roamer_token, roamer_id), (loner_token, loner_id) = members.values()

    def members_seen() -> list[tuple[str, str]]:
        return [
            (e["name"], e["user_id"])
            for e in _entries(ENV_APP, hooks[ENV_APP], room)
            if e["name"].startswith("member_")
        ]

    # One user on three connections over both nodes, another on one: two members.
    roamer = [await _join(node, room, roamer_token) for node in (node_a, node_b, node_b)]
    loner = await _join(node_b, room, loner_token)
    added = sorted([("member_added", roamer_id), ("member_added", loner_id)])
    # The two joins come from two nodes' event buffers: in either order.
    await wait_until(
        lambda: sorted(members_seen()) == added,
        "two member_added",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    for ws in roamer[:-1]:
        await ws.close()
    await loner.close()
    await wait_until(
        lambda: members_seen()[2:] == [("member_removed", loner_id)],
        "the loner's member_removed",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    await roamer[-1].close()
    await wait_until(
        lambda: members_seen()[-1:] == [("member_removed", roamer_id)],
        "the roamer's member_removed, with its last connection",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    seen = members_seen()
    assert sorted(seen[:2]) == added
    assert seen[2:] == [("member_removed", loner_id), ("member_removed", roamer_id)]
    member_events = [n for n in _stream_names(env, room) if n.startswith("member_")]
    assert member_events == ["member_added"] * 2 + ["member_removed"] * 2, "each once"
    entry = next(e for e in _entries(ENV_APP, hooks[ENV_APP], room) if "user_id" in e)
    assert set(entry) == {"name", "channel", "user_id"}
    await wait_until(
        lambda: (
            len(_entries(ROW_APP, hooks[ROW_APP], room))
            == len(_entries(ENV_APP, hooks[ENV_APP], room))
        ),
        "the app row's webhooks",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    _every_app_got_the_same(cluster, room)


async def test_a_receiver_that_fails_first_gets_the_event_later(
    e2e_env: dict[str, str],
) -> None:
    """Refused on every attempt of the worker's first try (three, with backoff), then
    accepted when the worker retries the event: delivered once, at least once."""
    with WebhookReceiver(refusals=4) as receiver:
        env = _pusher_env(e2e_env, receiver)
        node = ServerNode(env, name=f"pw-retry-{uuid.uuid4().hex[:4]}").start()
        worker = start_event_worker(env, f"pw-retry-{uuid.uuid4().hex[:4]}")
        try:
            channel = f"pw-retry-{uuid.uuid4().hex[:6]}"
            ws, _ = await subscribe(node.ws_url, channel)
            await wait_until(
                lambda: receiver.accepted, "the accepted webhook", timeout=30, interval=0.1
            )
            await ws.close()
        finally:
            _stop(worker)
            node.stop()
    assert receiver.refused == 4
    (accepted,) = receiver.accepted
    body = ENV_APP.verified(accepted)
    assert body["events"] == [{"name": "channel_occupied", "channel": channel}]
    assert abs(body["time_ms"] - time.time() * 1000) < 60_000, "stamped when sent"


async def test_client_events_and_cache_misses_of_pusher_connections(cluster: Cluster) -> None:
    node_a, node_b = cluster.nodes
    hooks = cluster.hooks
    tag = uuid.uuid4().hex[:6]
    room, private, cache = f"presence-pw-{tag}", f"private-pw-{tag}", f"cache-pw-{tag}"
    sender = await PusherClient.connect(node_a.pusher_url)
    await sender.subscribe(room, channel_data=presence_data("typist"))
    await sender.subscribe(private)
    reader = await PusherClient.connect(node_b.pusher_url)
    await reader.subscribe(room, channel_data=presence_data("reader"))
    await sender.send("client-typing", {"text": "hi"}, channel=room)
    await sender.send("client-note", "plain text", channel=private)
    await reader.subscribe(cache)  # nothing was ever sent there
    # Told of the miss too, but the back-end is called once to fill the channel: not
    # for a subscriber who comes next, nor for the reader subscribing again.
    later = await PusherClient.connect(node_b.pusher_url)
    await later.subscribe(cache)
    assert await later.receive() == {"event": "pusher:cache_miss", "channel": cache}
    await reader.subscribe(cache)
    # Emitted by the same node after them: once its webhook came, so had theirs.
    await reader.send("client-done", "", channel=room)

    def client_events() -> list[dict[str, Any]]:
        found = [*_entries(ENV_APP, hooks[ENV_APP], room)]
        found += _entries(ENV_APP, hooks[ENV_APP], private)
        return [e for e in found if e["name"] == "client_event"]

    await wait_until(
        lambda: len(client_events()) == 3,
        "three client_event",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    assert [e for e in client_events() if e["event"] != "client-done"] == [
        {
            "name": "client_event",
            "channel": room,
            "event": "client-typing",
            "data": '{"text":"hi"}',
            "socket_id": sender.socket_id,
            "user_id": "typist",
        },
        {
            "name": "client_event",
            "channel": private,
            "event": "client-note",
            "data": "plain text",
            "socket_id": sender.socket_id,
        },
    ]
    await wait_until(
        lambda: "cache_miss" in _names(ENV_APP, hooks[ENV_APP], cache),
        "the cache_miss",
        timeout=WEBHOOK_WAIT_SECS,
        interval=QUERY_INTERVAL_SECS,
    )
    assert sorted(_names(ENV_APP, hooks[ENV_APP], cache)) == ["cache_miss", "channel_occupied"]
    # Pusher's presence: members by the user ids of their channel_data.
    members = [e for e in _entries(ENV_APP, hooks[ENV_APP], room) if e["name"] == "member_added"]
    assert sorted(e["user_id"] for e in members) == ["reader", "typist"]
    for client in (sender, reader, later):
        await client.close()


@pytest.mark.django_db  # the handler reads the app rows (none here)
def test_a_signature_of_another_secret_or_key_is_refused() -> None:
    """What a receiver holding the app's credentials refuses: a body signed with another
    secret, another app's key, a body changed after signing."""
    channel = f"pw-sig-{uuid.uuid4().hex[:6]}"
    with WebhookReceiver() as receiver:
        for path, secret in (("/genuine", ENV_APP.secret), ("/forged", "not-the-secret")):
            with override_settings(
                PUSH={
                    "PUSHER_APP_ID": ENV_APP.app_id,
                    "PUSHER_APP_KEY": ENV_APP.key,
                    "PUSHER_APP_SECRET": secret,
                    "PUSHER_WEBHOOK_URLS": [receiver.url(path)],
                }
            ):
                app_cache.forget()
                deliver_pusher_webhooks(event(events.CHANNEL_OCCUPIED, channel=channel))
    app_cache.forget()
    genuine, forged = receiver.accepted
    assert ENV_APP.verified(genuine)["events"] == [{"name": "channel_occupied", "channel": channel}]
    library = ENV_APP.client()
    signature = forged.headers["X-Pusher-Signature"]
    assert library.validate_webhook(ENV_APP.key, signature, forged.body) is None
    signature = genuine.headers["X-Pusher-Signature"]
    assert library.validate_webhook(ROW_APP.key, signature, genuine.body) is None
    tampered = genuine.body.replace(b'"name":"', b'"name":"x')
    assert library.validate_webhook(ENV_APP.key, signature, tampered) is None


# ----- what each of our events becomes ------------------------------------------------


# What a client event's webhook repeats of it as it is.
CLIENT = {"event": "client-typing", "socket_id": "1.2"}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (  # on a presence channel, with its sender's user id; object data as JSON text
            event(events.CLIENT_EVENT, channel="presence-r", data={"x": 1}, user_id="7", **CLIENT),
            {"name": "client_event", "channel": "presence-r", "data": '{"x":1}', "user_id": "7"}
            | CLIENT,
        ),
        (
            event(events.CLIENT_EVENT, channel="private-r", data="text", node="n", **CLIENT),
            {"name": "client_event", "channel": "private-r", "data": "text"} | CLIENT,
        ),
        (event(events.CACHE_MISS, channel="cache-x"), {"name": "cache_miss", "channel": "cache-x"}),
        (
            event(events.MEMBER_REMOVED, channel="presence-r", user_id="7", node="n"),
            {"name": "member_removed", "channel": "presence-r", "user_id": "7"},
        ),
        (event(events.SUBSCRIBE, channel="news", connection_id="c"), None),
        (event(events.CONNECT, connection_id="c"), None),
    ],
)
def test_each_event_as_pusher_names_it(ours: dict[str, Any], theirs: dict | None) -> None:
    assert pusher_webhook_event(ours) == theirs
