"""PostgreSQL unreachable (the TCP proxy in front of it stopped): publishers are told
UNAVAILABLE (WebSocket `error`, REST 503), subscribers stay connected, and once
PostgreSQL is back publishing works again and subscribers receive the new messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from devtools.cluster import Cluster
from devtools.processes import OwnedProcess
from tests.faults import clients
from tests.faults.report import measure
from tests.wsclient import open_ws

pytestmark = pytest.mark.faults

CLIENTS = 50
# Above the nodes' database pool timeout (DATABASE_POOL_TIMEOUT_SECS, 3 s): that is
# how long a request waits for a connection before it is answered UNAVAILABLE.
REPLY_TIMEOUT_SECS = 30.0
RECOVERY_TIMEOUT_SECS = 60.0
FAST_COUNTER = "push_rest_fast_publishes_total"


async def ws_publish(ws: ClientConnection, channel: str, request_id: int) -> dict[str, Any]:
    envelope = {"type": "publish", "channel": channel, "data": {"ws": request_id}, "id": request_id}
    await ws.send(json.dumps(envelope))
    return json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_SECS))


async def ws_publish_until_published(ws: ClientConnection, channel: str, first_id: int) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_TIMEOUT_SECS
    request_id = first_id
    while (reply := await ws_publish(ws, channel, request_id))["type"] != "published":
        assert reply["code"] == "UNAVAILABLE", reply
        assert loop.time() < deadline, "WebSocket publishing did not come back"
        request_id += 1
        await asyncio.sleep(0.2)
    return int(reply["seq"])


async def token_holders_are_told_to_try_again_later(
    cluster: Cluster, token: str, channel: str
) -> None:
    """A valid token no node verified within ``PUSH_REVOCATION_CHECK_SECS`` cannot be
    checked without the database: the WebSocket is closed with 1013 and the SSE request
    answered 503, never refused as an invalid token. (A token a node verified moments
    ago is still served from its principal cache for that long.)"""
    async with connect(f"{cluster.proxy_ws_url}?token={token}") as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_SECS)
    assert ws.close_code == 1013
    async with httpx.AsyncClient(timeout=REPLY_TIMEOUT_SECS) as http:
        response = await http.get(
            f"{cluster.proxy_url}/sse/", params={"channel": channel, "token": token}
        )
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "UNAVAILABLE"


async def fast_publishes(cluster: Cluster) -> float:
    """REST publishes the cluster's nodes answered without Django (``FAST_COUNTER``)."""
    total = 0.0
    async with httpx.AsyncClient(timeout=10) as http:
        for record in cluster.node_records():
            metrics = (await http.get(f"{cluster.node_url(record.name)}/metrics")).text
            total += sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith(FAST_COUNTER + " ")
            )
    return total


async def keep_on_every_node(cluster: Cluster, key: str) -> None:
    """A first REST publish to each node, so each keeps the back-end's token."""
    async with httpx.AsyncClient(timeout=REPLY_TIMEOUT_SECS) as http:
        for record in cluster.node_records():
            response = await http.post(
                f"{cluster.node_url(record.name)}/api/v1/channels/faults-keep/messages",
                json={"data": record.name},
                headers={"Authorization": f"Token {key}"},
            )
            assert response.status_code == 201, response.text


@pytest.mark.timeout(180)
async def test_publishers_get_unavailable_and_subscribers_stay_while_postgres_is_away(
    cluster: Cluster,
    channel: str,
    publisher_token: str,
    backend_key: str,
    unseen_token: str,
    pg_proxy: OwnedProcess,
) -> None:
    loop = asyncio.get_running_loop()
    await keep_on_every_node(cluster, backend_key)
    async with (
        await open_ws(cluster.proxy_ws_url, token=publisher_token) as ws,
        clients.audience(cluster.proxy_ws_url, channel, CLIENTS) as audience,
        clients.RestPublisher(cluster.proxy_url, publisher_token, channel) as rest,
        clients.RestPublisher(cluster.proxy_url, backend_key, f"{channel}-backend") as backend,
    ):
        assert (await ws_publish(ws, channel, 1))["type"] == "published"
        await rest.publish(0)
        await backend.publish(0)

        await asyncio.to_thread(pg_proxy.stop)
        cut_at = loop.time()
        fast_before = await fast_publishes(cluster)
        ws_reply, rest_reply, backend_reply = await asyncio.gather(
            ws_publish(ws, channel, 2), rest.post_once(1), backend.post_once(1)
        )
        answered_secs = loop.time() - cut_at
        assert ws_reply["type"] == "error" and ws_reply["code"] == "UNAVAILABLE", ws_reply
        assert ws_reply["id"] == 2
        for reply in (rest_reply, backend_reply):
            assert reply.status_code == 503, reply.text
            assert reply.json()["code"] == "UNAVAILABLE"
        # The back-end's refusal came from the fast path (the user's from DRF).
        assert await fast_publishes(cluster) - fast_before == 1
        assert audience.disconnected() == [], "subscribers stay connected"
        await token_holders_are_told_to_try_again_later(cluster, unseen_token, channel)

        pg_proxy.launch()
        await asyncio.to_thread(pg_proxy.wait_answering)
        back_at = loop.time()
        await rest.publish(1, give_up_secs=RECOVERY_TIMEOUT_SECS)
        rest_recovery_secs = loop.time() - back_at
        await backend.publish(1, give_up_secs=RECOVERY_TIMEOUT_SECS)
        await ws_publish_until_published(ws, channel, 3)
        ws_recovery_secs = loop.time() - back_at
        await audience.wait_until_received(4, RECOVERY_TIMEOUT_SECS)

    assert rest.last_seq <= 4, "the refused publishes took no seq"
    assert (backend.acked[0], backend.acked[1]) == (1, 2), "nor the back-end's"
    assert audience.wrong_sequences(4) == []
    assert audience.disconnected() == [], "no subscriber was disconnected"
    name = "PostgreSQL unreachable"
    measure(
        name, "answered UNAVAILABLE (WebSocket error, REST 503) after", f"{answered_secs:.2f} s"
    )
    measure(
        name, "REST publishing works again after PostgreSQL is back", f"{rest_recovery_secs:.2f} s"
    )
    measure(name, "WebSocket publishing works again after", f"{ws_recovery_secs:.2f} s")
    measure(name, "subscribers disconnected", f"0 of {CLIENTS}")
