"""A uvicorn WebSocket's plain data frames read here, straight off the socket.

Under uvicorn (``websockets-sansio``), every frame a client sends passes through the
websockets library's parser (generator coroutines reading a stream buffer a few bytes
at a time) and uvicorn's event dispatch before it reaches the application's
``receive``: measured, 3.4 µs of the node's CPU for a 130-byte publish frame, a
twentieth of what a node spends on a publish. ``read_frames_directly`` puts a reader
between the socket and uvicorn's protocol that parses the frames clients send all the
time (a whole text or binary message in one masked frame, no extension bits) and queues
them for ``receive`` as uvicorn would: the same event, the same queue, the same pause of
reading until the application has taken them. Every other frame goes to uvicorn as the
exact bytes it arrived in:

- a ping, a pong: to uvicorn's protocol, frame by frame, and reading goes on here;
- a close, a fragment, an unknown opcode, reserved bits, an unmasked frame, a payload
  past the size limit, text that is not UTF-8: from that frame on, the connection is
  uvicorn's again, whose parser answers it as it always did (a close handshake, a 1002,
  a 1009, a 1007).

The reader takes over only at a frame boundary (websockets' parser waiting for the next
frame with nothing buffered), so both parsers always agree where frames begin. Like the
direct writers (``push.transport.server_adapters``), it reads private attributes of
uvicorn's protocol object, so it is used only with the versions it was tested with;
otherwise, under any other server, and with ``PUSH_DIRECT_READS=false``, frames go
through the server as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from websockets.frames import apply_mask
from websockets.protocol import OPEN

from common import metrics
from common.conf import push_settings
from push.transport.server_adapters import TESTED_VERSIONS, installed_version

logger = logging.getLogger(__name__)

SANSIO_PROTOCOL = "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol"
_PACKAGES = ("uvicorn", "websockets")

# RFC 6455, section 5.2.
_FIN = 0x80
_RESERVED_BITS = 0x70
_OPCODE = 0x0F
_MASKED = 0x80
_LENGTH = 0x7F
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_CONTROL_PAYLOAD = 125
_REFUSED = (0, 0, 0)  # what ``FrameReader._frame_at`` says of a frame left to uvicorn

_DIRECT_FRAMES = metrics.INBOUND_DIRECT_FRAMES
_tested: bool | None = None  # decided once per process


def read_frames_directly(send: Any) -> bool:
    """Read the plain data frames of the WebSocket whose ``send`` this is here, from
    now on; False when it stays the server's (another server, another version, or the
    connection not open at a frame boundary). Called once the handshake is answered."""
    if not push_settings.DIRECT_READS:
        return False
    protocol = getattr(send, "__self__", None)
    if protocol is None or _qualified_name(type(protocol)) != SANSIO_PROTOCOL or not _is_tested():
        return False
    # Without a size limit, websockets' parser is left the frames, as their bound.
    connection = protocol.conn
    if connection.max_message_size is None and connection.max_fragment_size is None:
        return False
    if not _at_frame_boundary(protocol):
        return False
    protocol.transport.set_protocol(FrameReader(protocol))
    _queue_on_its_loop(protocol.queue)
    return True


def _queue_on_its_loop(queue: asyncio.Queue[Any]) -> None:
    """Let the connection's receive queue take its loop as known: ``asyncio.Queue.get``
    asks for the running loop each time it waits (``_LoopBoundMixin._get_loop``, a
    ``getpid()`` system call on Python 3.11), once per frame a publisher sends when it
    reads them as they come (py-spy: 2.9% of the node's main thread under recent-only
    publishing). The queue belongs to the connection's loop, where it stays; one
    getter per loop serves every connection's queue."""
    global _loop_getter
    loop = asyncio.get_running_loop()
    if _loop_getter is None or _loop_getter[0] is not loop:
        _loop_getter = (loop, lambda: loop)
    vars(queue)["_get_loop"] = _loop_getter[1]


# The loop of the last connection whose queue was given its loop, and the getter.
_loop_getter: tuple[asyncio.AbstractEventLoop, Callable[[], asyncio.AbstractEventLoop]] | None = (
    None
)


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _is_tested() -> bool:
    global _tested
    if _tested is None:
        untested = {p: installed_version(p) for p in _PACKAGES}
        untested = {p: v for p, v in untested.items() if v != TESTED_VERSIONS[p]}
        _tested = not untested
        if untested:
            logger.warning("frames read through the server: %s not the tested versions", untested)
    return _tested


def _at_frame_boundary(protocol: Any) -> bool:
    """Whether websockets' parser waits for the first byte of a frame, with no message
    begun and no extension negotiated: where a second parser can take over."""
    connection = protocol.conn
    return (
        protocol.handshake_complete
        and not protocol.close_sent
        and not protocol.frames
        and connection.state is OPEN
        and connection.parser_exc is None
        and not connection.extensions
        and connection.current_size is None
        and not connection.reader.buffer
        and _innermost(connection.parser).gi_code is type(connection.reader).at_eof.__code__
    )


def _innermost(generator: Any) -> Any:
    """The generator ``generator`` waits in, through its ``yield from`` chain."""
    while (inner := getattr(generator, "gi_yieldfrom", None)) is not None:
        generator = inner
    return generator


class FrameReader:
    """The transport's protocol in place of uvicorn's, which it forwards everything to
    but the plain data frames it parses itself."""

    __slots__ = ("_limit", "_needed", "_pending", "_protocol", "_queue", "_transport")

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._transport = protocol.transport
        self._queue = protocol.queue
        connection = protocol.conn
        limits = [
            size
            for size in (connection.max_message_size, connection.max_fragment_size)
            if size is not None
        ]
        self._limit = min(limits)  # set: see ``read_frames_directly``
        self._pending = bytearray()  # the start of a frame not yet whole
        self._needed = 0  # the bytes that frame needs to be parsed further

    # ----- what the transport calls, forwarded -------------------------------------------

    # (No ``connection_made``: the reader is set on a transport already connected.)

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def eof_received(self) -> bool | None:
        result: bool | None = self._protocol.eof_received()
        return result

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    # ----- frames ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        pending = self._pending
        if pending:
            # A frame arriving in pieces is gathered here and parsed once whole (a
            # client dribbling a large frame a byte at a time costs an append a byte,
            # not a copy of everything before it).
            pending += data
            if len(pending) < self._needed:
                return
            data = bytes(pending)
            self._pending = bytearray()
        protocol = self._protocol
        queued = 0
        start, size = 0, len(data)
        while start < size:
            head, payload_start, end = self._frame_at(data, start, size)
            if end > size:  # not whole yet: wait for the bytes it needs
                self._pending = bytearray(data[start:])
                self._needed = end - start
                break
            opcode = head & _OPCODE
            if head & (_FIN | _RESERVED_BITS) == _FIN and opcode in (_TEXT, _BINARY):
                event = _event(opcode, data, payload_start, end)
                if event is None:  # not UTF-8: uvicorn's parser answers it
                    self._give_back(data[start:])
                    break
                if not protocol.close_sent:  # as uvicorn: past its close, dropped
                    self._queue.put_nowait(event)
                    queued += 1
            elif opcode in (_PING, _PONG) and head & (_FIN | _RESERVED_BITS) == _FIN:
                protocol.data_received(data[start:end])
            else:  # a close, a fragment, or anything websockets must refuse
                self._give_back(data[start:])
                break
            start = end
        _DIRECT_FRAMES.value += queued
        if queued and not protocol.read_paused:
            # As uvicorn does for each message it queues: read again once the
            # application has taken them all (its ``receive``).
            protocol.read_paused = True
            self._transport.pause_reading()

    def _frame_at(self, data: bytes, start: int, size: int) -> tuple[int, int, int]:
        """The frame at ``start``: its first byte, where its payload starts (after the
        mask) and where it ends, which lies past ``size`` while it is not whole (past
        its header's end while that is not whole either). A frame this reader must not
        parse (unmasked, too large, a control frame too long) comes back as
        ``_REFUSED``, whose first byte 0 no frame it parses has."""
        if size - start < 2:
            return 0, 0, start + 2
        head, second = data[start], data[start + 1]
        length = second & _LENGTH
        offset = start + 2
        if length == 126:
            offset += 2
            if size < offset:
                return 0, 0, offset
            length = int.from_bytes(data[offset - 2 : offset], "big")
        elif length == 127:
            offset += 8
            if size < offset:
                return 0, 0, offset
            length = int.from_bytes(data[offset - 8 : offset], "big")
        if not second & _MASKED or length > self._limit:
            return _REFUSED
        if head & _OPCODE >= _CLOSE and length > _MAX_CONTROL_PAYLOAD:
            return _REFUSED
        payload_start = offset + 4
        return head, payload_start, payload_start + length

    def _give_back(self, data: bytes) -> None:
        """The connection is uvicorn's again, from the frame that starts ``data`` on."""
        protocol = self._protocol
        self._transport.set_protocol(protocol)
        if data:
            protocol.data_received(data)


def _event(opcode: int, data: bytes, payload_start: int, end: int) -> dict[str, Any] | None:
    """The ``websocket.receive`` event uvicorn would queue for the data frame whose
    payload is ``data[payload_start:end]`` (its mask the 4 bytes before); None for text
    that is not UTF-8."""
    payload = apply_mask(data[payload_start:end], data[payload_start - 4 : payload_start])
    if opcode == _BINARY:
        return {"type": "websocket.receive", "bytes": payload}
    try:
        return {"type": "websocket.receive", "text": payload.decode()}
    except UnicodeDecodeError:
        return None
