"""One client address may hold only so many open HTTP connections on a node, under
either server (``PUSH_MAX_HTTP_CONNECTIONS_PER_IP``): an idle keep-alive connection holds
one of the node's files as a WebSocket does, and one address kept 1,500 of them open
with a request each every few seconds. Clients bind addresses of their own in 127/8
(Linux routes all of it to the loopback interface), so one address can use up its
connections while another is served as usual."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.servers import ServerNode
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

PER_ADDRESS = 20
ANSWER_SECS = 10.0
GET = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def node(e2e_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[ServerNode]:
    env = {**e2e_env, "PUSH_MAX_HTTP_CONNECTIONS_PER_IP": str(PER_ADDRESS)}
    started = ServerNode(env, server=request.param, name=f"http-conns-{request.param}").start()
    yield started
    started.stop()


async def _request(connection: Connection) -> tuple[bytes, bytes]:
    """GET /health on ``connection``: the answer's head and body."""
    reader, writer = connection
    writer.write(GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_SECS)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), ANSWER_SECS)


async def _served_from(node: ServerNode, address: str) -> Connection:
    """A new keep-alive connection from ``address`` that has had one request answered."""
    connection = await asyncio.open_connection("127.0.0.1", node.port, local_addr=(address, 0))
    head, _ = await _request(connection)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return connection


def _refused_count(node: ServerNode) -> float:
    body = httpx.get(f"{node.http_url}/metrics", timeout=ANSWER_SECS).text
    line = 'push_connections_refused_total{limit="http_address"} '
    return next((float(row[len(line) :]) for row in body.splitlines() if row.startswith(line)), 0)


async def test_one_address_holds_only_so_many_http_connections(node: ServerNode) -> None:
    refused_before = _refused_count(node)
    held = [await _served_from(node, "127.0.5.1") for _ in range(PER_ADDRESS)]
    extra = await asyncio.open_connection("127.0.0.1", node.port, local_addr=("127.0.5.1", 0))
    try:
        head, body = await _request(extra)
        # Answered, so a client knows why, and closed.
        assert head.startswith(b"HTTP/1.1 429 "), head
        assert b"connection: close" in head.lower()
        assert json.loads(body)["code"] == "RATE_LIMITED"
        assert await asyncio.wait_for(extra[0].read(), ANSWER_SECS) == b""
        # One that never sends its request is answered all the same, and does not stay.
        silent, writer = await asyncio.open_connection(
            "127.0.0.1", node.port, local_addr=("127.0.5.1", 0)
        )
        try:
            answer = await asyncio.wait_for(silent.read(), ANSWER_SECS)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 429 ")
        assert _refused_count(node) == refused_before + 2
        # Another address is served as usual, over HTTP and WebSocket.
        (await _served_from(node, "127.0.5.2"))[1].close()
        async with connect(node.ws_url, open_timeout=ANSWER_SECS, local_addr=("127.0.5.3", 0)):
            pass
        # The held connections are still served, and one closed leaves a place.
        head, _ = await _request(held[0])
        assert head.startswith(b"HTTP/1.1 200 ")
        held.pop()[1].close()
        held.append(await wait_until(lambda: _new_connection_served(node), "a place freed"))
    finally:
        extra[1].close()
        for _, writer in held:
            writer.close()


async def _new_connection_served(node: ServerNode) -> Connection | None:
    connection = await asyncio.open_connection("127.0.0.1", node.port, local_addr=("127.0.5.1", 0))
    head, _ = await _request(connection)
    if head.startswith(b"HTTP/1.1 200 "):
        return connection
    connection[1].close()
    return None


async def test_a_websocket_counts_only_until_it_is_upgraded(node: ServerNode) -> None:
    websockets = [
        await connect(node.ws_url, open_timeout=ANSWER_SECS, local_addr=("127.0.5.4", 0))
        for _ in range(PER_ADDRESS)
    ]
    try:
        # The application's own limits count them (PUSH_MAX_ANONYMOUS_CONNECTIONS_PER_IP).
        (await _served_from(node, "127.0.5.4"))[1].close()
    finally:
        for websocket in websockets:
            await websocket.close()
