"""No HTTP request body past ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is read: Django alone reads
every byte a client sends before any view may refuse it (``push.api.handler`` bounds
it under uvicorn), and daphne reads a whole body before it calls the application
(``push.transport.server_adapters.bound_daphne_request_bodies`` bounds it there). Sent
over a raw socket, so the test sees when the node answers, not when a client library
is done sending."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator

import pytest

from tests.servers import ServerNode

pytestmark = pytest.mark.asyncio

LIMIT = 2 * 1_048_576 + 65_536  # DATA_UPLOAD_MAX_MEMORY_SIZE with the default frame limit
CHUNK = 64 * 1024
ANSWER_SECS = 10.0
PATHS = ["/api/v1/channels/bodies/messages", "/api/v1/messages", "/admin/login/", "/apps/1/events"]


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def node(e2e_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[ServerNode]:
    started = ServerNode(e2e_env, server=request.param, name=f"bodies-{request.param}").start()
    yield started
    started.stop()


async def _status_and_body(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, json.loads(await reader.readexactly(length))


def _head(path: str, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("path", PATHS)
async def test_a_body_declared_too_large_is_refused_before_it_is_sent(
    node: ServerNode, path: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(_head(path, f"Content-Length: {100 * LIMIT}"))  # and no byte of it
        await writer.drain()
        status, body = await asyncio.wait_for(_status_and_body(reader), ANSWER_SECS)
    finally:
        writer.close()
    assert (status, body["code"]) == (413, "MESSAGE_TOO_LARGE")
    assert str(LIMIT) in body["message"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_chunked_body_is_read_up_to_the_limit_only(node: ServerNode, path: str) -> None:
    answer, sent = await asyncio.to_thread(_chunked_upload, node.port, path)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head, f"no answer after {sent} bytes sent"
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = json.loads(rest[:length])
    assert (status, body["code"]) == (413, "MESSAGE_TOO_LARGE")
    # What the socket buffers took on top of the limit, not the 100 MiB offered.
    assert sent < 10 * LIMIT


def _chunked_upload(port: int, path: str) -> tuple[bytes, int]:
    """Send a chunked body of up to 50 times the limit, reading whatever the node answers
    before each chunk, until its answer is whole or the node stops reading. What arrived
    is read at once: a node that stops reading closes the connection after its answer,
    and the client's next write would be reset, losing an answer an asyncio stream had
    not read yet (seen on a loaded machine)."""
    chunk = f"{CHUNK:x}\r\n".encode() + b" " * CHUNK + b"\r\n"
    received = b""
    sent = 0
    sending = True
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SECS) as sock:
        sock.sendall(_head(path, "Transfer-Encoding: chunked"))
        sock.setblocking(False)
        deadline = time.monotonic() + ANSWER_SECS
        while time.monotonic() < deadline and not _whole_answer(received):
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ConnectionError):
                    break
                if not data:
                    break
                received += data
                continue  # read all there is before sending more
            if writable and sending:
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    sending = False
                sending = sending and sent < 50 * LIMIT
            elif not sending:
                continue
            elif not writable:
                sending = False  # the node stopped reading: wait for its answer
    return received, sent


def _whole_answer(received: bytes) -> bool:
    head, separator, rest = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":", 1)[1])
    return False


async def test_a_publish_just_over_the_frame_limit_gets_the_view_s_answer(
    node: ServerNode, publisher_token: str
) -> None:
    data = "x" * 1_048_576
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        payload = json.dumps({"data": data}).encode()
        writer.write(
            _head(
                "/api/v1/channels/bodies/messages",
                f"Authorization: Token {publisher_token}",
                f"Content-Length: {len(payload)}",
            )
            + payload
        )
        status, body = await asyncio.wait_for(_status_and_body(reader), ANSWER_SECS)
    finally:
        writer.close()
    assert (status, body["code"]) == (413, "MESSAGE_TOO_LARGE")
    assert body["message"] == "body is larger than 1048576 bytes"


async def _closed_unanswered(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the node closes the connection within ``within`` seconds, unanswered
    (reset, when it closes with bytes of ours still unread)."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_one_address_holds_only_so_many_bytes_of_unfinished_bodies(
    node: ServerNode,
) -> None:
    # Eight bodies of ~1.9 MB each, every one still coming, fit in the address's 16 MiB;
    # nine do not, and the connection whose bytes pass it is dropped (which one depends
    # on the order the node reads them in).
    declared, sent = 2_000_000, 1_900_000
    opened = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(9)]
    try:
        for _, writer in opened:
            writer.write(_head("/api/v1/messages", f"Content-Length: {declared}"))
            writer.write(b" " * sent)
        watches = {
            asyncio.ensure_future(_closed_unanswered(reader, ANSWER_SECS)): (reader, writer)
            for reader, writer in opened
        }
        done, pending = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
        assert [watch.result() for watch in done] == [True], "nine bodies were held"
        more, pending = await asyncio.wait(pending, timeout=0.5)
        assert not more, "more than one body was dropped"
        for watch in pending:
            watch.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        reader, writer = watches[next(iter(pending))]
        writer.write(b" " * (declared - sent))  # a body within the bytes is read whole
        status, _ = await asyncio.wait_for(_status_and_body(reader), ANSWER_SECS)
        assert status == 401  # answered (no token), not dropped
    finally:
        for _, writer in opened:
            writer.close()


async def test_bodies_sent_after_their_refusal_leave_nothing_held_for_their_address(
    node: ServerNode,
) -> None:
    # Refused at their heads (declared too large), ten bodies of 1.5 MB are sent all the
    # same, and what the node reads of them is dropped: none of it counts against the
    # address's 16 MiB of unfinished bodies once its connection is gone. Counted
    # and never given back, 15 MB of them left the address no room for a 1.9 MB body:
    # every later body from it was dropped, for as long as the node ran.
    for _ in range(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            writer.write(_head("/api/v1/messages", f"Content-Length: {100 * LIMIT}"))
            writer.write(b" " * 1_500_000)
            status, _ = await asyncio.wait_for(_status_and_body(reader), ANSWER_SECS)
            assert status == 413
            await asyncio.sleep(0.2)  # what the node reads of the rest meanwhile
        finally:
            writer.close()
    declared = 2_000_000
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(_head("/api/v1/messages", f"Content-Length: {declared}"))
        writer.write(b" " * declared)
        status, _ = await asyncio.wait_for(_status_and_body(reader), ANSWER_SECS)
        assert status == 401  # read whole and answered (no token), not dropped
    finally:
        writer.close()


async def test_a_form_body_reaches_the_application_as_sent(node: ServerNode) -> None:
    # daphne's Twisted parsed form bodies itself, on the event loop, before calling the
    # application (which reads the raw body, never what Twisted parsed): 2 MB of a
    # URL-encoded form cost the node 0.77 s of CPU per anonymous request, and a body it
    # could not parse as multipart got Twisted's own 400 page instead of the
    # application's answer. A multipart type without a boundary is such a body.
    body = b'{"data": 1}'
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(
            (
                "POST /api/v1/channels/bodies/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: multipart/form-data\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        status, answer = await asyncio.wait_for(_status_and_body(reader), ANSWER_SECS)
    finally:
        writer.close()
    assert (status, answer["code"]) == (401, "NOT_AUTHENTICATED")
