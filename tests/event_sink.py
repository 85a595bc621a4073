"""Where the tests' events end up: ``record``, an event handler run by the worker, appends
each event to a file with the name of the worker that ran it, slowly if asked, and
refuses one event type if asked (``EVENT_SINK_PATH``, ``EVENT_SINK_WORKER``,
``EVENT_SINK_DELAY``, ``EVENT_SINK_FAIL_TYPE``); ``WebhookReceiver`` is an HTTP server
that webhooks are POSTed to."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def record(event: dict[str, Any]) -> None:
    time.sleep(float(os.environ.get("EVENT_SINK_DELAY", "0")))
    if event.get("type") == os.environ.get("EVENT_SINK_FAIL_TYPE"):
        raise RuntimeError("this handler refuses that event type")
    handled_by = os.environ.get("EVENT_SINK_WORKER", "")
    line = (json.dumps({**event, "handled_by": handled_by}) + "\n").encode()
    # One write() on an O_APPEND descriptor: two workers appending at once never
    # interleave their lines (the tests' reader still skips a line not yet whole).
    sink = os.open(os.environ["EVENT_SINK_PATH"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(sink, line)
    finally:
        os.close(sink)


@dataclass(frozen=True)
class Received:
    """One request a ``WebhookReceiver`` accepted: its path, headers and raw body."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A webhook receiver on a local port of its own, in a thread of the test's process: it
    answers 500 to its first ``refusals`` requests (counted in ``refused``) and 200 to
    the others, which it keeps in ``accepted``. Use it as a context manager."""

    def __init__(self, *, refusals: int = 0) -> None:
        self.refusals = refusals
        self.refused = 0
        self.accepted: list[Received] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            if self.refused < self.refusals:
                self.refused += 1
                return 500
            self.accepted.append(Received(path, headers, body))
            return 200

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver._answer(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
