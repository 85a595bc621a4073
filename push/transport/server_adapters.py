"""What ASGI does not say about the server underneath, for daphne and uvicorn.

ASGI gives a WebSocket application no flow control on ``send``, no say over the close
handshake, and one server call per frame. uvicorn pushes back by making ``send`` wait;
daphne writes every frame into Twisted's buffer at once. These helpers reach the
server's protocol object (daphne passes ``partial(server.handle_reply, protocol)`` as
``send``, uvicorn its protocol's bound ``send``) and do nothing under other servers.

``raw_writer`` is the fan-out's fast path: a data frame built once (``push.wire.frames``)
is written to each subscriber's socket directly, skipping the per-frame work of the
server's WebSocket library (framing the same bytes again for every subscriber); an
SSE event goes out the same way as one chunk of the response body. It is only used
while the connection is open and the socket takes data; everything else (accept,
the response head, close, flow control) stays with the server.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib.metadata
import json
import logging
import pprint
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import unquote

from common import metrics
from common.addresses import address_block
from common.errors import ErrorCode
from push.cluster.address_budgets import TokenBucket
from push.wire.protocol import body_too_large, error

logger = logging.getLogger(__name__)


TWISTED_TCP_SERVER = "twisted.internet.tcp.Server"
DAPHNE_WEBSOCKET = "daphne.ws_protocol.WebSocketProtocol"


def _class_name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


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

    return functools.partial(_twisted_unsent, transport)


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
    protocol: Any = _daphne_protocol(send)
    send_close_frame = getattr(protocol, "sendCloseFrame", None)
    if send_close_frame is None or getattr(protocol, "state", None) != protocol.STATE_OPEN:
        return False
    send_close_frame(code=code, isReply=False)
    return True


Writer = tuple[Callable[[bytes], None], Callable[[], bool]]

# The versions the direct writers were tested with: the pins of requirements.txt
# (push/tests/test_server_adapters.py checks that they agree). The writers read
# private attributes of these servers' protocol objects, so under any other version
# frames go through the server's ``send``: slower, never wrong.
TESTED_VERSIONS = {
    "daphne": "4.2.3",
    "twisted": "26.10.0",
    "autobahn": "26.10.2",
    "uvicorn": "0.54.0",
    "websockets": "17.4",
    "httptools": "0.9.0",
}


def raw_writer(send: Any) -> Writer | None:
    """``(write, writable)`` for writing whole frames to the socket, or None.

    For a WebSocket a frame is a data frame; for a streaming HTTP response (SSE) it is
    one chunk of the chunked body, written only once the server has sent the head.
    Which writer serves a server's protocol class is decided once per process."""
    protocol = getattr(send, "__self__", None)  # uvicorn: its protocol's bound method
    if protocol is None:
        protocol = _daphne_protocol(send)
        if protocol is None:
            return None
    kind = type(protocol)
    try:
        make = _writer_by_class[kind]
    except KeyError:
        make = _writer_by_class[kind] = _choose_writer(kind)
    return make(protocol) if make is not None else None


_writer_by_class: dict[type, Callable[[Any], Writer] | None] = {}


def _choose_writer(kind: type) -> Callable[[Any], Writer] | None:
    """The writer for instances of exactly ``kind`` (a subclass may change what the
    writer relies on), if it was tested with the installed versions; logged once."""
    name = f"{kind.__module__}.{kind.__qualname__}"
    entry = _WRITERS.get(name)
    if entry is None:
        logger.info("direct writes off for %s: not a server protocol they know", name)
        return None
    make, packages = entry
    untested = {p: v for p in packages if (v := installed_version(p)) != TESTED_VERSIONS[p]}
    if untested:
        logger.warning(
            "direct writes off for %s: %s not the tested %s; frames go through the server",
            name,
            untested,
            {p: TESTED_VERSIONS[p] for p in untested},
        )
        return None
    return make


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _uvicorn_sansio_writer(protocol: Any) -> Writer:
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


def _uvicorn_http_writer(cycle: Any) -> Writer:
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


def _daphne_writer(protocol: Any) -> Writer:
    transport = protocol.transport
    open_state = protocol.STATE_OPEN

    def writable() -> bool:
        return protocol.state == open_state and transport.connected

    return _twisted_direct_write(transport), writable


def _daphne_http_writer(request: Any) -> Writer:
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
    if _class_name(transport) != TWISTED_TCP_SERVER:
        # TLS (daphne's ``ssl:`` endpoint): the transport is Twisted's TLS wrapper,
        # which forwards attribute reads to the TCP transport under it, so
        # ``transport.socket`` would find the raw socket and plaintext would go into
        # the TLS stream. Only the wrapper's own write encrypts.
        return transport.write
    sock = transport.socket

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
    protocol: Any = getattr(send, "__self__", None)
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


# Protocol class -> (its writer, the packages whose versions it was tested with).
_WRITERS: dict[str, tuple[Callable[[Any], Writer], tuple[str, ...]]] = {
    "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol": (
        _uvicorn_sansio_writer,
        ("uvicorn", "websockets"),
    ),
    "uvicorn.protocols.http.httptools_impl.RequestResponseCycle": (
        _uvicorn_http_writer,
        ("uvicorn", "httptools"),
    ),
    DAPHNE_WEBSOCKET: (_daphne_writer, ("daphne", "twisted", "autobahn")),
    "daphne.http_protocol.WebRequest": (_daphne_http_writer, ("daphne", "twisted")),
}


# ----- frames the application never sees -----------------------------------------------

UVICORN_SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol"
# Fragments of a message and control frames are parsed (a ping answered) by the server's
# WebSocket library and never reach the consumer, whose rate limit and the address's
# frame budget count messages: measured, one anonymous connection sending empty
# fragments of a message it never finished (no size limit is ever reached), or pings,
# kept the node's loop busy (3.6-5 s of CPU in 3 s under uvicorn, 4.3-5 s in 4 s under
# daphne) and was never closed, and each fragment stayed in the message's list. A
# message may have this many fragments (a 4 MiB one in 4 KiB pieces), and a connection
# send pings and pongs at this rate (a client pings every few seconds at most); past
# either, it is closed.
MAX_FRAGMENTS_PER_MESSAGE = 1024
CONTROL_FRAME_BURST = 50
CONTROL_FRAMES_PER_SEC = 10.0


def bound_unseen_frames(send: Any) -> bool:
    """Bound the fragments and control frames of the WebSocket whose ``send`` this is:
    past ``MAX_FRAGMENTS_PER_MESSAGE`` fragments in one message it is closed 1009 (too
    big), past its control-frame rate 1008 (policy), as the contract closes a frame too
    large or a client over its rate. False (nothing done) under another server than
    uvicorn and daphne. The handlers are wrapped on the instance: its class stays the
    server's, which the direct reader and writers look for."""
    daphne = _daphne_protocol(send)
    if daphne is not None and _class_name(daphne) == DAPHNE_WEBSOCKET:
        _bound_autobahn_frames(daphne)
        return True
    protocol = getattr(send, "__self__", None)
    if protocol is None or _class_name(protocol) != UVICORN_SANSIO:
        return False
    control = TokenBucket(CONTROL_FRAME_BURST, CONTROL_FRAMES_PER_SEC)
    handle_cont, handle_ping, handle_pong = (
        protocol.handle_cont,
        protocol.handle_ping,
        protocol.handle_pong,
    )

    def bounded_cont(event: Any) -> None:
        if len(protocol.frames) >= MAX_FRAGMENTS_PER_MESSAGE:
            _fail_uvicorn(protocol, 1009, "message in too many fragments")
        else:
            handle_cont(event)

    def bounded_ping() -> None:
        if control.take():
            handle_ping()
        else:
            _fail_uvicorn(protocol, 1008, "too many pings")

    def bounded_pong(event: Any) -> None:
        if control.take():
            handle_pong(event)
        else:
            _fail_uvicorn(protocol, 1008, "too many pongs")

    protocol.handle_cont = bounded_cont
    protocol.handle_ping = bounded_ping
    protocol.handle_pong = bounded_pong
    return True


def _bound_autobahn_frames(protocol: Any) -> None:
    """``bound_unseen_frames`` for daphne's protocol (autobahn's): its hooks for a
    message's start, each of its frames, and control frames, wrapped on the instance.
    autobahn fails a connection by dropping it (no close frame)."""
    control = TokenBucket(CONTROL_FRAME_BURST, CONTROL_FRAMES_PER_SEC)
    fragments = 0
    message_begin, frame_begin = protocol._onMessageBegin, protocol._onMessageFrameBegin
    on_ping, on_pong = protocol._onPing, protocol._onPong

    def bounded_message_begin(is_binary: bool) -> None:
        nonlocal fragments
        fragments = 0
        message_begin(is_binary)

    def bounded_frame_begin(length: int) -> None:
        nonlocal fragments
        fragments += 1
        if fragments > MAX_FRAGMENTS_PER_MESSAGE:
            protocol._fail_connection(1009, "message in too many fragments")
        else:
            frame_begin(length)

    def bounded_ping(payload: bytes) -> None:
        if control.take():
            on_ping(payload)
        else:
            protocol._fail_connection(1008, "too many pings")

    def bounded_pong(payload: bytes) -> None:
        if control.take():
            on_pong(payload)
        else:
            protocol._fail_connection(1008, "too many pongs")

    protocol._onMessageBegin = bounded_message_begin
    protocol._onMessageFrameBegin = bounded_frame_begin
    protocol._onPing = bounded_ping
    protocol._onPong = bounded_pong


def _fail_uvicorn(protocol: Any, code: int, reason: str) -> None:
    """Close as uvicorn closes on a frame its parser refuses: a close frame, the
    application told, the socket closed; frames parsed with this one are dropped."""
    if protocol.close_sent or protocol.conn.close_sent is not None:
        return
    protocol.conn.fail(code, reason)
    protocol.handle_parser_exception()


# ----- request bodies (daphne) ---------------------------------------------------------


def leave_daphne_requests_unparsed() -> None:
    """Make daphne's requests leave their cookies, query strings and bodies as they
    came: daphne hands the raw headers, query string and body to the application and
    never reads what Twisted parses out of them (``request.received_cookies``,
    ``request.args``).

    Twisted's ``Request`` parses them on the event loop, before the application sees
    the request, and so before any token or budget is checked, for every request the
    node answers, refusals included:

    - every ``Cookie`` header, into a dict, with an exception caught per piece without
      ``=``: 15,000 semicolons (a head is at most 16 KiB) cost 8 ms of CPU per request
      (one anonymous keep-alive client, eight requests at a time: 119 requests a second
      took 96% of a core);
    - every query string, into lists of values: a 16 KiB request line of ``a&a&...``
      cost 4.9 ms of CPU per request, against 0.35 ms for a short one (measured, one
      anonymous keep-alive client, eight requests at a time: 166 requests a second took
      82% of a core, almost all of them answered 429 over the address's REST budget);
    - every POST whose ``Content-Type`` is a form (URL-encoded or multipart): 2 MB of
      ``a&a&...`` cost 0.77 s of CPU per anonymous request, every connection of the
      node stalled meanwhile, a multipart body as much; and a multipart body it could
      not parse got Twisted's own 400 page. Deciding whether a body is a form cost
      every POST 43 us too (the standard library's e-mail header parser builds two
      classes per call, left to the cyclic garbage collector).

    So daphne's request class parses no cookies, and takes Twisted's
    ``requestReceived`` without the parsing (Twisted 26's, whose only other work is
    this). Django parses cookies, a query string or a form only where something reads
    them (``DATA_UPLOAD_MAX_NUMBER_FIELDS`` bounds the fields). Called before daphne's
    server starts."""
    from daphne import http_protocol

    def request_received(request: Any, command: bytes, path: bytes, version: bytes) -> None:
        request.content.seek(0, 0)
        request.args = {}
        request.method, request.uri = command, path
        request.clientproto = version
        request.path = path.split(b"?", 1)[0]
        request.process()

    http_protocol.WebRequest.requestReceived = request_received
    http_protocol.WebRequest.parseCookies = _ignore


def bound_daphne_request_bodies(
    limit: int | None,
    *,
    max_unfinished_body_bytes_per_peer: int = 0,
    refused_before_body: BodyRefusal | None = None,
) -> None:
    """Make daphne stop reading a request body past ``limit`` bytes, and drop a
    connection whose read would take its peer's bytes of unfinished bodies past
    ``max_unfinished_body_bytes_per_peer`` (0: no such bound; 0 behind a proxy), as
    ``bounded_head_httptools_protocol`` does under uvicorn. A request with a body that
    ``refused_before_body`` (given a scope of its path, client and headers) says the
    application would refuse 429 is answered so at once, its body not read.

    daphne reads a whole body (into a temporary file past 100 KB) before it calls the
    application, so the application's own bound (``push.api.handler``) comes too late:
    200 MB sent without a token were read whole. Each request daphne makes is given
    this bound: one declaring a larger ``Content-Length`` is answered 413 at once,
    and a chunked one when it goes past it; the rest of the body is not stored, the
    application is not called, and the connection is closed. The request stays
    daphne's own class (``_WRITERS`` knows it by name); only its instance's methods
    are wrapped. Called before daphne's server starts."""
    if limit is None:
        return
    from daphne import http_protocol

    build_protocol = http_protocol.HTTPFactory.buildProtocol
    held = _HeldBytes(max_unfinished_body_bytes_per_peer, "unfinished_body_bytes")

    def build_bounded(factory: Any, addr: Any) -> Any:
        protocol = build_protocol(factory, addr)
        if protocol is not None:
            host = getattr(addr, "host", None)
            key = address_block(host) if host and held.limit else None
            make_request = protocol.requestFactory
            protocol.requestFactory = lambda channel, queued: _bounded_request(
                make_request(channel, queued), channel, limit, held, key, refused_before_body
            )
        return protocol

    http_protocol.HTTPFactory.buildProtocol = build_bounded


class _HeldBytes:
    """Bytes each peer (IPv6: its /64) has the node hold for it, and their bound: the
    unfinished request bodies daphne reads (``MAX_UNFINISHED_BODY_BYTES_PER_PEER``:
    daphne keeps every body it reads, each in a temporary file (a file of the node's)
    past 100 KB, until it is whole, however slowly it comes; measured, 20 bodies of
    2 MB from one address, each one byte short, held on the node while the client kept
    their sockets), or the unsent bytes of its HTTP responses under either server
    (``MAX_UNSENT_RESPONSE_BYTES_PER_PEER``)."""

    __slots__ = ("bytes", "limit")

    def __init__(self, limit: int, kind: str) -> None:
        self.limit = limit
        self.bytes = metrics.address_holding(kind)

    def take(self, key: str, nbytes: int) -> bool:
        """Count ``nbytes`` more under ``key``: False once they pass the bound."""
        self.bytes[key] += nbytes
        return self.bytes[key] <= self.limit

    def give_back(self, key: str, nbytes: int) -> None:
        _uncount(self.bytes, key, nbytes)


def _bounded_request(
    request: Any,
    channel: Any,
    limit: int,
    held: _HeldBytes | None = None,
    key: str | None = None,
    refused_before_body: BodyRefusal | None = None,
) -> Any:
    """``request`` (daphne's) with its body bounded to ``limit`` bytes, and what it has
    read of it counted under ``key`` in ``held`` until it is whole (None: not counted);
    with a body, refused before it is read where ``refused_before_body`` says so.

    The wrappers refer to the request, and the request to them: once the body is read
    whole, refused or dropped, they are taken off again, so no request is left in a
    reference cycle for the garbage collector."""
    kind = type(request)
    received = 0
    counted = 0  # what this request's body counts in ``held``
    # The body is over (read whole, refused, dropped or its connection lost). Twisted's
    # transfer decoder took ``handleContentChunk`` when it read the request's length,
    # so ``bounded_chunk`` is still what it calls for the rest of a refused body: it
    # counted those bytes again, never given back once the connection closed (~2 MB a
    # refusal; eight, and the address's every later body was dropped for good), and
    # answered the refusal again for each chunk past the limit.
    over = False

    def bounded_length(length: int | None) -> None:
        if length is not None and length > limit:
            kind.gotLength(request, None)
            refuse()
            return
        # (None: chunked, a body of unknown length.)
        refusal = None
        if length != 0 and refused_before_body is not None:
            refusal = refused_before_body(_daphne_scope(request))
        if refusal is not None:
            kind.gotLength(request, None)
            unwrap()
            retry_after, body = refusal
            answer = closing_json_answer("429 Too Many Requests", body, retry_after)
            _refuse_daphne_request(request, channel, answer)
        else:
            kind.gotLength(request, length)

    def bounded_chunk(data: bytes) -> None:
        nonlocal received, counted
        if over:
            return
        received += len(data)
        if received > limit:
            refuse()
            return
        if held is not None and key is not None:
            counted += len(data)
            if not held.take(key, len(data)):
                # Dropped without an answer, as under uvicorn.
                unwrap()
                _ignore_body(request)
                channel.transport.loseConnection()
                return
        kind.handleContentChunk(request, data)

    def read_whole(*args: Any) -> None:
        unwrap()
        kind.requestReceived(request, *args)

    def lost(reason: Any) -> None:
        unwrap()
        kind.connectionLost(request, reason)

    def unwrap() -> None:
        nonlocal counted, over
        over = True
        if counted:
            assert held is not None and key is not None
            held.give_back(key, counted)
            counted = 0
        for name in (*_BODY_HOOKS, "connectionLost"):
            vars(request).pop(name, None)

    def refuse() -> None:
        unwrap()
        body = json.dumps(body_too_large(limit)).encode()
        _refuse_daphne_request(request, channel, closing_json_answer("413 Payload Too Large", body))

    request.gotLength = bounded_length
    request.handleContentChunk = bounded_chunk
    request.requestReceived = read_whole
    if held is not None and key is not None:
        # The channel tells its requests of the socket's close, mid-body too.
        request.connectionLost = lost
    return request


def closing_json_answer(status: str, body: bytes, retry_after_secs: int | None = None) -> bytes:
    """A whole HTTP/1.1 response of JSON ``body`` that closes the connection, written
    straight to a socket by the server's own code (the application never saw it)."""
    retry_after = f"Retry-After: {retry_after_secs}\r\n" if retry_after_secs else ""
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{retry_after}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _refuse_daphne_request(request: Any, channel: Any, answer: bytes) -> None:
    """Answer ``request`` (daphne's) with ``answer``, which closes the connection: what
    else arrives is dropped, and the application is never called."""
    _ignore_body(request)
    _answer_and_linger(channel.transport, answer)


def _answer_and_linger(transport: Any, answer: bytes) -> None:
    """Write ``answer`` to a Twisted ``transport`` and close it ``LINGER_SECS`` later."""
    transport.write(answer)
    # Not closed at once: a close with unread bytes would reset the connection,
    # and the client might lose the answer before reading it.
    half_close = getattr(transport, "loseWriteConnection", None)
    if half_close is not None:  # not every transport can (TLS)
        half_close()
    # daphne runs Twisted on asyncio's loop.
    asyncio.get_event_loop().call_later(LINGER_SECS, transport.loseConnection)


# A request's ``Retry-After`` and body of a 429 before its body is read, or None.
BodyRefusal = Callable[[dict[str, Any]], tuple[int, bytes] | None]


def _daphne_scope(request: Any) -> dict[str, Any]:
    """What the application's budgets read of a request (daphne's) whose head is read:
    its path, client address and headers, as its ASGI scope will have them."""
    peer: Any = request.channel.transport.getPeer() if request.channel else None
    host = getattr(peer, "host", None)
    headers = _daphne_headers(request)
    return {
        "type": "http",
        "path": unquote(request.uri.split(b"?", 1)[0].decode("latin-1")),  # as daphne's
        "client": (host, peer.port) if host else None,
        "headers": headers,
    }


def _daphne_headers(request: Any) -> list[tuple[bytes, bytes]]:
    """A daphne request's headers as its ASGI scope will have them: lowercase names."""
    return [
        (name.lower(), value)
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    ]


# The request methods ``_bounded_request`` wraps.
_BODY_HOOKS = ("gotLength", "handleContentChunk", "requestReceived")


def _ignore(*args: Any) -> None:
    pass


def _ignore_body(request: Any) -> None:
    """Drop what else arrives of ``request``'s body; the application is never called."""
    for name in _BODY_HOOKS:
        setattr(request, name, _ignore)


# How long a refused request's connection stays open to read (and drop) what the client
# is still sending, so it reads the answer before the close.
LINGER_SECS = 2.0


# ----- open connections per peer (daphne) ----------------------------------------------


def bound_daphne_connections_per_peer(limit: int) -> None:
    """Make daphne count its open HTTP connections per peer (IPv6: its /64) and answer
    a new one past ``limit`` (0: none) with 429 ``RATE_LIMITED``, as
    ``bounded_head_httptools_protocol`` does under uvicorn: a connection counts from its
    accept until it closes or becomes a WebSocket. Called before daphne's server
    starts.

    A refused connection is answered at once, not after its request: waiting for it
    would let a client hold refused connections for as long as a head may take. It is
    closed ``LINGER_SECS`` later (what arrives meanwhile is dropped), and while its peer
    has ``MAX_INCOMPLETE_HEADS_PER_PEER`` refused ones lingering, a new one is closed
    unanswered."""
    if not limit:
        return
    from daphne import http_protocol
    from twisted.internet.protocol import Protocol

    open_per_peer = metrics.address_holding("http_connections")
    lingering = metrics.address_holding("refused_connections")
    build_protocol = http_protocol.HTTPFactory.buildProtocol

    class Refused(Protocol):
        """A connection over its peer's count: answered, then closed."""

        def __init__(self, key: str) -> None:
            self.key = key
            lingering[key] += 1

        def connectionMade(self) -> None:  # Twisted's name
            _answer_and_linger(self.transport, TOO_MANY_CONNECTIONS)

        def connectionLost(self, reason: Any = None) -> None:  # Twisted's name
            _uncount(lingering, self.key, 1)

    def build_counted(factory: Any, addr: Any) -> Any:
        host = getattr(addr, "host", None)
        key = address_block(host) if host else None
        if key is not None and open_per_peer[key] >= limit:
            REFUSED_HTTP_CONNECTIONS.inc()
            # None: Twisted closes the socket at once.
            return Refused(key) if lingering[key] < MAX_INCOMPLETE_HEADS_PER_PEER else None
        protocol = build_protocol(factory, addr)
        if protocol is None or key is None:
            return protocol
        open_per_peer[key] += 1
        counted = [True]

        def uncount() -> None:
            if counted[0]:
                counted[0] = False
                _uncount(open_per_peer, key, 1)

        # Twisted tells the HTTP channel of its socket's close, unless the socket was
        # handed to a WebSocket: each request says whether it did.
        connection_lost = protocol.connectionLost

        def counted_connection_lost(reason: Any) -> None:
            uncount()
            connection_lost(reason)

        protocol.connectionLost = counted_connection_lost
        make_request = protocol.requestFactory
        protocol.requestFactory = lambda channel, queued: _uncounted_if_upgraded(
            make_request(channel, queued), uncount
        )
        return protocol

    http_protocol.HTTPFactory.buildProtocol = build_counted


def _uncounted_if_upgraded(request: Any, uncount: Callable[[], None]) -> Any:
    """``request`` (daphne's), calling ``uncount`` if it hands its socket to a WebSocket
    (daphne's ``process`` does, and takes the request's transport away)."""
    kind = type(request)

    def process() -> None:
        del request.process  # no reference cycle left behind
        kind.process(request)
        if request.transport is None:
            uncount()

    request.process = process
    return request


# ----- unsent response bytes per peer (daphne and uvicorn) ------------------------------

# Neither server bounds what a response that its client does not read leaves on the
# node: daphne (Twisted) takes every byte of it into the transport's buffer at once;
# uvicorn's send waits while the transport's buffer is over its high-water mark, and
# Django sends a body 64 KiB at a time, so the rest of the response waits in the
# application instead, its request never done. Measured, 60 connections from one
# address each asking for a 3.8 MB history page and reading nothing (their receive
# buffers 4 KiB, as a far client's window fills): the node's RSS rose ~350 MB under
# daphne and ~490 MB under uvicorn, every socket still open 12 s later; uvicorn would
# have held them for good (its keep-alive timeout starts only once a response is
# written whole), daphne until Twisted's idle timeout (60 s, then 15 s to abort). (Over
# loopback with the default buffers the kernel took most of each page, uvicorn wrote
# the rest, and its keep-alive timeout closed the sockets 5 s later; daphne kept them.)
# So one client address (IPv6: its /64) may have this many bytes of responses unsent
# on a node, across its HTTP connections (SSE streams too): eight full history pages,
# or twice its history budget's burst; the write that would pass it drops its
# connection, as a WebSocket past its send queue is. A connection counts from when
# the server's buffer passes its high-water mark (64 KiB) until it has drained
# (about as long as the client takes to read it): what the buffer holds, and under
# uvicorn the response's bytes not yet written (of its Content-Length).
MAX_UNSENT_RESPONSE_BYTES_PER_PEER = 32 * 1024 * 1024
DROPPED_UNSENT_RESPONSES = metrics.CONNECTIONS_REFUSED.labels("response_bytes")


class _UnsentResponse:
    """One HTTP connection's unsent response bytes, as its peer's count in ``held``
    has them: its buffer's size when last seen past the high-water mark, until it has
    drained."""

    __slots__ = ("counted", "held", "key")

    def __init__(self, held: _HeldBytes, key: str) -> None:
        self.held = held
        self.key = key
        self.counted = 0

    def grew_to(self, unsent: int) -> bool:
        """The connection holds ``unsent`` bytes: False once its peer holds too many,
        and the connection must be dropped."""
        more = unsent - self.counted
        if more <= 0:
            return True
        self.counted = unsent
        return self.held.take(self.key, more)

    def drained(self) -> None:
        if self.counted:
            self.held.give_back(self.key, self.counted)
            self.counted = 0


def _twisted_unsent(transport: Any) -> int:
    """The bytes a Twisted TCP transport has buffered and not yet written."""
    return (
        len(transport.dataBuffer)
        - getattr(transport, "offset", 0)
        + getattr(transport, "_tempDataLen", 0)
    )


def bound_daphne_unsent_responses(limit: int) -> None:
    """Make daphne drop an HTTP connection whose write would take the unsent bytes of
    its peer's responses past ``limit`` (0: no such bound), as
    ``bounded_head_httptools_protocol`` does under uvicorn. Twisted tells the HTTP
    channel (its transport's producer) after every write that leaves more than 64 KiB
    buffered, and again once the buffer is empty; a connection handed to a WebSocket
    is not counted (its send queue bounds it). A TLS transport (a wrapper without its
    own buffer) is not counted either: runnode listens on plain TCP. Called before
    daphne's server starts."""
    if not limit:
        return
    from daphne import http_protocol

    held = _HeldBytes(limit, "unsent_response_bytes")
    build_protocol = http_protocol.HTTPFactory.buildProtocol

    def build_bounded(factory: Any, addr: Any) -> Any:
        protocol = build_protocol(factory, addr)
        host = getattr(addr, "host", None)
        # Twisted's HTTP channel, behind the protocol that would switch it to HTTP/2;
        # none for a connection another bound refused.
        channel = getattr(protocol, "_channel", None)
        if channel is not None and host:
            _count_unsent(protocol, channel, _UnsentResponse(held, address_block(host)))
        return protocol

    http_protocol.HTTPFactory.buildProtocol = build_bounded


def _count_unsent(protocol: Any, channel: Any, unsent: _UnsentResponse) -> None:
    """Count what the transport of ``protocol`` (Twisted's, around its HTTP
    ``channel``) holds in ``unsent``, dropping the connection once its peer holds too
    much. The methods they had, their own or what other bounds wrapped them in, are
    called on after."""
    pause, resume = channel.pauseProducing, channel.resumeProducing
    connection_lost = protocol.connectionLost
    dropped = False

    def paused() -> None:
        nonlocal dropped
        transport = channel.transport
        if dropped:
            return  # an aborted transport takes writes until it is gone: not counted
        # (A WebSocket's writes come here too: the channel stays its transport's
        # producer after the upgrade.)
        if getattr(transport, "protocol", None) is protocol and hasattr(transport, "dataBuffer"):
            if not unsent.grew_to(_twisted_unsent(transport)):
                DROPPED_UNSENT_RESPONSES.inc()
                dropped = True
                unsent.drained()
                transport.abortConnection()  # its buffer dropped, not flushed first
                return
        else:
            unsent.drained()
        pause()

    def resumed() -> None:
        unsent.drained()
        resume()

    def lost(reason: Any) -> None:
        unsent.drained()
        connection_lost(reason)

    channel.pauseProducing = paused
    channel.resumeProducing = resumed
    protocol.connectionLost = lost


# ----- whole responses (uvicorn) -------------------------------------------------------

# The ASGI extension (``scope["extensions"]``) under which the bounded httptools protocol
# offers ``write_whole_response`` to the application, as ``{"write": ...}``.
WHOLE_RESPONSE_EXTENSION = "push.http.response.whole"
_CONNECTION_CLOSE = b"connection: close\r\n"
# Headers whose value changes what uvicorn's send does besides writing them.
_HEADERS_SEND_READS = frozenset({b"content-length", b"transfer-encoding", b"connection"})

Headers = Sequence[tuple[bytes, bytes]]


def write_whole_response(
    send: Any, status: int, before_length: Headers, after_length: Headers, body: bytes
) -> bool:
    """Send a whole response in one write of the socket under uvicorn's httptools
    protocol: byte for byte what its ``send`` writes for ``http.response.start`` with
    the headers ``before_length``, a ``Content-Length`` of ``len(body)``, the headers
    ``after_length``, then ``http.response.body``; and the state it leaves.

    False, with nothing done, under another server, at untested versions, or whenever
    uvicorn's ``send`` would do more than write: the response already begun or the
    client gone, writes paused (it waits), its access log on (it logs a line), a HEAD
    request, a header it refuses (it raises) or reads (``Connection``...). The caller
    then sends the response through ``send``.

    The two headers sequences are the caller's own, sent again and again: their lines
    are made once, by identity (a sequence must not change once passed here).

    Measured (a REST publish's answer, 11 headers, on a fake transport): uvicorn's two
    ``send`` calls cost ~14 us of CPU, checking every header against two patterns each
    time, and write the socket twice; this costs ~2.6 us and writes once (a system call
    less, and one packet)."""
    cycle = getattr(send, "__self__", None)
    if cycle is None or type(cycle) is not _uvicorn_cycle_class():
        return False
    if (
        cycle.response_started
        or cycle.disconnected
        or cycle.access_log
        or cycle.flow.write_paused
        or cycle.scope["method"] == "HEAD"
    ):
        return False
    status_line = _STATUS_LINES.get(status)
    defaults = _default_header_lines(cycle.default_headers)
    before = _header_lines(before_length)
    after = _header_lines(after_length)
    if status_line is None or defaults is None or before is None or after is None:
        return False
    # What send() sets on its way (a Content-Length, then all of the body written).
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.chunked_encoding = False
    cycle.expected_content_length = 0
    close = not cycle.keep_alive
    cycle.transport.write(
        b"%s%s%scontent-length: %d\r\n%s%s\r\n%s"
        % (
            status_line,
            defaults,
            before,
            len(body),
            after,
            _CONNECTION_CLOSE if close else b"",
            body,
        )
    )
    cycle.response_complete = True
    cycle.message_event.set()
    if close:
        cycle.transport.close()
    cycle.on_response()
    return True


# uvicorn's status lines, by code (100 to 599), once its protocol is known.
_STATUS_LINES: dict[int, bytes] = {}


@functools.cache
def _uvicorn_cycle_class() -> type | None:
    """uvicorn's ``RequestResponseCycle`` if this process writes whole responses for
    it (uvicorn and httptools at the tested versions), else None; decided once."""
    untested = {
        p: v for p in ("uvicorn", "httptools") if (v := installed_version(p)) != TESTED_VERSIONS[p]
    }
    if untested:
        logger.warning("whole responses go through uvicorn's send: %s not as tested", untested)
        return None
    from uvicorn.protocols.http import httptools_impl

    _STATUS_LINES.update(httptools_impl.STATUS_LINE)
    return httptools_impl.RequestResponseCycle


def response_header_lines(headers: Headers) -> bytes | None:
    """``headers`` as uvicorn's ``send`` writes them (``name: value`` lines, the name
    lower-cased), or None when it would refuse one (it raises: only through it does
    the application see that) or read one (``_HEADERS_SEND_READS``)."""
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    lines = []
    for name, value in headers:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            return None
        lowered = name.lower()
        if lowered in _HEADERS_SEND_READS:
            return None
        lines.append(b"%s: %s\r\n" % (lowered, value))
    return b"".join(lines)


# Lines of the callers' header sequences, by identity (each kept, so its id stays its
# own); a handful in a process, forgotten all at once past this many.
MAX_KEPT_HEADER_LINES = 64
_lines_by_id: dict[int, tuple[Headers, bytes | None]] = {}


def _header_lines(headers: Headers) -> bytes | None:
    kept = _lines_by_id.get(id(headers))
    if kept is not None and kept[0] is headers:
        return kept[1]
    if len(_lines_by_id) >= MAX_KEPT_HEADER_LINES:
        _lines_by_id.clear()
    lines = response_header_lines(headers)
    _lines_by_id[id(headers)] = (headers, lines)
    return lines


# The server's default headers (date, server) as lines, for the list last seen: uvicorn
# makes a new list when the date changes, once a second.
_defaults_seen: tuple[Headers, bytes | None] | None = None


def _default_header_lines(headers: Headers) -> bytes | None:
    global _defaults_seen
    seen = _defaults_seen
    if seen is not None and seen[0] is headers:
        return seen[1]
    # Its server and date headers are the server's: uvicorn's send reads none of them.
    lines = response_header_lines(headers)
    _defaults_seen = (headers, lines)
    return lines


# ----- request heads (uvicorn) ---------------------------------------------------------

# uvicorn's httptools protocol reads a request's line and headers without a bound, before
# the application (and so any limit of ours) sees the request: measured, 60 MB of short
# header lines on one connection raised the node's RSS by ~800 MB and cost 3 s of CPU,
# and neither a URL nor a header value of 60 MB was refused. Twisted (daphne) refuses a
# line over 16 KiB and a head of over 500 headers; nginx in front allows 32 KiB (four
# buffers of 8 KiB). Twice that here, and gunicorn's 100 fields.
MAX_REQUEST_HEAD_BYTES = 65_536
MAX_REQUEST_HEADERS = 100
# The bytes a request may carry in each of the WebSocket handshake's negotiation headers
# (its lines together, names included, when sent more than once): a browser sends a
# line of some 70 bytes of extensions, a client a few subprotocols. Both servers'
# WebSocket libraries parse them as lists before the application can refuse anything,
# for every handshake, however fast an address makes them (a refusal of its handshake
# budget comes after): measured, 7 KB of commas as subprotocols cost uvicorn's
# websockets 2.3 ms of CPU per handshake, and 7 KB of semicolons as extensions daphne's
# autobahn 3.3 ms, against 0.4 and 0.7 ms for a plain handshake. Past it, uvicorn
# answers 431 and daphne's Twisted its own 400.
MAX_WEBSOCKET_NEGOTIATION_BYTES = 1024
_NEGOTIATION_HEADERS = (b"sec-websocket-protocol", b"sec-websocket-extensions")
# A request whose Content-Type is longer is refused (415) before Django parses it
# (``realtime_project.asgi``): Django parses a request's type and parameters when it makes
# the request, and DRF again when it picks a parser, at about 3 us a parameter (measured
# under uvicorn, 60 KB of "; a=b": 52 ms of CPU per anonymous request). A multipart
# boundary has at most 70 characters (RFC 2046).
MAX_CONTENT_TYPE_BYTES = 1024
# Bounding each head is not enough: it has no deadline either, and the budgets of an
# address are kept by the application, after the head. Measured, 1,500 connections
# from one host each holding 60 KiB of an unfinished head held ~93 MB of the node for
# as long as they liked. So a head must be done within ``PUSH_REQUEST_HEAD_DEADLINE_SECS``
# (nginx's client_header_timeout is 60 s; a head is one packet for any real client),
# and one client address (IPv6: its /64) may have this many unfinished at once: 256 of
# 64 KiB is 16 MiB, and a busy NAT has a handful. The same count and deadline hold
# under daphne (``bound_daphne_request_heads``).
MAX_INCOMPLETE_HEADS_PER_PEER = 256
# A new connection closed at once for its address's unfinished heads, and a connection
# dropped for a head not done by its deadline.
REFUSED_UNFINISHED_HEADS = metrics.CONNECTIONS_REFUSED.labels("unfinished_heads")
DROPPED_SLOW_HEADS = metrics.CONNECTIONS_REFUSED.labels("head_deadline")
# Nor has a request's body a bound in time: measured, a REST publish whose body stopped
# after its first bytes was held (its connection, and the body read so far, up to 1 MiB
# in the fast path's hands or Django's) for as long as the client kept the socket, on
# either path, where daphne (Twisted) drops a connection idle for 60 s. Here a body
# that has not come on for this long is dropped: nginx's client_body_timeout (60 s),
# counted from the last read, so a slow client that keeps sending is never cut short.
REQUEST_BODY_IDLE_SECS = 60.0
# Nor is a body that keeps coming, a byte a minute, ever idle that long: each such
# connection holds what it sent so far (up to DATA_UPLOAD_MAX_MEMORY_SIZE, 2 MiB), and a
# thousand from one address held 2 GB. So one client address (IPv6: its /64) may have
# this many bytes of unfinished bodies at once, as many as its unfinished heads may
# hold; the read that would pass it drops its connection. A body that comes whole in
# the read of its head is never counted, and a back-end's bodies finish in
# milliseconds: eight 2 MiB batches uploading at once from one host stay within it.
MAX_UNFINISHED_BODY_BYTES_PER_PEER = 16 * 1024 * 1024
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
    b"content-length: 33\r\nconnection: close\r\n\r\nrequest line or headers too large"
)
# Nor had a client address a bound on its open HTTP connections: measured, one address
# held 1,500 keep-alive connections under uvicorn with a request to /health each every
# few seconds (uvicorn closes one idle for 5 s; daphne for 60 s), each a file of the
# node's, which only the server's count of every socket (open_files) bounded. Past
# ``PUSH_MAX_HTTP_CONNECTIONS_PER_IP`` a new connection is answered this, as an SSE
# stream over its address's connections is, and closed.
TOO_MANY_CONNECTIONS_MESSAGE = "too many open HTTP connections from this address; close some"


TOO_MANY_CONNECTIONS = closing_json_answer(
    "429 Too Many Requests",
    json.dumps(error(code=ErrorCode.RATE_LIMITED, message=TOO_MANY_CONNECTIONS_MESSAGE)).encode(),
    retry_after_secs=1,
)
REFUSED_HTTP_CONNECTIONS = metrics.CONNECTIONS_REFUSED.labels("http_address")


def bounded_head_httptools_protocol(
    *,
    max_bytes: int = MAX_REQUEST_HEAD_BYTES,
    max_headers: int = MAX_REQUEST_HEADERS,
    deadline_secs: float,
    max_incomplete_per_peer: int = MAX_INCOMPLETE_HEADS_PER_PEER,
    body_idle_secs: float = REQUEST_BODY_IDLE_SECS,
    max_unfinished_body_bytes_per_peer: int = MAX_UNFINISHED_BODY_BYTES_PER_PEER,
    max_open_connections: int = 0,
    max_connections_per_peer: int = 0,
    max_unsent_response_bytes_per_peer: int = 0,
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol (``uvicorn.Config(http=...)``) answering 431 and
    closing once a request's line and headers pass ``max_bytes`` bytes or
    ``max_headers`` fields, before the application is called; closing a connection
    whose head is not done ``deadline_secs`` after it began; and closing at once a new
    connection from a socket peer (IPv6: its /64) that has ``max_incomplete_per_peer``
    heads unfinished (0: no such bound; pass 0 behind a proxy, whose address every
    connection has); closing a connection whose request body has not come on for
    ``body_idle_secs`` while the server was reading (the application then reads
    ``http.disconnect``); and closing one whose read would take its peer's bytes of
    unfinished bodies past ``max_unfinished_body_bytes_per_peer`` (0: no such bound;
    0 behind a proxy, which reads the bodies itself). A WebSocket upgrade hands the
    connection to the WebSocket protocol after its head, so frames are never counted
    here. And closing at once a new connection while the server holds
    ``max_open_connections`` (0: no such bound), WebSockets and HTTP alike: the node's
    own limit (``PUSH_MAX_CONNECTIONS``) counts its clients' long-lived connections,
    but idle keep-alive connections, and heads still coming, each hold a file too, and
    a node out of files can open no database or Redis connection. And answering 429
    ``RATE_LIMITED`` (``Connection: close``) to a new connection, before its request,
    from a peer (IPv6: its /64) that has ``max_connections_per_peer`` HTTP connections
    open (0: no such bound; 0 behind a proxy), idle or not, and closing it
    ``LINGER_SECS`` later: a connection counts from its accept until it closes or
    becomes a WebSocket, which the application's own limits count instead. And
    dropping a connection whose response would take the unsent bytes of its peer's
    responses past ``max_unsent_response_bytes_per_peer`` (0: no such bound; 0 behind a
    proxy, which reads the responses itself), counted from when the transport's buffer
    passes its high-water mark until it is below its low one again."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    incomplete = metrics.address_holding("unfinished_heads")
    # Peer -> the bytes read of its requests' bodies not yet whole.
    unfinished_body_bytes = metrics.address_holding("unfinished_body_bytes")
    # Peer -> its open HTTP connections (not yet upgraded).
    open_per_peer = metrics.address_holding("http_connections")
    # Peer -> the bytes of its responses the transports hold unsent.
    unsent_held = _HeldBytes(max_unsent_response_bytes_per_peer, "unsent_response_bytes")
    per_peer = bool(
        max_incomplete_per_peer
        or max_unfinished_body_bytes_per_peer
        or max_connections_per_peer
        or max_unsent_response_bytes_per_peer
    )
    # uvicorn's own handlers of what arrives, called for every request: through these
    # rather than super(), which makes a proxy object each time. Measured on a fake
    # transport, a REST request cost 2.2-3.7 us more in this class than in uvicorn's
    # own; 1.5-1.8 us so (with the head's start and end inline below).
    base_data_received = HttpToolsProtocol.data_received
    base_on_header = HttpToolsProtocol.on_header
    base_on_headers_complete = HttpToolsProtocol.on_headers_complete
    base_on_message_complete = HttpToolsProtocol.on_message_complete
    # Offered to the application in each request's scope (one dict for all: nothing
    # writes to it), where whole responses can be written.
    extensions: dict[str, dict[object, object]] | None = (
        {WHOLE_RESPONSE_EXTENSION: {"write": write_whole_response}}
        if _uvicorn_cycle_class() is not None
        else None
    )

    class BoundedHeadHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0
        _head_fields = 0
        _in_head = False
        # Whether the head being read has its deadline and counts in ``incomplete``:
        # only once it spans more than one read (see ``data_received``).
        _head_armed = False
        _head_refused = False
        # Whether this connection counts in ``open_per_peer``, or was refused for it.
        _counted_open = False
        _refused_open = False
        _between_requests = False
        _head_deadline: asyncio.TimerHandle | None = None
        # The key this connection counts under in ``incomplete`` while its head is read.
        _peer_key: str | None = None
        _access_handlers = False
        # A request's head is read and its body not yet whole; the body's timer (armed
        # only once a read leaves it unfinished) and when a read last brought some.
        _in_body = False
        _body_timer: asyncio.TimerHandle | None = None
        _body_read_at = 0.0
        # What this connection's unfinished body counts in ``unfinished_body_bytes``.
        _body_held = 0
        # What its responses left unsent count in ``unsent_held`` (None: not counted).
        _unsent: _UnsentResponse | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature
            super().connection_made(transport)
            # (uvicorn's set of the server's connections holds this one now.)
            if max_open_connections and len(self.connections) > max_open_connections:
                metrics.CONNECTIONS_REFUSED.labels("open_files").inc()
                transport.close()
                return
            self._access_handlers = self.access_log  # whether uvicorn would log
            peer = self.client[0] if self.client else None
            if per_peer and peer:
                key = address_block(peer)
                if max_incomplete_per_peer and incomplete[key] >= max_incomplete_per_peer:
                    REFUSED_UNFINISHED_HEADS.inc()
                    transport.close()
                    return
                self._peer_key = key
                if max_unsent_response_bytes_per_peer:
                    self._unsent = _UnsentResponse(unsent_held, key)
            # Nothing read yet: the first head is bounded in time and counted from now.
            self._head_begins()
            self._arm_head()
            if max_connections_per_peer and self._peer_key is not None:
                self._count_open(self._peer_key)

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_ends()
            self._body_ends()
            self._uncount_open()
            if self._unsent is not None:
                self._unsent.drained()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self) -> None:
            self._uncount_open()
            if self._unsent is not None:
                self._unsent.drained()  # its send queue bounds a WebSocket
                self._unsent = None
            super().handle_websocket_upgrade()
            _answer_unparsed_handshake(self.transport)

        def pause_writing(self) -> None:
            # Called in the write that passed the high-water mark; uvicorn's send
            # waits for resume_writing before it writes again, and Django's sends a
            # body 64 KiB at a time: the rest of the response (its Content-Length
            # not yet written) waits in the application meanwhile, and counts too.
            unsent = self._unsent
            if unsent is not None and not unsent.grew_to(
                self.transport.get_write_buffer_size() + self._response_unwritten()
            ):
                DROPPED_UNSENT_RESPONSES.inc()
                unsent.drained()
                self.transport.abort()  # its buffer dropped, not flushed first
            # Paused when dropped too: the application's send then waits until uvicorn
            # hears of the close (and returns without writing), instead of writing to
            # the closed transport.
            super().pause_writing()

        def resume_writing(self) -> None:
            if self._unsent is not None:
                self._unsent.drained()
            super().resume_writing()

        def _response_unwritten(self) -> int:
            """The bytes of the response's declared length not yet written (0 for a
            chunked one, or none begun)."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return 0
            return int(cycle.expected_content_length)

        def _count_open(self, key: str) -> None:
            """Count this new connection under its peer, or refuse it when the peer has
            its most: answered at once and closed ``LINGER_SECS`` later (closed at once,
            its request might arrive after and reset the connection, and the client
            lose the answer). Until then it counts as an unfinished head, which bounds
            how many one peer has lingering."""
            if open_per_peer[key] < max_connections_per_peer:
                open_per_peer[key] += 1
                self._counted_open = True
                return
            REFUSED_HTTP_CONNECTIONS.inc()
            self._refused_open = True
            self.transport.write(TOO_MANY_CONNECTIONS)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECS, self.transport.close)

        def _uncount_open(self) -> None:
            if self._counted_open:
                self._counted_open = False
                assert self._peer_key is not None
                _uncount(open_per_peer, self._peer_key, 1)

        def data_received(self, data: bytes) -> None:
            if self._refused_open:
                return  # answered already: dropped unparsed, the application not called
            if self._between_requests:
                self._between_requests = False
                if not self._in_head:  # _head_begins, inline: every request's first read
                    self._in_head = True
                    self._head_bytes = 0
                    self._head_fields = 0
            if not self._in_head:
                base_data_received(self, data)
                if self._in_body:
                    self._body_comes(len(data))
                return
            # Counted whole, then judged once parsed: a chunk that ends the head may
            # carry a body (a REST publish of 1 MiB), which is no part of it. So a head
            # may pass the bound by one read (uvloop's are at most 256 KB).
            self._head_bytes += len(data)
            base_data_received(self, data)
            if self._in_head:
                if self._head_bytes > max_bytes:
                    self._refuse(_HEAD_TOO_LARGE)
                else:
                    # A keep-alive request's head nearly always comes whole in one
                    # read: only one that does not gets a deadline and is counted
                    # (from its first read, microseconds ago), which spares the
                    # others a timer each (measured: ~1.5 us of CPU per request).
                    self._arm_head()
            elif self._in_body:  # the head came whole, the body not (yet)
                # (All of the read counted: its head's part, at most one head's bound.)
                self._body_comes(len(data))

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_fields += 1
            if self._head_fields > max_headers:
                # Raised in the parser's callback, the parser stops and uvicorn answers
                # through send_400_response, which says why instead.
                self._head_refused = True
                raise _HeadTooLarge
            base_on_header(self, name, value)  # kept in ``self.headers``, name lowered
            lowered = self.headers[-1][0]
            if name[:14].lower() == b"sec-websocket-" and _negotiation_too_long(
                lowered, (value for key, value in self.headers if key == lowered)
            ):
                self._head_refused = True  # as above
                raise _HeadTooLarge

        def send_400_response(self, msg: str) -> None:
            if self._head_refused:
                self._refuse(_HEAD_TOO_LARGE)
            else:
                super().send_400_response(msg)

        def on_headers_complete(self) -> None:
            if self._head_armed:
                self._head_ends()
            else:
                self._in_head = False  # all _head_ends does then
            # uvicorn makes each request's access line (~1.1 us: the client's address,
            # the quoted path) whenever its logger has a handler, as under Django's
            # LOGGING, and Logger.info then drops it below INFO: asked here first, as
            # Logger.info would, for this request's response.
            self.access_log = self._access_handlers and self.access_logger.isEnabledFor(
                logging.INFO
            )
            if extensions is not None:
                self.scope["extensions"] = extensions
            self._in_body = True  # until on_message_complete, in this read or a later one
            base_on_headers_complete(self)

        def on_message_complete(self) -> None:
            if self._body_timer is not None or self._body_held:
                self._body_ends()
            else:
                self._in_body = False  # all _body_ends does then
            base_on_message_complete(self)
            # The next request on this connection (keep-alive) has a head of its own,
            # from its first byte: until then the connection is idle, which uvicorn's
            # keep-alive timeout bounds.
            if not self.transport.is_closing() and not self.parser.should_upgrade():
                self._between_requests = True

        def _head_begins(self) -> None:
            if self._in_head:
                return
            self._in_head = True
            self._head_bytes = 0
            self._head_fields = 0

        def _arm_head(self) -> None:
            if self._head_armed or not self._in_head:
                return
            self._head_armed = True
            self._head_deadline = self.loop.call_later(deadline_secs, self._head_too_slow)
            if self._peer_key is not None and max_incomplete_per_peer:
                incomplete[self._peer_key] += 1

        def _head_ends(self) -> None:
            if not self._in_head:
                return
            self._in_head = False
            if not self._head_armed:
                return
            self._head_armed = False
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            if self._peer_key is not None and max_incomplete_per_peer:
                _uncount(incomplete, self._peer_key, 1)

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            self._head_ends()
            if self.transport.get_protocol() is not self:  # upgraded to a WebSocket
                return
            # An idle keep-alive connection is uvicorn's to close (sooner); one in the
            # middle of a head is dropped without an answer, as nginx does.
            DROPPED_SLOW_HEADS.inc()
            self.transport.close()

        def _body_comes(self, nbytes: int) -> None:
            """A read of ``nbytes`` that leaves the body unfinished: its idle time starts
            again, and its bytes count against the peer's budget."""
            self._body_read_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(body_idle_secs, self._body_too_slow)
            key = self._peer_key
            if key is None or not max_unfinished_body_bytes_per_peer:
                return
            self._body_held += nbytes
            unfinished_body_bytes[key] += nbytes
            if unfinished_body_bytes[key] > max_unfinished_body_bytes_per_peer:
                # Dropped without an answer, as a body too slow is.
                self._body_ends()
                self.transport.close()

        def _body_ends(self) -> None:
            self._in_body = False
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            if self._body_held:
                assert self._peer_key is not None
                _uncount(unfinished_body_bytes, self._peer_key, self._body_held)
                self._body_held = 0

        def _body_too_slow(self) -> None:
            self._body_timer = None
            if not self._in_body or self.transport.get_protocol() is not self:
                self._body_ends()  # (an upgraded connection's count, if any, too)
                return
            now = self.loop.time()
            # Not the client's wait: uvicorn stopped reading (a pipelined request, or a
            # body the application has not taken yet), or the client waits for the
            # "100 Continue" the application has not asked for yet.
            if self.flow.read_paused or self.cycle.waiting_for_100_continue:
                self._body_read_at = now
            idle = now - self._body_read_at
            if idle < body_idle_secs:
                self._body_timer = self.loop.call_later(body_idle_secs - idle, self._body_too_slow)
                return
            # Dropped without an answer, as a head too slow is: the application may
            # have begun one.
            self._body_ends()
            self.transport.close()

        def _refuse(self, answer: bytes) -> None:
            self._head_ends()  # nothing more is counted, nor answered twice
            if not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return BoundedHeadHttpToolsProtocol


def _answer_unparsed_handshake(transport: asyncio.Transport) -> None:
    """Send the refusal websockets made of a WebSocket handshake it could not parse, and
    close. httptools reads a longer head than websockets does (8 KiB a line, 128
    headers), so a handshake with a URL or a header past those got websockets' 414 or
    431, which uvicorn's websockets-sansio protocol never sent: measured, such a
    connection stayed open unanswered for good, and one address held 600 of them (a file
    of the node's each, past its address's connection bound, which ends at the upgrade).
    """
    conn = getattr(transport.get_protocol(), "conn", None)
    if getattr(conn, "handshake_exc", None) is None or transport.is_closing():
        return
    transport.write(b"".join(conn.data_to_send()))  # type: ignore[union-attr]  # has handshake_exc
    transport.close()


def _uncount(counter: collections.Counter[str], key: str, amount: int) -> None:
    """Take ``amount`` off ``key``'s count, and the key away at zero (a counter of every
    address ever seen would grow without bound)."""
    counter[key] -= amount
    if counter[key] <= 0:
        del counter[key]


class _HeadTooLarge(Exception):
    """Raised when a request's head has more header fields than allowed."""


# ----- request heads (daphne) ----------------------------------------------------------

# Twisted (daphne) bounds a head itself, to 16 KiB of whole lines, a line being read of
# up to 16 KiB more, and 500 headers, but neither in time nor in number: its 60 s idle
# timeout starts again with every byte (measured, a head trickled a byte every 5 s was
# still open after 100 s), and only an address's open HTTP connections (1,000) bounded
# how many it had. Measured, 1,000 heads of 500 headers each from one address grew the
# node by ~90 MB (256 of them by ~22 MB, about what uvicorn's 256 of 64 KiB may hold):
# the count bounds their bytes too.


def bound_daphne_request_heads(*, deadline_secs: float, max_incomplete_per_peer: int) -> None:
    """Make daphne close a connection whose request head (line and headers) is not done
    ``deadline_secs`` after it began, and close at once a new connection from a peer
    (IPv6: its /64) that has ``max_incomplete_per_peer`` heads unfinished (0: no such
    bound; 0 behind a proxy, whose address every connection has), as
    ``bounded_head_httptools_protocol`` does under uvicorn. A connection's first head
    begins at its accept, a later one (kept alive) at its first byte; a head that
    arrives whole in one read is neither timed nor counted. Called before daphne's
    server starts, after the other bounds: a connection it refuses is never built."""
    from daphne import http_protocol

    incomplete = metrics.address_holding("unfinished_heads")
    build_protocol = http_protocol.HTTPFactory.buildProtocol

    def build_bounded(factory: Any, addr: Any) -> Any:
        host = getattr(addr, "host", None)
        key = address_block(host) if host and max_incomplete_per_peer else None
        if key is not None and incomplete[key] >= max_incomplete_per_peer:
            REFUSED_UNFINISHED_HEADS.inc()
            return None  # Twisted closes the socket at once
        protocol = build_protocol(factory, addr)
        # Twisted's HTTP channel, behind the protocol that would switch it to HTTP/2;
        # none for a connection another bound refused.
        channel = getattr(protocol, "_channel", None)
        if channel is not None:
            _DaphneHeads(protocol, channel, deadline_secs, incomplete, key).first_head()
        return protocol

    http_protocol.HTTPFactory.buildProtocol = build_bounded


class _DaphneHeads:
    """The request heads of one daphne connection (Twisted's ``protocol`` around its
    HTTP ``channel``): when each begins and ends, its deadline, and its count under
    ``key`` in ``incomplete`` (None: not counted). The channel's methods are wrapped
    on the instance, and unwrapped when the connection is lost."""

    __slots__ = (
        "armed",
        "channel",
        "deadline_secs",
        "in_head",
        "incomplete",
        "key",
        "protocol",
        "timer",
    )

    def __init__(
        self,
        protocol: Any,
        channel: Any,
        deadline_secs: float,
        incomplete: collections.Counter[str],
        key: str | None,
    ) -> None:
        self.protocol = protocol
        self.channel = channel
        self.deadline_secs = deadline_secs
        self.incomplete = incomplete
        self.key = key
        self.in_head = False
        self.armed = False
        self.timer: Any = None

    def first_head(self) -> None:
        """Nothing read yet: the first head is timed and counted from the accept."""
        self.in_head = True
        self.arm()
        channel, protocol = self.channel, self.protocol
        data_received = channel.dataReceived
        all_headers_received = channel.allHeadersReceived
        connection_lost = protocol.connectionLost

        def received(data: bytes) -> None:
            # Line mode and no head: the next request's first bytes (read now, or
            # kept while the last request was handled and passed on when it is done).
            if self.in_head or not channel.line_mode:
                data_received(data)
                return
            self.in_head = True
            data_received(data)
            # A kept-alive request's head nearly always comes whole in one read: only
            # one that does not is timed and counted (from its first read, just now).
            if self.in_head:
                self.arm()

        def headers_received() -> None:
            self.head_ends()
            all_headers_received()

        def lost(reason: Any) -> None:
            self.head_ends()
            for name in ("dataReceived", "allHeadersReceived", "headerReceived"):
                vars(channel).pop(name, None)  # no reference cycle left behind
            connection_lost(reason)

        header_received = channel.headerReceived

        def header_checked(line: bytes) -> bool:
            if not header_received(line):
                return False
            if line[:14].lower() == b"sec-websocket-" and _negotiation_too_long(
                name := line.split(b":", 1)[0].strip().lower(),
                channel.requests[-1].requestHeaders.getRawHeaders(name) or (),
            ):
                # Twisted's own answer to a head past its bounds; it reads no further.
                channel._respondToBadRequestAndDisconnect()
                return False
            return True

        channel.dataReceived = received
        channel.allHeadersReceived = headers_received
        channel.headerReceived = header_checked
        protocol.connectionLost = lost

    def arm(self) -> None:
        self.armed = True
        self.timer = self.channel.callLater(self.deadline_secs, self.too_slow)
        if self.key is not None:
            self.incomplete[self.key] += 1

    def head_ends(self) -> None:
        self.in_head = False
        if not self.armed:
            return
        self.armed = False
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        if self.key is not None:
            _uncount(self.incomplete, self.key, 1)

    def too_slow(self) -> None:
        self.timer = None
        self.head_ends()
        if self.protocol._channel is not self.channel:  # switched to HTTP/2
            return
        # Dropped without an answer, as under uvicorn: Twisted's own close of a client
        # idle too long (the socket aborted if it is not gone 15 s later).
        DROPPED_SLOW_HEADS.inc()
        self.channel.timeoutConnection()


def _negotiation_too_long(name: bytes, values: Iterable[bytes]) -> bool:
    """Whether the lines of the negotiation header ``name`` (lowercase; any other is
    never too long) with these ``values`` take more than
    ``MAX_WEBSOCKET_NEGOTIATION_BYTES``. Whole lines, the name's bytes too: counted by
    their values alone, 500 one-byte lines (as many headers as daphne takes) stayed
    under it and cost a sum over all of them per line."""
    if name not in _NEGOTIATION_HEADERS:
        return False
    line_bytes = len(name) + 2  # "name: "
    return sum(line_bytes + len(value) for value in values) > MAX_WEBSOCKET_NEGOTIATION_BYTES


# ----- inbound bound (daphne) ---------------------------------------------------------


def bound_inbound(
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Any,
    *,
    max_frames: int,
    max_bytes: int,
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """``receive`` for a daphne WebSocket whose unhandled inbound frames are bounded.

    daphne puts every frame the client sends into an unbounded ``asyncio.Queue`` (its
    ``receive`` is that queue's ``get``), however long the application takes to ask
    for the next one: a client that floods frames while its request waits (a replay
    paced by a slow reader, a slow publish) would make the node hold all of them.
    Here, once ``max_frames`` frames or ``max_bytes`` bytes wait, the socket is no
    longer read (Twisted's ``pauseProducing``): TCP pushes back on the client, and
    reading resumes when half of both bounds have been handled. Nothing is dropped.

    uvicorn needs none of this: it stops reading after every frame it queues and
    reads again once the application has taken them all. Other servers: unchanged."""
    protocol = _daphne_protocol(send)
    queue = getattr(receive, "__self__", None)
    if (
        protocol is None
        or _class_name(protocol) != DAPHNE_WEBSOCKET
        or not isinstance(queue, asyncio.Queue)
    ):
        return receive
    return _BoundedInbound(protocol, queue, max_frames=max_frames, max_bytes=max_bytes).receive


class _BoundedInbound:
    __slots__ = (
        "_on_message",
        "bytes",
        "max_bytes",
        "max_frames",
        "paused",
        "protocol",
        "queue",
        "sizes",
    )

    def __init__(
        self, protocol: Any, queue: asyncio.Queue[Any], *, max_frames: int, max_bytes: int
    ) -> None:
        self.protocol = protocol
        self.queue = queue
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        # Sizes of the frames waiting in the queue, in its order.
        self.sizes: collections.deque[int] = collections.deque()
        self.bytes = 0
        self.paused = False
        # autobahn calls ``self.onMessage`` for each complete message: an instance
        # attribute wraps daphne's method for this connection only.
        self._on_message = protocol.onMessage
        protocol.onMessage = self.on_message

    def on_message(self, payload: bytes, is_binary: bool) -> None:
        queued = self.queue.qsize()
        self._on_message(payload, is_binary)
        if self.queue.qsize() == queued:  # muted (closing): daphne queued nothing
            return
        self.sizes.append(len(payload))
        self.bytes += len(payload)
        if not self.paused and (len(self.sizes) >= self.max_frames or self.bytes >= self.max_bytes):
            self.paused = True
            metrics.INBOUND_PAUSES.inc()
            self.protocol.transport.pauseProducing()

    async def receive(self) -> dict[str, Any]:
        event: dict[str, Any] = await self.queue.get()
        if event["type"] == "websocket.receive" and self.sizes:
            self.bytes -= self.sizes.popleft()
        if (
            self.paused
            and len(self.sizes) <= self.max_frames // 2
            and self.bytes <= self.max_bytes // 2
        ):
            self.paused = False
            self.protocol.transport.resumeProducing()
        return event


class _FormattedWhenWritten:
    """``pprint.pformat``'s text, made only when a log line is written."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)


def defer_autobahn_config_dump() -> None:
    """autobahn (daphne's WebSocket library) pretty-prints each new connection's settings
    for a debug line, logged or not: 13% of the node's Python time per handshake under a
    handshake flood. Its module's ``pformat`` becomes a lazy one, so the text is made
    only when debug logging is on; the log line itself is unchanged."""
    from autobahn.websocket import protocol

    protocol.pformat = _FormattedWhenWritten  # type: ignore[assignment]  # str() of it is the same text
