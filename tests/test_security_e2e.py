"""Where requests come from, against real daphne and uvicorn nodes: a client that writes
its own X-Forwarded-For is still one address (REST throttle, per-IP connection limit)
when no proxy is trusted, and WebSocket and SSE requests naming a host outside
ALLOWED_HOSTS are refused, as Django refuses them for its views."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.servers import ServerNode

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def guarded_node(request: pytest.FixtureRequest, e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    env = {
        **e2e_env,
        "PUSH_REST_ANON_RATE": "3/min",
        "PUSH_MAX_CONNECTIONS_PER_IP": "1",
        "REDIS_PREFIX": f"{e2e_env['REDIS_PREFIX']}{request.param}",
    }
    node = ServerNode(env, server=request.param).start()
    yield node
    node.stop()


async def _handshake_status(node: ServerNode, host: str) -> int:
    """The HTTP status a WebSocket handshake naming ``host`` gets (101: accepted)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /ws/ HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return int(status_line.split()[1])


async def test_streams_refuse_a_foreign_host(guarded_node: ServerNode) -> None:
    assert await _handshake_status(guarded_node, "rebound.attacker.example") == 403
    assert await _handshake_status(guarded_node, f"localhost:{guarded_node.port}") == 101
    async with httpx.AsyncClient(base_url=guarded_node.http_url, timeout=10) as http:
        foreign = await http.get("/sse/?channel=news", headers={"Host": "rebound.example"})
        assert foreign.status_code == 400
        # Django's views refuse it alike.
        assert (await http.get("/health", headers={"Host": "rebound.example"})).status_code == 400


async def test_a_written_x_forwarded_for_is_no_new_address(guarded_node: ServerNode) -> None:
    async with httpx.AsyncClient(base_url=guarded_node.http_url, timeout=10) as http:
        statuses = [
            (
                await http.get("/api/v1/channels/", headers={"X-Forwarded-For": f"10.9.0.{i}"})
            ).status_code
            for i in range(5)
        ]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    first = await connect(guarded_node.ws_url, additional_headers={"X-Forwarded-For": "10.9.1.1"})
    second = await connect(guarded_node.ws_url, additional_headers={"X-Forwarded-For": "10.9.1.2"})
    await second.wait_closed()
    assert second.close_code == 1013, "one address: the per-IP limit of 1 applies"
    await first.close()


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
async def test_behind_one_proxy_the_address_it_appended_counts(
    server: str, e2e_env: dict[str, str]
) -> None:
    """``--proxy-headers``: one trusted proxy, whose X-Forwarded-For entry is the last;
    what the client wrote before it is not believed."""
    env = {
        **e2e_env,
        "PUSH_MAX_CONNECTIONS_PER_IP": "1",
        "REDIS_PREFIX": f"{e2e_env['REDIS_PREFIX']}proxy{server}",
    }
    node = ServerNode(env, server=server, args=("--proxy-headers",)).start()
    try:
        first = await connect(
            node.ws_url, additional_headers={"X-Forwarded-For": "10.8.0.1, 192.0.2.1"}
        )
        other = await connect(node.ws_url, additional_headers={"X-Forwarded-For": "192.0.2.2"})
        same = await connect(
            node.ws_url, additional_headers={"X-Forwarded-For": "10.8.0.9, 192.0.2.1"}
        )
        await same.wait_closed()
        assert same.close_code == 1013, "192.0.2.1 again, whatever came before it"
        for admitted in (first, other):
            greeting = json.loads(await asyncio.wait_for(admitted.recv(), 10))
            assert greeting["type"] == "connection_established"
        await first.close()
        await other.close()
    finally:
        node.stop()
