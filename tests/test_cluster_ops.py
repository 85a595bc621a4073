"""Operations across nodes: disconnecting a user or one connection wherever they are,
the admin's nodes page, a node that dies without draining having its connections
marked closed, and tokens kept out of a node's log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from tests.servers import (
    Database,
    ServerNode,
    admin_client,
    create_superuser,
    create_token,
    csrf_headers,
    manage,
)
from tests.waiting import QUERY_INTERVAL_SECS, wait_until
from tests.wsclient import open_ws, request, subscribe

pytestmark = pytest.mark.e2e

ADMIN_PASSWORD = "admin-pw"


@pytest.fixture(scope="module")
def admin_user(e2e_env: dict[str, str]) -> str:
    create_superuser(e2e_env, "ops-admin", ADMIN_PASSWORD)
    return "ops-admin"


@pytest.fixture
async def admin_on_a(
    two_nodes: tuple[ServerNode, ServerNode], admin_user: str
) -> AsyncIterator[httpx.AsyncClient]:
    client = await admin_client(two_nodes[0], admin_user, ADMIN_PASSWORD)
    yield client
    await client.aclose()


async def _registered_pk(database: Database, connection_id: str) -> int:
    """The registry row's primary key, once the node's batch has written it."""
    rows = await wait_until(
        lambda: database.query(
            "SELECT id FROM push_connection WHERE connection_id = %s", connection_id
        ),
        f"{connection_id} in the registry",
        interval=QUERY_INTERVAL_SECS,
    )
    return int(rows[0][0])


async def test_admin_closes_one_connection_that_lives_on_the_other_node(
    two_nodes: tuple[ServerNode, ServerNode],
    admin_on_a: httpx.AsyncClient,
    e2e_database: Database,
) -> None:
    from websockets.asyncio.client import connect

    sockets, ids = [], []
    for _ in range(2):
        ws = await connect(two_nodes[1].ws_url, open_timeout=10)
        ids.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["connection_id"])
        sockets.append(ws)
    target, neighbour = sockets
    pk = await _registered_pk(e2e_database, ids[0])
    response = await admin_on_a.post(
        "/admin/push/connection/",
        data={"action": "disconnect_connections", "_selected_action": str(pk)},
        headers=csrf_headers(admin_on_a),
    )
    assert response.status_code == 302, response.text
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(target.recv(), 10)
    assert target.close_code == 1008
    reply = await request(neighbour, {"type": "heartbeat"})
    assert reply["type"] == "heartbeat_ack", "only the chosen connection is closed"
    await neighbour.close()


_CHANNEL_ROW = (
    r"<tr><td>{name}</td><td>(?P<subscribers>\d+)</td><td>(?P<rate>[\d.]+)</td>"
    r"<td>(?P<nodes>\d+)</td></tr>"
)


async def test_admin_nodes_page_sums_subscribers_across_nodes_with_the_message_rate(
    two_nodes: tuple[ServerNode, ServerNode],
    admin_on_a: httpx.AsyncClient,
    publisher_token: str,
) -> None:
    channel = f"busy-{uuid.uuid4().hex[:6]}"
    node_a, node_b = two_nodes
    subscribers = [(await subscribe(node.ws_url, channel))[0] for node in (node_a, node_a, node_b)]
    publisher = await open_ws(node_a.ws_url, token=publisher_token)

    async def publish_forever() -> None:
        for i in range(10_000):
            await publisher.send(json.dumps({"type": "publish", "channel": channel, "data": i}))
            await asyncio.sleep(0.02)  # pacing: a steady rate for the page to show

    publishing = asyncio.create_task(publish_forever())
    row = re.compile(_CHANNEL_ROW.format(name=re.escape(channel)))
    page = ""

    async def listed_with_a_rate_on_two_nodes() -> re.Match[str] | None:
        nonlocal page
        page = (await admin_on_a.get("/admin/push/connection/nodes/")).text
        found = row.search(page)
        return found if found and float(found["rate"]) > 0 and found["nodes"] == "2" else None

    try:
        # The nodes announce their stats every PUSH_CLUSTER_ANNOUNCE_SECS (0.5 s here).
        found = await wait_until(
            listed_with_a_rate_on_two_nodes,
            f"{channel} on the nodes page with a rate, on two nodes",
            timeout=20,
            interval=0.25,
        )
    finally:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
    assert found["subscribers"] == "3" and found["nodes"] == "2", found.group(0)
    assert float(found["rate"]) > 0, found.group(0)
    assert node_a.name in page and node_b.name in page
    for ws in [*subscribers, publisher]:
        # They never read what they were sent: a closing handshake would wait behind it.
        ws.transport.abort()


async def test_disconnect_a_user_on_every_node(
    two_nodes: tuple[ServerNode, ServerNode], e2e_env: dict[str, str]
) -> None:
    username = f"kick-{uuid.uuid4().hex[:6]}"
    token = create_token(e2e_env, username)
    on_a = await open_ws(two_nodes[0].ws_url, token=token)
    on_b = await open_ws(two_nodes[1].ws_url, token=token)
    bystander = await open_ws(two_nodes[0].ws_url)
    script = (
        "from django.contrib.auth.models import User;"
        "from push.cluster.directory import connections_disconnect;"
        f"connections_disconnect(user_ids=[User.objects.get(username={username!r}).pk])"
    )
    await asyncio.to_thread(manage, e2e_env, "shell", "-c", script)
    for ws in (on_a, on_b):
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1008
    await bystander.send(json.dumps({"type": "heartbeat"}))
    assert json.loads(await asyncio.wait_for(bystander.recv(), 5))["type"] == "heartbeat_ack"
    await bystander.close()


async def test_killed_node_connections_are_marked_closed_by_another(
    two_nodes: tuple[ServerNode, ServerNode], e2e_env: dict[str, str], e2e_database: Database
) -> None:
    # A node starts its runtime (the reaper with it) at its first connection: the
    # surviving ones have had one whether or not a test before this one connected.
    for node in two_nodes:
        await (await open_ws(node.ws_url)).close()
    doomed = ServerNode(e2e_env, name=f"doomed-{uuid.uuid4().hex[:6]}").start()
    clients = [await open_ws(doomed.ws_url) for _ in range(5)]
    query = "SELECT count(*) FROM push_connection WHERE server_id = %s AND disconnected_at IS NULL"
    redis = aioredis.from_url(e2e_env["REDIS_URL"])
    nodes = f"{e2e_env['REDIS_PREFIX']}:nodes"  # the node directory's sorted set

    async def recorded_and_announced() -> bool:
        if e2e_database.query(query, doomed.name) != [(5,)]:
            return False
        return await redis.zscore(nodes, doomed.name) is not None

    try:
        await wait_until(
            recorded_and_announced,
            "the registry rows and the node's announcement",
            interval=QUERY_INTERVAL_SECS,
        )
    finally:
        await redis.aclose()
    doomed.stop(signal.SIGKILL)
    await wait_until(
        lambda: e2e_database.query(query, doomed.name) == [(0,)],
        "another node to mark the killed node's connections closed",
        timeout=20,  # dead after PUSH_NODE_DEAD_AFTER_SECS (3 s), then reaped
        interval=QUERY_INTERVAL_SECS,
    )
    for ws in clients:
        ws.transport.abort()


async def test_presence_across_nodes_and_a_dead_node_members_leave(
    two_nodes: tuple[ServerNode, ServerNode], e2e_env: dict[str, str]
) -> None:
    room = f"presence-{uuid.uuid4().hex[:6]}"
    names = [f"{role}-{uuid.uuid4().hex[:6]}" for role in ("w", "r", "g")]
    # One manage.py for the three: each costs ~2 s of starting Django.
    script = (
        "from accounts.models import ChannelGrant;"
        "from django.contrib.auth.models import User;"
        "from rest_framework.authtoken.models import Token;"
        f"users = [User.objects.create(username=n) for n in {names!r}];"
        "[ChannelGrant.objects.create(user=u, pattern='*', can_publish=True) for u in users];"
        "[ChannelGrant.objects.create(user=u, pattern='presence-*', can_subscribe=True)"
        " for u in users];"
        "[print('TOKEN', Token.objects.create(user=u).key) for u in users]"
    )
    output = await asyncio.to_thread(manage, e2e_env, "shell", "-c", script)
    watcher_token, roamer_token, ghost_token = [
        line.split()[1] for line in output.splitlines() if line.startswith("TOKEN ")
    ]
    node_a, node_b = two_nodes
    watcher = await open_ws(node_a.ws_url, token=watcher_token)
    await watcher.send(json.dumps({"type": "subscribe", "channel": room}))

    async def next_event(timeout: float = 15) -> dict:
        """The next join, leave or presence the watcher receives."""
        while True:
            envelope = json.loads(await asyncio.wait_for(watcher.recv(), timeout))
            if envelope["type"] in ("join", "leave", "presence"):
                return envelope

    async def no_event(wait_secs: float = 1.5) -> None:
        with pytest.raises(TimeoutError):
            await next_event(timeout=wait_secs)

    watcher_id = (await next_event())["member"]["user_id"]  # the watcher itself

    # One user, three connections over two nodes: one member.
    tabs = []
    for url in (node_a.ws_url, node_b.ws_url, node_b.ws_url):
        tab = await open_ws(url, token=roamer_token)
        await tab.send(json.dumps({"type": "subscribe", "channel": room}))
        tabs.append(tab)
    joined = await next_event()
    assert joined["type"] == "join" and joined["member"]["user_id"] != watcher_id
    await no_event()  # the second and third connection are the same member
    await watcher.send(json.dumps({"type": "presence", "channel": room}))
    listing = await next_event()
    assert listing["type"] == "presence"
    assert len(listing["members"]) == 2, "four connections, two members"
    for tab in tabs[:-1]:
        await tab.close()
        await no_event()  # the user is still there through another connection
    await tabs[-1].close()
    left = await next_event()
    assert left == {"type": "leave", "channel": room, "member": joined["member"]}

    # A member whose only connection is on a node that dies leaves when it is reaped.
    doomed = ServerNode(e2e_env, name=f"doomed-{uuid.uuid4().hex[:6]}").start()
    ghost = await open_ws(doomed.ws_url, token=ghost_token)
    await ghost.send(json.dumps({"type": "subscribe", "channel": room}))
    joined = await next_event()
    assert joined["type"] == "join"
    doomed.stop(signal.SIGKILL)
    # Reaped once its announcements are PUSH_NODE_DEAD_AFTER_SECS old (3 s here).
    left = await next_event(timeout=20)
    assert left == {"type": "leave", "channel": room, "member": joined["member"]}
    ghost.transport.abort()
    await watcher.close()


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
async def test_a_token_in_the_url_never_reaches_the_node_log(
    e2e_env: dict[str, str], server: str
) -> None:
    token = await asyncio.to_thread(create_token, e2e_env, f"logged-{uuid.uuid4().hex[:6]}")
    node = ServerNode(
        e2e_env,
        server=server,
        name=f"access-log-{server}-{uuid.uuid4().hex[:6]}",
        args=("--access-log",),
    ).start()
    try:
        ws = await open_ws(node.ws_url, token=token)
        assert (await request(ws, {"type": "subscribe", "channel": "logged"}))["type"] == (
            "subscribed"
        )
        await ws.close()
        async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:
            await http.get(f"/api/v1/channels/logged/messages?since=0&token={token}")
            async with http.stream("GET", f"/sse/?channel=logged&token={token}") as stream:
                assert stream.status_code == 200
                await anext(stream.aiter_bytes())
        await wait_until(
            lambda: node.log().count(" closed after ") == 2, "both closes in the node's log"
        )
    finally:
        node.stop()
    log = node.log()
    assert token not in log
    assert "token=[redacted]" in log, "the access log is on and shows the redacted URL"
    assert log.count(" opened: user:") == 2 and log.count(" closed after ") == 2, log


async def test_nodes_paused_together_do_not_take_each_other_for_dead(
    e2e_env: dict[str, str],
) -> None:
    """A machine (or a virtual machine) that stops for longer than
    PUSH_NODE_DEAD_AFTER_SECS stops every node on it: the first to run again must not
    take the others for dead (closing their connections, their presence members
    leaving) because their last announcements are as old as its own. (A Redis outage
    takes the same path: the node's own announcements stop.)"""
    env = {**e2e_env, "REDIS_PREFIX": f"paused{uuid.uuid4().hex[:6]}:"}  # their own cluster
    suffix = uuid.uuid4().hex[:6]
    nodes = [ServerNode(env, name=f"paused-{n}-{suffix}").start() for n in "ab"]
    try:
        # A node runs its cluster loop once a client started it.
        clients = [await open_ws(node.ws_url) for node in nodes]
        await asyncio.sleep(1.5)  # a few announcements each (every 0.5 s here)
        for node in nodes:
            assert node.process is not None
            node.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(4.0)  # past PUSH_NODE_DEAD_AFTER_SECS (3 s here)
        # One runs again first, as one always does: the other within a turn of its.
        for node in nodes:
            assert node.process is not None
            node.process.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.3)
        await asyncio.sleep(2.0)  # several announcements and judgements again
        for ws in clients:
            assert (await request(ws, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
        for node in nodes:
            assert " is gone:" not in node.log()
        # A node that really stops is still found dead, once its silence is older than
        # PUSH_NODE_DEAD_AFTER_SECS and the other has run that long since its own pause.
        survivor, stopped = nodes
        assert stopped.process is not None
        stopped.process.send_signal(signal.SIGSTOP)
        await wait_until(
            lambda: " is gone:" in survivor.log(), "the stopped node found dead", timeout=15
        )
        stopped.process.send_signal(signal.SIGCONT)
        for ws in clients:
            ws.transport.abort()
    finally:
        for node in nodes:
            node.stop()
