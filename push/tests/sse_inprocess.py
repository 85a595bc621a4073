"""An SSE client over Channels' ``ApplicationCommunicator``: the real ASGI application,
no server, each event as (event name, envelope)."""

from __future__ import annotations

import json
from typing import Any

from channels.testing import ApplicationCommunicator

RECEIVE_TIMEOUT_SECS = 5.0


class InProcessStream:
    def __init__(self, query: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        from realtime_project.asgi import application

        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "path": "/sse/",
            "raw_path": b"/sse/",
            "query_string": query.encode(),
            "headers": [(b"accept", b"text/event-stream"), *(headers or [])],
            "client": ("127.0.0.1", 40000),
        }
        self.communicator = ApplicationCommunicator(application, scope)
        self.ended = False
        self._pending = b""
        self.last_event_id: str | None = None

    async def start(self) -> int:
        """The response's status."""
        start = await self.communicator.receive_output(RECEIVE_TIMEOUT_SECS)
        assert start["type"] == "http.response.start", start
        return int(start["status"])

    async def next_event(self, timeout: float = RECEIVE_TIMEOUT_SECS) -> tuple[str, Any] | None:
        """The next event (comments skipped); None once the server ended the stream."""
        while b"\n\n" not in self._pending:
            if self.ended:
                return None
            output = await self.communicator.receive_output(timeout)
            self._pending += output.get("body", b"")
            self.ended = not output.get("more_body", False)
        block, self._pending = self._pending.split(b"\n\n", 1)
        fields = dict(
            line.split(": ", 1) for line in block.decode().splitlines() if not line.startswith(":")
        )
        if "event" not in fields:
            return await self.next_event(timeout)
        self.last_event_id = fields.get("id", self.last_event_id)
        return fields["event"], json.loads(fields["data"])

    async def close(self) -> None:
        await self.communicator.send_input({"type": "http.disconnect"})
        await self.communicator.wait(RECEIVE_TIMEOUT_SECS)
