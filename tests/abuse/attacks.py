"""The abuse suite's attackers: 50 anonymous clients, run as a process of their own
(``python -m tests.abuse.attacks``) so that the CPU measured on the node is the node's.

Each row of ``ATTACKS`` is one kind of abuse: how many clients run it, how often each
acts, and the coroutine one client runs until the deadline. Every answer a client gets
is recorded as an outcome (``error INVALID_MESSAGE, open``, ``http 429``, ``close 1009``)
marked expected or not, and every frame, handshake or HTTP request it sends counts as
one abusive request. The report (``--report``, JSON) holds these counts per attack.

Each attack comes from an address of its own, as separate attacking hosts would:
the attack in row i binds its sockets to 127.0.0.(2 + i) (Linux routes all of 127/8 to
the loopback interface), while the honest clients stay on 127.0.0.1. So the per-address
budgets (``PUSH_ADDRESS_*``) bound each attack, and never the honest clients.
``--addresses N`` spreads the attacks over N addresses instead (1: one attacking host);
attacks that share an address share its budgets, and then a budget's refusal is an
answer any of them may get.

``--only NAME`` (repeatable) runs some attacks alone: ``tests/abuse/costs.py`` measures
what each costs the node that way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import random
import re
import secrets
import signal
import socket
import ssl
import string
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from push.wire.codecs import CODECS, Codec

REPLY_TIMEOUT_SECS = 5.0
HTTP_TIMEOUT_SECS = 30.0
MAX_FRAME_BYTES = 1_048_576  # the default PUSH_MAX_FRAME_BYTES
# The contract's REST page budget: 4 MiB of message data, and at least one message.
PAGE_BUDGET_BYTES = 4 * 1_048_576
BOMB_MESSAGE_BYTES = 1_000_000
# A page may exceed the budget by its last message and the envelopes around the data.
PAGE_BYTES_BOUND = PAGE_BUDGET_BYTES + BOMB_MESSAGE_BYTES + 256 * 1024
# A bomb reader stops reading past this (and records the page as over budget), so a
# node without the budget cannot make this process hold 100 MB per request.
PAGE_READ_CAP_BYTES = 2 * PAGE_BYTES_BOUND
STALL_SECS = 5.0
# The default bucket (100) plus the default close-after (200), and room for the tokens
# the bucket earns back (50/s) while a busy node works through the burst.
FLOOD_FRAMES = 600
SUBSCRIBE_LIMIT = 1000  # the default PUSH_MAX_SUBSCRIPTIONS_PER_CONNECTION
SPREAD_CONNECTIONS = 20
SPREAD_PER_CONNECTION_PER_SEC = 45
HANDSHAKE_FLOOD_WORKERS = 8
HANDSHAKE_FLOOD_PER_SEC = 64
# Errors a frame the server cannot understand may get; the connection stays open.
GARBAGE_CODES = {"INVALID_JSON", "INVALID_MESSAGE", "UNKNOWN_MESSAGE_TYPE", "FORBIDDEN"}
SAMPLES_KEPT = 5
STOP_GRACE_SECS = 3.0
# The attack in row i of ATTACKS sends from 127.0.0.(FIRST_SOURCE_HOST + i).
FIRST_SOURCE_HOST = 2

# The address the current attack's sockets are bound to: set once per client task
# (asyncio copies it into every task the attack starts), read where a socket is opened.
source_address: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "source_address", default=None
)


def source_of(row: int, addresses: int = 0) -> str:
    """The address of the attack in ``row``: its own, or with ``addresses`` > 0 one of
    that many shared in turn (1: every attack from one host)."""
    return f"127.0.0.{FIRST_SOURCE_HOST + (row % addresses if addresses else row)}"


def local_addr() -> tuple[str, int] | None:
    source = source_address.get()
    return (source, 0) if source else None


# The target is plain HTTP, so no TLS context is ever used; one made once is passed to
# every client. Without it each new client loads the CA bundle (httpx's default):
# ~20 ms of CPU per SSE attempt, which took most of a core of this process, and so of
# the node's machine, in a run.
_UNUSED_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def http_client(target: Target) -> httpx.AsyncClient:
    """An HTTP client sending from the current attack's address."""
    source = source_address.get()
    transport = (
        httpx.AsyncHTTPTransport(local_address=source, verify=_UNUSED_TLS) if source else None
    )
    return httpx.AsyncClient(
        base_url=target.http_url,
        timeout=HTTP_TIMEOUT_SECS,
        transport=transport,
        verify=_UNUSED_TLS,
    )


@dataclass
class Target:
    http_url: str
    secret: str
    honest_channels: list[str]
    resume_channel: str
    bomb_channel: str
    deadline: float = 0.0

    @property
    def ws_url(self) -> str:
        return self.http_url.replace("http://", "ws://", 1) + "/ws/"

    def over(self) -> bool:
        return time.monotonic() >= self.deadline


@dataclass
class AttackStats:
    name: str
    clients: int
    anonymous_rest: bool
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    # Anonymous REST requests answered 200, and when the first and last were sent.
    rest_ok: int = 0
    rest_first_at: float | None = None
    rest_last_at: float | None = None
    max_page_bytes: int = 0
    # The address the attack sends from; when other attacks share it, they share its
    # budgets, so a budget refusal (RATE_LIMITED, 1013, 429, and 1008 after refusals)
    # is an answer any of them may get, counted in ``budget_refused``.
    address: str = ""
    shared_address: bool = False
    budget_refused: int = 0
    # While the node is overloaded, any new anonymous stream or REST request may be
    # refused (1013, or 503 for SSE and REST), whatever it is: counted here, and checked
    # against the node's own count of such refusals (push_overload_refusals_total).
    overload_refused: int = 0

    def record(self, outcome: str, expected: bool, sample: str = "") -> None:
        self.outcomes[outcome] += 1
        if not expected and is_overload_refusal(outcome):
            self.overload_refused += 1
            return
        if not expected and self.shared_address and is_budget_refusal(outcome):
            self.budget_refused += 1
            return
        if not expected:
            self.unexpected[outcome] += 1
            if len(self.samples) < SAMPLES_KEPT:
                self.samples.append(f"{outcome}: {sample}"[:300])

    def report(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs.
        return {**vars(self), "outcomes": dict(self.outcomes), "unexpected": dict(self.unexpected)}

    def rest_sent(self) -> None:
        now = time.time()
        self.requests += 1
        self.rest_first_at = self.rest_first_at or now
        self.rest_last_at = now


BUDGET_REFUSALS = re.compile(r"RATE_LIMITED|\b1013\b|http 429|close[d]? 1008")


def is_budget_refusal(outcome: str) -> bool:
    return BUDGET_REFUSALS.search(outcome) is not None


OVERLOAD_REFUSALS = re.compile(r"\b1013\b|http 503")


def is_overload_refusal(outcome: str) -> bool:
    return OVERLOAD_REFUSALS.search(outcome) is not None


class Pacer:
    """At most ``per_sec`` ticks a second and ``per_sec`` x the time left in all; no
    catch-up bursts after a slow step."""

    def __init__(self, target: Target, per_sec: float) -> None:
        self.target = target
        self.interval = 1.0 / per_sec
        self.left = int((target.deadline - time.monotonic()) * per_sec) + 1
        self.last = 0.0

    async def tick(self) -> bool:
        wait = self.last + self.interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.last = time.monotonic()
        self.left -= 1
        return self.left >= 0 and not self.target.over()


# ----- WebSocket helpers ------------------------------------------------------------------


async def ws_open(
    url: str, *, subprotocol: str | None = None, **kwargs: Any
) -> tuple[ClientConnection, Codec]:
    if "sock" not in kwargs:
        kwargs["local_addr"] = local_addr()
    ws = await connect(
        url,
        subprotocols=[subprotocol] if subprotocol else None,  # type: ignore[list-item]  # websockets wants its Subprotocol type
        open_timeout=10,
        close_timeout=1,
        ping_interval=None,
        max_size=None,
        **kwargs,
    )
    return ws, CODECS[ws.subprotocol or "v1.json"]


async def recv_envelope(ws: ClientConnection, codec: Codec) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_SECS)
    return codec.decode(frame)


def describe(envelope: dict[str, Any]) -> str:
    if envelope.get("type") == "error":
        return f"error {envelope.get('code')}" + (" with id" if "id" in envelope else "")
    return str(envelope.get("type"))


async def handshake_outcome(url: str, **kwargs: Any) -> str:
    """What a handshake that should be refused got: ``http 403``, ``close 1008``, or
    ``connection_established`` when it was let in."""
    try:
        ws, codec = await ws_open(url, **kwargs)
    except InvalidStatus as exc:
        return f"http {exc.response.status_code}"
    try:
        return describe(await recv_envelope(ws, codec))
    except ConnectionClosed as exc:
        return f"close {exc.rcvd.code if exc.rcvd else None}"
    finally:
        await ws.close()


# One step on an open connection; the int counts the steps on this connection from 1.
Step = Callable[[ClientConnection, Codec, AttackStats, int], Awaitable[None]]


async def frame_attack(
    target: Target, stats: AttackStats, step: Step, *, per_sec: float, subprotocol: str | None
) -> None:
    """Run ``step`` on one connection ``per_sec`` times a second; a close the step did
    not expect is recorded and the client connects again."""
    pacer = Pacer(target, per_sec)
    while pacer.left > 0 and not target.over():
        stats.requests += 1
        ws, codec = await ws_open(target.ws_url, subprotocol=subprotocol)
        steps = 0
        try:
            await recv_envelope(ws, codec)  # connection_established
            while await pacer.tick():
                steps += 1
                await step(ws, codec, stats, steps)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            stats.record(f"closed {code}", False, "the server closed the connection")
            await asyncio.sleep(1.0)
        except TimeoutError:
            stats.record("no reply", False, f"nothing within {REPLY_TIMEOUT_SECS} s")
        finally:
            await ws.close()


async def send_expecting(
    ws: ClientConnection,
    codec: Codec,
    stats: AttackStats,
    frame: str | bytes,
    expected: Callable[[dict[str, Any]], bool],
) -> None:
    stats.requests += 1
    await ws.send(frame)
    reply = await recv_envelope(ws, codec)
    stats.record(describe(reply) + ", open", expected(reply), repr(reply)[:200])


# ----- 1. lone surrogate request ids -----------------------------------------------------


async def surrogate_id(target: Target, stats: AttackStats) -> None:
    # The JSON escape itself: the frame is valid UTF-8, its decoded id is not Unicode.
    frame = '{"type":"heartbeat","id":"\\ud800"}'

    def expected(reply: dict[str, Any]) -> bool:
        return reply.get("code") == "INVALID_MESSAGE" and "id" not in reply

    async def step(ws: ClientConnection, codec: Codec, stats: AttackStats, _: int) -> None:
        await send_expecting(ws, codec, stats, frame, expected)

    await frame_attack(target, stats, step, per_sec=10, subprotocol=None)


# ----- 2. resume from 0 and leave ----------------------------------------------------------


async def resume_and_leave(target: Target, stats: AttackStats) -> None:
    subscribe = json.dumps({"type": "subscribe", "channel": target.resume_channel, "since": 0})
    pacer = Pacer(target, 4)
    while await pacer.tick():
        stats.requests += 2  # the handshake and the subscribe
        ws, _ = await ws_open(target.ws_url)
        await ws.send(subscribe)
        await asyncio.sleep(0.01)
        ws.transport.abort()
        stats.record("left 10 ms after subscribe", True)


# ----- 3. history bombs ----------------------------------------------------------------------


def bomb_path(target: Target) -> str:
    return f"/api/v1/channels/{target.bomb_channel}/messages?since=0&limit=1000"


async def bomb_reader(target: Target, stats: AttackStats) -> None:
    pacer = Pacer(target, 0.5)
    async with http_client(target) as http:
        while await pacer.tick():
            stats.rest_sent()
            async with http.stream("GET", bomb_path(target)) as response:
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > PAGE_READ_CAP_BYTES:
                        break
            stats.max_page_bytes = max(stats.max_page_bytes, size)
            record_rest(stats, response.status_code, {200, 429})
            if response.status_code == 200 and size > PAGE_BYTES_BOUND:
                stats.record("page over the byte budget", False, f"{size} bytes or more")


async def bomb_staller(target: Target, stats: AttackStats) -> None:
    """Asks for the bomb page, reads its first bytes, then reads nothing for a while."""
    host, port = urlsplit(target.http_url).hostname, urlsplit(target.http_url).port
    pacer = Pacer(target, 1 / (STALL_SECS + 1))
    while await pacer.tick():
        stats.rest_sent()
        reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr())
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(f"GET {bomb_path(target)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status_line = await asyncio.wait_for(reader.readline(), HTTP_TIMEOUT_SECS)
        status = int(status_line.split()[1]) if status_line else 0
        record_rest(stats, status, {200, 429})
        await asyncio.sleep(STALL_SECS)
        writer.transport.abort()


def record_rest(stats: AttackStats, status: int, expected: set[int]) -> None:
    if status == 200 and stats.anonymous_rest:
        stats.rest_ok += 1
    stats.record(f"http {status}", status in expected)


# ----- 4. floods, oversized frames, subscribe storms, garbage ------------------------------


async def frame_flood(target: Target, stats: AttackStats) -> None:
    """Frames as fast as the socket takes them: RATE_LIMITED, then close 1008."""
    frame = json.dumps({"type": "heartbeat"})
    pacer = Pacer(target, 0.25)
    while await pacer.tick():
        stats.requests += 1 + FLOOD_FRAMES
        ws, codec = await ws_open(target.ws_url)
        limited = 0
        try:
            for _ in range(FLOOD_FRAMES):
                await ws.send(frame)
            async with asyncio.timeout(10):
                while True:
                    limited += describe(await recv_envelope(ws, codec)) == "error RATE_LIMITED"
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            stats.record(f"close {code} after RATE_LIMITED", code == 1008 and limited > 0)
        except TimeoutError:
            stats.record("still open after the flood", False, f"{limited} RATE_LIMITED")
        finally:
            ws.transport.abort()


async def oversized(target: Target, stats: AttackStats) -> None:
    """A frame one byte over the limit (MESSAGE_TOO_LARGE, close 1009), a REST body
    over it (413, or refused before it is read: anonymous), and one 8 times the largest
    body a node reads (413 before any of it is read)."""
    pacer = Pacer(target, 0.5)
    frame = "x" * (MAX_FRAME_BYTES + 1)
    body = b'{"data":"' + b"x" * MAX_FRAME_BYTES + b'"}'
    async with http_client(target) as http:
        while await pacer.tick():
            stats.requests += 2
            ws, codec = await ws_open(target.ws_url)
            outcome = ""
            try:
                await recv_envelope(ws, codec)
                await ws.send(frame)
                outcome = describe(await recv_envelope(ws, codec))
                await recv_envelope(ws, codec)
            except ConnectionClosed as exc:
                outcome += f", close {exc.rcvd.code if exc.rcvd else None}"
            except TimeoutError:
                outcome += ", no close"
            finally:
                ws.transport.abort()
            stats.record(outcome, outcome == "error MESSAGE_TOO_LARGE, close 1009")
            stats.rest_sent()
            response = await http.post(
                "/api/v1/channels/big/messages",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            record_rest(stats, response.status_code, {401, 403, 413, 429})
            stats.rest_sent()
            status = await _huge_body(target)
            record_rest(stats, status, {413, 429})


# A body 8 times the largest one a node reads (DATA_UPLOAD_MAX_MEMORY_SIZE): what a
# node would read whole, spooled to disk, if it read every body before refusing it.
HUGE_BODY_BYTES = 8 * (2 * MAX_FRAME_BYTES + 65_536)
HUGE_BODY_CHUNK = 64 * 1024


async def _huge_body(target: Target) -> int:
    """POST a body declared as ``HUGE_BODY_BYTES``, written until the node answers or
    stops reading: the node's status (413 before reading it, or 429 over the address's
    REST budget), 0 if none came."""
    host, port = urlsplit(target.http_url).hostname, urlsplit(target.http_url).port
    reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr())
    head = (
        f"POST /api/v1/channels/big/messages HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {HUGE_BODY_BYTES}\r\n\r\n"
    )
    try:
        writer.write(head.encode())
        answered = asyncio.ensure_future(reader.readline())
        sent = 0
        while not answered.done() and sent < HUGE_BODY_BYTES:
            writer.write(b" " * HUGE_BODY_CHUNK)
            sent += HUGE_BODY_CHUNK
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except (TimeoutError, ConnectionError):
                break  # the node stopped reading
        status_line = await asyncio.wait_for(answered, HTTP_TIMEOUT_SECS)
        return int(status_line.split()[1]) if status_line else 0
    except (TimeoutError, ConnectionError, IndexError, ValueError):
        return 0
    finally:
        writer.transport.abort()


async def subscribe_storm(target: Target, stats: AttackStats) -> None:
    """Thousands of subscribes to new channels, just under the frame rate: subscribed up
    to the per-connection limit, FORBIDDEN past it; and RATE_LIMITED once the three
    clients together (75 a second) have used up their address's subscription budget
    (a burst of 1000, then 50 a second)."""
    prefix = f"storm-{secrets.token_hex(4)}"
    held: Counter[int] = Counter()  # subscriptions each connection holds

    async def step(ws: ClientConnection, codec: Codec, stats: AttackStats, n: int) -> None:
        frame = json.dumps({"type": "subscribe", "channel": f"{prefix}-{id(ws)}-{n}"})
        full = held[id(ws)] >= SUBSCRIBE_LIMIT
        wanted = {"error FORBIDDEN"} if full else {"subscribed", "error RATE_LIMITED"}
        stats.requests += 1
        await ws.send(frame)
        reply = describe(await recv_envelope(ws, codec))
        held[id(ws)] += reply == "subscribed"
        stats.record(reply + ", open", reply in wanted, reply)

    await frame_attack(target, stats, step, per_sec=25, subprotocol=None)


def garbage_frame(subprotocol: str) -> str | bytes:
    """One frame the server cannot understand, of a kind picked at random."""
    rng = random.random()
    if subprotocol == "v1.json":
        if rng < 0.25:
            return "".join(random.choices(string.printable, k=random.randint(1, 200)))
        if rng < 0.4:
            return random.randbytes(random.randint(1, 200))  # a binary frame on JSON
        if rng < 0.55:
            return '{"type":"publish","channel":"g","data":' + "[" * 100_000 + "]" * 100_000 + "}"
        if rng < 0.7:
            return random.choice(["[1,2]", '"x"', "null", '{"type":7}', '{"id":[]}', "{}"])
        return json.dumps({"type": "subscribe", "channel": "bad name!" * 20, "since": "x"})
    if rng < 0.2:
        return "".join(random.choices(string.printable, k=50))  # a text frame on binary
    if rng < 0.35 and subprotocol == "v1.msgpack":
        return b"\x91" * 100_000 + b"\x00"  # arrays nested 100,000 deep
    return random.randbytes(random.randint(1, 300))


async def garbage(target: Target, stats: AttackStats, subprotocol: str) -> None:
    def expected(reply: dict[str, Any]) -> bool:
        # Random bytes may decode to a valid request now and then: any non-error reply.
        return reply.get("type") != "error" or reply.get("code") in GARBAGE_CODES

    async def step(ws: ClientConnection, codec: Codec, stats: AttackStats, _: int) -> None:
        await send_expecting(ws, codec, stats, garbage_frame(subprotocol), expected)

    await frame_attack(target, stats, step, per_sec=10, subprotocol=subprotocol)


# ----- 5. throttle escapes, bad credentials, hosts, cursors, nesting, secrets -------------


async def forwarded_for(target: Target, stats: AttackStats) -> None:
    """Anonymous reads, each claiming another client IP: the throttle must not care."""
    pacer = Pacer(target, 10)
    path = f"/api/v1/channels/{target.resume_channel}/messages?since=5990&limit=5"
    async with http_client(target) as http:
        while await pacer.tick():
            stats.rest_sent()
            ip = ".".join(str(random.randint(1, 254)) for _ in range(4))
            response = await http.get(path, headers={"X-Forwarded-For": ip})
            record_rest(stats, response.status_code, {200, 429})


async def sse_status(target: Target, query: str, headers: dict[str, str] | None = None) -> int:
    async with (
        http_client(target) as http,
        http.stream(
            "GET", f"/sse/?{query}", headers={"Accept": "text/event-stream", **(headers or {})}
        ) as response,
    ):
        return response.status_code


async def bad_credentials(target: Target, stats: AttackStats) -> None:
    """Handshakes with made-up tokens (refused: 403 or close 1008, never anonymous) and
    made-up session cookies (anonymous, or refused). Past the failed-authentication
    budget of an address (PUSH_AUTH_FAILURES_PER_MIN) credentials go unchecked: close
    1013 (try again later) and SSE 429."""
    pacer = Pacer(target, 5)
    refused = {"http 403", "close 1008", "close 1013"}
    while await pacer.tick():
        stats.requests += 3
        token = secrets.token_hex(20)
        outcome = await handshake_outcome(f"{target.ws_url}?token={token}")
        stats.record(f"ws token: {outcome}", outcome in refused)
        cookie = {"Cookie": f"sessionid={secrets.token_hex(16)}"}
        outcome = await handshake_outcome(target.ws_url, additional_headers=cookie)
        stats.record(f"ws session: {outcome}", outcome in refused | {"connection_established"})
        status = await sse_status(target, f"channel={target.resume_channel}&token={token}")
        stats.record(f"sse token: http {status}", status in {403, 429})


async def foreign_host(target: Target, stats: AttackStats) -> None:
    """WebSocket and SSE handshakes for a host this server does not serve."""
    pacer = Pacer(target, 4)
    port = urlsplit(target.http_url).port
    refused = {"http 400", "http 403", "close 1008"}
    while await pacer.tick():
        stats.requests += 2
        outcome = await handshake_outcome(
            f"ws://evil.example:{port}/ws/", host="127.0.0.1", port=port
        )
        stats.record(f"ws: {outcome}", outcome in refused)
        status = await sse_status(
            target, f"channel={target.resume_channel}", {"Host": "evil.example"}
        )
        stats.record(f"sse: http {status}", status in {400, 403})


async def huge_cursor(target: Target, stats: AttackStats) -> None:
    """SSE cursors of thousands of digits, in ``?since=`` and in ``Last-Event-ID``."""
    pacer = Pacer(target, 3)
    channel = target.resume_channel
    while await pacer.tick():
        stats.requests += 2
        digits = "9" * random.randint(2_000, 6_000)
        status = await sse_status(target, f"channel={channel}&since={channel}:{digits}")
        stats.record(f"since: http {status}", status == 400)
        status = await sse_status(
            target, f"channel={channel}", {"Last-Event-ID": f"{channel}:{digits}"}
        )
        stats.record(f"last-event-id: http {status}", status == 400)


async def deep_nesting(target: Target, stats: AttackStats) -> None:
    """JSON nested 100,000 deep in a REST body and in a WebSocket frame."""
    pacer = Pacer(target, 3)
    nested = "[" * 100_000 + "]" * 100_000
    body = '{"data":' + nested + "}"
    frame = '{"type":"publish","channel":"nest","data":' + nested + "}"
    async with http_client(target) as http:
        ws, codec = await ws_open(target.ws_url)
        await recv_envelope(ws, codec)
        try:
            while await pacer.tick():
                stats.rest_sent()
                response = await http.post(
                    "/api/v1/channels/nest/messages",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                record_rest(stats, response.status_code, {400, 401, 403, 429})
                # 200 KB frames, 6 a second: past the address's frame-byte budget (a
                # burst of 8 MiB, then 1 MiB a second) they are refused undecoded.
                await send_expecting(
                    ws,
                    codec,
                    stats,
                    frame,
                    lambda reply: reply.get("code") in GARBAGE_CODES | {"RATE_LIMITED"},
                )
        except (ConnectionClosed, TimeoutError) as exc:
            stats.record("websocket lost", False, repr(exc))
        finally:
            await ws.close()


# A URL-encoded form as large as a node reads: ``a&a&...``, a million fields.
FORM_BODY = b"a&" * (MAX_FRAME_BYTES + 32_000)
MULTIPART_BODY = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n' * 40_000


async def form_bodies(target: Target, stats: AttackStats) -> None:
    """Anonymous REST publishes whose bodies are forms of a million fields (2 MB,
    URL-encoded) or 40,000 parts (multipart): a server that parsed forms before the
    application (daphne's Twisted did) spent 0.77 s of CPU on each."""
    pacer = Pacer(target, 3)
    kinds = [
        (FORM_BODY, "application/x-www-form-urlencoded"),
        (MULTIPART_BODY, "multipart/form-data; boundary=b"),
    ]
    async with http_client(target) as http:
        while await pacer.tick():
            body, content_type = kinds[stats.requests % 2]
            stats.rest_sent()
            response = await http.post(
                "/api/v1/channels/form/messages",
                content=body,
                headers={"Content-Type": content_type},
            )
            record_rest(stats, response.status_code, {401, 429})


# Heads that cost a node most to read, each line within what both servers read (daphne's
# Twisted closes a connection with a line over 16 KiB unanswered): a Content-Type of
# 3,000 parameters, 1,800 cookies, 15,000 semicolons as cookies, 7,500 query
# parameters, and a WebSocket handshake whose URL is past what the handshake's parser
# takes under uvicorn (8 KiB).
HEAVY_LINE_BYTES = 15_000
HEAVY_CONTENT_TYPE = ("application/json" + "; a=b" * 3_000)[:HEAVY_LINE_BYTES].rstrip("; ")
HEAVY_COOKIE = "; ".join(f"c{i}=v" for i in range(3_000))[:HEAVY_LINE_BYTES].rstrip("; ")
# Pieces without "=": Twisted caught an exception for each.
HEAVY_BARE_COOKIE = ";" * HEAVY_LINE_BYTES
HEAVY_QUERY = "&".join(["a"] * 7_500)  # past 1,000 fields; each one parsed under daphne
LONG_HANDSHAKE_URL = "/ws/?x=" + "a" * 12_000


async def heavy_heads(target: Target, stats: AttackStats) -> None:
    """Anonymous requests with the heads above, in turn."""
    pacer = Pacer(target, 4)
    host, port = urlsplit(target.http_url).hostname, urlsplit(target.http_url).port
    async with http_client(target) as http:
        while await pacer.tick():
            kind = stats.requests % 5
            stats.rest_sent()
            if kind == 0:
                response = await http.post(
                    "/api/v1/channels/heavy/messages",
                    content=b'{"data": 1}',
                    headers={"Content-Type": HEAVY_CONTENT_TYPE},
                )
                record_rest(stats, response.status_code, {415, 429})
            elif kind == 1:
                response = await http.get(
                    "/api/v1/channels/heavy/messages", headers={"Cookie": HEAVY_COOKIE}
                )
                record_rest(stats, response.status_code, {200, 429})
            elif kind == 2:
                response = await http.get(f"/api/v1/channels/heavy/messages?{HEAVY_QUERY}")
                record_rest(stats, response.status_code, {400, 429})
            elif kind == 3:
                response = await http.get(
                    "/api/v1/channels/heavy/messages", headers={"Cookie": HEAVY_BARE_COOKIE}
                )
                record_rest(stats, response.status_code, {200, 429})
            else:
                status = await _long_handshake(host, port)
                # 414 under uvicorn; daphne reads lines of up to 16 KiB and accepts it.
                stats.record(f"long handshake: {status}", status in {"414", "101", "1013"})


async def _long_handshake(host: str | None, port: int | None) -> str:
    """The status a WebSocket handshake of ``LONG_HANDSHAKE_URL`` gets ("none": closed
    unanswered; "open": no answer and still open after the reply timeout)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr())
    try:
        writer.write(
            (
                f"GET {LONG_HANDSHAKE_URL} HTTP/1.1\r\nHost: {host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT_SECS)
        return line.split()[1].decode() if line else "none"
    except TimeoutError:
        return "open"
    except (ConnectionError, IndexError):
        return "none"
    finally:
        writer.transport.abort()


async def secret_in_url(target: Target, stats: AttackStats) -> None:
    """``%74oken`` is ``token`` percent-encoded: the node must refuse it as a token and
    keep it out of its log (the test reads the log for the secret)."""
    pacer = Pacer(target, 2)
    query = f"%74oken={target.secret}"
    channel = target.resume_channel
    async with http_client(target) as http:
        while await pacer.tick():
            stats.requests += 2
            outcome = await handshake_outcome(f"{target.ws_url}?{query}")
            outcomes = {"http 403", "close 1008", "close 1013"}  # 1013: see bad_credentials
            stats.record(f"ws: {outcome}", outcome in outcomes)
            status = await sse_status(target, f"channel={channel}&{query}")
            stats.record(f"sse: http {status}", status in {403, 429})
            stats.rest_sent()
            response = await http.get(f"/api/v1/channels/{channel}/messages?since=5999&{query}")
            record_rest(stats, response.status_code, {200, 401, 403, 429})


# ----- 6. slow readers -----------------------------------------------------------------------


async def slow_reader(target: Target, stats: AttackStats) -> None:
    """Subscribes to the busy channels (and replays the whole resume channel), then
    reads nothing: its send queue must stay bounded, or it must be closed 4002."""
    host, port = urlsplit(target.http_url).hostname, urlsplit(target.http_url).port
    sock = socket.socket()
    if (source := local_addr()) is not None:
        sock.bind(source)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    # max_queue=1: the library stops reading the socket after one unread frame.
    ws, codec = await ws_open(target.ws_url, sock=sock, max_queue=1)
    await recv_envelope(ws, codec)
    stats.requests += 1
    for channel in target.honest_channels:
        stats.requests += 1
        await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
    stats.requests += 1
    await ws.send(json.dumps({"type": "subscribe", "channel": target.resume_channel, "since": 0}))
    await asyncio.sleep(max(0.0, target.deadline - time.monotonic()))
    code = ws.close_code
    stats.record(f"close {code}" if code else "held to the end", code in (None, 4002))
    ws.transport.abort()


# ----- 7. the per-address budgets -------------------------------------------------------------


async def handshake_flood(target: Target, stats: AttackStats) -> None:
    """WebSocket and SSE handshakes, 8 at a time, up to 64 a second: 3 times the
    address's budget (a burst of 100, then 20 a second), and over it however slowly a
    busy node answers. Let in, or refused with close 1013 and 429, never anything else."""
    channel = target.honest_channels[0]

    async def worker(sse: bool) -> None:
        pacer = Pacer(target, HANDSHAKE_FLOOD_PER_SEC / HANDSHAKE_FLOOD_WORKERS)
        while await pacer.tick():
            stats.requests += 1
            if sse:
                status = await sse_status(target, f"channel={channel}")
                stats.record(f"sse: http {status}", status in {200, 429})
            else:
                outcome = await handshake_outcome(target.ws_url)
                stats.record(f"ws: {outcome}", outcome in {"connection_established", "close 1013"})

    await asyncio.gather(*(worker(n % 2 == 1) for n in range(HANDSHAKE_FLOOD_WORKERS)))


async def spread_frames(target: Target, stats: AttackStats) -> None:
    """Frames spread over 20 connections, each within its own rate (45 a second against
    50), 900 a second in all against the address's 200 (after its burst of 2000):
    answered, or RATE_LIMITED with the connection open; a connection that goes on being
    refused is closed 1008 as the per-connection rate would close it, and the client
    opens another (which the address's handshake budget may refuse: 1013). Each
    connection sends without waiting for the replies."""
    frame = json.dumps({"type": "heartbeat"})

    async def read(ws: ClientConnection) -> None:
        while True:
            reply = await ws.recv()
            # Read cheaply: the attackers share one process with 49 other clients.
            if "heartbeat_ack" in reply:
                stats.record("heartbeat_ack, open", True)
            elif "RATE_LIMITED" in reply:
                stats.record("error RATE_LIMITED, open", True)
            else:
                stats.record("other reply", False, str(reply)[:200])

    async def one_connection() -> None:
        while not target.over():
            stats.requests += 1
            ws, codec = await ws_open(target.ws_url)
            reader: asyncio.Task[None] | None = None
            try:
                await recv_envelope(ws, codec)  # connection_established
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                stats.record(f"refused at connect: close {code}", code == 1013)
                ws.transport.abort()
                await asyncio.sleep(1.0)
                continue
            try:
                reader = asyncio.create_task(read(ws))
                pacer = Pacer(target, SPREAD_PER_CONNECTION_PER_SEC)
                while await pacer.tick() and not reader.done():
                    stats.requests += 1
                    await ws.send(frame)
                if reader.done():  # closed by the server: raises why
                    await reader
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                stats.record(f"close {code} after RATE_LIMITED", code == 1008)
            finally:
                if reader is not None:
                    reader.cancel()
                ws.transport.abort()

    await asyncio.gather(*(one_connection() for _ in range(SPREAD_CONNECTIONS)))


# ----- the table and the run -------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    clients: int
    run: Callable[[Target, AttackStats], Awaitable[None]]
    anonymous_rest: bool = False


def _garbage_in(subprotocol: str) -> Callable[[Target, AttackStats], Awaitable[None]]:
    return lambda target, stats: garbage(target, stats, subprotocol)


ATTACKS: list[Attack] = [
    Attack("lone surrogate id", 3, surrogate_id),
    Attack("resume from 0 and leave", 5, resume_and_leave),
    Attack("history bomb, reading", 4, bomb_reader, anonymous_rest=True),
    Attack("history bomb, stalled", 3, bomb_staller, anonymous_rest=True),
    Attack("frame flood", 3, frame_flood),
    Attack("oversized frame and body", 2, oversized, anonymous_rest=True),
    Attack("subscribe storm", 3, subscribe_storm),
    Attack("garbage v1.json", 2, _garbage_in("v1.json")),
    Attack("garbage v1.msgpack", 2, _garbage_in("v1.msgpack")),
    Attack("garbage v1.protobuf", 1, _garbage_in("v1.protobuf")),
    Attack("X-Forwarded-For rotation", 3, forwarded_for, anonymous_rest=True),
    Attack("bad tokens and sessions", 3, bad_credentials),
    Attack("foreign Host", 2, foreign_host),
    Attack("SSE cursor of 1000s of digits", 2, huge_cursor),
    Attack("nested JSON 100,000 deep", 2, deep_nesting, anonymous_rest=True),
    Attack("%74oken secret in URL", 2, secret_in_url, anonymous_rest=True),
    Attack("slow reader", 4, slow_reader),
    # Four clients of the attacks above gave theirs to these (still 50 in all).
    Attack("handshake flood", 1, handshake_flood),
    Attack("frames over 20 connections", 1, spread_frames),
    Attack("form bodies of a million fields", 1, form_bodies, anonymous_rest=True),
    Attack("heavy heads", 1, heavy_heads, anonymous_rest=True),
]
ATTACKERS = sum(attack.clients for attack in ATTACKS)


async def client(attack: Attack, target: Target, stats: AttackStats) -> None:
    """One attacker: runs its attack again after anything that breaks it, until the end,
    from the attack's own address."""
    source_address.set(stats.address)
    while not target.over():
        try:
            await attack.run(target, stats)
        except ConnectionClosed as exc:  # a close the attack did not expect
            stats.requests += 1
            stats.record(f"client error: closed {exc.rcvd.code if exc.rcvd else None}", False)
            await asyncio.sleep(1.0)
        except Exception as exc:  # any failure is a finding, recorded as unexpected
            stats.requests += 1
            stats.record(f"client error {type(exc).__name__}", False, str(exc))
            await asyncio.sleep(1.0)


async def run(
    target: Target, duration_secs: float, only: list[str] | None = None, addresses: int = 0
) -> dict[str, Any]:
    target.deadline = time.monotonic() + duration_secs
    attacks = [attack for attack in ATTACKS if not only or attack.name in only]
    # Every attack has its row in the report; one left out by ``only`` with nothing done.
    address_of = {a.name: source_of(ATTACKS.index(a), addresses) for a in ATTACKS}
    sharing = Counter(address_of.values())
    stats = {
        attack.name: AttackStats(
            attack.name,
            attack.clients,
            attack.anonymous_rest,
            address=address_of[attack.name],
            shared_address=sharing[address_of[attack.name]] > 1,
        )
        for attack in ATTACKS
    }
    # SIGTERM (the test stops an attack that takes the node's memory): end every loop
    # now and still write the report of what was done.
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    started = time.time()
    pending = {
        asyncio.create_task(client(attack, target, stats[attack.name]))
        for attack in attacks
        for _ in range(attack.clients)
    }
    # Every loop ends at the deadline; what is still waiting on the node then is cut.
    cut_at = target.deadline + HTTP_TIMEOUT_SECS
    while pending and time.monotonic() < cut_at:
        if stopped.is_set():
            target.deadline = time.monotonic()
            cut_at = min(cut_at, time.monotonic() + STOP_GRACE_SECS)
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return {
        "attackers": sum(attack.clients for attack in attacks),
        "started_at": started,
        "ended_at": time.time(),
        "stopped_early": stopped.is_set(),
        "cut_short": len(pending),
        "attacks": [s.report() for s in stats.values()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http-url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--honest-channel", action="append", required=True)
    parser.add_argument("--resume-channel", required=True)
    parser.add_argument("--bomb-channel", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument(
        "--only", action="append", choices=[a.name for a in ATTACKS], help="this attack only"
    )
    parser.add_argument(
        "--addresses",
        type=int,
        default=0,
        help="attack from this many addresses in turn (0: each attack from its own)",
    )
    args = parser.parse_args()
    target = Target(
        args.http_url, args.secret, args.honest_channel, args.resume_channel, args.bomb_channel
    )
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    report = asyncio.run(run(target, args.duration, args.only, args.addresses))
    with open(args.report, "w") as out:
        json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
