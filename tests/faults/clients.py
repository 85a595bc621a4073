"""Real clients for the fault tests, recording what the wire carried.

``ResumingSubscriber`` is what a well-behaved client does (as ``clients/python``'s
``PushClient``): reconnect after any loss and resubscribe with ``since`` = the last seq
it got. Unlike ``PushClient`` it drops nothing: every ``message`` frame is recorded as
it arrived, so a duplicate or a gap from the server shows in the test's assertions
instead of being smoothed over by the client.

``RestPublisher`` publishes over REST with an ``Idempotency-Key`` per message and
retries until the message is acknowledged, so message *i* exists exactly once whatever
fails in between.

``RestTicker`` and ``WsTicker`` publish as a ticker's back-end does on a recent-only
channel, where there is no ``Idempotency-Key``: every attempt is a new message, and a
refused one is dropped for the next. Each attempt is recorded with its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.wsclient import connect_ws, subscribe_envelope

CLOSE_TIMEOUT_SECS = 1.0
RECONNECT_BASE_SECS = 0.1
RECONNECT_MAX_SECS = 2.0
# Above the server's default database pool timeout (10 s): a request that waits for a
# database connection gets its 503 answer instead of a client-side timeout.
HTTP_TIMEOUT_SECS = 20.0
RETRY_SECS = 0.2


def reconnect_delay(attempt: int) -> float:
    """Full jitter over a capped exponential, as the project's clients do."""
    return random.uniform(0, min(RECONNECT_MAX_SECS, RECONNECT_BASE_SECS * 2**attempt))


@dataclass
class Resume:
    """One lost connection and the resume that followed it (loop times)."""

    lost_at: float
    since: int = 0
    resumed_at: float | None = None
    # Stored messages after `since` when the node answered: what it replayed.
    replayed: int = 0


@dataclass(eq=False)
class ResumingSubscriber:
    url: str
    channel: str
    last_seq: int = 0
    seqs: list[int] = field(default_factory=list)
    # Each message's data, beside its seq: a test can tell whose message a seq carried.
    data: list[Any] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    # Publish-to-receipt, wall clock: the message's timestamp is the server's commit time.
    latencies: list[float] = field(default_factory=list)
    resumes: list[Resume] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    server_ids: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.subscribed = asyncio.Event()
        self._since_sent = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def server_id(self) -> str:
        return self.server_ids[-1] if self.server_ids else ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            got_subscribed = await self._one_connection()
            attempt = 0 if got_subscribed else attempt + 1
            # Before its first subscription a client is still connecting (a node that
            # is overloaded closes new anonymous connections 1013): nothing to resume.
            resumed = not self.resumes or self.resumes[-1].resumed_at is not None
            if self.subscribed.is_set() and resumed:
                self.resumes.append(Resume(lost_at=loop.time()))
            await asyncio.sleep(reconnect_delay(attempt))

    async def _one_connection(self) -> bool:
        subscribed = False
        ws: ClientConnection | None = None
        try:
            ws, hello = await connect_ws(
                self.url, close_timeout=CLOSE_TIMEOUT_SECS, ping_interval=None, compression=None
            )
            self.server_ids.append(hello["server_id"])
            self._since_sent = self.last_seq
            await ws.send(json.dumps(subscribe_envelope(self.channel, self.last_seq)))
            heartbeat = asyncio.create_task(self._heartbeats(ws, hello["heartbeat_interval"]))
            try:
                async for frame in ws:
                    subscribed = self._on_envelope(json.loads(frame)) or subscribed
            finally:
                heartbeat.cancel()
        except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake):
            pass
        finally:
            if ws is not None:
                self.close_codes.append(ws.close_code)
                await ws.close()
        return subscribed

    def _on_envelope(self, envelope: dict[str, Any]) -> bool:
        """Record one envelope; True when it is the reply to our subscribe."""
        kind = envelope.get("type")
        if kind == "message" and envelope.get("channel") == self.channel:
            self.seqs.append(envelope["seq"])
            self.data.append(envelope["data"])
            self.received_at.append(asyncio.get_running_loop().time())
            self.latencies.append(time.time() - envelope["timestamp"])
            self.last_seq = max(self.last_seq, envelope["seq"])
        elif kind == "subscribed":
            self._on_subscribed(envelope)
            return True
        elif kind == "error":
            self.errors.append(envelope)
        return False

    def _on_subscribed(self, reply: dict[str, Any]) -> None:
        self.subscribed.set()
        pending = self.resumes[-1] if self.resumes else None
        if pending is not None and pending.resumed_at is None:
            pending.since = self._since_sent
            pending.resumed_at = asyncio.get_running_loop().time()
            pending.replayed = max(0, reply["seq"] - self._since_sent)

    @staticmethod
    async def _heartbeats(ws: ClientConnection, interval_secs: float) -> None:
        while True:
            await asyncio.sleep(interval_secs)
            await ws.send(json.dumps({"type": "heartbeat"}))


@dataclass
class Audience:
    """The subscribers of one channel, checked together."""

    subscribers: list[ResumingSubscriber]

    def __iter__(self) -> Iterator[ResumingSubscriber]:
        return iter(self.subscribers)

    async def wait_until_received(self, last_seq: int, timeout_secs: float) -> float:
        """Wait until every subscriber has ``last_seq``; the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout_secs
        while any(s.last_seq < last_seq for s in self) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return loop.time() - started

    def wrong_sequences(self, last_seq: int) -> list[str]:
        """Subscribers whose messages are not exactly 1..last_seq, once each, in order."""
        expected = list(range(1, last_seq + 1))
        return [
            describe_wrong_sequence(index, subscriber, expected)
            for index, subscriber in enumerate(self)
            if subscriber.seqs != expected
        ]

    def disconnected(self) -> list[ResumingSubscriber]:
        return [subscriber for subscriber in self if subscriber.resumes]

    def latencies(self) -> list[float]:
        return [latency for subscriber in self for latency in subscriber.latencies]


def describe_wrong_sequence(index: int, subscriber: ResumingSubscriber, expected: list[int]) -> str:
    counts = Counter(subscriber.seqs)
    duplicates = sorted(seq for seq, n in counts.items() if n > 1)
    missing = sorted(set(expected) - set(counts))
    return (
        f"subscriber {index} on {subscriber.server_ids}: {len(subscriber.seqs)} messages,"
        f" duplicates {duplicates[:10]}, missing {missing[:10]},"
        f" in order: {subscriber.seqs == sorted(subscriber.seqs)}"
    )


@contextlib.asynccontextmanager
async def audience(
    url: str, channel: str, count: int, *, batch: int = 50, timeout_secs: float = 60.0
) -> AsyncIterator[Audience]:
    """``count`` subscribers from seq 0, opened ``batch`` at a time, all subscribed."""
    subscribers: list[ResumingSubscriber] = []
    try:
        async with asyncio.timeout(timeout_secs):
            for first in range(0, count, batch):
                opened = [
                    ResumingSubscriber(url, channel) for _ in range(min(batch, count - first))
                ]
                subscribers.extend(opened)
                for subscriber in opened:
                    subscriber.start()
                await asyncio.gather(*(s.subscribed.wait() for s in opened))
        yield Audience(subscribers)
    finally:
        await asyncio.gather(*(subscriber.stop() for subscriber in subscribers))


def max_gap(times: list[float], start: float, end: float) -> float:
    """The longest wait between consecutive receipts that overlaps [start, end]."""
    gaps = [
        later - earlier
        for earlier, later in itertools.pairwise(times)
        if later >= start and earlier <= end
    ]
    return max(gaps, default=0.0)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


@contextlib.asynccontextmanager
async def paced(step: Callable[[], Awaitable[object]], rate_per_sec: float) -> AsyncIterator[None]:
    """``step`` once every 1/rate seconds (later while one is under way, catching up at
    most a second of delay) for as long as the block runs; the step under way when it
    ends is finished."""
    stop = asyncio.Event()
    task = asyncio.create_task(_run_paced(step, rate_per_sec, stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def _run_paced(
    step: Callable[[], Awaitable[object]], rate_per_sec: float, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        await step()
        next_at = max(next_at + 1 / rate_per_sec, loop.time() - 1.0)
        await asyncio.sleep(max(0.0, next_at - loop.time()))


class RestPublisher:
    """Publishes message 0, 1, 2, ... to one channel over REST, each until acknowledged."""

    def __init__(self, base_url: str, token: str, channel: str, *, blob_bytes: int = 0) -> None:
        self.url = f"{base_url}/api/v1/channels/{channel}/messages"
        self.headers = {"Authorization": f"Token {token}"}
        self.channel = channel
        self.blob = "x" * blob_bytes
        self.acked: dict[int, int] = {}  # message index -> seq
        self.failures: Counter[str] = Counter()
        self.failure_times: list[float] = []
        self.sent = 0
        self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECS)

    @property
    def last_seq(self) -> int:
        return max(self.acked.values(), default=0)

    async def __aenter__(self) -> RestPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def post_once(self, index: int) -> httpx.Response:
        data: dict[str, Any] = {"i": index}
        if self.blob:
            data["blob"] = self.blob
        return await self._http.post(
            self.url,
            json={"data": data},
            headers={**self.headers, "Idempotency-Key": f"{self.channel}-{index}"},
        )

    async def publish(self, index: int, *, give_up_secs: float = 60.0) -> int:
        """Publish message ``index``, retrying with its key until acknowledged; its seq."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_secs
        while True:
            try:
                response = await self.post_once(index)
                if response.status_code in (200, 201):
                    self.acked[index] = int(response.json()["seq"])
                    return self.acked[index]
                self._failed(str(response.status_code))
            except httpx.HTTPError as exc:
                self._failed(type(exc).__name__)
            if loop.time() > deadline:
                raise TimeoutError(f"message {index} not acknowledged: {dict(self.failures)}")
            await asyncio.sleep(RETRY_SECS)

    def _failed(self, reason: str) -> None:
        self.failures[reason] += 1
        self.failure_times.append(asyncio.get_running_loop().time())

    def steadily(self, rate_per_sec: float) -> contextlib.AbstractAsyncContextManager[None]:
        """Publish one message every 1/rate seconds (later while a retry holds one up)
        for as long as the block runs; the last message is acknowledged when it ends."""
        return paced(self._publish_next, rate_per_sec)

    async def _publish_next(self) -> None:
        await self.publish(self.sent)
        self.sent += 1


# Past the bound a fault test asserts on a publish's answer: a slow answer is measured,
# not cut short.
TICK_ANSWER_TIMEOUT_SECS = 15.0


@dataclass
class Attempt:
    """One tick: the data sent, when it was sent and answered (loop times), and the seq
    it got or why it was refused."""

    data: dict[str, Any]
    sent_at: float
    answered_at: float = 0.0
    seq: int | None = None
    refusal: str | None = None

    @property
    def wait_secs(self) -> float:
        return self.answered_at - self.sent_at


class Ticker:
    """Publishes ``{"by": name, "i": 0, 1, 2, ...}``, one at a time, each answered before
    the next is sent, so its messages are numbered in ``i`` order."""

    def __init__(self, name: str, channel: str) -> None:
        self.name = name
        self.channel = channel
        self.attempts: list[Attempt] = []

    async def __aenter__(self) -> Ticker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the connection; nothing to release by default."""

    async def send(self, data: dict[str, Any]) -> tuple[int | None, str | None]:
        """Publish ``data`` once: its seq, or None and why it was refused."""
        raise NotImplementedError

    @property
    def acked(self) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.seq is not None]

    @property
    def refusals(self) -> Counter[str]:
        return Counter(a.refusal for a in self.attempts if a.refusal is not None)

    async def tick(self) -> Attempt:
        loop = asyncio.get_running_loop()
        attempt = Attempt({"by": self.name, "i": len(self.attempts)}, loop.time())
        self.attempts.append(attempt)
        try:
            async with asyncio.timeout(TICK_ANSWER_TIMEOUT_SECS):
                attempt.seq, attempt.refusal = await self.send(attempt.data)
        except TimeoutError:
            attempt.refusal = "no answer"
        attempt.answered_at = loop.time()
        return attempt

    def steadily(self, rate_per_sec: float) -> contextlib.AbstractAsyncContextManager[None]:
        """A tick every 1/rate seconds (later while an answer is awaited) for as long as
        the block runs."""
        return paced(self.tick, rate_per_sec)


class RestTicker(Ticker):
    """Ticks with ``POST /api/v1/channels/<channel>/messages``, no ``Idempotency-Key``."""

    def __init__(self, base_url: str, token: str, channel: str, name: str = "rest") -> None:
        super().__init__(name, channel)
        self.url = f"{base_url}/api/v1/channels/{channel}/messages"
        self._http = httpx.AsyncClient(
            timeout=TICK_ANSWER_TIMEOUT_SECS, headers={"Authorization": f"Token {token}"}
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, data: dict[str, Any]) -> tuple[int | None, str | None]:
        try:
            response = await self._http.post(self.url, json={"data": data})
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        if response.status_code == 201:
            return int(response.json()["seq"]), None
        return None, f"{response.status_code} {error_code(response)}"


def error_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("code", ""))
    except ValueError:
        return "(not JSON)"


class WsTicker(Ticker):
    """Ticks with ``publish`` frames on one WebSocket, opened with ``token`` and opened
    again if it is lost (the tick it carried counts as refused: "connection lost")."""

    def __init__(self, ws_url: str, token: str, channel: str, name: str = "ws") -> None:
        super().__init__(name, channel)
        self.ws_url = ws_url
        self.token = token
        self._ws: ClientConnection | None = None

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def send(self, data: dict[str, Any]) -> tuple[int | None, str | None]:
        request_id = data["i"]
        envelope = {"type": "publish", "channel": self.channel, "data": data, "id": request_id}
        try:
            if self._ws is None:
                self._ws, _hello = await connect_ws(self.ws_url, token=self.token)
            await self._ws.send(json.dumps(envelope))
            reply = await self._reply(self._ws, request_id)
        except (ConnectionClosed, OSError, InvalidHandshake):
            self._ws = None
            return None, "connection lost"
        if reply["type"] == "published":
            return int(reply["seq"]), None
        return None, str(reply.get("code"))

    @staticmethod
    async def _reply(ws: ClientConnection, request_id: int) -> dict[str, Any]:
        # A reply to an earlier tick that timed out on our side may still come: skip it.
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("id") == request_id:
                return reply
