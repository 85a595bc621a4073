"""A whole response written at once under uvicorn
(``push.transport.server_adapters.write_whole_response``): the bytes and the state of
uvicorn's ``send`` for the same response, or nothing at all (the caller then sends it)
wherever ``send`` would do more than write. The REST fast path's answers through it
are compared with Django's in tests/test_rest_fast_publish.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.server import ServerState

from push.transport import server_adapters
from push.transport.server_adapters import (
    WHOLE_RESPONSE_EXTENSION,
    bounded_head_httptools_protocol,
    write_whole_response,
)

DEFAULTS = [(b"date", b"Sat, 05 Dec 2026 19:00:00 GMT"), (b"server", b"uvicorn")]
BEFORE = ((b"content-type", b"application/json"), (b"vary", b"Accept"), (b"allow", b"POST"))
AFTER = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))
BODY = b'{"channel":"news","seq":7}'


class Transport:
    """What uvicorn's cycle and protocol use of a transport."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("192.0.2.1", 40000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol


class Cycle:
    """A uvicorn request's cycle on a fake transport, counting its ``on_response``."""

    def __init__(self, *, keep_alive: bool = True, method: str = "POST") -> None:
        self.transport = Transport()
        self.responses = 0
        self.cycle = RequestResponseCycle(
            scope={"type": "http", "method": method, "http_version": "1.1"},  # type: ignore[typeddict-item]  # what send reads
            transport=self.transport,  # type: ignore[arg-type]  # the parts uvicorn uses
            flow=FlowControl(self.transport),  # type: ignore[arg-type]  # as above
            logger=logging.getLogger("uvicorn.error"),
            access_logger=logging.getLogger("uvicorn.access"),
            access_log=False,
            default_headers=DEFAULTS,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=keep_alive,
            on_response=self._responded,
        )

    def _responded(self) -> None:
        self.responses += 1

    async def send_through_uvicorn(
        self, status: int, before: Any = BEFORE, after: Any = AFTER, body: bytes = BODY
    ) -> None:
        headers = [*before, (b"content-length", b"%d" % len(body)), *after]
        await self.cycle.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.cycle.send({"type": "http.response.body", "body": body})

    def state(self) -> dict[str, Any]:
        cycle = self.cycle
        return {
            "written": b"".join(self.transport.written),
            "closed": self.transport.closed,
            "responses": self.responses,
            "event": cycle.message_event.is_set(),
            **{
                name: getattr(cycle, name)
                for name in (
                    "response_started",
                    "response_complete",
                    "waiting_for_100_continue",
                    "chunked_encoding",
                    "expected_content_length",
                    "keep_alive",
                )
            },
        }


@pytest.fixture(autouse=True)
def _fresh_decision() -> Iterator[None]:
    server_adapters._uvicorn_cycle_class.cache_clear()
    server_adapters._lines_by_id.clear()
    yield
    server_adapters._uvicorn_cycle_class.cache_clear()
    server_adapters._lines_by_id.clear()


@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("status", [200, 201, 400, 429, 500, 503])
async def test_the_whole_response_is_what_uvicorn_s_send_writes(
    keep_alive: bool, status: int
) -> None:
    whole, sent = Cycle(keep_alive=keep_alive), Cycle(keep_alive=keep_alive)
    assert write_whole_response(whole.cycle.send, status, BEFORE, AFTER, BODY)
    await sent.send_through_uvicorn(status)
    assert whole.state() == sent.state()
    assert len(whole.transport.written) == 1  # one write of the socket
    assert (b"connection: close\r\n" in whole.state()["written"]) is not keep_alive


async def test_header_names_are_lower_cased_as_uvicorn_does_and_lines_are_kept() -> None:
    before = ((b"Content-Type", b"application/json"),)
    whole, sent = Cycle(), Cycle()
    assert write_whole_response(whole.cycle.send, 201, before, (), BODY)
    await sent.send_through_uvicorn(201, before, ())
    assert whole.state() == sent.state()
    again = Cycle()
    assert write_whole_response(again.cycle.send, 201, before, (), BODY)
    assert again.transport.written == whole.transport.written


@pytest.mark.parametrize(
    "change",
    ["started", "disconnected", "access_log", "paused", "head", "bad_value", "connection"],
)
async def test_nothing_is_written_where_uvicorn_s_send_does_more(change: str) -> None:
    cycle = Cycle(method="HEAD" if change == "head" else "POST")
    before: Any = BEFORE
    if change == "started":
        cycle.cycle.response_started = True
    elif change == "disconnected":
        cycle.cycle.disconnected = True
    elif change == "access_log":
        cycle.cycle.access_log = True  # uvicorn logs a line
    elif change == "paused":
        cycle.cycle.flow.write_paused = True  # uvicorn waits for the client to read
    elif change == "bad_value":
        before = ((b"x-note", b"two\nlines"),)  # uvicorn raises
    elif change == "connection":
        before = ((b"connection", b"close"),)  # uvicorn reads it
    state = cycle.state()
    assert not write_whole_response(cycle.cycle.send, 201, before, AFTER, BODY)
    assert cycle.state() == state


async def test_bad_default_headers_leave_the_response_to_uvicorn() -> None:
    cycle = Cycle()
    cycle.cycle.default_headers = [(b"server", b"a\x00b")]
    assert not write_whole_response(cycle.cycle.send, 201, BEFORE, AFTER, BODY)
    assert cycle.transport.written == []


async def test_another_server_s_send_gets_nothing_written() -> None:
    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("not called")

    assert not write_whole_response(send, 201, BEFORE, AFTER, BODY)


async def test_untested_versions_leave_every_response_to_uvicorn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_adapters, "installed_version", lambda package: "0.0.1")
    cycle = Cycle()
    assert not write_whole_response(cycle.cycle.send, 201, BEFORE, AFTER, BODY)
    assert "extensions" not in await _scope_under_the_bounded_protocol()


async def test_the_bounded_protocol_offers_the_writer_in_each_scope() -> None:
    scope = await _scope_under_the_bounded_protocol()
    assert scope["extensions"][WHOLE_RESPONSE_EXTENSION]["write"] is write_whole_response


async def _scope_under_the_bounded_protocol() -> dict[str, Any]:
    """The scope of a request under the bounded httptools protocol."""
    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app, lifespan="off", log_config=None, proxy_headers=False)
    state = ServerState()
    bounded = bounded_head_httptools_protocol(deadline_secs=30.0)
    protocol = bounded(config=config, server_state=state, app_state={})  # type: ignore[call-arg]  # uvicorn's protocol signature
    protocol.connection_made(Transport())  # type: ignore[arg-type]  # the parts uvicorn uses
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    await asyncio.gather(*state.tasks)
    (scope,) = scopes
    return scope
