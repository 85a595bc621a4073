"""Frames a client sends to a real uvicorn node, read by ``push.transport.frame_reader``
where they are plain and by uvicorn's own parser where they are not: every one is
answered as before, in the order sent, however the bytes arrive."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import uuid
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from common.conf import push_settings
from push.management.commands.runnode import server_max_message_bytes
from tests.servers import ServerNode
from tests.wsclient import RECEIVE_TIMEOUT_SECS, open_ws, request

pytestmark = pytest.mark.e2e

DIRECT_FRAMES = "push_inbound_direct_frames_total"


@pytest.fixture(scope="module", params=[True, False], ids=["direct", "uvicorn-parser"])
def reads_directly(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(scope="module")
def node(reads_directly: bool, e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    """A uvicorn node reading frames itself, and one leaving them to uvicorn
    (``PUSH_DIRECT_READS=false``): every test answers the same on both."""
    env = {**e2e_env, "PUSH_DIRECT_READS": "true" if reads_directly else "false"}
    started = ServerNode(env, server="uvicorn", name=f"frames-{reads_directly}").start()
    yield started
    started.stop()


def _frame(payload: bytes, *, opcode: int = 0x1, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame as RFC 6455 lays it out."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client that writes the bytes it is given and reads frames back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, node: ServerNode, token: str) -> RawClient:
        host, port = node.http_url.removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws/?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECEIVE_TIMEOUT_SECS)
        assert head.startswith(b"HTTP/1.1 101"), head
        client = cls(reader, writer)
        opcode, hello = await client.read_frame()
        assert opcode == 0x1 and json.loads(hello)["type"] == "connection_established"
        return client

    async def read_frame(self) -> tuple[int, bytes]:
        async def read() -> tuple[int, bytes]:
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(size)

        return await asyncio.wait_for(read(), RECEIVE_TIMEOUT_SECS)

    async def read_envelope(self) -> dict:
        opcode, payload = await self.read_frame()
        assert opcode == 0x1, (opcode, payload)
        return json.loads(payload)

    async def close_code(self) -> int:
        """The code of the server's close frame (after any other frames)."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0])

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def _heartbeat(request_id: int) -> bytes:
    return _frame(json.dumps({"type": "heartbeat", "id": request_id}).encode())


async def test_publishes_are_read_directly_and_delivered(
    node: ServerNode, reads_directly: bool, publisher_token: str
) -> None:
    channel = f"fr-{uuid.uuid4().hex[:8]}"
    before = node.metric(DIRECT_FRAMES)
    subscriber = await open_ws(node.ws_url, token=publisher_token)
    publisher = await open_ws(node.ws_url, token=publisher_token)
    assert (await request(subscriber, {"type": "subscribe", "channel": channel}))["seq"] == 0
    for n in range(1, 4):
        reply = await request(
            publisher, {"type": "publish", "channel": channel, "data": {"n": n}, "id": n}
        )
        assert reply == {
            "type": "published",
            "channel": channel,
            "seq": n,
            "message_id": reply["message_id"],
            "id": n,
        }
        message = json.loads(await asyncio.wait_for(subscriber.recv(), RECEIVE_TIMEOUT_SECS))
        assert (message["seq"], message["data"]) == (n, {"n": n})
    await publisher.close()
    await subscriber.close()
    # The subscribe and the publishes, when the node reads frames itself.
    if reads_directly:
        assert node.metric(DIRECT_FRAMES) >= before + 4
    else:
        assert node.metric(DIRECT_FRAMES) == before == 0


async def test_frames_together_and_a_frame_byte_by_byte_are_answered_in_order(
    node: ServerNode, publisher_token: str
) -> None:
    client = await RawClient.open(node, publisher_token)
    # Three frames in one write, then a 300-byte one (16-bit length) a byte at a time,
    # then a frame split across the same write as the start of the next.
    await client.send(b"".join(_heartbeat(n) for n in (1, 2, 3)))
    long_frame = _frame(
        json.dumps({"type": "heartbeat", "id": "x" * 60, "pad": "p" * 240}).encode()
    )
    assert 125 < len(long_frame) - 8 < 1 << 16
    for byte in long_frame:
        await client.send(bytes([byte]))
    tail = _heartbeat(5)
    await client.send(_heartbeat(4) + tail[:3])
    await asyncio.sleep(0.05)
    await client.send(tail[3:])
    ids = [(await client.read_envelope()).get("id") for _ in range(6)]
    assert ids == [1, 2, 3, "x" * 60, 4, 5]
    client.close()


async def test_a_ping_is_answered_and_reading_goes_on(
    node: ServerNode, publisher_token: str
) -> None:
    client = await RawClient.open(node, publisher_token)
    await client.send(_frame(b"are-you-there", opcode=0x9) + _heartbeat(1))
    assert await client.read_frame() == (0xA, b"are-you-there")
    assert (await client.read_envelope())["id"] == 1
    await client.send(_frame(b"unasked", opcode=0xA) + _heartbeat(2))  # a pong: ignored
    assert (await client.read_envelope())["id"] == 2
    client.close()


async def test_a_fragmented_message_goes_to_the_server_and_is_answered(
    node: ServerNode, publisher_token: str
) -> None:
    async with connect(f"{node.ws_url}?token={publisher_token}") as ws:
        json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        await ws.send(iter(['{"type": "heart', 'beat", "id": 7}']))  # two frames
        reply = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        assert reply["type"] == "heartbeat_ack" and reply["id"] == 7
        assert (await request(ws, {"type": "heartbeat", "id": 8}))["id"] == 8


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_frame(b"\xff\xfe not UTF-8"), 1007),
        (_frame(b'{"type": "heartbeat"}', masked=False), 1002),
        (_frame(b"{}", opcode=0x3), 1002),  # a reserved opcode
        (bytes([0x81 | 0x40]) + _frame(b"{}")[1:], 1002),  # RSV1 without an extension
    ],
    ids=["not-utf8", "unmasked", "reserved-opcode", "rsv1"],
)
async def test_a_frame_the_server_must_refuse_is_refused_as_before(
    node: ServerNode, publisher_token: str, frame: bytes, code: int
) -> None:
    client = await RawClient.open(node, publisher_token)
    await client.send(_heartbeat(1))
    assert (await client.read_envelope())["id"] == 1
    await client.send(frame + _heartbeat(2))
    assert await client.close_code() == code
    client.close()


async def test_a_frame_past_the_servers_limit_closes_with_1009_before_its_payload(
    node: ServerNode, publisher_token: str
) -> None:
    client = await RawClient.open(node, publisher_token)
    too_large = server_max_message_bytes() + 1
    # Only the head: the server refuses the declared length without reading the payload.
    await client.send(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", too_large) + os.urandom(4))
    assert await client.close_code() == 1009
    client.close()


async def test_a_frame_over_our_limit_gets_message_too_large_and_the_connection_goes_on(
    node: ServerNode, publisher_token: str
) -> None:
    client = await RawClient.open(node, publisher_token)
    size = push_settings.MAX_FRAME_BYTES + 1000
    data = json.dumps({"type": "heartbeat", "id": 1, "pad": "p" * size}).encode()
    await client.send(_frame(data))
    reply = await client.read_envelope()
    assert reply["code"] == "MESSAGE_TOO_LARGE", reply


async def test_a_close_from_the_client_is_answered_with_its_code(
    node: ServerNode, publisher_token: str
) -> None:
    client = await RawClient.open(node, publisher_token)
    await client.send(_heartbeat(1))
    assert (await client.read_envelope())["id"] == 1
    await client.send(_frame(struct.pack("!H", 1000), opcode=0x8))
    assert await client.close_code() == 1000
    client.close()


async def test_binary_frames_are_read_directly_too(node: ServerNode, publisher_token: str) -> None:
    msgpack = pytest.importorskip("msgpack")
    async with connect(f"{node.ws_url}?token={publisher_token}", subprotocols=["v1.msgpack"]) as ws:
        hello = msgpack.unpackb(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        assert hello["type"] == "connection_established"
        await ws.send(msgpack.packb({"type": "heartbeat", "id": 3}))
        reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        assert reply["type"] == "heartbeat_ack" and reply["id"] == 3


async def test_a_client_that_leaves_mid_frame_is_cleaned_up(
    node: ServerNode, publisher_token: str
) -> None:
    client = await RawClient.open(node, publisher_token)
    await client.send(_heartbeat(1)[:5])
    client.close()
    # The node is still well: a new connection is answered.
    ws = await open_ws(node.ws_url, token=publisher_token)
    assert (await request(ws, {"type": "heartbeat", "id": 9}))["id"] == 9
    await ws.close()
