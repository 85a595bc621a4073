"""Frames built once for every subscriber parse as the WebSocket library parses them."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from push.wire.frames import data_frame


def _parse(frame_bytes: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(frame_bytes)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        return done.value
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65_535, 65_536, 1_048_576])
@pytest.mark.parametrize("binary", [False, True])
def test_frame_round_trip(length: int, binary: bool) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    if not binary:
        payload = b"x" * length
    frame = _parse(data_frame(payload, binary=binary))
    assert frame.fin
    assert frame.opcode == (Opcode.BINARY if binary else Opcode.TEXT)
    assert frame.data == payload
