"""Load-generator side of the wire: a minimal WebSocket client over asyncio.Protocol.

Why hand-written: a subscriber only counts frames and reads two fields, and on a
2-core machine every microsecond the client spends is one the server under test does
not get. The `websockets` client costs a task, a queue and a future per frame; this
parses frames straight out of ``data_received`` and hands each payload to a plain
callback (see README, "Making the client cheap").

Two shortcuts a load tool may take and a real client must not:
- The masking key is all zeros (RFC 6455 only requires that a key is sent), so masking
  is a no-op and payloads go out unchanged.
- The handshake's ``Sec-WebSocket-Accept`` is not checked; the 101 status is.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Callable

OPCODE_CONTINUATION = 0x0
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA
FIN_BIT = 0x80
MASK_BIT = 0x80
ZERO_MASK_KEY = b"\x00\x00\x00\x00"
CLOSE_NORMAL = 1000
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
MAX_HANDSHAKE_BYTES = 16_384
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

MessageHandler = Callable[["WsConnection", bytes, float], None]
CloseHandler = Callable[["WsConnection"], None]


class HandshakeError(Exception):
    """Raised when the server answers the upgrade with anything but 101."""


def _handshake_request(host: str, port: int, path: str, subprotocol: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


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


class WsConnection(asyncio.Protocol):
    """One client connection: handshake, then frames to ``on_message``."""

    def __init__(
        self,
        request: bytes,
        on_message: MessageHandler,
        on_close: CloseHandler | None = None,
    ) -> None:
        self._request = request
        self._on_message = on_message
        self._on_close = on_close
        self._buffer = b""
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self._upgraded = False
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closed = False
        # Free slot for the owner's per-connection state (subscriber bookkeeping).
        self.state: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before upgrade: {exc}"))
        if self._on_close is not None:
            self._on_close(self)

    def data_received(self, data: bytes) -> None:
        if not self._upgraded:
            data = self._read_handshake(data)
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

    def abort(self) -> None:
        """Drop the socket at once (end of a phase with thousands of connections)."""
        if self.transport is not None:
            self.transport.abort()

    def _read_handshake(self, data: bytes) -> bytes:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HANDSHAKE_BYTES:
                self._fail_handshake(b"oversized handshake response")
            return b""
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        if not head.startswith(b"HTTP/1.1 101"):
            self._fail_handshake(head.split(b"\r\n", 1)[0])
            return b""
        self._upgraded = True
        if not self.opened.done():
            self.opened.set_result(None)
        return rest

    def _fail_handshake(self, status_line: bytes) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(status_line.decode(errors="replace")))
        if self.transport is not None:
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


async def _open_socket(host: str, port: int, local_host: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local_host:
            # Without this, bind() picks the source port alone and each 127.0.0.x
            # runs out after ~28,000 connections, slowing down long before that;
            # with it, connect() picks the port per destination (the whole 4-tuple).
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((local_host, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


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
) -> WsConnection:
    """Open one upgraded connection; raise on refusal, handshake error or timeout."""
    loop = asyncio.get_running_loop()
    request = _handshake_request(host, port, path, subprotocol)
    sock = await asyncio.wait_for(_open_socket(host, port, local_host), timeout_secs)
    _, conn = await loop.create_connection(
        lambda: WsConnection(request, on_message, on_close), sock=sock
    )
    try:
        await asyncio.wait_for(asyncio.shield(conn.opened), timeout_secs)
    except BaseException:
        # Retrieve the late outcome, so asyncio does not log it as never retrieved.
        conn.opened.add_done_callback(lambda done: done.cancelled() or done.exception())
        conn.abort()
        raise
    return conn
