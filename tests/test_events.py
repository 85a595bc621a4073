"""Lifecycle events through the Redis Stream and the worker: two workers share the
stream, each event handled once; nothing lost when a worker dies mid-batch; handlers
registered in code run; webhooks signed (with a timestamp) and retried, sent at once to
every URL and again only to those that failed; failures dead-lettered and shown in the
admin; a node's unwritten events bounded while Redis is away."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.test import override_settings
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from common.background import cancel_and_wait
from devtools.processes import free_port
from push.ops import event_worker, events, webhooks
from push.ops.event_worker import DEFAULT_GROUP, EventWorker, configured_handlers, register_handler
from push.ops.events import (
    CHANNEL_OCCUPIED,
    CHANNEL_VACATED,
    CLIENT_EVENT,
    CONNECT,
    DISCONNECT,
    EventLog,
    event,
)
from push.ops.logs import RedactFilter
from push.ops.webhooks import WebhookFailed, deliver_webhooks
from push.ops.worker_metrics import EventStreamCollector
from push.services.runtime import get_node, stop_node
from push.tests.backends import terminate_backends
from push.tests.redis_proxy import Proxy
from tests.servers import (
    ROOT,
    Database,
    ServerNode,
    admin_client,
    create_superuser,
    start_event_worker,
    worker_log,
)
from tests.waiting import QUERY_INTERVAL_SECS, wait_until, wait_until_blocking
from tests.wsclient import flood, stalled_subscriber, subscribe

pytestmark = pytest.mark.e2e


def _event_env(e2e_env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **e2e_env,
        "REDIS_PREFIX": f"ev{uuid.uuid4().hex[:8]}",
        "PUSH_EVENT_RETRY_SECS": "1",
        "EVENT_SINK_PATH": str(tmp_path / "sink.jsonl"),
        **extra,
    }


def _sink(env: dict[str, str]) -> list[dict]:
    """The events recorded so far. A worker may be writing a line while this reads the
    file, so a last line without its newline is left for the next read."""
    path = Path(env["EVENT_SINK_PATH"])
    if not path.exists():
        return []
    text = path.read_text()
    whole_lines = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in whole_lines.splitlines() if line.strip()]


@pytest.fixture
def node_and_env(e2e_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[ServerNode, dict]]:
    env = _event_env(
        e2e_env,
        tmp_path,
        PUSH_EVENT_HANDLERS="tests.event_sink.record",
        EVENT_SINK_DELAY="0.02",
    )
    node = ServerNode(env, name=f"events-{uuid.uuid4().hex[:6]}").start()
    yield node, env
    node.stop()


def _stream_events(client: redis.Redis, env: dict[str, str]) -> list[dict]:
    entries = client.xrange(f"{env['REDIS_PREFIX']}:events")
    return [json.loads(fields[b"event"]) for _, fields in entries]


def _disconnects(client: redis.Redis, env: dict[str, str]) -> int:
    return sum(e["type"] == "disconnect" for e in _stream_events(client, env))


async def _traffic(node: ServerNode, env: dict[str, str], clients: int) -> str:
    """``clients`` connect, subscribe to one new channel and leave, and the node writes
    their events to the stream; returns the channel."""
    client = redis.Redis.from_url(env["REDIS_URL"])
    before = _disconnects(client, env)
    channel = f"events-{uuid.uuid4().hex[:6]}"
    sockets = [await subscribe(node.ws_url, channel) for _ in range(clients)]
    for ws, _ in sockets:
        await ws.close()
    await wait_until(
        lambda: _disconnects(client, env) >= before + clients,
        f"the {clients} disconnect events in the stream",
        interval=QUERY_INTERVAL_SECS,
    )
    client.close()
    return channel


async def test_worker_killed_mid_batch_loses_no_event(
    node_and_env: tuple[ServerNode, dict],
) -> None:
    node, env = node_and_env
    first = start_event_worker(env, "first")
    channel = await _traffic(node, env, 30)
    # Kill it inside its batch: some handled, most not (20 ms each).
    await wait_until(lambda: len(_sink(env)) >= 5, "the first worker to handle 5 events")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    handled_by_first = len(_sink(env))
    second = start_event_worker(env, "second")
    try:

        def all_handled() -> bool:
            kinds = [e["type"] for e in _sink(env)]
            return kinds.count("connect") >= 30 and kinds.count("disconnect") >= 30

        await wait_until(all_handled, "30 connects and 30 disconnects handled", timeout=30)
        events = _sink(env)
        connects = {e["connection_id"] for e in events if e["type"] == "connect"}
        disconnects = {e["connection_id"] for e in events if e["type"] == "disconnect"}
        subscribes = [e for e in events if e["type"] == "subscribe" and e["channel"] == channel]
        occupied = [
            e for e in events if e["type"] == "channel_occupied" and e["channel"] == channel
        ]
        assert 0 < handled_by_first < len(events), "the first worker died mid-way"
        assert len(connects) == 30 and connects == disconnects
        assert len({e["connection_id"] for e in subscribes}) == 30
        # At least once: the killed worker may have handled an event it never acked,
        # which the second handles again under the same id.
        assert len({e["id"] for e in occupied}) == 1, "one node, one occupancy"
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(10)


async def test_a_stopped_worker_ends_within_its_batch_and_another_takes_the_rest(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM (docker stop, a rolling update) mid-batch: the worker finishes the events
    in hand and exits, long before the batch would end (the platform's grace is 30 s);
    the rest stay pending for another worker, none lost and none handled twice."""
    env = _event_env(
        e2e_env,
        tmp_path,
        PUSH_EVENT_HANDLERS="tests.event_sink.record",
        EVENT_SINK_DELAY="1",
        PUSH_EVENT_CONCURRENCY="2",
    )
    client = redis.Redis.from_url(env["REDIS_URL"])
    sent = [event(CONNECT, connection_id=f"c-stop-{i}") for i in range(60)]
    for entry in sent:
        client.xadd(f"{env['REDIS_PREFIX']}:events", {"event": json.dumps(entry)})
    first = start_event_worker(env, "stopped")
    second = None
    try:
        await wait_until(lambda: _sink(env), "the first events handled", timeout=30)
        first.send_signal(signal.SIGTERM)
        started = time.monotonic()
        await asyncio.to_thread(first.wait, 60)
        assert time.monotonic() - started < 10, "the worker went on with its whole batch"
        assert len(_sink(env)) < len(sent)
        second = start_event_worker({**env, "EVENT_SINK_DELAY": "0"}, "second")
        await wait_until(lambda: len(_sink(env)) >= len(sent), "every event handled", timeout=30)
        assert sorted(e["id"] for e in _sink(env)) == sorted(e["id"] for e in sent)
    finally:
        for worker in (first, second):
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                worker.wait(60)
        client.close()


def _stream_event_ids(client: redis.Redis, stream: str) -> dict[str, str]:
    """Every entry of the stream: its entry id -> its event's id."""
    return {
        entry_id.decode(): json.loads(fields[b"event"])["id"]
        for entry_id, fields in client.xrange(stream)
    }


async def _until_every_event_handled(env: dict[str, str], client: redis.Redis) -> list[dict]:
    stream = f"{env['REDIS_PREFIX']}:events"

    def handled() -> bool:
        wanted = set(_stream_event_ids(client, stream).values())
        return wanted <= {e["id"] for e in _sink(env)}

    await wait_until(handled, "every event in the stream to be handled", timeout=30)
    return _sink(env)


async def _until_started(names: list[str], offsets: dict[str, int]) -> None:
    """Wait until each worker wrote its start line (past ``offsets`` in its log)."""

    def started() -> bool:
        logs = {n: worker_log(n).read_bytes()[offsets[n] :] for n in names}
        return all(f"event worker {n} in group".encode() in logs[n] for n in names)

    await wait_until(started, f"workers {names} to start", timeout=30)
    # Its group and first blocking read come right after the line, and Redis 7.0 shows
    # neither (a consumer appears in XINFO only once it was given an entry): a sleep,
    # so both workers read before the traffic and each takes a share.
    await asyncio.sleep(0.5)


async def _pending_of(client: redis.Redis, stream: str, consumer: str) -> list[str]:
    pending = client.xpending_range(stream, DEFAULT_GROUP, "-", "+", 1000, consumer)
    return [p["message_id"].decode() for p in pending]


async def test_two_workers_share_the_stream_and_one_takes_over_when_the_other_dies(
    node_and_env: tuple[ServerNode, dict],
) -> None:
    node, env = node_and_env
    client = redis.Redis.from_url(env["REDIS_URL"])
    stream = f"{env['REDIS_PREFIX']}:events"
    names = ["left", "right"]
    offsets = {n: worker_log(n).stat().st_size if worker_log(n).exists() else 0 for n in names}
    workers = {name: start_event_worker(env, name) for name in names}
    try:
        await _until_started(names, offsets)
        # In three bursts, each in the stream before the next starts: a node writes what
        # comes together in one call, and the worker that read a burst of 30 clients'
        # events is busy with it (20 ms each) when the next comes.
        for _ in range(3):
            await _traffic(node, env, 10)
        events = await _until_every_event_handled(env, client)
        assert set(Counter(e["id"] for e in events).values()) == {1}, "each event once"
        assert {e["handled_by"] for e in events} == {"left", "right"}, "both took a share"

        traffic = asyncio.create_task(_traffic(node, env, 40))

        # Kill it while it holds entries it has not handled yet: three at least, 20 ms
        # each, so it is still holding some when the signal lands (it acknowledges a
        # batch at once when done; a CI run killed it just after that, with nothing
        # left pending, while it waited for "two pending" alone).
        async def left_holds_unhandled_entries() -> bool:
            pending = await _pending_of(client, stream, "left")
            event_ids = _stream_event_ids(client, stream)
            handled = {e["id"] for e in _sink(env)}
            return sum(event_ids[p] not in handled for p in pending) >= 3

        await wait_until(
            left_holds_unhandled_entries, "three unhandled entries pending on the left worker"
        )
        workers["left"].send_signal(signal.SIGKILL)
        workers["left"].wait(10)
        orphaned = await _pending_of(client, stream, "left")
        await traffic
        events = await _until_every_event_handled(env, client)
    finally:
        for worker in workers.values():
            worker.send_signal(signal.SIGTERM)
            worker.wait(10)
    assert orphaned, "the worker died holding entries"
    event_ids = _stream_event_ids(client, stream)
    handlers: dict[str, list[str]] = {}
    for e in events:
        handlers.setdefault(e["id"], []).append(e["handled_by"])
    for entry_id in orphaned:
        assert "right" in handlers[event_ids[entry_id]], "the survivor reclaimed it"
    twice = [i for i, names in handlers.items() if len(names) > 1]
    # At least once: only the entry the killed worker had handled but not acknowledged
    # can run again.
    assert len(twice) <= 1 and set(twice) <= {event_ids[i] for i in orphaned}, twice


@pytest.mark.django_db  # the handlers the worker adds depend on the Pusher apps it reads
def test_a_handler_registered_in_code_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_worker, "_registered", [])
    seen: list[dict] = []

    @register_handler
    def remember(received: dict) -> None:
        seen.append(received)

    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"registered-{uuid.uuid4().hex[:8]}:events"
    worker = EventWorker(
        client,
        stream=stream,
        group=DEFAULT_GROUP,
        consumer="in-process",
        handlers=configured_handlers(),
        max_attempts=2,
        retry_idle_ms=1000,
    )
    try:
        worker.ensure_group()
        sent = event(CONNECT, connection_id="c-1")
        entry_id = client.xadd(stream, {"event": json.dumps(sent)}).decode()
        assert worker.step() == 1
        assert seen == [{**sent, "stream_id": entry_id}], "with its place in the stream"
        assert client.xpending(stream, DEFAULT_GROUP)["pending"] == 0, "acknowledged"
    finally:
        client.delete(stream)


async def test_failing_handler_dead_letters_after_its_attempts(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    env = _event_env(
        e2e_env,
        tmp_path,
        PUSH_EVENT_HANDLERS="tests.event_sink.record",
        EVENT_SINK_FAIL_TYPE="subscribe",
        PUSH_EVENT_MAX_ATTEMPTS="2",
    )
    node = ServerNode(env, name=f"dead-{uuid.uuid4().hex[:6]}").start()
    worker = start_event_worker(env, "dl")
    try:
        ws, _ = await subscribe(node.ws_url, "dead-letters")
        await ws.close()
        client = redis.Redis.from_url(env["REDIS_URL"])
        dead = await wait_until(
            lambda: client.xrange(f"{env['REDIS_PREFIX']}:events:dead"),
            "the dead-lettered event",
            timeout=15,
        )
        assert len(dead) == 1
        fields = {k.decode(): v.decode() for k, v in dead[0][1].items()}
        assert json.loads(fields["event"])["type"] == "subscribe"
        assert fields["attempts"] == "2" and "refuses" in fields["error"]
        kinds = [e["type"] for e in _sink(env)]
        assert "connect" in kinds and "subscribe" not in kinds
        await asyncio.to_thread(create_superuser, env, "events-admin", "pw")
        admin = await admin_client(node, "events-admin", "pw")
        page = (await admin.get("/admin/push/connection/events/dead/")).text
        await admin.aclose()
        assert dead[0][0].decode() in page and "refuses that event type" in page
        assert "&quot;type&quot;: &quot;subscribe&quot;" in page
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
        node.stop()


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict, bytes]] = []
    failures_left = 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Hook.failures_left > 0:
            _Hook.failures_left -= 1
            self.send_response(500)
        else:
            _Hook.received.append((dict(self.headers), body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def test_webhooks_are_signed_and_retried(e2e_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "hook-secret"
    env = _event_env(
        e2e_env,
        tmp_path,
        PUSH_WEBHOOK_URLS=f"http://127.0.0.1:{port}/hook",
        PUSH_WEBHOOK_SECRET=secret,
    )
    node = ServerNode(env, name=f"hooks-{uuid.uuid4().hex[:6]}").start()
    worker = start_event_worker(env, "hooks")
    try:
        ws, _ = await subscribe(node.ws_url, "hooked")
        await ws.close()
        await wait_until(
            lambda: any(json.loads(b)["type"] == "disconnect" for _, b in _Hook.received),
            "the disconnect webhook",
            timeout=15,
        )
        kinds = [json.loads(body)["type"] for _, body in _Hook.received]
        assert {"connect", "subscribe", "disconnect"} <= set(kinds)
        signing = _client_signing()
        for headers, body in _Hook.received:
            assert signing.webhook_verify(body, headers, secret=secret)
            assert not signing.webhook_verify(
                body, headers, secret=secret, now=int(headers["X-Push-Timestamp"]) + 600
            ), "a replay ten minutes later is refused"
            assert headers["X-Push-Event-Id"] == json.loads(body)["id"]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
        node.stop()
        server.shutdown()


async def test_occupancy_is_counted_across_nodes(e2e_env: dict[str, str], tmp_path: Path) -> None:
    """Two nodes serving one channel make one occupied event, and one vacated event once
    both let it go (each node keeps an empty channel joined for 10 s before leaving)."""
    env = _event_env(e2e_env, tmp_path)
    nodes = [ServerNode(env, name=f"occ-{n}-{uuid.uuid4().hex[:4]}").start() for n in range(2)]
    try:
        channel = f"occupied-{uuid.uuid4().hex[:6]}"
        sockets = [(await subscribe(node.ws_url, channel))[0] for node in nodes for _ in range(2)]
        client = redis.Redis.from_url(env["REDIS_URL"])

        def kinds() -> list[str]:
            entries = client.xrange(f"{env['REDIS_PREFIX']}:events")
            events = [json.loads(fields[b"event"]) for _, fields in entries]
            return [e["type"] for e in events if e.get("channel") == channel]

        # Kept as it was: the vacated event went missing (30 s) in 3 of 8 runs once these
        # waits polled for their conditions, never in 8 runs as written; not understood
        # yet, so left alone.
        await asyncio.sleep(0.5)
        assert kinds().count("channel_occupied") == 1
        for ws in sockets:
            await ws.close()
        for _ in range(60):
            if "channel_vacated" in kinds():
                break
            await asyncio.sleep(0.5)
        assert kinds().count("channel_occupied") == 1
        assert kinds().count("channel_vacated") == 1
    finally:
        for node in nodes:
            node.stop()


async def test_a_killed_nodes_connections_get_their_disconnect_events(
    e2e_env: dict[str, str], e2e_database: Database, tmp_path: Path
) -> None:
    """``kill -9`` a node: the node that marks its connections closed announces their
    disconnect events (a receiver that saw them connect would count them open for good)."""
    env = _event_env(e2e_env, tmp_path)
    keeper = ServerNode(env, name=f"keeper-{uuid.uuid4().hex[:6]}").start()
    doomed = ServerNode(env, name=f"doomed-{uuid.uuid4().hex[:6]}").start()
    client = redis.Redis.from_url(env["REDIS_URL"])
    open_rows = "SELECT count(*) FROM push_connection WHERE server_id = %s"
    open_rows += " AND disconnected_at IS NULL AND subscriptions = %s::jsonb"

    def of_doomed(kind: str) -> set[str]:
        return {
            e["connection_id"]
            for e in _stream_events(client, env)
            if e["type"] == kind and e.get("node") == doomed.name
        }

    sockets = []
    try:
        channel = f"killed-{uuid.uuid4().hex[:6]}"
        # A node's runtime (its reaper too) starts with its first connection.
        sockets = [(await subscribe(keeper.ws_url, f"{channel}-kept"))[0]]
        sockets += [(await subscribe(doomed.ws_url, channel))[0] for _ in range(3)]
        await wait_until(
            lambda: (
                len(of_doomed(CONNECT)) == 3
                and e2e_database.query(open_rows, doomed.name, json.dumps([channel])) == [(3,)]
            ),
            "the connect events and the registry rows",
            interval=QUERY_INTERVAL_SECS,
        )
        doomed.stop(signal.SIGKILL)
        disconnected = await wait_until(
            lambda: of_doomed("disconnect") if len(of_doomed("disconnect")) == 3 else None,
            "the killed node's disconnect events",
            timeout=30,  # dead after PUSH_NODE_DEAD_AFTER_SECS (3 s), then reaped
            interval=QUERY_INTERVAL_SECS,
        )
        assert disconnected == of_doomed(CONNECT)
        for entry in _stream_events(client, env):
            if entry["type"] == "disconnect" and entry.get("node") == doomed.name:
                assert entry["channels"] == [channel] and entry["close_code"] == 1011
    finally:
        for ws in sockets:
            ws.transport.abort()
        keeper.stop()
        client.close()


async def _read_until_closed(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
    return ws.close_code


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
async def test_a_client_aborted_at_the_drain_deadline_gets_its_disconnect_event(
    e2e_env: dict[str, str], publisher_token: str, tmp_path: Path, server: str
) -> None:
    """SIGTERM with a client that never reads: the node gives up on it at
    PUSH_DRAIN_DEADLINE_SECS, and its disconnect event still goes out with the others'."""
    env = _event_env(e2e_env, tmp_path, PUSH_DRAIN_DEADLINE_SECS="2")
    node = ServerNode(env, server=server, name=f"drain-events-{uuid.uuid4().hex[:6]}").start()
    client = redis.Redis.from_url(env["REDIS_URL"])
    stalled = None
    try:
        channel = f"drain-events-{uuid.uuid4().hex[:6]}"
        stalled = await stalled_subscriber(node.ws_url, channel)
        healthy, _ = await subscribe(node.ws_url, channel)
        reader = asyncio.create_task(_read_until_closed(healthy))
        # More than the stalled client's socket buffers take: it is still connected,
        # with frames waiting, when the drain starts.
        await flood(node.ws_url, publisher_token, channel, 96, 64 * 1024)
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(node.process.wait, 60)
        assert await reader == 1001
        events = _stream_events(client, env)
        connected = {e["connection_id"] for e in events if e["type"] == CONNECT}
        disconnected = [e["connection_id"] for e in events if e["type"] == "disconnect"]
        assert len(connected) == 3  # the two subscribers and the publisher
        assert sorted(disconnected) == sorted(connected), "one disconnect event each"
    finally:
        node.stop()
        client.close()
        if stalled is not None:
            stalled.transport.abort()


def _client_signing() -> ModuleType:
    """The Python client's ``pushclient.signing`` from this source tree (standard library
    only), whatever copy of the client the environment has installed."""
    path = ROOT / "clients" / "python" / "pushclient" / "signing.py"
    spec = importlib.util.spec_from_file_location("pushclient_signing_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that takes ``delay`` seconds to answer and refuses the first
    ``refusals`` requests; the server's ``received`` holds every request's event id."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        server.received.append(json.loads(body)["id"])  # type: ignore[attr-defined]  # set by the receivers fixture
        time.sleep(server.delay)  # type: ignore[attr-defined]  # set by the receivers fixture
        refuse = server.refusals > 0  # type: ignore[attr-defined]  # set by the receivers fixture
        server.refusals -= refuse  # type: ignore[attr-defined]  # set by the receivers fixture
        self.send_response(500 if refuse else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receivers() -> Iterator[list[HTTPServer]]:
    servers = []
    for _ in range(2):
        server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
        server.received, server.delay, server.refusals = [], 0.0, 0  # type: ignore[attr-defined]  # the receiver's state
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def _urls(servers: list[HTTPServer]) -> list[str]:
    return [f"http://127.0.0.1:{s.server_address[1]}/hook" for s in servers]


def test_a_failed_webhook_is_retried_only_where_it_failed(receivers: list[HTTPServer]) -> None:
    accepting, failing = receivers
    failing.refusals = 3  # type: ignore[attr-defined]  # every in-process attempt
    sent = event(CONNECT, connection_id="c-retry")
    with override_settings(PUSH={"WEBHOOK_URLS": _urls(receivers)}):
        with pytest.raises(WebhookFailed) as failed:
            deliver_webhooks(sent)
        assert _urls([failing])[0] in str(failed.value)
        assert _urls([accepting])[0] not in str(failed.value)
        deliver_webhooks(sent)  # the worker's retry
    assert accepting.received == [sent["id"]]  # type: ignore[attr-defined]  # set by the receivers fixture
    assert failing.received == [sent["id"]] * 4  # type: ignore[attr-defined]  # set by the receivers fixture


def test_what_a_delivered_event_leaves_in_redis_lasts_its_retries_not_a_day(
    receivers: list[HTTPServer],
) -> None:
    """Each URL that accepts an event is remembered in Redis (so a retry skips it): at
    hundreds of events a second, a day of those keys is gigabytes of Redis."""
    sent = event(CONNECT, connection_id="c-remembered")
    with override_settings(
        PUSH={"WEBHOOK_URLS": _urls(receivers), "EVENT_MAX_ATTEMPTS": 5, "EVENT_RETRY_SECS": 10}
    ):
        deliver_webhooks(sent)
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(f"*webhook-accepted:{sent['id']}:*"))
    assert len(keys) == 2, "one per URL"
    for key in keys:
        assert 0 < client.ttl(key) <= 600, "remembered past its five 10 s retries, no longer"
    client.close()


def test_webhooks_go_to_every_url_at_once(receivers: list[HTTPServer]) -> None:
    for server in receivers:
        server.delay = 0.8  # type: ignore[attr-defined]  # set by the receivers fixture
    started = time.monotonic()
    with override_settings(PUSH={"WEBHOOK_URLS": _urls(receivers)}):
        deliver_webhooks(event(CONNECT, connection_id="c-both"))
    assert time.monotonic() - started < 1.4, "the two 0.8 s receivers were asked one by one"


def test_a_webhook_urls_credentials_stay_out_of_logs_and_dead_letters(
    receivers: list[HTTPServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Basic auth in the URL (``https://user:password@host/``): what a failed delivery
    says (the dead-letter stream, the admin) and every log line leave the password out."""
    receiver = receivers[0]
    receiver.refusals = 3  # type: ignore[attr-defined]  # every in-process attempt
    url = _urls([receiver])[0].replace("http://", "http://hooks:s3cr3t-pw@")
    caplog.set_level(logging.INFO)
    with (
        override_settings(PUSH={"WEBHOOK_URLS": [url]}),
        pytest.raises(WebhookFailed) as failed,
    ):
        deliver_webhooks(event(CONNECT, connection_id="c-credentials"))
    assert "s3cr3t-pw" not in str(failed.value)
    assert f"127.0.0.1:{receiver.server_address[1]}/hook" in str(failed.value)
    assert caplog.records, "httpx logs each request"
    for record in caplog.records:
        RedactFilter().filter(record)
        assert "s3cr3t-pw" not in logging.Formatter().format(record)


class _Trickler(BaseHTTPRequestHandler):
    """A webhook receiver that accepts (200) but then sends a large body a byte at a
    time, for ``trickle_secs`` at most (bounded, so a test that fails does end)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        until = time.monotonic() + self.server.trickle_secs  # type: ignore[attr-defined]  # set by the test
        try:
            while time.monotonic() < until:
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:  # the sender hung up: what a bounded read does
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_a_receiver_that_trickles_its_answer_does_not_hold_the_worker() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Trickler)
    server.trickle_secs = 20.0  # type: ignore[attr-defined]  # read by _Trickler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with override_settings(PUSH={"WEBHOOK_URLS": _urls([server])}):
            deliver_webhooks(event(CONNECT, connection_id="c-trickled"))  # 200: accepted
        assert time.monotonic() - started < 10, "the worker read the whole trickled answer"
    finally:
        server.shutdown()
        server.server_close()


class _HeaderTrickler(BaseHTTPRequestHandler):
    """A webhook receiver that sends its status line and headers a byte every 0.5 s
    (each within any read timeout), for ``trickle_secs`` at most."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        head = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"x" * 10_000 + b"\r\n\r\n"
        until = time.monotonic() + self.server.trickle_secs  # type: ignore[attr-defined]  # set by the test
        try:
            for byte in head:
                if time.monotonic() > until:
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:  # the sender hung up: what a deadline does
            pass
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_receiver_that_trickles_its_headers_is_given_up_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each byte comes within the read timeout: only a deadline on the whole request
    frees the worker's thread (which would otherwise wait as long as the receiver likes)."""
    monkeypatch.setattr(webhooks, "REQUEST_DEADLINE_SECS", 1.5)
    monkeypatch.setattr(webhooks, "ATTEMPTS", 1)
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _HeaderTrickler)
    server.trickle_secs = 15.0  # type: ignore[attr-defined]  # read by _HeaderTrickler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with (
            override_settings(PUSH={"WEBHOOK_URLS": _urls([server])}),
            pytest.raises(WebhookFailed, match="Timeout"),
        ):
            deliver_webhooks(event(CONNECT, connection_id="c-slow-head"))
        assert time.monotonic() - started < 8, "the receiver held the request past its deadline"
    finally:
        server.shutdown()
        server.server_close()


def _in_process_worker(
    client: redis.Redis,
    stream: str,
    handlers: list,
    *,
    concurrency: int,
    max_attempts: int = 2,
    retry_idle_ms: int = 10_000,
) -> EventWorker:
    """A worker of this process on ``stream``, which tries an event twice."""
    return EventWorker(
        client,
        stream=stream,
        group=DEFAULT_GROUP,
        consumer="in-process",
        handlers=handlers,
        max_attempts=max_attempts,
        retry_idle_ms=retry_idle_ms,
        concurrency=concurrency,
    )


def _step_until_none_pending(worker: EventWorker, client: redis.Redis, stream: str) -> None:
    wait_until_blocking(
        lambda: worker.step() >= 0 and not client.xpending(stream, DEFAULT_GROUP)["pending"],
        "every event handled or dead-lettered",
        timeout=60,
    )


def test_the_worker_handles_a_batch_several_events_at_once() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"concurrent-{uuid.uuid4().hex[:8]}:events"
    seen: list[str] = []
    worker = _in_process_worker(
        client,
        stream,
        [lambda received: (time.sleep(0.3), seen.append(received["id"]))],
        concurrency=8,
    )
    try:
        worker.ensure_group()
        sent = [event(CONNECT, connection_id=f"c-{i}") for i in range(8)]
        for entry in sent:
            client.xadd(stream, {"event": json.dumps(entry)})
        started = time.monotonic()
        assert worker.step() == 8
        assert time.monotonic() - started < 1.5, "eight 0.3 s handlers ran one by one"
        assert sorted(seen) == sorted(e["id"] for e in sent)
        assert client.xpending(stream, DEFAULT_GROUP)["pending"] == 0, "acknowledged"
    finally:
        client.delete(stream)


def test_one_connections_events_are_handled_in_order_beside_others() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"ordered-{uuid.uuid4().hex[:8]}:events"
    seen: list[tuple[str, str]] = []

    def slow_connects(received: dict) -> None:
        time.sleep(0.5 if received["type"] == CONNECT else 0.0)
        seen.append((received["connection_id"], received["type"]))

    worker = _in_process_worker(client, stream, [slow_connects], concurrency=8)
    try:
        worker.ensure_group()
        for kind in (CONNECT, "subscribe", "disconnect"):
            for connection in ("c-a", "c-b"):
                client.xadd(stream, {"event": json.dumps(event(kind, connection_id=connection))})
        started = time.monotonic()
        assert worker.step() == 6
        assert time.monotonic() - started < 0.9, "the two connections ran one after the other"
        for connection in ("c-a", "c-b"):
            kinds = [kind for about, kind in seen if about == connection]
            assert kinds == [CONNECT, "subscribe", "disconnect"]
    finally:
        client.delete(stream)


def test_a_channels_later_events_wait_for_its_failed_one() -> None:
    """A channel's occupied that failed once is retried before its vacated is sent, the
    vacated in the same batch or read while the occupied waits: a receiver that saw the
    vacated first would take the channel for occupied for good."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"retried-{uuid.uuid4().hex[:8]}:events"
    seen: list[str] = []
    failures = Counter({CHANNEL_OCCUPIED: 1})

    def flaky(received: dict) -> None:
        if failures[received["type"]] > 0:
            failures[received["type"]] -= 1
            raise RuntimeError("receiver away")
        seen.append(received["type"])

    worker = _in_process_worker(
        client,
        stream,
        [flaky],
        concurrency=8,
        max_attempts=3,
        retry_idle_ms=5000,  # the two steps before the retry take far less
    )

    def add(kind: str, **fields: str) -> None:
        client.xadd(stream, {"event": json.dumps(event(kind, **fields))})

    try:
        worker.ensure_group()
        add(CHANNEL_OCCUPIED, channel="ch-flaky")
        add(CONNECT, connection_id="c-beside")
        add(CHANNEL_VACATED, channel="ch-flaky")
        worker.step()
        assert seen == [CONNECT], "only the other connection's event went"
        add(CHANNEL_OCCUPIED, channel="ch-flaky")
        add(CHANNEL_VACATED, channel="ch-flaky")
        worker.step()
        assert seen == [CONNECT], "read while the failed one waits, yet sent before it"
        _step_until_none_pending(worker, client, stream)
        assert seen == [CONNECT] + [CHANNEL_OCCUPIED, CHANNEL_VACATED] * 2
        assert not client.xrange(f"{stream}:dead"), "a held event spent none of its attempts"
    finally:
        client.delete(stream, f"{stream}:dead")


def test_a_receiver_down_for_a_while_gets_the_event_when_it_is_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five attempts 0.3 s apart were spent in about a second, and the event
    dead-lettered, while the receiver was down for two: the retries back off (0.3 s,
    then about 0.6, 1.2, 2.4), so the last of them finds it back."""
    monkeypatch.setattr(event_worker, "BLOCK_MS", 20)  # steps as often as the test likes
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"backoff-{uuid.uuid4().hex[:8]}:events"
    back_at: list[float] = []
    delivered: list[str] = []

    def down_at_first(received: dict) -> None:
        now = time.monotonic()
        back_at.append(back_at[0] if back_at else now + 1.8)
        if now < back_at[0]:
            raise RuntimeError("receiver down")
        delivered.append(received["id"])

    worker = _in_process_worker(
        client, stream, [down_at_first], concurrency=1, max_attempts=5, retry_idle_ms=300
    )
    try:
        worker.ensure_group()
        sent = event(CONNECT, connection_id="c-outage")
        client.xadd(stream, {"event": json.dumps(sent)})
        _step_until_none_pending(worker, client, stream)
        assert delivered == [sent["id"]]
        assert not client.xrange(f"{stream}:dead")
    finally:
        client.delete(stream, f"{stream}:dead")
        client.close()


def test_an_event_is_dead_lettered_once_its_retries_would_outlast_their_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries 0.2, 0.4 and 0.8 s after each failure: a third retry would come 1.4 s
    after the first failure, past the 1 s the event may be retried for."""
    monkeypatch.setattr(event_worker, "BLOCK_MS", 20)
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"retry-total-{uuid.uuid4().hex[:8]}:events"

    def refuses(received: dict) -> None:
        raise RuntimeError("receiver refuses it")

    worker = EventWorker(
        client,
        stream=stream,
        group=DEFAULT_GROUP,
        consumer="in-process",
        handlers=[refuses],
        max_attempts=10,
        retry_idle_ms=200,
        retry_total_ms=1000,
    )
    try:
        worker.ensure_group()
        client.xadd(stream, {"event": json.dumps(event(CONNECT, connection_id="c-refused"))})
        _step_until_none_pending(worker, client, stream)
        dead = client.xrange(f"{stream}:dead")
        assert [fields[b"attempts"] for _, fields in dead] == [b"3"]
    finally:
        client.delete(stream, f"{stream}:dead")
        client.close()


def test_a_stopped_workers_unhandled_events_go_before_the_later_ones_of_their_connection() -> None:
    """A worker stops after one event of its batch; another worker then reads that
    connection's next event: the stopped worker's unhandled one goes first, not after
    the retry delay (a disconnect sent before its subscribe)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"handover-{uuid.uuid4().hex[:8]}:events"
    seen: list[str] = []
    stopping = [False]

    def stops_after_one(received: dict) -> None:
        seen.append(received["type"])
        stopping[0] = True

    stopped = _in_process_worker(client, stream, [stops_after_one], concurrency=1)
    stopped._stop = lambda: stopping[0]
    other = EventWorker(
        client,
        stream=stream,
        group=DEFAULT_GROUP,
        consumer="other",
        handlers=[lambda received: seen.append(received["type"])],
        max_attempts=2,
        retry_idle_ms=10_000,
    )

    def add(kind: str) -> None:
        client.xadd(stream, {"event": json.dumps(event(kind, connection_id="c-handover"))})

    try:
        stopped.ensure_group()
        add(CONNECT)
        add("subscribe")
        stopped.step()
        assert seen == [CONNECT], "stopped within its batch"
        add(DISCONNECT)
        other.step()
        assert seen == [CONNECT, "subscribe", DISCONNECT]
    finally:
        client.delete(stream)
        client.close()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_event_whose_handler_outlasts_the_retry_delay_is_not_handled_twice(
    concurrency: int,
) -> None:
    """A slow webhook receiver (each attempt up to its deadline, three of them) keeps an
    event in hand past the retry delay: another worker must not take it for abandoned
    and send it again meanwhile."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"slow-{uuid.uuid4().hex[:8]}:events"
    seen: list[tuple[str, str]] = []

    def slow(name: str) -> Callable[[dict], None]:
        def handler(received: dict) -> None:
            seen.append((name, received["id"]))
            time.sleep(2.5)

        return handler

    workers = [
        _in_process_worker(
            client, stream, [slow(name)], concurrency=concurrency, retry_idle_ms=1000
        )
        for name in ("first", "second")
    ]
    workers[1].consumer = "second"
    try:
        workers[0].ensure_group()
        sent = event(CONNECT, connection_id="c-slow")
        client.xadd(stream, {"event": json.dumps(sent)})
        in_hand = threading.Thread(target=workers[0].step)
        in_hand.start()
        wait_until_blocking(lambda: seen, "the first worker to start on it")
        time.sleep(1.5)  # past the retry delay, the handler still running
        workers[1].step()
        in_hand.join()
        assert seen == [("first", sent["id"])]
    finally:
        client.delete(stream)
        client.close()


def test_an_entry_that_is_no_event_is_dead_lettered_and_the_rest_go_on() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"garbled-{uuid.uuid4().hex[:8]}:events"
    seen: list[str] = []
    worker = _in_process_worker(
        client,
        stream,
        [lambda received: seen.append(received["id"])],
        concurrency=1,
        max_attempts=1,
    )
    try:
        worker.ensure_group()
        client.xadd(stream, {"event": "{not json"})
        sent = event(CONNECT, connection_id="c-after")
        client.xadd(stream, {"event": json.dumps(sent)})
        _step_until_none_pending(worker, client, stream)
        assert seen == [sent["id"]]
        assert [fields[b"event"] for _, fields in client.xrange(f"{stream}:dead")] == [b"{not json"]
    finally:
        client.delete(stream, f"{stream}:dead")
        client.close()


@pytest.fixture
def refusing_occupied() -> Iterator[tuple[redis.Redis, str, list[str], EventWorker]]:
    """A stream and a worker on it whose handler refuses every channel_occupied and
    keeps the others' types in a list; it tries an event twice, 0.5 s apart."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"refusing-{uuid.uuid4().hex[:8]}:events"
    seen: list[str] = []

    def refuses_occupied(received: dict) -> None:
        if received["type"] == CHANNEL_OCCUPIED:
            raise RuntimeError("receiver refuses it")
        seen.append(received["type"])

    worker = _in_process_worker(
        client, stream, [refuses_occupied], concurrency=1, retry_idle_ms=500
    )
    worker.ensure_group()
    yield client, stream, seen, worker
    client.delete(stream, f"{stream}:dead")
    client.close()


def test_a_dead_lettered_event_lets_the_ones_behind_it_go(
    refusing_occupied: tuple[redis.Redis, str, list[str], EventWorker],
) -> None:
    client, stream, seen, worker = refusing_occupied
    for kind in (CHANNEL_OCCUPIED, CHANNEL_VACATED):
        client.xadd(stream, {"event": json.dumps(event(kind, channel="ch-poisoned"))})
    _step_until_none_pending(worker, client, stream)
    assert seen == [CHANNEL_VACATED]
    dead = [json.loads(fields[b"event"])["type"] for _, fields in client.xrange(f"{stream}:dead")]
    assert dead == [CHANNEL_OCCUPIED]


def test_the_dead_letters_kept_are_bounded_and_the_newest(
    refusing_occupied: tuple[redis.Redis, str, list[str], EventWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, stream, _seen, worker = refusing_occupied
    monkeypatch.setattr(event_worker, "DEAD_LETTERS_KEPT", 3, raising=False)
    for n in range(5):
        client.xadd(stream, {"event": json.dumps(event(CHANNEL_OCCUPIED, channel=f"ch-{n}"))})
    _step_until_none_pending(worker, client, stream)
    dead = client.xrange(f"{stream}:dead")
    assert [json.loads(fields[b"event"])["channel"] for _, fields in dead] == [
        "ch-2",
        "ch-3",
        "ch-4",
    ]


def test_an_event_waits_for_a_failed_one_only_so_long(
    refusing_occupied: tuple[redis.Redis, str, list[str], EventWorker],
) -> None:
    """A receiver that refuses every event of a channel (a dead URL among several) must
    not hold that channel's other events back for good: an event added longer ago than
    twice the attempts' time (here 2 x 2 x 0.5 s) goes without waiting."""
    client, stream, seen, worker = refusing_occupied
    added_ms = int(time.time() * 1000) - 60_000  # a minute ago: a backlog
    for n, kind in enumerate((CHANNEL_OCCUPIED, CHANNEL_VACATED)):
        entry = {"event": json.dumps(event(kind, channel="ch-outwaited"))}
        client.xadd(stream, entry, id=f"{added_ms}-{n}")
    worker.step()
    assert seen == [CHANNEL_VACATED]


def test_events_trimmed_while_they_wait_for_a_retry_are_reported(
    refusing_occupied: tuple[redis.Redis, str, list[str], EventWorker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A receiver down long enough under load: the stream (``PUSH_EVENT_STREAM_MAXLEN``)
    drops events still waiting for their retry; the worker says so instead of nothing."""
    client, stream, _seen, worker = refusing_occupied
    for _ in range(3):
        client.xadd(stream, {"event": json.dumps(event(CHANNEL_OCCUPIED, channel="ch-trim"))})
    worker.step()  # all three refused: pending for a retry
    client.xtrim(stream, maxlen=0)
    caplog.set_level(logging.WARNING, logger="push.ops.event_worker")
    wait_until_blocking(
        lambda: worker.step() >= 0 and "3 events lost" in caplog.text,
        "the worker to report the trimmed events",
    )
    assert "PUSH_EVENT_STREAM_MAXLEN" in caplog.text
    assert not client.xpending(stream, DEFAULT_GROUP)["pending"]


@pytest.mark.django_db(transaction=True)
def test_a_handler_reads_the_database_again_after_postgresql_ended_its_connection() -> None:
    """Handlers may use the ORM (Pusher's webhooks read the apps). A handler thread
    that kept its connection out of the pool failed every later event on it once
    PostgreSQL had ended it (a restart), until the worker was restarted."""
    from django.contrib.auth.models import User
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's backends")
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"reconnect-{uuid.uuid4().hex[:8]}:events"
    read_on: list[int] = []  # the backend each event was handled on

    def reading(received: dict) -> None:
        User.objects.exists()
        read_on.append(connection.connection.info.backend_pid)

    worker = _in_process_worker(client, stream, [reading], concurrency=2)
    try:
        worker.ensure_group()
        client.xadd(stream, {"event": json.dumps(event(CONNECT, connection_id="c-1"))})
        assert worker.step() == 1
        terminate_backends(read_on[-1])
        client.xadd(stream, {"event": json.dumps(event(CONNECT, connection_id="c-2"))})
        assert worker.step() == 1, "the handler failed on the ended connection"
        assert read_on[-1] != read_on[0]
    finally:
        client.delete(stream)


def _dropped() -> float:
    return REGISTRY.get_sample_value("push_events_dropped_total") or 0.0


@pytest.fixture
async def unreachable() -> AsyncIterator[aioredis.Redis]:
    """A Redis client of a port nothing listens on. No retries: redis-py's default
    retries a refused connection three times with backoff, ~6 s a flush, and what the
    tests with it look at is the event buffer, not the client."""
    client = aioredis.Redis(
        host="127.0.0.1",
        port=free_port(),
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), retries=0),
    )
    yield client
    await client.aclose()


async def test_unwritten_events_are_bounded_and_the_newest_kept(
    unreachable: aioredis.Redis,
) -> None:
    """Redis away: the buffer keeps the newest events, up to its bound, across failed
    flushes, and counts what it dropped."""
    log = EventLog(unreachable, "gone", "node-x", maxlen=100, max_buffered=5)
    before = _dropped()
    for i in range(3):
        log.emit(CONNECT, connection_id=f"c-{i}")
    await log.flush()  # fails: the three stay
    for i in range(3, 7):
        log.emit(CONNECT, connection_id=f"c-{i}")
    assert [e["connection_id"] for e in log._buffer] == [f"c-{i}" for i in range(2, 7)]
    await log.flush()
    assert [e["connection_id"] for e in log._buffer] == [f"c-{i}" for i in range(2, 7)]
    assert _dropped() - before == 2


async def test_unwritten_events_are_bounded_in_bytes(unreachable: aioredis.Redis) -> None:
    """Client events carry up to 10 KB of data each: while Redis is away the buffer
    keeps the newest within its bytes, not only its count (100,000 of them were 1 GB),
    across failed flushes, and counts what it dropped."""
    log = EventLog(unreachable, "gone", "node-x", maxlen=100, max_buffered_bytes=35_000)
    before = _dropped()
    for i in range(3):
        log.emit(CLIENT_EVENT, channel="private-x", event="client-e", data="d" * 10_000, n=i)
    await log.flush()  # fails: the three stay
    for i in range(3, 6):
        log.emit(CLIENT_EVENT, channel="private-x", event="client-e", data="d" * 10_000, n=i)
    assert [e["n"] for e in log._buffer] == [3, 4, 5]
    await log.flush()
    assert [e["n"] for e in log._buffer] == [3, 4, 5]
    assert _dropped() - before == 3


async def test_a_batch_being_written_when_the_node_stops_is_written_all_the_same() -> None:
    """A node stopping cancels its event loop, possibly with a batch on its way to a slow
    Redis: that batch is written by the stop's last flush, not lost."""
    port = urlsplit(settings.REDIS_URL).port or 6379
    proxy = Proxy(("127.0.0.1", port))
    proxied = aioredis.Redis(host="127.0.0.1", port=await proxy.start(), db=_redis_db())
    prefix = f"stopping{uuid.uuid4().hex[:8]}"
    log = EventLog(proxied, prefix, "node-s", maxlen=1000)
    try:
        await proxied.ping()
        proxy.frozen = True  # Redis answers nothing: the loop's batch stays in flight
        log.emit(CONNECT, connection_id="c-in-flight")
        loop_task = asyncio.create_task(log.run())
        await wait_until(lambda: not log._buffer, "the loop to take the batch")
        await cancel_and_wait([loop_task], timeout=5)
        proxy.frozen = False
        log.emit(DISCONNECT, connection_id="c-in-flight")
        await asyncio.wait_for(log.flush(), 10)  # the stop's last flush
        entries = await proxied.xrange(f"{prefix}:events")
        kinds = [json.loads(fields[b"event"])["type"] for _, fields in entries]
        # Each once, though the cancelled write may have reached Redis too.
        assert kinds == [CONNECT, DISCONNECT]
    finally:
        await proxied.delete(f"{prefix}:events")
        await proxied.aclose()
        await proxy.stop()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_node")
async def test_events_emitted_just_before_the_node_stops_reach_the_stream() -> None:
    node = await get_node()
    stream = f"{node.directory.prefix}:events"
    connection_id = f"c-last-{uuid.uuid4().hex[:6]}"
    node.events.emit(DISCONNECT, connection_id=connection_id)
    await stop_node()
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        assert connection_id in [e.get("connection_id") for e in _stream_events_of(client, stream)]
    finally:
        client.close()


def _stream_events_of(client: redis.Redis, stream: str) -> list[dict]:
    return [json.loads(fields[b"event"]) for _, fields in client.xrange(stream)]


def _redis_db() -> int:
    return int(urlsplit(settings.REDIS_URL).path.lstrip("/") or 0)


def _scraped(url: str) -> dict[str, float]:
    """Every sample of a Prometheus endpoint, by name and labels."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_the_event_worker_shows_what_it_handled_on_its_metrics_endpoint(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = _event_env(
        e2e_env,
        tmp_path,
        PUSH_EVENT_HANDLERS="tests.event_sink.record",
        EVENT_SINK_FAIL_TYPE="unsubscribe",
        PUSH_EVENT_MAX_ATTEMPTS="1",
        PUSH_EVENT_WORKER_METRICS_PORT=str(port),
    )
    client = redis.Redis.from_url(env["REDIS_URL"])
    stream = f"{env['REDIS_PREFIX']}:events"
    for n in range(3):
        client.xadd(stream, {"event": json.dumps(event(CONNECT, connection_id=f"c-{n}"))})
    refused = event("unsubscribe", connection_id="c-9", channel="metered")
    client.xadd(stream, {"event": json.dumps(refused)})
    worker = start_event_worker(env, "metered")
    url = f"http://127.0.0.1:{port}/metrics"

    def scraped_when_done() -> dict[str, float] | None:
        with contextlib.suppress(httpx.HTTPError):
            samples = _scraped(url)
            # The four run at once: all of them counted, whichever came last.
            handled = samples.get("push_events_processed_total{outcome=handled}")
            if handled == 3 and samples.get("push_events_processed_total{outcome=dead}") == 1:
                return samples
        return None

    try:
        samples = wait_until_blocking(scraped_when_done, "the worker's metrics", timeout=30)
        assert samples["push_event_dead_letters{}"] == 1
        assert samples["push_event_handle_seconds_count{}"] == 4
        assert samples["push_event_stream_entries{}"] == 4
        assert samples["push_event_pending{}"] == 0
        assert samples["push_event_lag_seconds{}"] == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)
        client.delete(stream, f"{stream}:dead")
        client.close()


def test_the_metrics_show_how_far_behind_the_workers_are() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"lagging-{uuid.uuid4().hex[:8]}:events"
    collector = EventStreamCollector(client, stream=stream, group=DEFAULT_GROUP)
    worker = _in_process_worker(client, stream, [lambda received: None], concurrency=1)
    try:
        worker.ensure_group()
        added_ms = int(time.time() * 1000) - 30_000  # waiting for half a minute
        for n in range(2):
            entry = {"event": json.dumps(event(CONNECT, connection_id=f"c-{n}"))}
            client.xadd(stream, entry, id=f"{added_ms + n}-0")
        samples = {family.name: family.samples[0].value for family in collector.collect()}
        assert samples["push_event_lag_seconds"] >= 30
        assert samples["push_event_unread"] == 2
        worker.step()
        samples = {family.name: family.samples[0].value for family in collector.collect()}
        assert samples["push_event_lag_seconds"] == 0
        assert samples["push_event_unread"] == 0
    finally:
        client.delete(stream)
        client.close()


async def test_the_event_stream_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client events of 10 KB: a stream kept to its count alone took 10 GB of Redis for
    a million of them. The node trims it to its bytes, the oldest first."""
    monkeypatch.setattr(events, "STREAM_BYTES_CHECK_SECS", 0.1)
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    prefix = f"bytes{uuid.uuid4().hex[:8]}"
    stream = f"{prefix}:events"
    log = EventLog(client, prefix, "node-b", maxlen=1_000_000, max_stream_bytes=200_000)
    loop_task = asyncio.create_task(log.run())
    try:
        for n in range(100):
            log.emit(CLIENT_EVENT, channel="private-big", event="client-e", data="d" * 10_000, n=n)
        await wait_until(lambda: client.xlen(stream), "the events in the stream")

        async def within_bound() -> bool:
            return (await client.memory_usage(stream, samples=0) or 0) <= 200_000

        await wait_until(within_bound, "the stream trimmed to its bytes", timeout=10)
        entries = await client.xrange(stream)
        kept = [json.loads(fields[b"event"])["n"] for _, fields in entries]
        assert kept and kept[-1] == 99 and kept == sorted(kept), "the newest kept"
    finally:
        await cancel_and_wait([loop_task], timeout=5)
        await client.delete(stream)
        await client.aclose()
