"""Lifecycle events through the Redis Stream and the worker: nothing lost when a worker
dies mid-batch, webhooks signed and retried, failures dead-lettered."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import redis

from tests.servers import LOG_DIR, ROOT, ServerNode, free_port
from tests.wsclient import subscribe

pytestmark = pytest.mark.e2e


def _event_env(e2e_env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **e2e_env,
        "REDIS_PREFIX": f"ev{uuid.uuid4().hex[:8]}",
        "PUSH_EVENT_RETRY_SECS": "1",
        "EVENT_SINK_PATH": str(tmp_path / "sink.jsonl"),
        **extra,
    }


def _start_worker(env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = (LOG_DIR / f"worker-{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_event_worker", "--consumer", name],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _sink(env: dict[str, str]) -> list[dict]:
    path = Path(env["EVENT_SINK_PATH"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


async def _traffic(node: ServerNode, clients: int) -> str:
    """``clients`` connect, subscribe to one new channel and leave; returns the channel."""
    channel = f"events-{uuid.uuid4().hex[:6]}"
    sockets = [await subscribe(node.ws_url, channel) for _ in range(clients)]
    for ws, _ in sockets:
        await ws.close()
    await asyncio.sleep(0.5)
    return channel


async def test_worker_killed_mid_batch_loses_no_event(
    node_and_env: tuple[ServerNode, dict],
) -> None:
    node, env = node_and_env
    first = _start_worker(env, "first")
    channel = await _traffic(node, 30)
    for _ in range(100):  # kill it inside its batch: some handled, most not (20 ms each)
        if len(_sink(env)) >= 5:
            break
        await asyncio.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    handled_by_first = len(_sink(env))
    second = _start_worker(env, "second")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events = _sink(env)
            kinds = [e["type"] for e in events]
            if kinds.count("connect") >= 30 and kinds.count("disconnect") >= 30:
                break
            await asyncio.sleep(0.2)
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
        assert len(occupied) == 1, "one node, one occupancy"
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(10)


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
    worker = _start_worker(env, "dl")
    try:
        ws, _ = await subscribe(node.ws_url, "dead-letters")
        await ws.close()
        client = redis.Redis.from_url(env["REDIS_URL"])
        dead: list = []
        for _ in range(60):
            dead = client.xrange(f"{env['REDIS_PREFIX']}:events:dead")
            if dead:
                break
            await asyncio.sleep(0.25)
        assert len(dead) == 1
        fields = {k.decode(): v.decode() for k, v in dead[0][1].items()}
        assert json.loads(fields["event"])["type"] == "subscribe"
        assert fields["attempts"] == "2" and "refuses" in fields["error"]
        kinds = [e["type"] for e in _sink(env)]
        assert "connect" in kinds and "subscribe" not in kinds
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
    worker = _start_worker(env, "hooks")
    try:
        ws, _ = await subscribe(node.ws_url, "hooked")
        await ws.close()
        for _ in range(60):
            if any(json.loads(b)["type"] == "disconnect" for _, b in _Hook.received):
                break
            await asyncio.sleep(0.25)
        kinds = [json.loads(body)["type"] for _, body in _Hook.received]
        assert {"connect", "subscribe", "disconnect"} <= set(kinds)
        for headers, body in _Hook.received:
            expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-Push-Signature"] == expected
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
