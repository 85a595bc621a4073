"""Operations across nodes: disconnecting a user wherever they are, seeing the nodes,
and a node that dies without draining having its connections marked closed."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import pytest
from websockets.exceptions import ConnectionClosed

from tests.servers import Database, ServerNode, create_token, manage
from tests.wsclient import open_ws

pytestmark = pytest.mark.e2e


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
        "from push.cluster import connections_disconnect;"
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
    doomed = ServerNode(e2e_env, name=f"doomed-{uuid.uuid4().hex[:6]}").start()
    clients = [await open_ws(doomed.ws_url) for _ in range(5)]
    await asyncio.sleep(2.0)  # the registry writes them, the node announces itself
    query = "SELECT count(*) FROM push_connection WHERE server_id = %s AND disconnected_at IS NULL"
    assert e2e_database.query(query, doomed.name) == [(5,)]
    doomed.stop(signal.SIGKILL)
    for _ in range(40):
        await asyncio.sleep(0.25)
        if e2e_database.query(query, doomed.name) == [(0,)]:
            break
    assert e2e_database.query(query, doomed.name) == [(0,)]
    for ws in clients:
        ws.transport.abort()


async def test_presence_across_nodes_and_a_dead_node_members_leave(
    two_nodes: tuple[ServerNode, ServerNode], e2e_env: dict[str, str]
) -> None:
    room = f"presence-{uuid.uuid4().hex[:6]}"
    grant = "from accounts.models import ChannelGrant; from django.contrib.auth.models import User;"

    def member_token(name: str) -> str:
        token = create_token(e2e_env, name)
        manage(
            e2e_env,
            "shell",
            "-c",
            grant + f"ChannelGrant.objects.create(user=User.objects.get(username={name!r}),"
            " pattern='presence-*', can_subscribe=True)",
        )
        return token

    watcher_token, roamer_token, ghost_token = [
        await asyncio.to_thread(member_token, f"{role}-{uuid.uuid4().hex[:6]}")
        for role in ("w", "r", "g")
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
