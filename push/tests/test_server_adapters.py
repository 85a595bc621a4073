"""The server adapters with fake protocol objects: which writer each server's protocol
class gets (once per process, only at tested versions), plain TCP versus TLS under
Twisted, daphne's inbound bound, and what the outbox does when a direct write raises.
The same paths against real servers: tests/test_transport_e2e.py."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from common import metrics
from push.fanout import outbox as outbox_module
from push.fanout.outbox import Outbox, OutFrame, deliveries_together
from push.transport import server_adapters
from push.transport.server_adapters import TESTED_VERSIONS, bound_inbound, raw_writer


@pytest.fixture(autouse=True)
def _fresh_choice() -> Any:
    """Each test decides the writers afresh, as a new process would."""
    server_adapters._writer_by_class.clear()
    yield
    server_adapters._writer_by_class.clear()


def _fake_class(qualified: str, **attrs: Any) -> type:
    module, _, name = qualified.rpartition(".")
    kind = type(name, (), {"__module__": module, **attrs})
    kind.__qualname__ = name
    return kind


class FakeTcpTransport:
    """Twisted's TCP transport as the direct writer sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.connected = True
        self.written: list[bytes] = []
        self.paused = 0
        self.resumed = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1


TcpServerTransport = type("Server", (FakeTcpTransport,), {"__module__": "twisted.internet.tcp"})


class FakeTlsWrapper:
    """Twisted's TLSMemoryBIOProtocol: attribute reads fall through to the TCP
    transport under it (``socket`` among them); only its own write encrypts."""

    def __init__(self, tcp: FakeTcpTransport) -> None:
        self.tcp = tcp
        self.encrypted: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.encrypted.append(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tcp, name)


FakeTlsWrapper.__module__ = "twisted.protocols.tls"
FakeTlsWrapper.__qualname__ = "TLSMemoryBIOProtocol"


DaphneWebSocket = _fake_class(
    "daphne.ws_protocol.WebSocketProtocol", STATE_OPEN=3, sendCloseFrame=lambda self, **kw: None
)


def _daphne_ws_protocol(transport: Any) -> Any:
    protocol = DaphneWebSocket()
    protocol.transport = transport
    protocol.state = 3
    return protocol


def _daphne_send(protocol: Any) -> Any:
    async def handle_reply(protocol: Any, event: dict[str, Any]) -> None:
        pass

    return functools.partial(handle_reply, protocol)


@pytest.fixture
def socket_pair() -> Any:
    server, client = socket.socketpair()
    server.setblocking(False)
    yield server, client
    server.close()
    client.close()


def test_daphne_over_plain_tcp_writes_to_the_socket(socket_pair: Any) -> None:
    server, client = socket_pair
    transport = TcpServerTransport(server)
    writer = raw_writer(_daphne_send(_daphne_ws_protocol(transport)))
    assert writer is not None
    write, writable = writer
    assert writable()
    write(b"frame")
    assert client.recv(100) == b"frame" and transport.written == []


def test_daphne_over_tls_never_writes_to_the_raw_socket(socket_pair: Any) -> None:
    server, client = socket_pair
    tls = FakeTlsWrapper(TcpServerTransport(server))
    assert tls.socket is server  # what made the old check pass
    writer = raw_writer(_daphne_send(_daphne_ws_protocol(tls)))
    assert writer is not None
    write, _ = writer
    write(b"frame")
    assert tls.encrypted == [b"frame"]
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)  # nothing in plaintext on the wire


def test_a_subclass_of_a_server_protocol_gets_no_writer(socket_pair: Any) -> None:
    protocol = _daphne_ws_protocol(TcpServerTransport(socket_pair[0]))
    subclass = type("WebSocketProtocol", (type(protocol),), {"__module__": "myserver"})
    protocol.__class__ = subclass
    assert raw_writer(_daphne_send(protocol)) is None


def test_an_untested_server_version_writes_through_send_and_says_so_once(
    socket_pair: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(TESTED_VERSIONS, "autobahn", "0.0.1")
    caplog.set_level(logging.INFO, logger="push.transport.server_adapters")
    for _ in range(3):
        protocol = _daphne_ws_protocol(TcpServerTransport(socket_pair[0]))
        assert raw_writer(_daphne_send(protocol)) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "autobahn" in warnings[0].getMessage()


def test_an_unknown_server_gets_no_writer() -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    assert raw_writer(queue.put) is None  # a test communicator's send, say


def test_tested_versions_are_the_pins_of_requirements() -> None:
    text = (Path(__file__).resolve().parents[2] / "requirements.txt").read_text()
    pins = {
        name.lower(): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE)
    }
    assert {name: pins[name] for name in TESTED_VERSIONS} == TESTED_VERSIONS


# ----- the outbox when a direct write raises -------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.failures: list[BaseException] = []

    async def send(self, event: dict[str, Any]) -> None:
        self.sent.append(event)

    def outbox(self, write: Any, kind: type[Outbox] = Outbox) -> Outbox:
        return kind(
            self.send,
            max_frames=10,
            max_bytes=10**6,
            on_overflow=lambda: None,
            on_send_failed=self.failures.append,
            raw=(write, lambda: True),
        )


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_a_frame_that_cannot_be_built_goes_through_send() -> None:
    class Unbuildable(OutFrame):
        @property
        def wire(self) -> bytes:
            raise ValueError("cannot frame this")

    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    before = _sample("push_direct_write_failures_total", {"outcome": "fallback"})
    event = {"type": "websocket.send", "text": "{}"}
    assert outbox.push(Unbuildable(event, 2))
    assert outbox.push(OutFrame(dict(event), 2))  # and from now on through send too
    assert recorder.sent == [event, event] and written == [] and not recorder.failures
    assert _sample("push_direct_write_failures_total", {"outcome": "fallback"}) == before + 1


async def test_a_write_that_raises_fails_the_connection() -> None:
    def broken_write(data: bytes) -> None:
        raise OSError("half written")

    recorder = Recorder()
    outbox = recorder.outbox(broken_write)
    before = _sample("push_direct_write_failures_total", {"outcome": "closed"})
    assert not outbox.push(OutFrame({"type": "websocket.send", "text": "{}"}, 2))
    assert outbox.closed and [str(e) for e in recorder.failures] == ["half written"]
    assert recorder.sent == []  # part of it may be on the wire: nothing more after it
    assert _sample("push_direct_write_failures_total", {"outcome": "closed"}) == before + 1


async def test_direct_writes_are_counted() -> None:
    written: list[bytes] = []
    outbox = Recorder().outbox(written.append)
    before = metrics.DIRECT_WRITES.value
    for _ in range(3):
        outbox.push(OutFrame({"type": "websocket.send", "text": "{}"}, 2))
    assert len(written) == 3
    assert _sample("push_direct_writes_total") == before + 3


def _frames(*texts: str) -> list[OutFrame]:
    return [OutFrame({"type": "websocket.send", "text": text}, len(text)) for text in texts]


async def test_a_run_of_frames_goes_to_the_socket_in_one_write() -> None:
    """A replay's slice: one write (one system call) for all its frames, in order, each
    frame counted as written directly."""
    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    frames = _frames('{"n":1}', '{"n":2}', '{"n":3}')
    before = metrics.DIRECT_WRITES.value
    assert outbox.push_many(frames)
    assert written == [b"".join(frame.wire for frame in frames)] and recorder.sent == []
    assert _sample("push_direct_writes_total") == before + 3


async def test_a_run_of_frames_the_socket_cannot_take_goes_through_send_in_order() -> None:
    recorder = Recorder()
    written: list[bytes] = []
    outbox = Outbox(
        recorder.send,
        max_frames=10,
        max_bytes=10**6,
        on_overflow=lambda: None,
        raw=(written.append, lambda: False),  # the server's own buffer is not empty
    )
    frames = _frames('{"n":1}', '{"n":2}')
    assert outbox.push_many(frames)
    assert recorder.sent == [frame.event for frame in frames] and written == []


async def test_a_run_of_frames_whose_write_raises_fails_the_connection() -> None:
    def broken_write(data: bytes) -> None:
        raise OSError("half written")

    recorder = Recorder()
    outbox = recorder.outbox(broken_write)
    assert not outbox.push_many(_frames("{}", "{}"))
    assert outbox.closed and [str(e) for e in recorder.failures] == ["half written"]
    assert recorder.sent == []


def test_a_text_frame_with_a_lone_surrogate_is_framed_as_its_json_escape() -> None:
    text = json.dumps({"s": "a\ud800b"}, ensure_ascii=False)
    wire = OutFrame({"type": "websocket.send", "text": text}, len(text)).wire
    payload = wire[2:].decode("utf-8")  # valid UTF-8
    assert json.loads(payload) == {"s": "a\ud800b"}


# ----- daphne's inbound queue ----------------------------------------------------------


class FakeDaphneInbound:
    """daphne's side of one connection: its onMessage fills the application's queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.transport = FakeTcpTransport(socket.socket())
        self.protocol = _daphne_ws_protocol(self.transport)
        queue = self.queue
        self.protocol.muted = False

        def on_message(payload: bytes, is_binary: bool) -> None:  # daphne's, simplified
            if not self.protocol.muted:
                queue.put_nowait({"type": "websocket.receive", "bytes": payload})

        self.protocol.onMessage = on_message

    def close(self) -> None:
        self.transport.socket.close()


async def test_daphne_stops_reading_a_socket_whose_frames_wait_and_reads_again_later() -> None:
    daphne = FakeDaphneInbound()
    receive = bound_inbound(
        daphne.queue.get, _daphne_send(daphne.protocol), max_frames=4, max_bytes=1000
    )
    assert receive is not daphne.queue.get
    before = _sample("push_inbound_pauses_total")
    for _ in range(3):
        daphne.protocol.onMessage(b"x" * 10, True)
    assert daphne.transport.paused == 0
    daphne.protocol.onMessage(b"x" * 10, True)  # the fourth frame waits: stop reading
    assert daphne.transport.paused == 1
    assert _sample("push_inbound_pauses_total") == before + 1
    await receive()
    assert daphne.transport.resumed == 0  # three still wait
    await receive()
    assert daphne.transport.resumed == 1  # half of the bound: read again
    daphne.close()


async def test_daphne_inbound_bytes_are_bounded_too() -> None:
    daphne = FakeDaphneInbound()
    receive = bound_inbound(
        daphne.queue.get, _daphne_send(daphne.protocol), max_frames=100, max_bytes=1000
    )
    daphne.protocol.onMessage(b"x" * 600, True)
    assert daphne.transport.paused == 0
    daphne.protocol.onMessage(b"x" * 600, True)
    assert daphne.transport.paused == 1
    await receive()
    assert daphne.transport.resumed == 0  # 600 bytes still wait, over half of 1000
    await receive()
    assert daphne.transport.resumed == 1
    daphne.close()


async def test_a_muted_daphne_connection_counts_nothing() -> None:
    daphne = FakeDaphneInbound()
    bound_inbound(daphne.queue.get, _daphne_send(daphne.protocol), max_frames=1, max_bytes=10)
    daphne.protocol.muted = True
    daphne.protocol.onMessage(b"x" * 600, True)
    assert daphne.transport.paused == 0
    daphne.close()


def test_other_servers_keep_their_receive() -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    assert bound_inbound(queue.get, queue.put, max_frames=1, max_bytes=1) == queue.get


def test_autobahn_pretty_prints_a_connections_settings_only_for_a_written_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autobahn.websocket import protocol

    monkeypatch.setattr(protocol, "pformat", protocol.pformat)  # restored after the test
    printed: list[int] = []

    class Setting:
        def __repr__(self) -> str:
            printed.append(1)
            return "Setting()"

    server_adapters.defer_autobahn_config_dump()
    text = protocol.pformat([("openHandshakeTimeout", Setting(), "Factory")])
    assert printed == []
    assert f"{text}" == "[('openHandshakeTimeout', Setting(), 'Factory')]"
    assert printed == [1]


class _Request:
    """What daphne's request does with a body, as ``_bounded_request`` sees it."""

    def __init__(self) -> None:
        self.body = b""
        self.length: int | None = -1
        self.received = False

    def gotLength(self, length: int | None) -> None:  # Twisted's name
        self.length = length

    def handleContentChunk(self, data: bytes) -> None:  # Twisted's name
        self.body += data

    def requestReceived(self, *args: Any) -> None:  # Twisted's name
        self.received = True


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.half_closed = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def loseWriteConnection(self) -> None:  # Twisted's name
        self.half_closed = True

    def loseConnection(self) -> None:  # Twisted's name
        self.closed = True


def _bounded(limit: int) -> tuple[_Request, _Transport]:
    transport = _Transport()
    channel = type("Channel", (), {"transport": transport})()
    request = server_adapters._bounded_request(_Request(), channel, limit)
    return request, transport


async def test_a_body_within_the_bound_is_read_and_the_wrappers_go() -> None:
    request, transport = _bounded(10)
    request.gotLength(None)
    request.handleContentChunk(b"12345")
    request.handleContentChunk(b"67890")
    request.requestReceived(b"POST", b"/", b"HTTP/1.1")
    assert (request.body, request.received, transport.written) == (b"1234567890", True, b"")
    # No wrapper left on the instance: nothing holds the request in a cycle.
    assert not set(vars(request)) & set(server_adapters._BODY_HOOKS)


@pytest.mark.parametrize("declared", [11, None])
async def test_a_body_past_the_bound_is_answered_413_and_dropped(declared: int | None) -> None:
    request, transport = _bounded(10)
    request.gotLength(declared)
    for _ in range(3):
        request.handleContentChunk(b"123456")
    request.requestReceived(b"POST", b"/", b"HTTP/1.1")
    assert transport.written.startswith(b"HTTP/1.1 413 ")
    assert json.loads(transport.written.split(b"\r\n\r\n", 1)[1])["code"] == "MESSAGE_TOO_LARGE"
    assert not request.received, "the application is never called"
    assert len(request.body) <= 6  # what came before the bound, never more
    assert transport.half_closed and not transport.closed
    await asyncio.sleep(server_adapters.LINGER_SECS + 0.1)
    assert transport.closed


async def test_frames_pushed_soon_go_out_in_one_write_at_the_end_of_the_loop_turn() -> None:
    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    first, second = _frames('{"n":1}', '{"n":2}')
    outbox.push_soon(first)
    outbox.push_soon(second)
    assert written == []
    await asyncio.sleep(0)
    assert written == [first.wire + second.wire]


async def test_a_frame_pushed_now_goes_after_the_frames_pushed_soon() -> None:
    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    soon, now = _frames('{"n":1}', '{"n":2}')
    outbox.push_soon(soon)
    outbox.push(now)
    await asyncio.sleep(0)
    assert written == [soon.wire, now.wire]


async def test_deliveries_together_write_each_connection_once_at_the_end() -> None:
    recorder = Recorder()
    one: list[bytes] = []
    other: list[bytes] = []
    first, second, third = _frames('{"n":1}', '{"n":2}', '{"n":3}')
    outboxes = recorder.outbox(one.append), recorder.outbox(other.append)
    with deliveries_together():
        outboxes[0].push(first)
        outboxes[1].push(first)
        outboxes[0].push(second)
        with deliveries_together():  # inside another: the outer one sends
            outboxes[0].push(third)
        assert one == [] and other == []
    assert one == [first.wire + second.wire + third.wire]
    assert other == [first.wire]


async def test_deliveries_together_send_what_waits_when_the_block_raises() -> None:
    """The error goes on up (from an inner block too), once the frames pushed before it
    are sent; pushes after the block go out at once."""
    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    first, second, after = _frames('{"n":1}', '{"n":2}', '{"n":3}')
    with pytest.raises(LookupError), deliveries_together():
        outbox.push(first)
        with deliveries_together():
            outbox.push(second)
            raise LookupError("broadcast failed")
    assert written == [first.wire + second.wire]
    assert outbox_module._open_together() is None
    outbox.push(after)
    assert written == [first.wire + second.wire, after.wire]


async def test_an_outbox_that_fails_at_the_end_fails_alone() -> None:
    """Sending one connection's held frames raised: that connection fails (its owner
    is told, the failure counted), and the others' frames go out all the same."""

    class Broken(Outbox):
        def _push_soon_now(self) -> None:
            raise RuntimeError("a bug")

    recorder = Recorder()
    written: list[bytes] = []
    broken = recorder.outbox(written.append, Broken)
    healthy = recorder.outbox(written.append)
    (frame,) = _frames('{"n":1}')
    failures = _sample("push_fan_out_failures_total")
    with deliveries_together():
        broken.push(frame)
        healthy.push(frame)
    assert written == [frame.wire]
    assert broken.closed and not healthy.closed
    assert [type(exc) for exc in recorder.failures] == [outbox_module.WriteFailed]
    assert _sample("push_fan_out_failures_total") == failures + 1


async def test_a_push_from_a_callback_started_inside_deliveries_together_goes_out() -> None:
    """A callback scheduled inside the block (a hub's repair) runs in a copy of its
    context after the block ended: what it pushes is sent, not held for nobody."""
    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    delivery, repaired = _frames('{"n":1}', '{"n":2}')
    with deliveries_together():
        outbox.push(delivery)
        asyncio.get_running_loop().call_soon(outbox.push, repaired)
    await asyncio.sleep(0)
    assert written == [delivery.wire, repaired.wire]


async def test_deliveries_together_keep_their_order_with_frames_pushed_soon() -> None:
    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    answer, delivery, later = _frames('{"n":1}', '{"n":2}', '{"n":3}')
    outbox.push_soon(answer)
    with deliveries_together():
        outbox.push(delivery)
        outbox.push_many([later])  # what waits goes first
    outbox.push(later)
    await asyncio.sleep(0)
    assert b"".join(written) == answer.wire + delivery.wire + later.wire + later.wire


async def test_deliveries_together_to_a_stalled_client_stay_within_its_bounds() -> None:
    """Held frames go out in runs: once the socket stops taking data, the rest goes to
    the bounded queue, which overflows as it would for frames pushed one by one."""
    writable = True
    written: list[bytes] = []
    overflowed: list[bool] = []

    def write(data: bytes) -> None:
        nonlocal writable
        written.append(data)
        writable = False  # the socket's buffer is full after one write

    async def stalled_send(event: dict[str, Any]) -> None:
        await asyncio.Event().wait()  # the server's transport paused writing

    outbox = Outbox(
        stalled_send,
        max_frames=10,
        max_bytes=10**6,
        on_overflow=lambda: overflowed.append(True),
        raw=(write, lambda: writable),
    )
    frames = _frames(*(f'{{"n":{n}}}' for n in range(outbox_module.JOINED_WRITE_FRAMES + 20)))
    with deliveries_together():
        for frame in frames:
            outbox.push(frame)
    assert written == [b"".join(f.wire for f in frames[: outbox_module.JOINED_WRITE_FRAMES])]
    # One more waits in the server's send, then 10 fill the queue: the next overflows.
    assert overflowed == [True] and outbox.closed
    if outbox._writer is not None:  # still waiting in the stalled send
        outbox._writer.cancel()


async def test_sealing_sends_the_frames_pushed_soon_first() -> None:
    recorder = Recorder()
    written: list[bytes] = []
    outbox = recorder.outbox(written.append)
    (soon,) = _frames('{"n":1}')
    outbox.push_soon(soon)
    outbox.seal()
    await asyncio.sleep(0)
    assert written == [soon.wire] and outbox.closed


class _CountedRequest(_Request):
    def connectionLost(self, reason: object) -> None:  # Twisted's name
        self.lost = True


def _counted(held: Any) -> tuple[_Request, _Transport]:
    transport = _Transport()
    channel = type("Channel", (), {"transport": transport})()
    request = server_adapters._bounded_request(_CountedRequest(), channel, 100, held, "peer")
    return request, transport


async def test_unfinished_bodies_of_one_peer_share_a_bound_until_they_are_whole() -> None:
    held = server_adapters._HeldBytes(10, "unfinished_body_bytes")
    first, _ = _counted(held)
    second, dropped = _counted(held)
    first.handleContentChunk(b"123456")
    second.handleContentChunk(b"123456")
    # Past the peer's bytes: dropped unanswered, what else comes not stored.
    assert (dropped.closed, dropped.written, second.body) == (True, b"", b"")
    second.handleContentChunk(b"7")
    assert second.body == b""
    first.requestReceived(b"POST", b"/", b"HTTP/1.1")
    assert held.bytes == {}  # a body whole counts no longer
    third, kept = _counted(held)
    third.handleContentChunk(b"1234567890")
    third.connectionLost(None)  # nor one whose client left
    assert (kept.closed, held.bytes) == (False, {})
    assert not set(vars(third)) & {*server_adapters._BODY_HOOKS, "connectionLost"}


class _TwistedTransport:
    """What the unsent-response count reads of a Twisted TCP transport."""

    def __init__(self) -> None:
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.protocol: Any = None
        self.aborted = False

    def abortConnection(self) -> None:  # Twisted's name
        self.aborted = True


class _HttpChannel:
    def __init__(self, transport: _TwistedTransport) -> None:
        self.transport = transport
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:  # Twisted's name
        self.paused += 1

    def resumeProducing(self) -> None:  # Twisted's name
        self.resumed += 1


class _HttpProtocol:
    def __init__(self) -> None:
        self.lost = False

    def connectionLost(self, reason: Any) -> None:  # Twisted's name
        self.lost = True


def _unsent_counted(held: Any) -> tuple[_HttpProtocol, _HttpChannel, _TwistedTransport]:
    transport = _TwistedTransport()
    protocol, channel = _HttpProtocol(), _HttpChannel(transport)
    transport.protocol = protocol
    unsent = server_adapters._UnsentResponse(held, "peer")
    server_adapters._count_unsent(protocol, channel, unsent)
    return protocol, channel, transport


def test_unsent_responses_of_one_peer_share_a_bound_until_drained() -> None:
    held = server_adapters._HeldBytes(100, "unsent_response_bytes")
    _, first, first_transport = _unsent_counted(held)
    second_protocol, second, second_transport = _unsent_counted(held)
    first_transport._tempDataLen = 60
    first.pauseProducing()
    second_transport.dataBuffer, second_transport.offset = b"x" * 70, 10
    second.pauseProducing()
    # Past the peer's bytes: that connection dropped, its buffer not flushed first.
    assert (first_transport.aborted, second_transport.aborted) == (False, True)
    assert (first.paused, second.paused, held.bytes) == (1, 0, {"peer": 60})
    second.pauseProducing()  # an aborted transport still takes writes until it is gone
    second_protocol.connectionLost(None)
    assert (second_transport.aborted, second_protocol.lost, held.bytes) == (
        True,
        True,
        {"peer": 60},
    )
    first.resumeProducing()  # drained
    assert (first.resumed, held.bytes) == (1, {})


def test_a_connection_handed_to_a_websocket_counts_no_unsent_response() -> None:
    held = server_adapters._HeldBytes(100, "unsent_response_bytes")
    _, channel, transport = _unsent_counted(held)
    transport._tempDataLen = 60
    channel.pauseProducing()
    transport.protocol = object()  # the WebSocket's, its frames bounded by its send queue
    transport._tempDataLen = 1_000
    channel.pauseProducing()
    assert (transport.aborted, channel.paused, held.bytes) == (False, 2, {})


def test_daphne_requests_reach_the_application_with_nothing_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twisted parsed every cookie header, query string (and form body) on the event
    loop before the application was called: the node's requests leave them as they
    came."""
    import io

    from daphne import http_protocol
    from twisted.web import http
    from twisted.web.http_headers import Headers

    for name in ("requestReceived", "parseCookies"):  # put back after the test
        monkeypatch.setattr(http_protocol.WebRequest, name, getattr(http_protocol.WebRequest, name))
    server_adapters.leave_daphne_requests_unparsed()

    def no_parsing(*args: Any) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(http, "parse_qs", no_parsing)
    processed: list[tuple[bytes, bytes, bytes]] = []
    request = type("Request", (), {})()
    request.content = io.BytesIO(b"a=1&" * 1000)
    request.content.seek(0, 2)  # as Twisted leaves it: at the end of what it stored
    request.process = lambda: processed.append((request.method, request.uri, request.path))
    http_protocol.WebRequest.requestReceived(request, b"POST", b"/p?a&a&a", b"HTTP/1.1")
    assert processed == [(b"POST", b"/p?a&a&a", b"/p")]
    assert (request.args, request.clientproto, request.content.tell()) == ({}, b"HTTP/1.1", 0)
    request.received_cookies = {}
    request.requestHeaders = Headers({b"Cookie": [b"a=1; " * 1000]})
    http_protocol.WebRequest.parseCookies(request)
    assert request.received_cookies == {}, "its cookies unread"
