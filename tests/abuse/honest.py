"""The abuse suite's honest clients: a signed-in publisher at a steady rate and
subscribers that record every message as it arrives, so latency, loss, duplicates and
order can be judged after the attack.

Latency is publish-to-delivery on one clock: the publisher stamps each message with its
send time, and the subscribers run in the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

OPEN_TIMEOUT_SECS = 10.0
BACKOFF_SECS = 0.5
PADDING = "p" * 200  # a message of a few hundred bytes, as a chat or a ticker sends
# Below the announced heartbeat interval (25 s): a subscriber that only listens would be
# closed 4001 after PUSH_HEARTBEAT_TIMEOUT_SECS (75 s), shorter than a run.
HEARTBEAT_SECS = 20.0


@dataclass
class Sample:
    sent_at: float
    latency_secs: float
    # Of which, from the publisher's send to the message's timestamp (same clock), taken
    # when the write pipeline plans the batch that commits it: the rest is that batch's
    # transaction, the fan-out and this subscriber's read.
    to_batch_secs: float


@dataclass(eq=False)
class HonestSubscriber:
    """Subscribes to every busy channel and records what it receives; never reconnects,
    since an honest client must not be disconnected by someone else's abuse."""

    url: str
    channels: list[str]
    subscribed_seq: dict[str, int] = field(default_factory=dict)
    seqs: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    samples: list[Sample] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    # Closed by the server or the network, not by stop().
    closed: bool = False
    stopping: bool = False

    async def start(self) -> None:
        self.ws = await self._connect()
        async with asyncio.timeout(OPEN_TIMEOUT_SECS):
            while pending := [c for c in self.channels if c not in self.subscribed_seq]:
                await self._subscribe(pending)
        self.task = asyncio.create_task(self._read())
        self.heartbeat = asyncio.create_task(self._beat())

    async def _subscribe(self, channels: list[str]) -> None:
        """Subscribe to ``channels``; those refused ``RATE_LIMITED`` (the node
        overloaded) are left for another try after a back-off, as a real client does."""
        for channel in channels:
            request = {"type": "subscribe", "channel": channel, "id": channel}
            await self.ws.send(json.dumps(request))
        answered: set[str] = set()
        refused = False
        while len(answered) < len(channels):
            envelope = json.loads(await self.ws.recv())
            if envelope.get("type") == "error" and envelope.get("code") == "RATE_LIMITED":
                answered.add(envelope["id"])
                refused = True
                continue
            self._on_frame(envelope)
            if envelope.get("type") in ("subscribed", "error"):
                answered.add(envelope.get("id") or envelope.get("channel"))
        if refused:
            await asyncio.sleep(BACKOFF_SECS)

    async def _connect(self) -> ClientConnection:
        """Connected, as a real client is: one closed 1013 (the node overloaded, as it
        may be right after the seeding's 100 MB) tries again after a back-off."""
        async with asyncio.timeout(OPEN_TIMEOUT_SECS):
            while True:
                ws = await connect(self.url, open_timeout=OPEN_TIMEOUT_SECS, max_size=None)
                try:
                    await ws.recv()  # connection_established
                    return ws
                except ConnectionClosed:
                    if ws.close_code != 1013:
                        raise
                await asyncio.sleep(BACKOFF_SECS)

    async def _beat(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(HEARTBEAT_SECS)
                await self.ws.send(json.dumps({"type": "heartbeat"}))

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                self._on_frame(json.loads(frame))
        except ConnectionClosed:
            pass
        if not self.stopping:
            self.closed = True
            self.close_code = self.ws.close_code

    def _on_frame(self, envelope: dict[str, Any]) -> None:
        kind = envelope.get("type")
        if kind == "message":
            now = time.time()
            self.seqs[envelope["channel"]].append(envelope["seq"])
            sent_at = envelope["data"]["sent_at"]
            to_batch = envelope["timestamp"] - sent_at
            self.samples.append(Sample(sent_at, now - sent_at, to_batch))
        elif kind == "subscribed":
            self.subscribed_seq[envelope["channel"]] = envelope["seq"]
        elif kind == "error":
            self.errors.append(envelope)

    def last_seq(self, channel: str) -> int:
        seqs = self.seqs.get(channel)
        return seqs[-1] if seqs else self.subscribed_seq.get(channel, 0)

    async def stop(self) -> None:
        self.stopping = True
        self.heartbeat.cancel()
        await self.ws.close()
        await asyncio.gather(self.task, self.heartbeat, return_exceptions=True)


@dataclass(eq=False)
class HonestPublisher:
    """One WebSocket per channel (each well inside the per-connection frame rate),
    publishing ``per_sec`` messages a second in all, without waiting for each reply."""

    url: str
    channels: list[str]
    per_sec: float
    acked: dict[str, int] = field(default_factory=dict)
    published: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    async def start(self) -> None:
        self.stopping = asyncio.Event()
        self.connections: list[ClientConnection] = []
        for channel in self.channels:
            ws = await connect(self.url, open_timeout=OPEN_TIMEOUT_SECS)
            await ws.recv()  # connection_established
            self.connections.append(ws)
            self.acked[channel] = 0
        interval = len(self.channels) / self.per_sec
        self.tasks = [
            task
            for channel, ws in zip(self.channels, self.connections, strict=True)
            for task in (
                asyncio.create_task(self._publish(ws, channel, interval)),
                asyncio.create_task(self._read_replies(ws)),
            )
        ]

    async def _publish(self, ws: ClientConnection, channel: str, interval: float) -> None:
        started = time.monotonic()
        sent = 0
        while not self.stopping.is_set():
            data = {"sent_at": time.time(), "pad": PADDING}
            await ws.send(json.dumps({"type": "publish", "channel": channel, "data": data}))
            sent += 1
            # A fixed schedule, so a stall on this side shows as latency, not a lower rate.
            delay = started + sent * interval - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), max(delay, 0.0))

    async def _read_replies(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                reply = json.loads(frame)
                if reply.get("type") == "published":
                    self.published += 1
                    channel = reply["channel"]
                    self.acked[channel] = max(self.acked[channel], reply["seq"])
                else:
                    self.errors.append(reply)

    async def stop(self) -> None:
        """Stop publishing; wait a moment for replies still in flight."""
        self.stopping.set()
        await asyncio.sleep(2.0)
        for ws in self.connections:
            await ws.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class HonestVerdict:
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    duplicates: int
    out_of_order: int
    disconnected: int
    close_codes: list[int | None]
    errors: int
    # The p99 of each part of the latency: the publisher's send to its batch (waiting
    # for the batch before), and the batch to the subscriber's read (the transaction,
    # the fan-out, the socket, the client's own turn).
    to_batch_p99_ms: float
    from_batch_p99_ms: float
    # Per second of the window: [second, samples, p50 ms, max ms], to tell a node that
    # is slow throughout (saturated) from one that stalls now and then.
    seconds: list[list[float]] = field(default_factory=list)


def judge(
    subscribers: list[HonestSubscriber],
    publisher: HonestPublisher,
    window: tuple[float, float],
) -> HonestVerdict:
    """Latency of the messages sent within ``window``; loss, duplicates and order over
    everything received (every acknowledged seq after the one subscribed at)."""
    samples = [s for sub in subscribers for s in sub.samples if window[0] <= s.sent_at <= window[1]]
    latencies = sorted(s.latency_secs for s in samples)
    lost = duplicates = out_of_order = 0
    for sub in subscribers:
        for channel in sub.channels:
            seqs = sub.seqs.get(channel, [])
            duplicates += len(seqs) - len(set(seqs))
            out_of_order += sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
            wanted = range(sub.subscribed_seq[channel] + 1, publisher.acked[channel] + 1)
            lost += len(set(wanted) - set(seqs))
    return HonestVerdict(
        samples=len(latencies),
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        max_ms=percentile_ms(latencies, 1.0),
        to_batch_p99_ms=percentile_ms(sorted(s.to_batch_secs for s in samples), 0.99),
        from_batch_p99_ms=percentile_ms(
            sorted(s.latency_secs - s.to_batch_secs for s in samples), 0.99
        ),
        lost=lost,
        duplicates=duplicates,
        out_of_order=out_of_order,
        disconnected=sum(1 for sub in subscribers if sub.closed),
        close_codes=[sub.close_code for sub in subscribers if sub.closed],
        errors=sum(len(sub.errors) for sub in subscribers) + len(publisher.errors),
        seconds=latency_by_second(subscribers, window),
    )


def latency_by_second(
    subscribers: list[HonestSubscriber], window: tuple[float, float]
) -> list[list[float]]:
    by_second: dict[int, list[float]] = defaultdict(list)
    for sub in subscribers:
        for s in sub.samples:
            if window[0] <= s.sent_at <= window[1]:
                by_second[int(s.sent_at - window[0])].append(s.latency_secs)
    return [
        [second, len(lat), percentile_ms(sorted(lat), 0.5), percentile_ms(sorted(lat), 1.0)]
        for second, lat in sorted(by_second.items())
    ]


def percentile_ms(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, int(fraction * len(ordered)))
    return round(ordered[index] * 1000, 1)


async def wait_delivered(
    subscribers: list[HonestSubscriber], publisher: HonestPublisher, timeout_secs: float
) -> None:
    """Until every subscriber has every acknowledged message, or the time is up."""
    deadline = time.monotonic() + timeout_secs
    while time.monotonic() < deadline:
        if all(
            sub.closed or sub.last_seq(channel) >= publisher.acked[channel]
            for sub in subscribers
            for channel in sub.channels
        ):
            return
        await asyncio.sleep(0.1)
