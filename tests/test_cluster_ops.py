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

    watcher_token = await asyncio.to_thread(member_token, f"w-{uuid.uuid4().hex[:6]}")
    roamer_token = await asyncio.to_thread(member_token, f"r-{uuid.uuid4().hex[:6]}")
    watcher = await open_ws(two_nodes[0].ws_url, token=watcher_token)
    await watcher.send(json.dumps({"type": "subscribe", "channel": room}))

    async def next_of(kind: str) -> dict:
        while True:
            envelope = json.loads(await asyncio.wait_for(watcher.recv(), 15))
            if envelope["type"] == kind:
                return envelope

    await next_of("join")  # the watcher itself
    doomed = ServerNode(e2e_env, name=f"doomed-{uuid.uuid4().hex[:6]}").start()
    tabs = [
        await open_ws(doomed.ws_url, token=roamer_token),
        await open_ws(two_nodes[1].ws_url, token=roamer_token),
    ]
    for tab in tabs:
        await tab.send(json.dumps({"type": "subscribe", "channel": room}))
    joined = await next_of("join")
    await watcher.send(json.dumps({"type": "presence", "channel": room}))
    listing = await next_of("presence")
    assert len(listing["members"]) == 2, "three connections, two members"
    doomed.stop(signal.SIGKILL)  # the roamer is still there through node B: no leave
    await tabs[1].close()  # now its last connection is gone (the dead one is reaped)
    left = await next_of("leave")
    assert left["member"]["user_id"] == joined["member"]["user_id"]
    await watcher.close()
