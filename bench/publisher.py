"""Publisher side of the load generator: lanes that publish, and a gate that paces them.

A lane is one publishing transport (an authenticated WebSocket, or one keep-alive HTTP
connection for REST) that sends a publish and waits for its reply. The gate hands out
publishes to the lanes in one of two modes:

- ``rate``: a fixed schedule, message k at ``start + k / rate`` (latency scenarios).
- ``window``: as fast as the server delivers. A probe connection, subscribed last to
  every channel, counts what reaches it; the gate lets at most ``window`` messages be
  published and not yet seen by the probe. Without this bound a "max rate" publisher
  only measures how fast the server's queues fill.

Every payload carries the publisher's clock (``data.t``), so latency is publish call to
delivery, measured by one clock across processes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from bench.wire import WireFormat, get_format
from bench.wsclient import WsConnection, ws_connect

REPLY_TIMEOUT_SECS = 10.0
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
    mode: str = "window"  # "window" or "rate"
    rate: float = 10.0  # messages per second, rate mode
    window: int = 8  # messages in flight, window mode
    duration_secs: float = 10.0
    max_messages: int = 1_000_000
    lanes: int = 4
    lane_rate: float = 0.0  # per-lane cap in messages per second; 0 = none
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


class Lane(Protocol):
    """One publishing transport."""

    async def publish(self, channel: str, data: dict[str, Any]) -> tuple[int | None, str]:
        """Publish once; return (seq, "") or (None, error code)."""
        ...

    async def close(self) -> None: ...


class WsLane:
    """Publishes over an authenticated WebSocket, one request in flight."""

    def __init__(self, fmt: WireFormat) -> None:
        self._format = fmt
        self._pending: asyncio.Future[dict[str, Any]] | None = None
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
        if message.get("type") in ("published", "error"):
            pending = self._pending
            if pending is not None and not pending.done():
                pending.set_result(message)

    async def publish(self, channel: str, data: dict[str, Any]) -> tuple[int | None, str]:
        if self.conn is None:
            raise RuntimeError("publish on a lane that was never opened")
        self._pending = asyncio.get_running_loop().create_future()
        request = {"type": "publish", "channel": channel, "data": data}
        self.conn.send(self._format.encode(request), self._format.opcode)
        try:
            reply = await asyncio.wait_for(self._pending, REPLY_TIMEOUT_SECS)
        except TimeoutError:
            return None, "REPLY_TIMEOUT"
        if reply.get("type") == "published":
            return int(reply["seq"]), ""
        return None, str(reply.get("code"))

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class RestLane:
    """Publishes with ``POST /api/v1/channels/<channel>/messages`` on one connection."""

    def __init__(self, spec: PublishSpec) -> None:
        headers = {"Authorization": f"Token {spec.token}"} if spec.token else {}
        self._client = httpx.AsyncClient(
            base_url=f"http://{spec.host}:{spec.port}",
            headers=headers,
            limits=httpx.Limits(max_connections=1),
            timeout=REPLY_TIMEOUT_SECS,
        )

    async def publish(self, channel: str, data: dict[str, Any]) -> tuple[int | None, str]:
        try:
            reply = await self._client.post(
                f"/api/v1/channels/{channel}/messages", json={"data": data}
            )
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        if reply.status_code in (200, 201):
            return int(reply.json()["seq"]), ""
        return None, f"HTTP_{reply.status_code}"

    async def close(self) -> None:
        await self._client.aclose()


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
    """Hands out publishes (a channel each) to lanes and records their outcome."""

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

    async def acquire(self) -> str | None:
        """The channel of the next publish, or None when the phase is over."""
        spec = self.spec
        if self.issued >= spec.max_messages or self.over():
            return None
        if spec.mode == "rate":
            index = self.issued
            self.issued += 1
            await asyncio.sleep(max(0.0, self.started + index / spec.rate - time.time()))
        else:
            if not await self._wait_window():
                return None
            index = self.issued
            self.issued += 1
        return spec.channels[index % len(spec.channels)]

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

    def record(self, channel: str, seq: int | None, error: str) -> None:
        outcome = self.outcome
        if seq is None:
            outcome.failed += 1
            outcome.errors[error] = outcome.errors.get(error, 0) + 1
            return
        outcome.published += 1
        if seq > outcome.final_seq.get(channel, 0):
            outcome.final_seq[channel] = seq


async def _run_lane(lane: Lane, gate: Gate, padding: str) -> None:
    cap = gate.spec.lane_rate
    next_ok = time.time()
    while True:
        if cap > 0:
            await asyncio.sleep(max(0.0, next_ok - time.time()))
            next_ok = max(next_ok, time.time() - 1.0 / cap) + 1.0 / cap
        channel = await gate.acquire()
        if channel is None:
            return
        seq, error = await lane.publish(channel, {"t": time.time(), "p": padding})
        gate.record(channel, seq, error)


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
    gate.outcome.started = time.time()
    try:
        await asyncio.gather(*(_run_lane(lane, gate, padding) for lane in lanes))
    finally:
        gate.outcome.finished = time.time()
        for lane in lanes:
            await lane.close()
        if probe is not None:
            probe.close()
    return gate.outcome
