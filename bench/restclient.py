"""Load-generator side of REST publishing: one keep-alive HTTP/1.1 connection, one
request at a time, JSON in and out.

Why not httpx: measured here, an httpx request cost the publisher 1.0 to 1.3 ms of CPU
(this client: 0.15 to 0.2 ms), so REST publishers topped out near 1,000 requests/s on
a whole core of the two the server needs, below what PostgreSQL commits alone
(``db_floor``): the benchmark would have measured its own client. This one writes the
request in one call and cuts the answer out of ``data_received``.

What a publisher needs and no more: the status and the JSON body of answers framed by
``Content-Length`` or chunked (daphne and uvicorn use one or the other); no redirects,
no ``Expect``, no trailers. A connection the server closes is opened again for the
next request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bench.httpconn import request_head

HEAD_END = b"\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"
CRLF = b"\r\n"


class HttpStatusError(Exception):
    """Raised when an answer cannot be read (closed early, or not HTTP/1.1)."""


class _Exchange(asyncio.Protocol):
    """The socket: each answer, once complete, resolves the waiting future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = b""
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # always a Transport here

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(HttpStatusError(f"connection closed: {exc}"))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        if self.transport is None or self.closed:
            raise HttpStatusError("connection closed")
        self._answer = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self.transport.write(request)
        return self._answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        pending = self._answer
        if pending is None or pending.done():
            return
        try:
            answer = _parse_answer(self._buffer)
        except (HttpStatusError, ValueError) as exc:
            pending.set_exception(HttpStatusError(str(exc)))
            return
        if answer is not None:
            pending.set_result(answer)


def _parse_answer(data: bytes) -> tuple[int, bytes] | None:
    """(status, body) once ``data`` holds a whole answer, else None."""
    end = data.find(HEAD_END)
    if end < 0:
        return None
    head = data[:end].decode("latin-1")
    body = data[end + len(HEAD_END) :]
    status_line, _, header_text = head.partition("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HttpStatusError(f"not an HTTP/1.1 answer: {status_line[:80]!r}")
    headers = {}
    for line in header_text.split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return (int(parts[1]), _dechunk(body)) if body.endswith(CHUNKED_END) else None
    length = int(headers.get("content-length", "0"))
    return (int(parts[1]), body[:length]) if len(body) >= length else None


def _dechunk(body: bytes) -> bytes:
    pieces, pos = [], 0
    while True:
        line_end = body.index(CRLF, pos)
        size = int(body[pos:line_end].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(pieces)
        start = line_end + len(CRLF)
        pieces.append(body[start : start + size])
        pos = start + size + len(CRLF)


class RestClient:
    """``post_json`` over one kept-alive connection to ``host:port``."""

    def __init__(self, host: str, port: int, headers: dict[str, str], timeout_secs: float) -> None:
        self._host = host
        self._port = port
        self._headers = [f"{name}: {value}" for name, value in headers.items()]
        self._timeout = timeout_secs
        self._exchange: _Exchange | None = None

    async def _connection(self) -> _Exchange:
        if self._exchange is None or self._exchange.closed:
            loop = asyncio.get_running_loop()
            _, self._exchange = await asyncio.wait_for(
                loop.create_connection(_Exchange, self._host, self._port), self._timeout
            )
        return self._exchange

    async def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        """POST ``payload`` as JSON; (status, decoded body or None if not JSON)."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = request_head(
            "POST",
            self._host,
            self._port,
            path,
            [
                *self._headers,
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
            ],
        )
        exchange = await self._connection()
        try:
            status, answer = await asyncio.wait_for(exchange.send(head + body), self._timeout)
        except BaseException:
            # A late answer would be taken for the next request's: start afresh.
            await self.close()
            raise
        try:
            return status, json.loads(answer) if answer else None
        except ValueError:
            return status, None

    async def close(self) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is not None and exchange.transport is not None:
            exchange.transport.close()
