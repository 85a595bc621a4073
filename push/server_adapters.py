"""What ASGI does not say about the server underneath, for daphne and uvicorn.

ASGI gives a WebSocket application no flow control on ``send``, no say over the close
handshake, and one server call per frame. uvicorn pushes back by making ``send`` wait;
daphne writes every frame into Twisted's buffer at once. These helpers reach the
server's protocol object (daphne passes ``partial(server.handle_reply, protocol)`` as
``send``, uvicorn its protocol's bound ``send``) and do nothing under other servers.

``raw_writer`` is the fan-out's fast path: a data frame built once (``push.wsframe``)
is written to each subscriber's socket directly, skipping the per-frame work of the
server's WebSocket library (framing the same bytes again for every subscriber); an
SSE event goes out the same way as one chunk of the response body. It is only used
while the connection is open and the socket takes data; everything else (accept,
the response head, close, flow control) stays with the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def _daphne_protocol(send: Any) -> Any | None:
    args = getattr(send, "args", None)
    protocol = args[0] if args else None
    return protocol if hasattr(protocol, "transport") else None


def daphne_backlog_probe(send: Any) -> Callable[[], int] | None:
    """A probe of daphne's unsent bytes for this socket, or None under other servers.

    daphne hands the application ``partial(server.handle_reply, protocol)`` and writes
    every frame straight into Twisted's transport buffer, which grows without bound
    for a peer that stops reading; this reads that buffer's size.
    """
    transport = getattr(_daphne_protocol(send), "transport", None)
    if transport is None or not hasattr(transport, "dataBuffer"):
        return None

    def backlog() -> int:
        return (
            len(transport.dataBuffer)
            - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0)
        )

    return backlog


def allow_slow_close(send: Any, secs: float) -> None:
    """Let a closing daphne connection drain its queued frames before the close frame
    for ``secs``: autobahn's default (1 s) drops a slow reader with 1006 before it can
    see the 4002 that tells it why."""
    protocol = _daphne_protocol(send)
    if protocol is not None and hasattr(protocol, "closeHandshakeTimeout"):
        protocol.closeHandshakeTimeout = secs


def drop_if_still_open(send: Any, after_secs: float) -> None:
    """Under uvicorn, drop the socket ``after_secs`` after the server closed it.

    uvicorn closes a transport by flushing it first, and a client that never reads
    again never lets the flush finish: its socket (and the bytes queued for it) would
    stay on the server for good, after the connection left every count and limit.
    daphne needs none of this (autobahn drops it after its close handshake timeout)."""
    owner = getattr(send, "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return
    asyncio.get_running_loop().call_later(after_secs, transport.abort)


def close_with_any_code(send: Any, code: int) -> bool:
    """Close a daphne connection with ``code`` even where daphne's WebSocket library
    (autobahn) refuses it. autobahn's ``sendClose`` takes only 1000 and 3000-4999, but
    the contract closes with 1001, 1008, 1009, 1011, 1012 and 1013 as well; its
    ``sendCloseFrame`` sends any code. Returns False when ``send`` is not daphne's."""
    protocol = _daphne_protocol(send)
    send_close_frame = getattr(protocol, "sendCloseFrame", None)
    if send_close_frame is None or getattr(protocol, "state", None) != protocol.STATE_OPEN:
        return False
    send_close_frame(code=code, isReply=False)
    return True


def raw_writer(send: Any) -> tuple[Callable[[bytes], None], Callable[[], bool]] | None:
    """``(write, writable)`` for writing whole frames to the socket, or None.

    For a WebSocket a frame is a data frame; for a streaming HTTP response (SSE) it is
    one chunk of the chunked body, written only once the server has sent the head."""
    protocol = getattr(send, "__self__", None)
    kind = type(protocol).__name__
    if kind == "WebSocketsSansIOProtocol":
        return _uvicorn_sansio_writer(protocol)
    if kind == "RequestResponseCycle" and type(protocol).__module__.endswith("httptools_impl"):
        return _uvicorn_http_writer(protocol)
    protocol = _daphne_protocol(send)
    if protocol is not None and hasattr(protocol, "sendCloseFrame"):
        return _daphne_writer(protocol)
    if protocol is not None and hasattr(protocol, "startedWriting"):
        return _daphne_http_writer(protocol)
    return None


def _uvicorn_sansio_writer(protocol: Any) -> tuple[Callable[[bytes], None], Callable[[], bool]]:
    transport = protocol.transport
    writable_event = protocol.writable

    def writable() -> bool:
        return (
            writable_event.is_set()
            and not protocol.close_sent
            and not protocol.disconnected
            and not transport.is_closing()
        )

    return transport.write, writable


def _uvicorn_http_writer(cycle: Any) -> tuple[Callable[[bytes], None], Callable[[], bool]]:
    transport = cycle.transport
    flow = cycle.flow

    def writable() -> bool:
        return (
            cycle.response_started
            and cycle.chunked_encoding is True
            and not cycle.response_complete
            and not cycle.disconnected
            and not flow.write_paused
            and not transport.is_closing()
        )

    return transport.write, writable


def _daphne_writer(protocol: Any) -> tuple[Callable[[bytes], None], Callable[[], bool]]:
    transport = protocol.transport
    open_state = protocol.STATE_OPEN

    def writable() -> bool:
        return protocol.state == open_state and transport.connected

    return _twisted_direct_write(transport), writable


def _daphne_http_writer(request: Any) -> tuple[Callable[[bytes], None], Callable[[], bool]]:
    transport = request.transport

    def writable() -> bool:
        # The head goes out with Twisted's first write; chunks may follow it directly.
        return bool(
            request.startedWriting
            and request.chunked
            and not request.finished
            and not request._disconnected
            and request.channel is not None
            and transport.connected
        )

    return _twisted_direct_write(transport), writable


def _twisted_direct_write(transport: Any) -> Callable[[bytes], None]:
    sock = getattr(transport, "socket", None)
    if sock is None:  # not a plain TCP transport (TLS in Twisted): let it buffer
        return transport.write  # type: ignore[no-any-return]

    def write(frame: bytes) -> None:
        # Twisted's write only buffers, then polls for writability and sends on the
        # next reactor turn: two epoll_ctl calls and a loop pass per socket per
        # message, which at thousands of subscribers is most of a delivery's cost and
        # all of its latency. When nothing is waiting in Twisted's buffer, send now,
        # as uvloop does; whatever the socket does not take goes to Twisted in order.
        if transport.dataBuffer or transport._tempDataBuffer:
            transport.write(frame)
            return
        try:
            sent = sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            transport.write(frame)  # let Twisted notice the dead socket its own way
            return
        if sent < len(frame):
            transport.write(frame[sent:])

    return write


def peer_gone_probe(send: Any) -> Callable[[], bool] | None:
    """A probe that says when the server knows the client is gone (its socket closed,
    or a close began), or None under other servers.

    The consumer handles one request at a time and reads the disconnect only after the
    request returns; a long request (a replay) asks this instead, so its work stops
    when the client leaves rather than after it has read everything for no one."""
    protocol = getattr(send, "__self__", None)
    kind = type(protocol).__name__
    if kind == "WebSocketsSansIOProtocol":
        transport = protocol.transport
        return lambda: bool(protocol.disconnected or protocol.close_sent or transport.is_closing())
    if kind == "RequestResponseCycle":
        return lambda: bool(protocol.disconnected)
    protocol = _daphne_protocol(send)
    if protocol is not None and hasattr(protocol, "sendCloseFrame"):
        open_state = protocol.STATE_OPEN
        return lambda: protocol.state != open_state or not protocol.transport.connected
    if protocol is not None and hasattr(protocol, "startedWriting"):
        return lambda: bool(protocol._disconnected or protocol.finished)
    return None
