"""Load-generator connections that start with an HTTP/1.1 request: the WebSocket client
(an upgrade, then frames) and the Server-Sent Events client (a streamed response).

What both share lives here: the socket to a node (from a chosen local address when
one loopback address runs out of ports), the request, the head of the answer and its
status, the connection's state for its owner, and the open call that waits for the
head and cleans up after a refusal. Each client parses its own body.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, TypeVar

CLOSE_ABNORMAL = 1006  # the socket ended without a close (RFC 6455's code for it)
MAX_HEAD_BYTES = 16_384
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

# (level, option, value) set on a client socket before it connects.
SocketOption = tuple[int, int, int]

# (connection, payload, receive time): one call per message; the owner's hot path.
MessageHandler = Callable[[Any, bytes, float], None]
CloseHandler = Callable[[Any], None]


class HandshakeError(Exception):
    """Raised when the server answers the request with another status than expected."""


class HttpConnection(asyncio.Protocol):
    """One client connection: the request goes out, the head comes back, then the body
    is the subclass's (``data_received`` calls ``read_head`` until ``head_read``)."""

    expected_status = b"HTTP/1.1 200"

    def __init__(
        self,
        request: bytes,
        on_message: MessageHandler,
        on_close: CloseHandler | None = None,
        state: object = None,
    ) -> None:
        self._request = request
        self._on_message = on_message
        self._on_close = on_close
        self._buffer = b""
        self.head_read = False
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closed = False
        # Free slot for the owner's per-connection state (subscriber bookkeeping).
        self.state = state

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # always a Transport here
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the answer: {exc}"))
        if self._on_close is not None:
            self._on_close(self)

    def abort(self) -> None:
        """Drop the socket at once (end of a phase with thousands of connections)."""
        if self.transport is not None:
            self.transport.abort()

    def accept_head(self, head: bytes) -> bool:
        """Whether the answer's head (status line and headers) lets the body follow."""
        return head.startswith(self.expected_status)

    def read_head(self, data: bytes) -> bytes:
        """Buffer until the head is complete; return what follows it (b"" until then)."""
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._fail_head(b"oversized response head")
            return b""
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        if not self.accept_head(head):
            self._fail_head(head.split(b"\r\n", 1)[0])
            return b""
        self.head_read = True
        if not self.opened.done():
            self.opened.set_result(None)
        return rest

    def _fail_head(self, status_line: bytes) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(status_line.decode(errors="replace")))
        if self.transport is not None:
            self.transport.close()


def request_head(method: str, host: str, port: int, path: str, headers: list[str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _open_socket(
    host: str, port: int, local_host: str | None, options: tuple[SocketOption, ...]
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        for level, option, value in options:  # before connect: buffers and MSS take effect
            sock.setsockopt(level, option, value)
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


ConnectionT = TypeVar("ConnectionT", bound=HttpConnection)


async def open_connection(
    host: str,
    port: int,
    factory: Callable[[], ConnectionT],
    *,
    local_host: str | None,
    timeout_secs: float,
    socket_options: tuple[SocketOption, ...] = (),
) -> ConnectionT:
    """Connect, send the request and wait for an accepted head; raise on refusal,
    a wrong status or timeout (and drop the socket)."""
    loop = asyncio.get_running_loop()
    sock = await asyncio.wait_for(
        _open_socket(host, port, local_host, socket_options), timeout_secs
    )
    _, conn = await loop.create_connection(factory, sock=sock)
    try:
        await asyncio.wait_for(asyncio.shield(conn.opened), timeout_secs)
    except BaseException:
        # Retrieve the late outcome, so asyncio does not log it as never retrieved.
        conn.opened.add_done_callback(lambda done: done.cancelled() or done.exception())
        conn.abort()
        raise
    return conn
