"""Subscriber side of the load generator: many connections in one process, counted.

Each connection subscribes to one channel, remembers the channel's seq from the
`subscribed` reply (its base) and then checks every `message` against the last seq it
saw: +1 is a delivery, a jump is a gap, anything not above the last is a duplicate.
At the end the orchestrator says each channel's final seq and every connection's loss
is ``final - base - unique deliveries``.

A stalled subscriber (``stall=True``, the slow-consumer scenarios) subscribes the same
way, then stops reading its socket (``pause_reading``) until the orchestrator resumes it
to read what the server did meanwhile: the close code, or the gaps in seq.

A Server-Sent Events stream (``transport="sse"``) has no `subscribed` reply: the
orchestrator names each channel's current seq, the stream resumes after it
(``?since=``), so that seq is the base and nothing published later can be missed.

A Pusher connection (``transport="pusher"``, ``/app/<key>``) has neither a seq in its
`subscription_succeeded` nor in its events: the orchestrator names the base as for
SSE (nothing is published between the subscriptions and the publish phase), and the
subscription counts its deliveries (``counted``): ``last`` is the base plus the count,
so a loss shows as ``final - base - count`` and a count above ``final - base`` as that
many duplicates. A lost and a duplicated delivery on one connection would cancel out,
and order is not checked: the Pusher wire has nothing to check it with.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from bench import pusher
from bench.httpconn import CLOSE_ABNORMAL, HttpConnection
from bench.sseclient import sse_connect, sse_path
from bench.stats import BUCKETS_PER_SEC, DeliveryStats
from bench.wire import OPCODE_TEXT, WireFormat, get_format
from bench.wsclient import WsConnection, ws_connect

SUBSCRIBE_TIMEOUT_SECS = 30.0
DRAIN_POLL_SECS = 0.05
QUIET_SECS = 3.0  # no frame for this long ends the wait for stragglers
ERROR_SAMPLE_LIMIT = 20  # distinct error texts kept per worker, to keep replies small
# A stalled subscriber's socket: a small receive buffer (the kernel doubles it) and an
# Internet-sized MSS. Over loopback the MSS is 64 KB and the server's kernel send buffer
# grows to 4 MB (about 20,000 small frames) for a peer that reads nothing, before the
# server's own send queue holds a frame; with a 1,460-byte MSS it stops near 100 KB, as
# for a client across a network.
STALLED_SOCKET_OPTIONS = (
    (socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),
    (socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460),
)


@dataclass(slots=True)
class Subscription:
    """Per-connection bookkeeping: the channel, its base seq and the last seq seen."""

    channel: str
    ready: asyncio.Future[int]
    base: int = -1
    last: int = -1
    unique: int = 0
    counted: bool = False  # no seq on the wire (Pusher): last = base + deliveries


@dataclass(frozen=True)
class SubscribeSpec:
    """Where and how a worker opens its share of subscriber connections."""

    host: str
    port: int
    path: str
    channels: list[str]
    count: int
    offset: int  # global index of this worker's first connection (picks channels)
    concurrency: int
    fmt: str = "json"
    local_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()  # several nodes: connection i goes to ports[i % n]
    # "ws", "sse" (a stream per connection, JSON only) or "pusher" (``/app/<key>``)
    transport: str = "ws"
    # SSE and Pusher: each channel's seq before they subscribe, the base (0 if absent).
    base_seqs: dict[str, int] = field(default_factory=dict)
    stall: bool = False  # WebSocket only: stop reading once subscribed


class SubscriberSet:
    """All subscriber connections of one worker process and what they received."""

    def __init__(self) -> None:
        self.connections: list[HttpConnection] = []
        self.stats = DeliveryStats()
        self._format: WireFormat = get_format("json")
        self._closing = False

    async def open(self, spec: SubscribeSpec) -> dict[str, Any]:
        """Open and subscribe ``spec.count`` connections; report timing and failures."""
        # SSE and Pusher events are JSON whatever the publishers speak.
        self._format = get_format("json" if spec.transport in ("sse", "pusher") else spec.fmt)
        self._closing = False
        gate = asyncio.Semaphore(spec.concurrency)
        started = time.time()
        outcomes = await asyncio.gather(
            *(self._open_one(spec, spec.offset + i, gate) for i in range(spec.count))
        )
        failures: dict[str, int] = {}
        for outcome in outcomes:
            if outcome is not None:
                failures[outcome] = failures.get(outcome, 0) + 1
        return {
            "opened": spec.count - sum(failures.values()),
            "failures": failures,
            "started": started,
            "finished": time.time(),
        }

    async def _open_one(
        self, spec: SubscribeSpec, index: int, gate: asyncio.Semaphore
    ) -> str | None:
        channel = spec.channels[index % len(spec.channels)]
        port = spec.ports[index % len(spec.ports)] if spec.ports else spec.port
        local = spec.local_hosts[index % len(spec.local_hosts)] if spec.local_hosts else None
        async with gate:
            try:
                if spec.transport == "sse":
                    await self._open_stream(spec, channel, port, local)
                elif spec.transport == "pusher":
                    await self._open_pusher(spec, channel, port, local)
                else:
                    await self._open_websocket(spec, channel, port, local)
            except Exception as exc:
                return _describe(exc)
        return None

    async def _open_websocket(
        self, spec: SubscribeSpec, channel: str, port: int, local: str | None
    ) -> None:
        conn = await ws_connect(
            spec.host,
            port,
            spec.path,
            self._on_message,
            subprotocol=self._format.subprotocol,
            on_close=self._on_close,
            local_host=local,
            socket_options=STALLED_SOCKET_OPTIONS if spec.stall else (),
        )
        sub = Subscription(channel, asyncio.get_running_loop().create_future())
        conn.state = sub
        self.connections.append(conn)
        request = {"type": "subscribe", "channel": channel}
        conn.send(self._format.encode(request), self._format.opcode)
        await asyncio.wait_for(sub.ready, SUBSCRIBE_TIMEOUT_SECS)
        if spec.stall and conn.transport is not None:
            conn.transport.pause_reading()

    async def _open_stream(
        self, spec: SubscribeSpec, channel: str, port: int, local: str | None
    ) -> None:
        base = spec.base_seqs.get(channel, 0)
        sub = Subscription(channel, asyncio.get_running_loop().create_future(), base, base)
        sub.ready.set_result(base)  # the stream resumes after ``base``: known already
        conn = await sse_connect(
            spec.host,
            port,
            sse_path(spec.path, [channel], {channel: base}),
            self._on_message,
            on_close=self._on_close,
            local_host=local,
            state=sub,
        )
        self.connections.append(conn)

    async def _open_pusher(
        self, spec: SubscribeSpec, channel: str, port: int, local: str | None
    ) -> None:
        base = spec.base_seqs.get(channel, 0)
        future = asyncio.get_running_loop().create_future()
        sub = Subscription(channel, future, base, base, counted=True)
        # The subscribe goes out when connection_established comes (_on_pusher_event),
        # which may be in the same read as the handshake's answer.
        conn = await ws_connect(
            spec.host,
            port,
            spec.path,
            self._on_pusher_event,
            on_close=self._on_close,
            local_host=local,
            state=sub,
        )
        self.connections.append(conn)
        await asyncio.wait_for(sub.ready, SUBSCRIBE_TIMEOUT_SECS)

    def _on_pusher_event(self, conn: WsConnection, payload: bytes, now: float) -> None:
        # Hot path, as _on_message: the event, then its data text for the publisher's t.
        loads = self._format.decode
        frame = loads(payload)
        event = frame.get("event")
        sub: Subscription = conn.state  # type: ignore[assignment]  # state holds the Subscription
        if event == pusher.MESSAGE_EVENT:
            stats = self.stats
            stats.received += 1
            sub.unique += 1
            sub.last += 1
            data = loads(frame["data"])
            sent = data.get("t") if isinstance(data, dict) else None
            if sent is not None:
                _count_latency(stats, now - sent, now)
            else:  # no server timestamp to fall back on: no latency, only the span
                stats.last_rx = now
        elif event == pusher.CONNECTION_ESTABLISHED:
            conn.send(pusher.subscribe_frame(sub.channel), OPCODE_TEXT)
        elif event == pusher.SUBSCRIPTION_SUCCEEDED:
            if not sub.ready.done():
                sub.ready.set_result(sub.base)
        elif event == pusher.PING:
            conn.send(pusher.PONG_FRAME, OPCODE_TEXT)
        elif event in pusher.ERRORS:
            data = frame.get("data")
            code = data.get("code") if isinstance(data, dict) else data
            self._count_error(f"{event} {code}")
            if not sub.ready.done():
                sub.ready.set_exception(RuntimeError(f"{event} {code}"))

    def _on_message(self, conn: HttpConnection, payload: bytes, now: float) -> None:
        # Hot path: one call per delivered frame, so locals and no helper calls.
        message = self._format.decode(payload)
        kind = message.get("type")
        sub: Subscription = conn.state  # type: ignore[assignment]  # state holds the Subscription
        if kind == "message":
            stats = self.stats
            seq = message["seq"]
            last = sub.last
            stats.received += 1
            if seq > last:
                if seq != last + 1 and last >= 0:
                    stats.gaps += seq - last - 1
                sub.last = seq
                sub.unique += 1
            else:
                stats.duplicates += 1
            data = message.get("data")
            sent = data.get("t") if isinstance(data, dict) else None
            _count_latency(stats, now - (sent if sent is not None else message["timestamp"]), now)
        elif kind == "subscribed":
            sub.base = sub.last = int(message["seq"])
            if not sub.ready.done():
                sub.ready.set_result(sub.base)
        elif kind == "error":
            self._count_error(str(message.get("code")))
            if sub is not None and not sub.ready.done():
                sub.ready.set_exception(RuntimeError(f"error {message.get('code')}"))

    def _on_close(self, conn: HttpConnection) -> None:
        sub = conn.state
        if isinstance(sub, Subscription) and not sub.ready.done():
            sub.ready.set_exception(ConnectionError(f"closed {conn.close_code}"))
        if self._closing:
            return
        stats = self.stats
        stats.closed_by_server += 1
        code = conn.close_code or CLOSE_ABNORMAL
        stats.close_codes[code] = stats.close_codes.get(code, 0) + 1

    def _count_error(self, code: str) -> None:
        errors = self.stats.errors
        if code in errors or len(errors) < ERROR_SAMPLE_LIMIT:
            errors[code] = errors.get(code, 0) + 1

    async def collect(self, final_seq: dict[str, int], drain_secs: float) -> DeliveryStats:
        """Wait until every open connection has its channel's final seq, then count."""
        await self._wait_drained(final_seq, drain_secs)
        stats = self.stats
        stats.connections = len(self.connections)
        stats.expected = stats.missing = 0
        for conn in self.connections:
            sub: Subscription = conn.state  # type: ignore[assignment]  # state holds the Subscription
            if sub.base < 0:
                continue
            expected = max(0, final_seq.get(sub.channel, sub.base) - sub.base)
            stats.expected += expected
            stats.missing += max(0, expected - sub.unique)
            if sub.counted:  # no seqs to tell a duplicate by: more than expected is one
                stats.duplicates += max(0, sub.unique - expected)
        return stats

    async def _wait_drained(self, final_seq: dict[str, int], drain_secs: float) -> None:
        deadline = time.monotonic() + drain_secs
        started = time.time()
        while time.monotonic() < deadline:
            if all(self._is_drained(conn, final_seq) for conn in self.connections):
                return
            # Nothing arrived for a while: what is missing is lost, not late.
            if time.time() - max(started, self.stats.last_rx) > QUIET_SECS:
                return
            await asyncio.sleep(DRAIN_POLL_SECS)

    @staticmethod
    def _is_drained(conn: HttpConnection, final_seq: dict[str, int]) -> bool:
        sub: Subscription = conn.state  # type: ignore[assignment]  # state holds the Subscription
        return conn.closed or sub.base < 0 or sub.last >= final_seq.get(sub.channel, 0)

    def resume_reading(self) -> None:
        """Stalled connections read again (what piled up, then the close if any)."""
        for conn in self.connections:
            if conn.transport is not None and not conn.closed:
                conn.transport.resume_reading()

    def reset_counts(self, base_seqs: dict[str, int] | None = None) -> None:
        """Start a new measurement on the same connections: each counts from now. A
        counted subscription (no seqs) starts from its channel's seq in ``base_seqs``:
        from its own count, a loss in the last measurement would count again."""
        self.stats = DeliveryStats()
        bases = base_seqs or {}
        for conn in self.connections:
            sub: Subscription = conn.state  # type: ignore[assignment]  # state holds the Subscription
            if sub.base >= 0:
                sub.base = sub.last = bases.get(sub.channel, sub.last) if sub.counted else sub.last
                sub.unique = 0

    async def close_all(self) -> int:
        """Drop every connection (abort: a clean close of thousands adds nothing)."""
        self._closing = True
        count = len(self.connections)
        for conn in self.connections:
            conn.abort()
        self.connections = []
        self.stats = DeliveryStats()
        await asyncio.sleep(0)
        return count


def _count_latency(stats: DeliveryStats, latency: float, now: float) -> None:
    """One delivery's latency into the histogram, and its time into the span (inline
    arithmetic, not LatencyHistogram.add: this runs once per delivered frame)."""
    histogram = stats.latency
    bucket = int(latency * BUCKETS_PER_SEC) if latency > 0 else 0
    counts = histogram.counts
    counts[bucket] = counts.get(bucket, 0) + 1
    histogram.total += 1
    if latency > histogram.max_secs:
        histogram.max_secs = latency
    if not stats.first_rx:
        stats.first_rx = now
    stats.last_rx = now


def _describe(exc: BaseException) -> str:
    text = str(exc)[:80]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
