"""A Server-Sent Events reader for the tests: what EventSource does, over httpx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class SseEvent:
    event: str = "message"
    data_lines: list[str] = field(default_factory=list)
    id: str | None = None

    @property
    def data(self) -> Any:
        return json.loads("\n".join(self.data_lines))


@dataclass
class SseStream:
    """Events of one response; ``comments`` counts ``:`` lines (the server's pings)."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    last_event_id: str | None = None

    async def events(self) -> AsyncIterator[SseEvent]:
        current = SseEvent()
        async for line in self.response.aiter_lines():
            if line == "":
                if current.data_lines:
                    if current.id is not None:
                        self.last_event_id = current.id
                    yield current
                current = SseEvent()
            elif line.startswith(":"):
                self.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    current.event = value
                elif name == "data":
                    current.data_lines.append(value)
                elif name == "id":
                    current.id = value


def sse_url(
    base: str, channels: list[str], *, tokens: dict[str, str] | None = None, **params: str
) -> str:
    """``tokens``: signed subscription tokens by channel, one ``subscription_token``
    parameter each."""
    query = [("channel", c) for c in channels] + list(params.items())
    query += [("subscription_token", f"{c}:{t}") for c, t in (tokens or {}).items()]
    return f"{base}/sse/?" + str(httpx.QueryParams(query))
