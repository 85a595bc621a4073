"""Load-generator side of Server-Sent Events: a minimal ``text/event-stream`` reader.

Like the WebSocket client, it parses straight out of ``data_received`` and hands each
event's ``data`` to a plain callback: first HTTP/1.1 chunked transfer coding (both
daphne and uvicorn send it for a response of unknown length), then events. httpx and
an ``async for`` over lines would cost a task switch and several objects per event;
here a read that is exactly one chunk holding exactly one event (almost every read in
a fan-out) is cut out with two ``find`` calls.

What a subscriber needs and no more, which a real client must not copy:
- Only the ``data`` field is passed on: the JSON envelope names its own ``type``, so
  ``event:`` is not needed; ``id:`` and ``retry:`` are not read (a resume is given
  with ``?since=`` at the start); comments (``: ping``) are skipped.
- Lines must end in LF, as the server writes them (the spec also allows CR and CRLF).
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

from bench.httpconn import (
    CloseHandler,
    HttpConnection,
    MessageHandler,
    open_connection,
    request_head,
)

# The server ended the response (the terminating chunk): a close, as the server's
# closes of a stream carry no code on the wire; a dropped socket stays 1006.
CLOSE_END_OF_STREAM = 1000
EVENT_END = b"\n\n"
MESSAGE_EVENT_HEAD = b"event: message\ndata: "  # how the server starts a message event
CHUNK_SIZE_DIGITS_MAX = 8  # a chunk size line longer than this is not the fast path


def sse_path(path: str, channels: list[str], since: dict[str, int]) -> str:
    """``/sse/?channel=a&channel=b&since=a:3,b:0``: resume each channel after a seq."""
    query = [("channel", channel) for channel in channels]
    if since:
        query.append(("since", ",".join(f"{channel}:{seq}" for channel, seq in since.items())))
    return f"{path}?{urlencode(query, safe=':,')}"


class SseConnection(HttpConnection):
    """One stream: the response head, then each event's data to ``on_message``."""

    expected_status = b"HTTP/1.1 200"
    # Parser state, set per instance on first change (immutable defaults).
    _chunked = False
    _chunk_left = 0  # bytes of the current chunk still to come, with its CRLF
    _raw = b""  # chunked bytes not yet decoded (a partial size line)
    _text = b""  # decoded bytes of an event not yet complete

    def accept_head(self, head: bytes) -> bool:
        if not super().accept_head(head):
            return False
        self._chunked = b"transfer-encoding: chunked" in head.lower()
        return True

    def data_received(self, data: bytes) -> None:
        if not self.head_read:
            data = self.read_head(data)
            if not data:
                return
        now = time.time()
        if not self._chunked:
            self._feed_text(data, now)
        elif self._raw or self._chunk_left or self._text or not self._one_event(data, now):
            self._feed_chunks(data, now)

    def _one_event(self, data: bytes, now: float) -> bool:
        """The fast path: ``data`` is one whole chunk that is one whole event."""
        eol = data.find(b"\r\n", 0, CHUNK_SIZE_DIGITS_MAX + 2)
        if eol <= 0:
            return False
        try:
            length = int(data[:eol], 16)
        except ValueError:  # a chunk extension: the slow path reads it
            return False
        start = eol + 2
        end = start + length  # the chunk's CRLF follows
        if end + 2 != len(data) or data.find(EVENT_END, start) != end - 2:
            return False
        self._on_event(data[start : end - 2], now)
        return True

    def _feed_chunks(self, data: bytes, now: float) -> None:
        if self.close_code is not None:  # after the last chunk: its trailer, ignored
            return
        buffer = self._raw + data if self._raw else data
        self._raw = b""
        pos, size = 0, len(buffer)
        pieces: list[bytes] = []
        ended = False
        while pos < size:
            left = self._chunk_left
            if left:
                take = min(left, size - pos)
                data_end = pos + min(take, max(0, left - 2))  # not the chunk's CRLF
                if data_end > pos:
                    pieces.append(buffer[pos:data_end])
                pos += take
                self._chunk_left = left - take
                continue
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                self._raw = buffer[pos:]
                break
            length = int(buffer[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if length == 0:
                ended = True
                break
            self._chunk_left = length + 2
        if pieces:
            self._feed_text(b"".join(pieces), now)
        if ended:
            self._end_of_stream()

    def _feed_text(self, data: bytes, now: float) -> None:
        text = self._text + data if self._text else data
        end = text.rfind(EVENT_END)
        if end < 0:
            self._text = text
            return
        self._text = text[end + 2 :]
        for block in text[:end].split(EVENT_END):
            self._on_event(block, now)

    def _on_event(self, block: bytes, now: float) -> None:
        if block.startswith(MESSAGE_EVENT_HEAD):
            start = len(MESSAGE_EVENT_HEAD)
            eol = block.find(b"\n", start)
            if eol < 0:
                self._on_message(self, block[start:], now)
                return
            if not block.startswith(b"data:", eol + 1):  # one data line, as always
                self._on_message(self, block[start:eol], now)
                return
        data_lines = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
        if data_lines:
            self._on_message(self, b"\n".join(data_lines), now)

    def _end_of_stream(self) -> None:
        self.close_code = CLOSE_END_OF_STREAM
        if self.transport is not None:
            self.transport.close()


async def sse_connect(
    host: str,
    port: int,
    path: str,
    on_message: MessageHandler,
    *,
    on_close: CloseHandler | None = None,
    local_host: str | None = None,
    state: object = None,
    timeout_secs: float = 10.0,
) -> SseConnection:
    """Open one stream (``path`` with its query); raise on refusal, a status other than
    200 or timeout. ``state`` is set before any event can arrive."""
    headers = ["Accept: text/event-stream", "Cache-Control: no-cache"]
    request = request_head("GET", host, port, path, headers)
    return await open_connection(
        host,
        port,
        lambda: SseConnection(request, on_message, on_close, state),
        local_host=local_host,
        timeout_secs=timeout_secs,
    )
