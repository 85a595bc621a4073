"""Reference "bare hub": a plain ASGI app with a process-local fan-out hub, no Django.

The design our server's hub follows, with nothing else around it, so its figures are
the ceiling for the same ASGI server: a dict channel -> set of connections; a publish
encodes the `message` frame once and appends it to each subscriber's deque; a writer
task per connection runs only while its deque is non-empty. It speaks enough of the
v1 JSON envelopes (docs/protocol.md) for the load generator: subscribe, publish (numbered
in memory, acknowledged at once with its request ``id``), message, and the REST publish
routes, single and batch. No authentication: every token is accepted; nothing is
stored, so its publish figures are the machine's ceiling with no database at all.

Run:  uvicorn bench.references.bare_hub:app --loop uvloop --ws websockets
          --ws-per-message-deflate false
With ``BARE_HUB_REDIS_URL`` set, several nodes share one seq counter per channel
(Redis INCR) and relay frames over one Redis pub/sub channel, each node fanning out
to its own subscribers; without it, everything stays in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SEND_QUEUE_LIMIT = 10_000  # frames; a subscriber this far behind is dropped (4002)
CLOSE_SLOW_CONSUMER = 4002
RELAY_CHANNEL = "barehub:relay"
SEQ_KEY_PREFIX = "barehub:seq:"
REST_PREFIX = "/api/v1/channels/"
REST_SUFFIX = "/messages"
REST_BATCH_PATH = "/api/v1/messages"
SERVER_ID = f"barehub-{os.getpid()}"
HEARTBEAT_INTERVAL_SECS = 25
RELAY_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. seq .. ARGV[3])
return seq
"""


class Subscriber:
    """One WebSocket: its pending frames and whether a writer task is draining them."""

    __slots__ = ("channels", "dropped", "queue", "send", "writing")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.queue: deque[str] = deque()
        self.writing = False
        self.channels: set[str] = set()
        self.dropped = False

    def push(self, frame: str) -> None:
        if self.dropped:
            return
        if len(self.queue) >= SEND_QUEUE_LIMIT:
            self.dropped = True
            self.queue.clear()
            asyncio.get_running_loop().create_task(self._close_slow())
            return
        self.queue.append(frame)
        if not self.writing:
            self.writing = True
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            queue = self.queue
            while queue:
                await self.send({"type": "websocket.send", "text": queue.popleft()})
        except Exception:
            self.queue.clear()
        finally:
            self.writing = False

    async def _close_slow(self) -> None:
        # The peer may already be gone; then there is nothing left to close.
        with contextlib.suppress(Exception):
            await self.send({"type": "websocket.close", "code": CLOSE_SLOW_CONSUMER})


class Hub:
    """Channel -> subscribers of this process, and the per-channel seq."""

    def __init__(self) -> None:
        self.channels: dict[str, set[Subscriber]] = {}
        self.seqs: dict[str, int] = {}
        self.redis: Any = None

    def subscribe(self, subscriber: Subscriber, channel: str) -> None:
        self.channels.setdefault(channel, set()).add(subscriber)
        subscriber.channels.add(channel)

    def unsubscribe_all(self, subscriber: Subscriber) -> None:
        for channel in subscriber.channels:
            members = self.channels.get(channel)
            if members is not None:
                members.discard(subscriber)
                if not members:
                    del self.channels[channel]

    async def current_seq(self, channel: str) -> int:
        if self.redis is not None:
            return int(await self.redis.get(SEQ_KEY_PREFIX + channel) or 0)
        return self.seqs.get(channel, 0)

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """Number, encode once, fan out (locally or through the relay)."""
        message_id = str(uuid.uuid4())
        timestamp = time.time()
        # The frame is built around its seq, so the seq can be filled in last.
        head = f'{{"type":"message","channel":{json.dumps(channel)},"seq":'
        tail = (
            f',"message_id":"{message_id}","data":{json.dumps(data, separators=(",", ":"))}'
            f',"timestamp":{timestamp!r}}}'
        )
        if self.redis is not None:
            seq = await self._relay(channel, head, tail)
        else:
            seq = self.seqs.get(channel, 0) + 1
            self.seqs[channel] = seq
            self.fan_out(channel, f"{head}{seq}{tail}")
        return {"channel": channel, "seq": seq, "message_id": message_id, "timestamp": timestamp}

    async def _relay(self, channel: str, head: str, tail: str) -> int:
        # INCR and PUBLISH in one script: two round trips would let two publishers
        # interleave, and subscribers would see seq 6 before seq 5.
        relay_head = f"{channel}\n{head}"
        keys_and_args = (SEQ_KEY_PREFIX + channel, RELAY_CHANNEL, relay_head, tail)
        return int(await self.redis.eval(RELAY_SCRIPT, 1, *keys_and_args))

    def fan_out(self, channel: str, frame: str) -> None:
        for subscriber in self.channels.get(channel, ()):
            subscriber.push(frame)

    async def relay_forever(self, pubsub: Any) -> None:
        """Fan out every frame any node published (this one included)."""
        async for item in pubsub.listen():
            if item.get("type") == "message":
                channel, frame = item["data"].split("\n", 1)
                self.fan_out(channel, frame)


HUB = Hub()


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def _error(code: str, text: str) -> str:
    return _dumps({"type": "error", "code": code, "message": text})


def _with_id(reply: dict[str, Any], request: dict[str, Any]) -> str:
    # The contract: a reply repeats its request's id, so a client may pipeline.
    if "id" in request:
        reply["id"] = request["id"]
    return _dumps(reply)


async def _handle_frame(subscriber: Subscriber, text: str) -> str:
    try:
        request = json.loads(text)
        kind = request["type"]
    except (ValueError, KeyError, TypeError):
        return _error("INVALID_JSON", "not a JSON envelope")
    if kind == "subscribe":
        channel = request["channel"]
        seq = await HUB.current_seq(channel)
        HUB.subscribe(subscriber, channel)
        return _with_id({"type": "subscribed", "channel": channel, "seq": seq}, request)
    if kind == "publish":
        message = await HUB.publish(request["channel"], request.get("data"))
        published = {"type": "published", **_result(message)}
        del published["timestamp"]
        return _with_id(published, request)
    if kind == "heartbeat":
        return _dumps({"type": "heartbeat_ack", "timestamp": time.time()})
    return _error("UNKNOWN_MESSAGE_TYPE", f"unknown type {kind!r}")


async def _websocket(scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    subscriber = Subscriber(send)
    established = {
        "type": "connection_established",
        "connection_id": str(uuid.uuid4()),
        "server_id": SERVER_ID,
        "heartbeat_interval": HEARTBEAT_INTERVAL_SECS,
        "timestamp": time.time(),
    }
    subscriber.push(_dumps(established))
    try:
        while True:
            event = await receive()
            if event["type"] != "websocket.receive":
                return
            text = event.get("text")
            if text is None:
                text = (event.get("bytes") or b"").decode(errors="replace")
            subscriber.push(await _handle_frame(subscriber, text))
    finally:
        HUB.unsubscribe_all(subscriber)


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            return body


async def _respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = _dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _result(message: dict[str, Any]) -> dict[str, Any]:
    return {key: message[key] for key in ("channel", "seq", "message_id", "timestamp")}


async def _publish_batch(receive: Receive, send: Send) -> None:
    try:
        messages = json.loads(await _read_body(receive))["messages"]
        items = [(message["channel"], message["data"]) for message in messages]
    except (ValueError, KeyError, TypeError):
        await _respond(send, 400, {"detail": 'body must be {"messages": [...]}'})
        return
    results = [_result(await HUB.publish(channel, data)) for channel, data in items]
    await _respond(send, 201, {"results": results})


async def _http(scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    if path in ("/health", "/ready"):
        await _respond(send, 200, {"status": "ok"})
        return
    if scope["method"] == "POST" and path == REST_BATCH_PATH:
        await _publish_batch(receive, send)
        return
    if not (scope["method"] == "POST" and path.startswith(REST_PREFIX)):
        await _respond(send, 404, {"detail": "not found"})
        return
    if not path.endswith(REST_SUFFIX):
        await _respond(send, 404, {"detail": "not found"})
        return
    channel = path[len(REST_PREFIX) : -len(REST_SUFFIX)]
    try:
        data = json.loads(await _read_body(receive))["data"]
    except (ValueError, KeyError, TypeError):
        await _respond(send, 400, {"detail": 'body must be {"data": ...}'})
        return
    await _respond(send, 201, _result(await HUB.publish(channel, data)))


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await _start_relay()
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


RELAY_URL = os.environ.get("BARE_HUB_REDIS_URL", "")
_relay_started = False


async def _start_relay() -> None:
    # Daphne sends no lifespan events, so the first scope of any kind starts the relay;
    # the flag is set before the first await so two scopes cannot both start it.
    global _relay_started
    if not RELAY_URL or _relay_started:
        return
    _relay_started = True
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(RELAY_URL, decode_responses=True)
    pubsub = client.pubsub()
    await pubsub.subscribe(RELAY_CHANNEL)
    _relay_tasks.add(asyncio.get_running_loop().create_task(HUB.relay_forever(pubsub)))
    HUB.redis = client


_relay_tasks: set[asyncio.Task[None]] = set()  # keeps the task referenced


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application."""
    kind = scope["type"]
    if RELAY_URL and not _relay_started:
        await _start_relay()
    if kind == "websocket":
        await _websocket(scope, receive, send)
    elif kind == "http":
        await _http(scope, receive, send)
    elif kind == "lifespan":
        await _lifespan(receive, send)
