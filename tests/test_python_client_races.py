"""The Python client against a scripted server (``websockets``): what it does when
replies come late, twice or out of turn, and when a channel's gap repair is slow."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from tests.test_python_client import FAST, PushClient
from tests.waiting import wait_until

Script = Callable[[ServerConnection], Awaitable[None]]


def established(heartbeat_interval: float = 25) -> str:
    return json.dumps(
        {
            "type": "connection_established",
            "connection_id": "c",
            "server_id": "scripted",
            "heartbeat_interval": heartbeat_interval,
            "timestamp": 0,
        }
    )


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """Serves each connection with the given script; yields a function that starts a
    server and returns its WebSocket URL."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(script: Script) -> str:
            async def handler(ws: ServerConnection) -> None:
                await script(ws)
                await ws.wait_closed()

            server = await stack.enter_async_context(
                serve(handler, "127.0.0.1", 0, subprotocols=[Subprotocol("v1.json")])
            )
            port = server.sockets[0].getsockname()[1]
            return f"ws://127.0.0.1:{port}/ws/"

        yield start


async def test_a_repeated_connection_established_does_not_add_heartbeats(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # A server (or a proxy replaying frames) that greets twice: the client must still
    # send one heartbeat per interval, not one per greeting.
    interval = 0.1
    heartbeats: list[float] = []
    started: list[float] = []

    async def script(ws: ServerConnection) -> None:
        started.append(time.monotonic())
        for _ in range(20):
            await ws.send(established(interval))
        async for frame in ws:
            if json.loads(frame)["type"] == "heartbeat":
                heartbeats.append(time.monotonic())

    client = PushClient(await scripted(script), **FAST)
    await client.connect()
    try:
        await wait_until(lambda: len(heartbeats) >= 3, "three heartbeats", timeout=10)
    finally:
        await client.close()
    # One heartbeat at most per interval since the first greeting went out.
    assert len(heartbeats) <= (heartbeats[-1] - started[0]) / interval + 1, heartbeats
