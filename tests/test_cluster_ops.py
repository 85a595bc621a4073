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
