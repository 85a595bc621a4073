"""Load-generator side of the wire: a minimal WebSocket client over asyncio.Protocol.

Why hand-written: a subscriber only counts frames and reads two fields, and on a
2-core machine every microsecond the client spends is one the server under test does
not get. The `websockets` client costs a task, a queue and a future per frame; this
parses frames straight out of ``data_received`` and hands each payload to a plain
callback (see README, "Making the client cheap"). The tests' client
(``tests/wsclient.py``, on ``websockets``) checks what a connection carries; this one
only has to hold thousands of them cheaply, so the two stay apart.

Two shortcuts a load tool may take and a real client must not:
- The masking key is all zeros (RFC 6455 only requires that a key is sent), so masking
  is a no-op and payloads go out unchanged.
- The handshake's ``Sec-WebSocket-Accept`` is not checked; the 101 status is.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable

from bench.httpconn import HttpConnection, SocketOption, open_connection, request_head

OPCODE_CONTINUATION = 0x0
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA
FIN_BIT = 0x80
MASK_BIT = 0x80
ZERO_MASK_KEY = b"\x00\x00\x00\x00"
CLOSE_NORMAL = 1000
CLOSE_NO_STATUS = 1005

MessageHandler = Callable[["WsConnection", bytes, float], None]
CloseHandler = Callable[["WsConnection"], None]


def _handshake_request(host: str, port: int, path: str, subprotocol: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return request_head("GET", host, port, path, lines)


def encode_frame(payload: bytes, opcode: int) -> bytes:
    """Build one final client frame with the all-zero masking key."""
    length = len(payload)
    first = bytes((FIN_BIT | opcode,))
    if length < 126:
        header = first + bytes((MASK_BIT | length,))
    elif length < 65_536:
        header = first + bytes((MASK_BIT | 126,)) + length.to_bytes(2, "big")
    else:
        header = first + bytes((MASK_BIT | 127,)) + length.to_bytes(8, "big")
    return header + ZERO_MASK_KEY + payload


class WsConnection(HttpConnection):
    """One client connection: handshake, then frames to ``on_message``."""

    expected_status = b"HTTP/1.1 101"

    def __init__(
        self,
        request: bytes,
        on_message: MessageHandler,
        on_close: CloseHandler | None = None,
        state: object = None,
    ) -> None:
        super().__init__(request, on_message, on_close, state)
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0

    def data_received(self, data: bytes) -> None:
        if not self.head_read:
            data = self.read_head(data)
            if not data:
                return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        # Fast path: in a fan-out almost every read is exactly one final data frame.
        if len(data) >= 2 and data[0] in (0x81, 0x82) and self._deliver_single(data):
            return
        self._parse_frames(data, time.time())

    def _deliver_single(self, data: bytes) -> bool:
        length = data[1] & 0x7F
        header = 2
        if length == 126 and len(data) >= 4:
            length = int.from_bytes(data[2:4], "big")
            header = 4
        elif length >= 126:
            return False
        if len(data) != header + length:
            return False
        self._on_message(self, data[header:], time.time())
        return True

    def send(self, payload: bytes, opcode: int) -> None:
        """Queue one message; the transport buffers, the kernel does the rest."""
        if self.transport is not None and not self.closed:
            self.transport.write(encode_frame(payload, opcode))

    def close(self, code: int = CLOSE_NORMAL) -> None:
        """Send a close frame and drop the socket without waiting for the echo."""
        if self.transport is None or self.closed:
            return
        self.transport.write(encode_frame(code.to_bytes(2, "big"), OPCODE_CLOSE))
        self.transport.close()

    def _parse_frames(self, data: bytes, now: float) -> None:
        # Server frames are never masked, so a header is 2, 4 or 10 bytes.
        pos = 0
        size = len(data)
        while size - pos >= 2:
            first = data[pos]
            length = data[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                header = 10
            end = pos + header + length
            if end > size:
                break
            self._on_frame(first, data[pos + header : end], now)
            pos = end
        if pos < size:
            self._buffer = data[pos:]

    def _on_frame(self, first: int, payload: bytes, now: float) -> None:
        opcode = first & 0x0F
        final = first & FIN_BIT
        if opcode in (0x1, 0x2):
            if final:
                self._on_message(self, payload, now)
            else:
                self._fragment_opcode = opcode
                self._fragments = [payload]
        elif opcode == OPCODE_CONTINUATION:
            self._fragments.append(payload)
            if final:
                whole = b"".join(self._fragments)
                self._fragments = []
                self._on_message(self, whole, now)
        elif opcode == OPCODE_PING:
            self.send(payload, OPCODE_PONG)
        elif opcode == OPCODE_CLOSE:
            self._on_close_frame(payload)

    def _on_close_frame(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CLOSE_NO_STATUS
        self.close_code = code
        if self.transport is not None:
            self.transport.write(encode_frame(payload[:2], OPCODE_CLOSE))
            self.transport.close()


async def ws_connect(
    host: str,
    port: int,
    path: str,
    on_message: MessageHandler,
    *,
    subprotocol: str | None = None,
    on_close: CloseHandler | None = None,
    local_host: str | None = None,
    timeout_secs: float = 10.0,
    socket_options: tuple[SocketOption, ...] = (),
    state: object = None,
) -> WsConnection:
    """Open one upgraded connection; raise on refusal, handshake error or timeout.
    ``state`` is set before any frame can arrive (a server may speak first)."""
    request = _handshake_request(host, port, path, subprotocol)
    return await open_connection(
        host,
        port,
        lambda: WsConnection(request, on_message, on_close, state),
        local_host=local_host,
        timeout_secs=timeout_secs,
        socket_options=socket_options,
    )
