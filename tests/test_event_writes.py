"""A node's writes of lifecycle events to the stream: a batch whose write reached Redis
but whose answer did not (the node stopping, a timeout) is written again without
duplicates, so handlers and webhook receivers get each event once, in the order it
happened; and what a node emits just before it stops reaches the stream."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.test import override_settings

from common.background import cancel_and_wait
from push.ops.events import (
    CHANNEL_OCCUPIED,
    CHANNEL_VACATED,
    CONNECT,
    DISCONNECT,
    MEMBER_ADDED,
    MEMBER_REMOVED,
    EventLog,
)
from push.ops.webhooks import deliver_webhooks
from push.tests.redis_proxy import Proxy
from tests.event_sink import WebhookReceiver
from tests.servers import ServerNode
from tests.test_events import _event_env, _in_process_worker, _step_until_none_pending
from tests.waiting import wait_until
from tests.wsclient import subscribe

pytestmark = pytest.mark.e2e

CHANNEL = "presence-lost-answer"


def _redis_db() -> int:
    return int(urlsplit(settings.REDIS_URL).path.lstrip("/") or 0)


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[Proxy, aioredis.Redis, str]]:
    """A proxy to the test Redis, a client through it, and a stream prefix of its own."""
    port = urlsplit(settings.REDIS_URL).port or 6379
    proxy = Proxy(("127.0.0.1", port))
    client = aioredis.Redis(host="127.0.0.1", port=await proxy.start(), db=_redis_db())
    prefix = f"writes{uuid.uuid4().hex[:8]}"
    await client.ping()
    yield proxy, client, prefix
    _delete_prefixed(prefix)
    await client.aclose()
    await proxy.stop()


def _delete_prefixed(prefix: str) -> None:
    direct = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(direct.scan_iter(f"{prefix}:*"))
    if keys:
        direct.delete(*keys)
    direct.close()


@pytest.fixture
async def direct_log() -> AsyncIterator[tuple[EventLog, redis.Redis, str]]:
    """An event log straight to the test Redis, a client of that Redis, the log's stream."""
    prefix = f"direct{uuid.uuid4().hex[:8]}"
    writer = aioredis.Redis.from_url(settings.REDIS_URL)
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield EventLog(writer, prefix, "node-d", maxlen=1000), client, f"{prefix}:events"
    _delete_prefixed(prefix)
    client.close()
    await writer.aclose()


async def _warmed_up(log: EventLog) -> EventLog:
    """``log`` once it has written a batch: Redis has its scripts, so a batch later goes
    out in one round trip (not behind a script load that would wait for the answer)."""
    log.occupied("warm-up")
    log.vacated("warm-up")
    await log.flush()
    assert not log._buffer
    return log


def _emit_a_members_visit(log: EventLog) -> None:
    """A connection whose member joins a presence channel and leaves it."""
    log.emit(CONNECT, connection_id="c-1")
    log.emit(MEMBER_ADDED, channel=CHANNEL, user_id="u-1")
    log.emit(MEMBER_REMOVED, channel=CHANNEL, user_id="u-1")
    log.emit(DISCONNECT, connection_id="c-1")


VISIT = [CONNECT, MEMBER_ADDED, MEMBER_REMOVED, DISCONNECT]


def _handled(stream: str) -> list[str]:
    """What a handler of the stream's events receives, in order."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    seen: list[str] = []

    def record(received: dict) -> None:
        if received.get("channel") != "warm-up":
            seen.append(received["type"])

    worker = _in_process_worker(client, stream, [record], concurrency=1)
    try:
        worker.ensure_group()
        _step_until_none_pending(worker, client, stream)
    finally:
        client.close()
    return seen


def _stream_length(stream: str) -> int:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return int(client.xlen(stream))
    finally:
        client.close()


async def test_a_write_whose_answer_was_lost_is_not_written_again(
    proxied: tuple[Proxy, aioredis.Redis, str],
) -> None:
    """The node stops while Redis' answer to its batch is on the way: the batch was
    written, and the stop's last flush writes what it could not know was written. A
    handler got every event twice, and out of order: the member added again after it
    left, present for good as far as the receiver knew."""
    proxy, client, prefix = proxied
    stream = f"{prefix}:events"
    log = await _warmed_up(EventLog(client, prefix, "node-lost", maxlen=1000))
    written = _stream_length(stream)
    proxy.answers_lost = True
    _emit_a_members_visit(log)
    loop_task = asyncio.create_task(log.run())
    await wait_until(lambda: _stream_length(stream) == written + len(VISIT), "the batch written")
    await cancel_and_wait([loop_task], timeout=5)  # the node stops
    proxy.answers_lost = False
    await asyncio.wait_for(log.flush(), 10)  # the stop's last flush
    assert await asyncio.to_thread(_handled, stream) == VISIT


async def test_a_write_that_reaches_redis_after_its_retry_is_not_written_twice(
    proxied: tuple[Proxy, aioredis.Redis, str],
) -> None:
    """A batch held up on the way to Redis (a slow network) when the node stops: the
    stop's flush writes it, and then the first write arrives and is not written again."""
    proxy, client, prefix = proxied
    stream = f"{prefix}:events"
    log = await _warmed_up(EventLog(client, prefix, "node-late", maxlen=1000))
    proxy.frozen = True  # the batch waits in the network
    _emit_a_members_visit(log)
    loop_task = asyncio.create_task(log.run())
    await wait_until(lambda: not log._buffer, "the loop to take the batch")
    await cancel_and_wait([loop_task], timeout=5)
    proxy.frozen = False  # the held write goes on, as does the stop's
    await asyncio.wait_for(log.flush(), 10)
    await asyncio.sleep(0.5)  # the held write, if it went after the stop's: nothing
    assert await asyncio.to_thread(_handled, stream) == VISIT


async def test_what_a_node_emits_just_before_sigterm_reaches_the_stream_once_in_order(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """A client subscribes and the node is sent SIGTERM at once, its connect,
    channel_occupied and subscribe still in its buffer: they reach the stream, then the drain's
    disconnect and channel_vacated, each once."""
    env = _event_env(e2e_env, tmp_path)
    node = ServerNode(env, name=f"sigterm-events-{uuid.uuid4().hex[:6]}").start()
    stream = f"{env['REDIS_PREFIX']}:events"
    channel = f"sigterm-{uuid.uuid4().hex[:6]}"
    ws = None
    try:
        ws, _ = await subscribe(node.ws_url, channel)
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(node.process.wait, 60) == 0
        client = redis.Redis.from_url(env["REDIS_URL"])
        try:
            written = [json.loads(fields[b"event"]) for _, fields in client.xrange(stream)]
        finally:
            client.close()
        kinds = [e["type"] for e in written]
        assert kinds == [CONNECT, CHANNEL_OCCUPIED, "subscribe", DISCONNECT, CHANNEL_VACATED]
        # The channels the connection held when the drain closed it, as a client's own
        # close (or a killed node's repair) lists them.
        assert written[kinds.index(DISCONNECT)]["channels"] == [channel]
    finally:
        if ws is not None:
            ws.transport.abort()
        node.stop()


async def test_a_channels_later_event_read_by_another_worker_waits_for_its_earlier_one(
    direct_log: tuple[EventLog, redis.Redis, str],
) -> None:
    """Two workers: one has a channel's occupied in hand (its receiver slow) when the
    channel's vacated comes and the other reads it. The receiver got the vacated first,
    and took the channel for occupied for good."""
    log, client, stream = direct_log
    seen: list[str] = []
    received = threading.Event()

    def slow_receiver(event: dict) -> None:
        if event["type"] == CHANNEL_OCCUPIED:
            received.set()
            time.sleep(2.0)
        seen.append(event["type"])

    first = _in_process_worker(client, stream, [slow_receiver], concurrency=1)
    second = _in_process_worker(client, stream, [slow_receiver], concurrency=1)
    second.consumer = "in-process-2"
    first.ensure_group()
    log.occupied(CHANNEL)
    await log.flush()
    reading = asyncio.create_task(asyncio.to_thread(first.step))
    assert await asyncio.to_thread(received.wait, 30), "the first worker took it"
    log.vacated(CHANNEL)
    await log.flush()
    # The second reads the vacated while the occupied is in the first's hand.
    await asyncio.to_thread(second.step)
    await reading
    await asyncio.to_thread(_step_until_none_pending, second, client, stream)
    assert seen == [CHANNEL_OCCUPIED, CHANNEL_VACATED]


async def test_a_webhook_carries_its_events_place_in_the_stream(
    direct_log: tuple[EventLog, redis.Redis, str],
) -> None:
    """What a receiver orders a channel's events by, whatever the attempt: the event's
    stream entry id, in a header and (our format) in the body."""
    log, client, stream = direct_log
    worker = _in_process_worker(client, stream, [deliver_webhooks], concurrency=1)
    with WebhookReceiver() as receiver:
        worker.ensure_group()
        log.occupied(CHANNEL)
        log.vacated(CHANNEL)
        await log.flush()
        with override_settings(PUSH={"WEBHOOK_URLS": [receiver.url()]}):
            await asyncio.to_thread(_step_until_none_pending, worker, client, stream)
    entry_ids = [entry_id.decode() for entry_id, _ in client.xrange(stream)]
    got = receiver.accepted
    assert [r.json()["type"] for r in got] == [CHANNEL_OCCUPIED, CHANNEL_VACATED]
    assert [r.headers["X-Push-Event-Stream-Id"] for r in got] == entry_ids
    assert [r.json()["stream_id"] for r in got] == entry_ids
