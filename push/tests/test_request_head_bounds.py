"""The bounds on a request's head and body under uvicorn
(``push.transport.server_adapters.bounded_head_httptools_protocol``), on an in-process
uvicorn with a plain ASGI app and small bounds: a head that is not done in time is
dropped, one address may have only so many unfinished at once, a body that stops
coming is dropped, and none of them touches a request that completes, a keep-alive
connection's next request or a WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect

from push.transport.server_adapters import bounded_head_httptools_protocol
from tests.waiting import wait_until

DEADLINE_SECS = 0.3
# Four times the pause between the writes of a body that keeps coming: a loaded machine
# that delays a write by a scheduling slice must not make it look idle.
BODY_IDLE_SECS = 0.6
PER_PEER = 3
# Three bodies of which 1,000 bytes (and a head) came fit; a fourth does not.
BODY_BYTES_PER_PEER = 4096
ANSWER_SECS = 5.0
GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# What the app read of each POST's body: its bytes, or None when the client left first.
bodies_read: list[bytes | None] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """200 "ok" for HTTP, after reading a POST's body whole (``/slow``: after a while);
    a WebSocket echoes."""
    if scope["type"] == "http":
        if scope["path"] == "/slow":
            await asyncio.sleep(BODY_IDLE_SECS * 3)
        if scope["method"] == "POST":
            body: bytes | None = b""
            while (event := await receive())["type"] == "http.request":
                body += event["body"]
                if not event.get("more_body"):
                    break
            else:
                body = None
            bodies_read.append(body)
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (event := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": event["text"]})


@contextlib.asynccontextmanager
async def _serving(**bounds: Any) -> AsyncIterator[int]:
    """An in-process uvicorn with ``bounds`` (the small ones above by default)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free,
        http=bounded_head_httptools_protocol(
            **{
                "deadline_secs": DEADLINE_SECS,
                "max_incomplete_per_peer": PER_PEER,
                "body_idle_secs": BODY_IDLE_SECS,
                "max_unfinished_body_bytes_per_peer": BODY_BYTES_PER_PEER,
                **bounds,
            }
        ),
        ws="websockets-sansio",
        lifespan="off",
        log_config=None,
        # A test that fails with a request unanswered must not hold the stop for good.
        timeout_graceful_shutdown=ANSWER_SECS,
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield free
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with _serving() as free:
        yield free


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds (unanswered)."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except (TimeoutError, ConnectionError):
        return False


async def _served(port: int) -> bool:
    reader, writer = await _open(port)
    try:
        writer.write(GET)
        answer = await asyncio.wait_for(reader.read(100), ANSWER_SECS)
        return answer.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def _served_once(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that has had one request answered."""
    reader, writer = await _open(port)
    writer.write(GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_SECS)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(reader.readexactly(2), ANSWER_SECS) == b"ok"
    return reader, writer


# The slow head is a connection's first, or a keep-alive request's after one answered
# (that one is timed and counted only once a read leaves it unfinished).
SLOW_HEAD_CONNECTIONS = pytest.mark.parametrize(
    "opened", [_open, _served_once], ids=["first-head", "later-head"]
)
Opener = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@SLOW_HEAD_CONNECTIONS
async def test_a_head_not_done_in_time_is_dropped(port: int, opened: Opener) -> None:
    reader, writer = await opened(port)
    writer.write(b"GET /?x=")
    assert not await _closed(reader, DEADLINE_SECS / 2), "dropped before its deadline"
    assert await _closed(reader, ANSWER_SECS), "a slow head was held past its deadline"
    writer.close()


@SLOW_HEAD_CONNECTIONS
async def test_one_address_may_have_only_so_many_heads_unfinished(
    port: int, opened: Opener
) -> None:
    slow = [await opened(port) for _ in range(PER_PEER)]
    for _, writer in slow:
        writer.write(b"GET /?x=")
    await asyncio.sleep(0.05)
    reader, writer = await _open(port)
    assert await _closed(reader, DEADLINE_SECS / 2), "one more unfinished head was taken"
    writer.close()
    slow[0][1].write(b"a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # one head is done
    answer = await asyncio.wait_for(slow[0][0].read(100), ANSWER_SECS)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert await _served(port), "a finished head frees its place"
    for _, other in slow:
        other.close()


async def test_keep_alive_requests_each_get_their_own_deadline(port: int) -> None:
    reader, writer = await _open(port)
    for _ in range(3):
        writer.write(GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_SECS)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(2), ANSWER_SECS) == b"ok"
        await asyncio.sleep(DEADLINE_SECS / 2)
    writer.close()
    # Nothing of these connections stays counted against the address.
    for _ in range(PER_PEER + 1):
        assert await _served(port)


async def test_a_websocket_outlives_the_deadline_of_its_head(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/") as ws:
        await asyncio.sleep(DEADLINE_SECS * 3)
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), ANSWER_SECS) == "still here"
    for _ in range(PER_PEER + 1):  # its head counts no longer
        assert await _served(port)


def _post(length: int) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % length


@contextlib.asynccontextmanager
async def _posting(
    port: int, opened: Opener = _open
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to send a POST on, closed after (the server's stop waits for an
    unanswered request); ``bodies_read`` starts empty."""
    bodies_read.clear()
    reader, writer = await opened(port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def _answered(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_SECS)
    return head + await asyncio.wait_for(reader.readexactly(2), ANSWER_SECS)


@SLOW_HEAD_CONNECTIONS
async def test_a_body_that_stops_coming_is_dropped(port: int, opened: Opener) -> None:
    # Its head was whole: no head deadline applies. Without a bound of its own, the
    # connection (and the body read so far) stayed on the node for good.
    async with _posting(port, opened) as (reader, writer):
        writer.write(_post(100) + b"x" * 10)
        assert not await _closed(reader, BODY_IDLE_SECS / 2), "dropped while its body came"
        assert await _closed(reader, ANSWER_SECS), "a body that stopped coming was held"
        assert bodies_read == [None], "the app was not told that the client is gone"


async def test_a_body_that_keeps_coming_is_read_however_long_it_takes(port: int) -> None:
    async with _posting(port) as (reader, writer):
        writer.write(_post(10))
        for _ in range(10):  # 1.5 s in all, past twice the bound, never idle that long
            await asyncio.sleep(BODY_IDLE_SECS / 4)
            writer.write(b"x")
        assert (await _answered(reader)).startswith(b"HTTP/1.1 200 ")
        assert bodies_read == [b"x" * 10]


async def test_one_address_may_hold_only_so_many_bytes_of_unfinished_bodies() -> None:
    # Each body could keep coming slowly enough never to be idle past its bound (here a
    # long one): without a count per address, a thousand such connections held 2 GB.
    bodies_read.clear()
    async with _serving(body_idle_secs=60.0, max_incomplete_per_peer=0) as port:
        slow = [await _open(port) for _ in range(4)]
        try:
            for _, writer in slow[:3]:
                writer.write(_post(2000) + b"x" * 1000)
            await asyncio.sleep(0.05)
            reader, writer = slow[3]
            writer.write(_post(2000) + b"x" * 1000)
            assert await _closed(reader, ANSWER_SECS), "a body past the address's bytes was held"
            for held, _ in slow[:3]:
                assert not await _closed(held, 0.05), "a body within the bytes was dropped"
            slow[0][1].write(b"x" * 1000)  # one body is done: its bytes count no longer
            assert (await _answered(slow[0][0])).startswith(b"HTTP/1.1 200 ")
            # The dropped one's app was told that its client left.
            assert bodies_read == [None, b"x" * 2000]
            reader, writer = slow[3] = await _open(port)
            writer.write(_post(2000) + b"x" * 1000)
            assert not await _closed(reader, 0.05), "a finished body's bytes stayed counted"
        finally:
            for _, writer in slow:
                writer.close()


async def test_a_body_the_server_is_not_reading_yet_is_not_timed(port: int) -> None:
    # Pipelined behind a slow request, the POST's body is not read (uvicorn stops
    # reading) until the slow one is answered: the client is not the one idle.
    async with _posting(port) as (reader, writer):
        writer.write(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + _post(10) + b"x" * 5)
        await asyncio.sleep(BODY_IDLE_SECS / 2)
        writer.write(b"x" * 5)
        for _ in range(2):
            assert (await _answered(reader)).startswith(b"HTTP/1.1 200 ")
        assert bodies_read == [b"x" * 10]


async def test_the_access_log_writes_what_its_level_lets_through(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The protocol skips making the access line of a request its logger would drop,
    and asks for each request: a keep-alive connection follows a change of level."""
    reader, writer = await _open(port)
    logged = []
    for level in (logging.INFO, logging.WARNING, logging.INFO):
        caplog.set_level(level, logger="uvicorn.access")
        caplog.clear()
        writer.write(GET)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), ANSWER_SECS)
        logged.append([r.getMessage() for r in caplog.records if r.name == "uvicorn.access"])
    writer.close()
    assert [len(lines) for lines in logged] == [1, 0, 1]
    assert logged[0][0].endswith('"GET / HTTP/1.1" 200')


async def test_past_its_open_connections_the_server_closes_a_new_one_until_one_goes() -> None:
    """Idle keep-alive connections and WebSockets alike hold a file each: past
    ``max_open_connections`` a new connection is closed unanswered, whatever its
    address, and served again once one of them went."""
    async with _serving(max_open_connections=2) as port:
        _, writer = await _served_once(port)  # kept alive, idle
        async with connect(f"ws://127.0.0.1:{port}/") as websocket:
            third, _ = await _open(port)
            assert await _closed(third, ANSWER_SECS)
            await websocket.send("still served")
            assert await asyncio.wait_for(websocket.recv(), ANSWER_SECS) == "still served"
        # The WebSocket went (once the server saw its socket close): a place is free.
        await wait_until(lambda: _served_unless_closed(port), "a new connection served")
        writer.close()


async def _served_unless_closed(port: int) -> bool:
    """Whether a new connection is answered; False when the server closed (or reset) it."""
    try:
        return await _served(port)
    except ConnectionError:
        return False


async def _refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The answer to a GET on a new connection, read to the server's close."""
    writer.write(GET)
    return await asyncio.wait_for(reader.read(), ANSWER_SECS)


async def test_one_address_may_hold_only_so_many_http_connections() -> None:
    """Idle keep-alive connections count against their address until they close; past
    ``max_connections_per_peer`` a new one's request is answered 429 and closed. A
    WebSocket counts only until it is upgraded (the application counts it then)."""
    async with _serving(max_connections_per_peer=2) as port:
        first = await _served_once(port)  # kept alive, idle
        async with connect(f"ws://127.0.0.1:{port}/") as websocket:
            second = await _served_once(port)
            answer = await _refused(*await _open(port))
            await websocket.send("still served")
            assert await asyncio.wait_for(websocket.recv(), ANSWER_SECS) == "still served"
        assert answer.startswith(b"HTTP/1.1 429 ")
        assert b"connection: close\r\n" in answer.lower()
        assert b'"code": "RATE_LIMITED"' in answer
        second[1].close()  # one goes: a place is free once the server saw it
        await wait_until(lambda: _served_unless_closed(port), "a new connection served")
        first[1].close()
