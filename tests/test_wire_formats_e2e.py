"""All three wire formats on real nodes: one channel, subscribers in JSON, MessagePack
and Protobuf on one node, publishers in each format on the other; everyone sees the
same messages with the same seq and data."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from push.wire.codecs import CODECS, Codec
from tests.servers import ServerNode
from tests.wsclient import RECEIVE_TIMEOUT_SECS

pytestmark = pytest.mark.e2e

FORMATS = ["v1.json", "v1.msgpack", "v1.protobuf"]


class FormatClient:
    """A real WebSocket client that speaks the subprotocol the server echoed."""

    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec

    @classmethod
    async def open(cls, url: str, subprotocol: str, token: str | None = None) -> FormatClient:
        if token:
            url = f"{url}?token={token}"
        ws = await connect(url, subprotocols=[subprotocol], open_timeout=10)  # type: ignore[list-item]  # websockets wants its Subprotocol type
        assert ws.subprotocol == subprotocol
        client = cls(ws, CODECS[subprotocol])
        assert (await client.recv())["type"] == "connection_established"
        return client

    async def recv(self) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.recv(), RECEIVE_TIMEOUT_SECS)
        assert isinstance(frame, bytes) == self.codec.binary, "frame type must match the format"
        return self.codec.decode(frame)

    async def request(self, envelope: dict[str, Any]) -> dict[str, Any]:
        await self.ws.send(self.codec.encode(envelope))
        return await self.recv()


async def test_every_format_sees_every_message_across_nodes(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    node_a, node_b = two_nodes
    channel = f"formats-{uuid.uuid4().hex[:8]}"
    subscribers = {f: await FormatClient.open(node_a.ws_url, f) for f in FORMATS}
    for client in subscribers.values():
        assert (await client.request({"type": "subscribe", "channel": channel}))["seq"] == 0
    values: list[Any] = [{"price": 101.25, "tags": ["a", "b"]}, "text with \u0000", 2**63 - 1]
    for n, subprotocol in enumerate(FORMATS):
        publisher = await FormatClient.open(node_b.ws_url, subprotocol, token=publisher_token)
        reply = await publisher.request(
            {"type": "publish", "channel": channel, "data": values[n], "id": n}
        )
        assert (reply["type"], reply["seq"], reply["id"]) == ("published", n + 1, n)
        await publisher.ws.close()
    for subprotocol, client in subscribers.items():
        received = [await client.recv() for _ in FORMATS]
        assert [(m["type"], m["seq"], m["data"]) for m in received] == [
            ("message", n + 1, value) for n, value in enumerate(values)
        ], subprotocol
        await client.ws.close()
