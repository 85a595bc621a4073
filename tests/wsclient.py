"""The WebSocket test client for real servers (the ``websockets`` library): the
end-to-end tests' helpers and the fault tests' resuming subscribers connect through it.

Two other clients do other jobs and stay apart: ``push/tests/wsclient.py`` talks to the
ASGI application in the test's own process (Channels' ``WebsocketCommunicator``, no
server, every wire format), and ``bench/wsclient.py`` is the benchmark's hand-written
client, lean enough to hold thousands of connections on the machine it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect

RECEIVE_TIMEOUT_SECS = 10.0
OPEN_TIMEOUT_SECS = 10.0


async def connect_ws(
    url: str, *, token: str | None = None, **options: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """A connection past its ``connection_established`` frame, and that frame.
    ``options`` go to ``websockets``' ``connect``."""
    if token:
        url = f"{url}?token={token}"
    ws = await connect(url, open_timeout=OPEN_TIMEOUT_SECS, max_size=None, **options)
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
    except BaseException:
        await ws.close()
        raise
    assert hello["type"] == "connection_established", hello
    return ws, hello


async def open_ws(url: str, *, token: str | None = None) -> ClientConnection:
    ws, _hello = await connect_ws(url, token=token)
    return ws


def subscribe_envelope(channel: str, since: int | None = None) -> dict[str, Any]:
    envelope: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if since is not None:
        envelope["since"] = since
    return envelope


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
    reply = await request(ws, subscribe_envelope(channel, since))
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


async def stalled_subscriber(
    url: str, channel: str, *, receive_buffer_bytes: int | None = None, **options: Any
) -> ClientConnection:
    """A subscriber that reads nothing after its ``subscribed`` reply.

    ``receive_buffer_bytes``: a kernel receive buffer that small as well, for a client
    behind a proxy whose own buffers would otherwise hold a lot before the server's
    writes back up. ``options`` go to ``websockets``' ``connect``.
    """
    if receive_buffer_bytes is not None:
        parts = urlsplit(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        options["sock"] = sock
    # max_queue=1: the client library stops reading the socket after one unread frame,
    # so the server's writes back up exactly as with a client that froze.
    ws, _hello = await connect_ws(url, max_queue=1, **options)
    reply = await request(ws, subscribe_envelope(channel))
    assert reply["type"] == "subscribed", reply
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
