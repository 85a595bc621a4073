"""A small real WebSocket client for end-to-end tests (the ``websockets`` library)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

RECEIVE_TIMEOUT_SECS = 10.0


async def open_ws(url: str, *, token: str | None = None) -> ClientConnection:
    if token:
        url = f"{url}?token={token}"
    ws = await connect(url, open_timeout=10, max_size=None)
    hello = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
    assert hello["type"] == "connection_established", hello
    return ws


async def request(ws: ClientConnection, envelope: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(envelope))
    return json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))


async def request_raw(ws: ClientConnection, frame: str | bytes) -> dict[str, Any]:
    await ws.send(frame)
    return json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))


async def subscribe(
    url: str, channel: str, *, since: int | None = None, token: str | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await open_ws(url, token=token)
    envelope: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if since is not None:
        envelope["since"] = since
    reply = await request(ws, envelope)
    assert reply["type"] == "subscribed", reply
    return ws, reply


async def collect_messages(
    ws: ClientConnection, count: int, *, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """The next ``count`` message envelopes (other frames are skipped)."""
    messages: list[dict[str, Any]] = []

    async def read() -> None:
        while len(messages) < count:
            envelope = json.loads(await ws.recv())
            if envelope["type"] == "message":
                messages.append(envelope)

    # A short list is the answer on timeout: the test compares it with what it expected.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), timeout)
    return messages


async def flood(url: str, token: str, channel: str, count: int, payload_bytes: int) -> None:
    """Publish ``count`` messages of ``payload_bytes`` each, one after another."""
    publisher = await open_ws(url, token=token)
    blob = "x" * payload_bytes
    for i in range(count):
        reply = await request(
            publisher, {"type": "publish", "channel": channel, "data": {"i": i, "blob": blob}}
        )
        assert reply["type"] == "published", reply
    await publisher.close()


async def stalled_subscriber(url: str, channel: str) -> ClientConnection:
    """A subscriber that reads nothing after its ``subscribed`` reply."""
    # max_queue=1: the client library stops reading the socket after one unread frame,
    # so the server's writes back up exactly as with a client that froze.
    ws = await connect(url, max_queue=1, max_size=None)
    await ws.recv()
    await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
    await ws.recv()
    return ws


async def publish_over_ws(url: str, token: str, channel: str, datas: list[Any]) -> list[int]:
    """Publish each of ``datas`` on one connection without waiting between them; the
    seqs of the replies, in the order they came (replies carry no promise of order)."""
    ws = await open_ws(url, token=token)
    for data in datas:
        await ws.send(json.dumps({"type": "publish", "channel": channel, "data": data}))
    seqs = []
    while len(seqs) < len(datas):
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert reply["type"] == "published", reply
        seqs.append(reply["seq"])
    await ws.close()
    return seqs
