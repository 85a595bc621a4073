"""Rewind, the latest value and occupancy with the JavaScript client in Node against real
nodes (``clients/js/test/live/context_subscriber.mjs``): the subscriber on one node,
publishers and other subscribers on the other. A rewind while messages are published
gets exactly the last N stored ones, then live, with no gap and no duplicate in what
the server sent or what the handler got; ``latest`` hands the current value, then each
change; ``occupancy: true`` reports the count across both nodes as others come and go."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from typing import Any

import pytest

from tests.servers import ROOT, ServerNode, publish_rest
from tests.test_delta_e2e import node_command
from tests.wsclient import subscribe

pytestmark = pytest.mark.e2e

NODE_SUBSCRIBER = ROOT / "clients" / "js" / "test" / "live" / "context_subscriber.mjs"
WAIT_SECS = 20.0
STORED = 6
REWIND = 4
# How long the publisher goes on after the rewind's reply: live messages follow it.
LIVE_SECS = 0.5


class NodeSubscriber:
    """The live script in a process of its own: its JSON lines as they come; it exits
    when its stdin closes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, url: str, channel: str, *args: str) -> NodeSubscriber:
        process = await asyncio.create_subprocess_exec(
            *node_command(),
            str(NODE_SUBSCRIBER),
            url,
            channel,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def until(self, what: str, done: Any) -> dict[str, Any]:
        """Read lines until one satisfies ``done``; that line."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + WAIT_SECS
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {what}; lines: {self.lines}"
            try:
                raw = await asyncio.wait_for(self.process.stdout.readline(), remaining)
            except TimeoutError:
                continue  # the assert above says what was missing
            assert raw, f"the script ended waiting for {what}: {await self._stderr()}"
            line = json.loads(raw)
            self.lines.append(line)
            if done(line):
                return line

    async def finish(self) -> list[dict[str, Any]]:
        """Close its stdin; every line it printed, once it exited 0."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        out, err = await asyncio.wait_for(self.process.communicate(), WAIT_SECS)
        self.lines += [json.loads(line) for line in out.decode().splitlines()]
        assert self.process.returncode == 0, (self.lines, err.decode()[-2000:])
        return self.lines

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()[-2000:]


async def _publish_until(
    node: ServerNode, token: str, channel: str, stop: asyncio.Event, published: dict[int, Any]
) -> None:
    k = 0
    while not stop.is_set():
        data = {"n": k}
        published[await publish_rest(node, token, channel, data)] = data
        k += 1
        await asyncio.sleep(0.01)


async def test_the_javascript_client_in_node_rewinds_then_goes_live_without_gap_or_duplicate(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    node_a, node_b = two_nodes
    channel = f"rewind-js-{uuid.uuid4().hex[:8]}"
    published: dict[int, Any] = {}
    for i in range(STORED):
        published[await publish_rest(node_b, publisher_token, channel, {"stored": i})] = {
            "stored": i
        }
    stop = asyncio.Event()
    publisher = asyncio.create_task(
        _publish_until(node_b, publisher_token, channel, stop, published)
    )
    # The subscribe lands while the channel is being published to: the seam.
    script = await NodeSubscriber.start(node_a.ws_url, channel, "rewind", str(REWIND))
    try:
        latest = (await script.until("the subscribe", lambda line: "subscribed" in line))[
            "subscribed"
        ]
        await asyncio.sleep(LIVE_SECS)
    finally:
        stop.set()
        await publisher
    last = max(published)
    assert latest > STORED and last > latest, (latest, last)
    await script.until(f"seq {last}", lambda line: line.get("seq") == last)
    lines = await script.finish()
    expected = list(range(latest - REWIND + 1, last + 1))
    # What the server sent: no gap, no duplicate; what the handler got, in order.
    assert [line["frame"] for line in lines if "frame" in line] == expected
    assert [(line["seq"], line["data"], line["replayed"]) for line in lines if "seq" in line] == [
        (seq, published[seq], seq <= latest) for seq in expected
    ]
    assert [line for line in lines if "event" in line] == []


async def test_the_javascript_client_in_node_hands_the_latest_value_then_each_change(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    node_a, node_b = two_nodes
    channel = f"latest-js-{uuid.uuid4().hex[:8]}"
    for price in (10, 11, 12):
        await publish_rest(node_b, publisher_token, channel, {"price": price})
    script = await NodeSubscriber.start(node_a.ws_url, channel, "latest")
    # The value may come before or after the line that says the subscribe resolved.
    subscribed = await script.until("the subscribe", lambda line: "subscribed" in line)
    assert subscribed == {"subscribed": 3}
    await publish_rest(node_b, publisher_token, channel, {"price": 13})
    await script.until("the change", lambda line: line.get("seq") == 4)
    lines = await script.finish()
    assert [line for line in lines if "value" in line] == [
        {"seq": 3, "value": {"price": 12}},
        {"seq": 4, "value": {"price": 13}},
    ]
    assert [line for line in lines if "event" in line] == []


async def test_the_javascript_client_in_node_hears_the_occupancy_across_nodes(
    two_nodes: tuple[ServerNode, ServerNode],
) -> None:
    node_a, node_b = two_nodes
    channel = f"occupancy-js-{uuid.uuid4().hex[:8]}"
    script = await NodeSubscriber.start(node_a.ws_url, channel, "occupancy")

    async def count(n: int) -> None:
        await script.until(f"the count {n}", lambda line: line.get("occupancy") == n)

    await count(1)  # itself, at once
    other, _ = await subscribe(node_b.ws_url, channel)
    await count(2)
    await other.close()
    await count(1)
    others = await asyncio.gather(
        subscribe(node_a.ws_url, channel), subscribe(node_b.ws_url, channel)
    )
    await count(3)
    await asyncio.gather(*(ws.close() for ws, _ in others))
    await count(1)
    lines = await script.finish()
    counts = [line["occupancy"] for line in lines if "occupancy" in line]
    # Two that join (or leave) at once may straddle a second: one event each, or one.
    assert counts[:4] == [1, 2, 1, 2] or counts[:4] == [1, 2, 1, 3], counts
    assert counts[-1] == 1 and 3 in counts and all(a != b for a, b in itertools.pairwise(counts))
    assert {"held": 1} in lines  # `subscription.subscribers` follows the events
    assert [line for line in lines if "event" in line] == []
