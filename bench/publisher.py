"""Publisher side of the load generator: lanes that publish, and a gate that paces them.

A lane is one publishing transport (an authenticated WebSocket, or one keep-alive HTTP
connection for REST) that sends publishes and waits for their replies: ``inflight``
requests at once on a WebSocket (replies matched by request ``id``), one on HTTP/1.1; a
REST request may carry a batch of messages (``POST /api/v1/messages``). The gate hands
out publishes to the lanes in one of three modes:

- ``rate``: a fixed schedule, message k at ``start + k / rate`` (latency scenarios).
- ``window``: as fast as the server delivers. A probe connection, subscribed last to
  every channel, counts what reaches it; the gate lets at most ``window`` messages be
  published and not yet seen by the probe. Without this bound a "max rate" publisher
  only measures how fast the server's queues fill.
- ``ack``: as fast as the server acknowledges: each lane keeps ``inflight`` requests
  outstanding and sends the next when a reply comes (the publish scenarios, where each
  message reaches one subscriber and the acknowledgement is what is measured).

Every payload carries the publisher's clock (``data.t``), so latency is publish call to
delivery, measured by one clock across processes; the time from sending a request to
its reply (the acknowledgement latency) goes into the outcome's histogram.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.restclient import HttpStatusError, RestClient
from bench.stats import LatencyHistogram
from bench.wire import WireFormat, get_format
from bench.wsclient import WsConnection, ws_connect

REPLY_TIMEOUT_SECS = 10.0
BATCH_PUBLISH_PATH = "/api/v1/messages"
STALL_SECS = 5.0  # window mode: no probe progress this long ends the phase
PROBE_CHANNELS_PER_CONN = 40  # below the contract's burst of 100 requests
MAX_LANES = 64


@dataclass(frozen=True)
class PublishSpec:
    """One publish phase: where, how fast, for how long."""

    host: str
    port: int
    channels: list[str]
    via: str = "ws"  # "ws" or "rest"
    ws_path: str = "/ws/"
    token: str = ""
    mode: str = "window"  # "window", "rate" or "ack"
    rate: float = 10.0  # messages per second, rate mode
    window: int = 8  # messages in flight, window mode
    duration_secs: float = 10.0
    max_messages: int = 1_000_000
    lanes: int = 4
    inflight: int = 1  # requests outstanding per lane (WebSocket; HTTP/1.1 has one)
    batch: int = 1  # messages per request; above 1 only over REST (POST /api/v1/messages)
    lane_rate: float = 0.0  # per-lane cap in requests per second; 0 = none
    payload_bytes: int = 64
    fmt: str = "json"
    probe_port: int = 0  # node the probe subscribes on; 0 = same as publishing


@dataclass
class PublishOutcome:
    """What the publish phase did, returned to the orchestrator."""

    published: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    final_seq: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    stalled: bool = False
    requests: int = 0  # acknowledged requests (a REST batch is one)
    ack_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


# (seqs of the messages, in order, or None; error code or "")
PublishReply = tuple[list[int] | None, str]


class Lane(Protocol):
    """One publishing transport."""

    async def publish(self, channels: list[str], data: dict[str, Any]) -> PublishReply:
        """Publish one message per channel in one request; return their seqs or the
        request's error code."""
        ...

    async def close(self) -> None: ...


class WsLane:
    """Publishes over an authenticated WebSocket, several requests in flight, each
    reply matched to its request by ``id`` (in order when a server echoes none)."""

    def __init__(self, fmt: WireFormat) -> None:
        self._format = fmt
        # Insertion-ordered: a reply without ``id`` answers the oldest request.
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self.conn: WsConnection | None = None

    async def open(self, spec: PublishSpec) -> None:
        path = spec.ws_path + (f"?token={spec.token}" if spec.token else "")
        self.conn = await ws_connect(
            spec.host,
            spec.port,
            path,
            self._on_message,
            subprotocol=self._format.subprotocol,
        )

    def _on_message(self, conn: WsConnection, payload: bytes, now: float) -> None:
        message = self._format.decode(payload)
        if message.get("type") not in ("published", "error") or not self._pending:
            return
        request_id = message.get("id")
        if request_id is None:
            request_id = next(iter(self._pending))
        pending = self._pending.pop(request_id, None)
        if pending is not None and not pending.done():
            pending.set_result(message)

    async def publish(self, channels: list[str], data: dict[str, Any]) -> PublishReply:
        if self.conn is None:
            raise RuntimeError("publish on a lane that was never opened")
        if len(channels) != 1:
            raise ValueError("a WebSocket publish carries one message")
        request_id = self._next_id
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        request = {"type": "publish", "id": request_id, "channel": channels[0], "data": data}
        self.conn.send(self._format.encode(request), self._format.opcode)
        try:
            reply = await asyncio.wait_for(future, REPLY_TIMEOUT_SECS)
        except TimeoutError:
            self._pending.pop(request_id, None)
            return None, "REPLY_TIMEOUT"
        if reply.get("type") == "published":
            return [int(reply["seq"])], ""
        return None, str(reply.get("code"))

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class RestLane:
    """Publishes over one keep-alive HTTP connection: ``POST
    /api/v1/channels/<channel>/messages`` for one message, ``POST /api/v1/messages``
    for a batch."""

    def __init__(self, spec: PublishSpec) -> None:
        headers = {"Authorization": f"Token {spec.token}"} if spec.token else {}
        self._client = RestClient(spec.host, spec.port, headers, REPLY_TIMEOUT_SECS)
        self._batched = spec.batch > 1

    async def publish(self, channels: list[str], data: dict[str, Any]) -> PublishReply:
        if self._batched:
            url = BATCH_PUBLISH_PATH
            body: dict[str, Any] = {"messages": [{"channel": c, "data": data} for c in channels]}
        else:
            url, body = f"/api/v1/channels/{channels[0]}/messages", {"data": data}
        try:
            status, answer = await self._client.post_json(url, body)
        except (OSError, TimeoutError, HttpStatusError) as exc:
            return None, type(exc).__name__
        if status not in (200, 201) or not isinstance(answer, dict):
            return None, f"HTTP_{status}"
        results = answer["results"] if self._batched else [answer]
        return [int(result["seq"]) for result in results], ""

    async def close(self) -> None:
        await self._client.close()


class Probe:
    """Subscriber connections on every channel that only count arrivals."""

    def __init__(self, fmt: WireFormat) -> None:
        self._format = fmt
        self.seen = 0
        self.progress = asyncio.Event()
        self._conns: list[WsConnection] = []

    async def open(self, spec: PublishSpec) -> None:
        port = spec.probe_port or spec.port
        for start in range(0, len(spec.channels), PROBE_CHANNELS_PER_CONN):
            conn = await ws_connect(
                spec.host,
                port,
                spec.ws_path,
                self._on_message,
                subprotocol=self._format.subprotocol,
            )
            self._conns.append(conn)
            for channel in spec.channels[start : start + PROBE_CHANNELS_PER_CONN]:
                request = {"type": "subscribe", "channel": channel}
                conn.send(self._format.encode(request), self._format.opcode)

    def _on_message(self, conn: WsConnection, payload: bytes, now: float) -> None:
        if self._format.decode(payload).get("type") == "message":
            self.seen += 1
            self.progress.set()

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


class Gate:
    """Hands out publishes (a channel per message) to lanes and records their outcome."""

    def __init__(
        self, spec: PublishSpec, probe: Probe | None, stop: asyncio.Event | None = None
    ) -> None:
        self.spec = spec
        self.probe = probe
        self.outcome = PublishOutcome()
        self.issued = 0
        self.started = time.time()
        self.deadline = self.started + spec.duration_secs
        self.stop = stop  # set by the orchestrator to end the phase before the deadline

    def over(self) -> bool:
        return time.time() >= self.deadline or (self.stop is not None and self.stop.is_set())

    async def acquire(self, count: int = 1) -> list[str] | None:
        """The channels of the next request's ``count`` messages, or None when the phase
        is over."""
        spec = self.spec
        if self.issued + count > spec.max_messages or self.over():
            return None
        if spec.mode == "rate":
            index = self.issued
            self.issued += count
            await asyncio.sleep(max(0.0, self.started + index / spec.rate - time.time()))
        else:
            if spec.mode == "window" and not await self._wait_window():
                return None
            index = self.issued
            self.issued += count
        channels = spec.channels
        return [channels[(index + offset) % len(channels)] for offset in range(count)]

    async def _wait_window(self) -> bool:
        probe = self.probe
        if probe is None:
            raise RuntimeError("window mode needs a probe")
        while self.issued - self.outcome.failed - probe.seen >= self.spec.window:
            probe.progress.clear()
            try:
                await asyncio.wait_for(probe.progress.wait(), STALL_SECS)
            except TimeoutError:
                self.outcome.stalled = True
                return False
            if self.over():
                return False
        return True

    def record(
        self, channels: list[str], seqs: list[int] | None, error: str, ack_secs: float
    ) -> None:
        outcome = self.outcome
        if seqs is None:
            outcome.failed += len(channels)
            outcome.errors[error] = outcome.errors.get(error, 0) + 1
            return
        outcome.requests += 1
        outcome.published += len(seqs)
        outcome.ack_latency.add(ack_secs)
        final = outcome.final_seq
        for channel, seq in zip(channels, seqs, strict=False):
            if seq > final.get(channel, 0):
                final[channel] = seq


async def _run_lane(lane: Lane, gate: Gate, padding: str) -> None:
    """One request at a time on ``lane``; a lane with ``inflight`` > 1 runs that many."""
    cap = gate.spec.lane_rate
    count = gate.spec.batch
    next_ok = time.time()
    while True:
        if cap > 0:
            await asyncio.sleep(max(0.0, next_ok - time.time()))
            next_ok = max(next_ok, time.time() - 1.0 / cap) + 1.0 / cap
        channels = await gate.acquire(count)
        if channels is None:
            return
        sent = time.time()
        seqs, error = await lane.publish(channels, {"t": sent, "p": padding})
        gate.record(channels, seqs, error, time.time() - sent)


async def _open_lanes(spec: PublishSpec, fmt: WireFormat) -> list[Lane]:
    lanes: list[Lane] = []
    for _ in range(max(1, min(spec.lanes, MAX_LANES))):
        if spec.via == "rest":
            lanes.append(RestLane(spec))
        else:
            lane = WsLane(fmt)
            await lane.open(spec)
            lanes.append(lane)
    return lanes


async def run_publish(spec: PublishSpec, stop: asyncio.Event | None = None) -> PublishOutcome:
    """Run one publish phase to its end (or until ``stop`` is set) and report what was
    published."""
    fmt = get_format(spec.fmt)
    probe = Probe(fmt) if spec.mode == "window" else None
    if probe is not None:
        await probe.open(spec)
        await asyncio.sleep(0.2)  # let the probe's subscriptions land before publishing
    lanes = await _open_lanes(spec, fmt)
    gate = Gate(spec, probe, stop)
    padding = "x" * spec.payload_bytes
    # HTTP/1.1 has no pipelining: one request in flight per REST connection.
    inflight = 1 if spec.via == "rest" else max(1, spec.inflight)
    gate.outcome.started = time.time()
    try:
        await asyncio.gather(
            *(_run_lane(lane, gate, padding) for lane in lanes for _ in range(inflight))
        )
    finally:
        gate.outcome.finished = time.time()
        for lane in lanes:
            await lane.close()
        if probe is not None:
            probe.close()
    return gate.outcome
