"""``FrameReader`` on its own, against a stand-in for uvicorn's protocol: how bytes that
arrive in pieces become events, and what it leaves to uvicorn. The same frames against
a real uvicorn node: tests/test_frame_reader.py."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

from push.transport.frame_reader import FrameReader

LIMIT = 1 << 20


class FakeConnection:
    max_message_size = LIMIT
    max_fragment_size = None


class FakeTransport:
    def __init__(self) -> None:
        self.paused = 0
        self.protocol: Any = None

    def pause_reading(self) -> None:
        self.paused += 1

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class FakeUvicorn:
    """What the reader reads of uvicorn's protocol, and what it hands to it."""

    def __init__(self) -> None:
        self.conn = FakeConnection()
        self.transport = FakeTransport()
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_sent = False
        self.read_paused = False
        self.received: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def events(uvicorn: FakeUvicorn) -> list[dict[str, Any]]:
    taken = []
    while not uvicorn.queue.empty():
        taken.append(uvicorn.queue.get_nowait())
    return taken


def test_frames_in_one_piece_each_in_pieces_and_together_become_events() -> None:
    uvicorn = FakeUvicorn()
    reader = FrameReader(uvicorn)
    large = b"x" * 70_000  # a 64-bit length
    data = frame(b"one") + frame(b"\x00\x01", opcode=0x2) + frame(large) + frame("é".encode())
    for index in range(0, len(data), 7):  # odd pieces, cutting through every header
        reader.data_received(data[index : index + 7])
    assert events(uvicorn) == [
        {"type": "websocket.receive", "text": "one"},
        {"type": "websocket.receive", "bytes": b"\x00\x01"},
        {"type": "websocket.receive", "text": large.decode()},
        {"type": "websocket.receive", "text": "é"},
    ]
    assert uvicorn.read_paused and uvicorn.received == []


def test_a_large_frame_a_byte_at_a_time_is_gathered_not_copied_again_and_again() -> None:
    uvicorn = FakeUvicorn()
    reader = FrameReader(uvicorn)
    payload = b"y" * 1_000_000
    data = frame(payload)
    # Copying what came before each byte again, as a first version did, took 17 s here.
    for index in range(len(data)):
        reader.data_received(data[index : index + 1])
    assert events(uvicorn) == [{"type": "websocket.receive", "text": payload.decode()}]


def test_pings_and_pongs_go_to_uvicorn_frame_by_frame_and_reading_goes_on() -> None:
    uvicorn = FakeUvicorn()
    reader = FrameReader(uvicorn)
    ping, pong = frame(b"p", opcode=0x9), frame(b"q", opcode=0xA)
    reader.data_received(frame(b"a") + ping + frame(b"b") + pong)
    assert uvicorn.received == [ping, pong]
    assert [e["text"] for e in events(uvicorn)] == ["a", "b"]
    assert uvicorn.transport.protocol is None  # still the reader's


def test_anything_else_hands_the_connection_back_from_that_frame_on() -> None:
    oversized = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", LIMIT + 1) + os.urandom(4)
    for refused in (
        frame(struct.pack("!H", 1000), opcode=0x8),  # a close
        frame(b"frag", fin=False),
        frame(b"x", opcode=0x3),
        frame(b"\xff"),  # not UTF-8
        oversized,
        bytes([0x81, 0x01]) + b"x",  # unmasked
    ):
        uvicorn = FakeUvicorn()
        reader = FrameReader(uvicorn)
        after = frame(b"after")
        reader.data_received(frame(b"before") + refused + after)
        assert [e["text"] for e in events(uvicorn)] == ["before"]
        assert uvicorn.transport.protocol is uvicorn  # uvicorn's again
        assert uvicorn.received == [refused + after]


def test_after_the_server_closed_frames_are_dropped_as_uvicorn_drops_them() -> None:
    uvicorn = FakeUvicorn()
    uvicorn.close_sent = True
    FrameReader(uvicorn).data_received(frame(b"late"))
    assert events(uvicorn) == [] and not uvicorn.read_paused
