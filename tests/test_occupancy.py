"""``occupancy: true`` against real nodes: the subscriber count across nodes as
subscribers come and go and as a node dies, at most one event a second per channel,
and the permissions of subscribing."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
import uuid
from typing import Any

import pytest

from tests.servers import ServerNode
from tests.wsclient import open_ws, request, subscribe

pytestmark = pytest.mark.e2e

WAIT_SECS = 15.0


def _channel(prefix: str = "occ") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Watcher:
    """A subscriber with ``occupancy: true`` that records each count and when it came."""

    def __init__(self) -> None:
        self.counts: list[tuple[float, int]] = []
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None

    async def open(self, node: ServerNode, channel: str) -> dict[str, Any]:
        self.ws = await open_ws(node.ws_url)
        reply = await request(self.ws, {"type": "subscribe", "channel": channel, "occupancy": True})
        self.task = asyncio.create_task(self._read())
        return reply

    async def _read(self) -> None:
        async for frame in self.ws:
            envelope = json.loads(frame)
            if envelope["type"] == "occupancy":
                self.counts.append((time.monotonic(), envelope["subscribers"]))

    async def until(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_SECS
        while not self.counts or self.counts[-1][1] != count:
            assert time.monotonic() < deadline, f"waiting for {count}, saw {self.values()}"
            await asyncio.sleep(0.05)

    def values(self) -> list[int]:
        return [count for _, count in self.counts]

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.ws.close()


async def test_counts_across_two_nodes_as_subscribers_come_and_go(
    two_nodes: tuple[ServerNode, ServerNode],
) -> None:
    channel = _channel()
    watcher = Watcher()
    reply = await watcher.open(two_nodes[0], channel)
    assert reply["type"] == "subscribed"
    await watcher.until(1)  # itself, at once
    others = [(await subscribe(two_nodes[1].ws_url, channel))[0] for _ in range(3)]
    await watcher.until(4)
    second = Watcher()
    await second.open(two_nodes[1], channel)
    await second.until(5)
    await watcher.until(5)
    for ws in others:
        await ws.close()
    await watcher.until(2)
    await second.until(2)
    await second.close()
    await watcher.until(1)
    await watcher.close()


async def test_at_most_one_event_a_second_while_subscribers_churn(
    two_nodes: tuple[ServerNode, ServerNode],
) -> None:
    channel = _channel("churn")
    watcher = Watcher()
    await watcher.open(two_nodes[0], channel)
    await watcher.until(1)
    started = time.monotonic()
    while time.monotonic() - started < 3.5:
        for node in two_nodes:
            ws, _ = await subscribe(node.ws_url, channel)
            await ws.close()
    await watcher.until(1)
    times = [at for at, _ in watcher.counts[1:]]  # after the one on subscribe
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    await watcher.close()


async def test_a_dead_nodes_subscribers_leave_the_count(
    two_nodes: tuple[ServerNode, ServerNode], e2e_env: dict[str, str]
) -> None:
    channel = _channel("dead")
    watcher = Watcher()
    await watcher.open(two_nodes[0], channel)
    doomed = ServerNode(e2e_env, name=f"occ-doomed-{uuid.uuid4().hex[:6]}").start()
    try:
        sockets = [(await subscribe(doomed.ws_url, channel))[0] for _ in range(2)]
        await watcher.until(3)
        doomed.stop(signal.SIGKILL)  # no drain: its counts must expire
        await watcher.until(1)
        del sockets
    finally:
        doomed.stop()
    await watcher.close()


async def test_occupancy_needs_the_right_to_subscribe(
    two_nodes: tuple[ServerNode, ServerNode],
) -> None:
    ws = await open_ws(two_nodes[0].ws_url)
    reply = await request(
        ws, {"type": "subscribe", "channel": _channel("private-occ"), "occupancy": True}
    )
    assert reply["type"] == "error" and reply["code"] == "FORBIDDEN"
    bad = await request(ws, {"type": "subscribe", "channel": _channel(), "occupancy": "yes"})
    assert bad["code"] == "INVALID_MESSAGE"
    await ws.close()
