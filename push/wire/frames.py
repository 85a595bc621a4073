"""WebSocket data frames as bytes (RFC 6455, server to client: unmasked, unfragmented).

A server's frames carry no mask, so the frame for one message is the same bytes for
every subscriber: fan-out builds it once per message and wire format, and writes it
to each socket as it is.
"""

from __future__ import annotations

import struct

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
_FIN = 0x80


def data_frame(payload: bytes, *, binary: bool) -> bytes:
    head = _FIN | (OPCODE_BINARY if binary else OPCODE_TEXT)
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", head, length) + payload
    if length < 65_536:
        return struct.pack("!BBH", head, 126, length) + payload
    return struct.pack("!BBQ", head, 127, length) + payload
