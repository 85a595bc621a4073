"""``occupancy: true`` against real nodes: the subscriber count across nodes as
subscribers come and go and as a node dies, at most one event a second per channel,
and the permissions of subscribing; the same counts in the channel info over REST."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.servers import ServerNode, create_token, publish_rest
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


# ----- channel info over REST ----------------------------------------------------------


async def _eventually_json(http: Any, url: str, expected: Any, **kwargs: Any) -> None:
    deadline = time.monotonic() + WAIT_SECS
    while True:
        response = await http.get(url, **kwargs)
        if response.status_code == 200 and response.json() == expected:
            return
        assert time.monotonic() < deadline, (url, response.status_code, response.text)
        await asyncio.sleep(0.2)


async def test_channel_info_and_list_count_across_nodes_and_obey_permissions(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str, e2e_env: dict[str, str]
) -> None:
    tag = uuid.uuid4().hex[:8]
    a, b, c = (f"info{tag}-{name}" for name in "abc")
    secret, room = f"private-info{tag}", f"presence-info{tag}"
    staff = {"Authorization": f"Token {create_token(e2e_env, 'occ-staff', staff=True)}"}
    for channel in (a, a, b, c):
        await publish_rest(two_nodes[0], publisher_token, channel, 1)
    sockets = [(await subscribe(two_nodes[i % 2].ws_url, a))[0] for i in range(3)]
    sockets.append((await subscribe(two_nodes[1].ws_url, b))[0])
    token = staff["Authorization"].split()[1]
    sockets.append((await subscribe(two_nodes[0].ws_url, secret, token=token))[0])
    sockets.append((await subscribe(two_nodes[1].ws_url, room, token=token))[0])
    base = f"{two_nodes[1].http_url}/api/v1/channels"
    async with httpx.AsyncClient(timeout=10) as http:
        await _eventually_json(http, f"{base}/{a}", {"channel": a, "last_seq": 2, "subscribers": 3})
        assert (await http.get(f"{base}/{secret}")).status_code == 403
        await _eventually_json(
            http,
            f"{base}/{secret}",
            {"channel": secret, "last_seq": 0, "subscribers": 1},
            headers=staff,
        )
        await _eventually_json(
            http,
            f"{base}/{room}",
            {"channel": room, "last_seq": 0, "subscribers": 1, "presence_members": 1},
            headers=staff,
        )
        # Paged by name: the occupied ones only, then every stored one.
        first = (await http.get(f"{base}/?prefix=info{tag}&occupied=true&limit=1")).json()
        assert first["results"] == [{"channel": a, "last_seq": 2, "subscribers": 3}]
        second = (await http.get(first["next"])).json()
        assert second == {
            "results": [{"channel": b, "last_seq": 1, "subscribers": 1}],
            "next": None,
        }
        stored = (await http.get(f"{base}/?prefix=info{tag}")).json()["results"]
        assert [entry["channel"] for entry in stored] == [a, b, c]
        # The list holds only what the caller may subscribe to.
        hidden = (await http.get(f"{base}/?prefix=private-info{tag}&occupied=true")).json()
        shown = await http.get(f"{base}/?prefix=private-info{tag}&occupied=true", headers=staff)
        assert hidden["results"] == []
        assert [entry["channel"] for entry in shown.json()["results"]] == [secret]
        bad = await http.get(f"{base}/?limit=0")
        assert bad.status_code == 400
        for ws in sockets:
            await ws.close()
        await _eventually_json(http, f"{base}/{a}", {"channel": a, "last_seq": 2, "subscribers": 0})
