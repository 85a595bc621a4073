"""The group-commit write path end to end: real nodes, real WebSocket publishers with
several publishes in flight each, the rows PostgreSQL holds afterwards; and PostgreSQL
cut off (a TCP proxy in front of it stops) while they publish."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from devtools.processes import OwnedProcess, free_port
from tests.faults.services import tcp_proxy
from tests.servers import LOG_DIR, Database, ServerNode
from tests.waiting import wait_until
from tests.wsclient import collect_messages, open_ws, subscribe

pytestmark = pytest.mark.e2e

IN_FLIGHT = 8


@dataclass
class Publisher:
    """One WebSocket publishing to ``channels`` in turn with up to IN_FLIGHT unanswered."""

    ws: ClientConnection
    channels: list[str]
    tag: str
    sent_at: dict[int, float] = field(default_factory=dict)
    sent_to: dict[int, str] = field(default_factory=dict)
    # id -> (reply, seconds from send to reply)
    replies: dict[int, tuple[dict[str, Any], float]] = field(default_factory=dict)

    async def run(self, *, count: int | None = None, until: asyncio.Event | None = None) -> None:
        slots = asyncio.Semaphore(IN_FLIGHT)
        reader = asyncio.create_task(self._read(slots))
        request_id = 0
        while (count is None or request_id < count) and not (until and until.is_set()):
            await slots.acquire()
            request_id += 1
            channel = self.channels[request_id % len(self.channels)]
            self.sent_at[request_id] = time.monotonic()
            self.sent_to[request_id] = channel
            await self.ws.send(
                json.dumps(
                    {
                        "type": "publish",
                        "id": request_id,
                        "channel": channel,
                        "data": {"tag": self.tag, "i": request_id},
                    }
                )
            )
        await wait_until(lambda: len(self.replies) >= request_id, "every publish answered")
        reader.cancel()

    async def _read(self, slots: asyncio.Semaphore) -> None:
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("type") not in ("published", "error"):
                continue
            request_id = reply["id"]
            self.replies[request_id] = (reply, time.monotonic() - self.sent_at[request_id])
            if reply["type"] == "error":  # as a real client would, back off a little
                asyncio.get_running_loop().call_later(0.05, slots.release)
            else:
                slots.release()

    def acknowledged(self) -> list[dict[str, Any]]:
        return [r for _, (r, _) in sorted(self.replies.items()) if r["type"] == "published"]


def _stored(database: Database, channels: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    rows = database.query(
        "SELECT c.name, m.seq, m.message_id::text, m.data FROM push_message m "
        "JOIN push_channel c ON c.id = m.channel_id WHERE c.name = ANY(%s) ORDER BY c.name, m.seq",
        channels,
    )
    stored: dict[str, list[tuple[int, str, str]]] = {c: [] for c in channels}
    for name, seq, message_id, data in rows:
        stored[name].append((seq, message_id, data))
    return stored


def _assert_acknowledged_are_stored(
    publishers: list[Publisher], stored: dict[str, list[tuple[int, str, str]]]
) -> set[str]:
    by_id = {
        message_id: (name, seq) for name, rows in stored.items() for seq, message_id, _ in rows
    }
    acknowledged = set()
    for publisher in publishers:
        for reply in publisher.acknowledged():
            assert by_id.get(reply["message_id"]) == (reply["channel"], reply["seq"]), reply
            acknowledged.add(reply["message_id"])
    for name, rows in stored.items():
        assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1)), f"gap in {name}"
    return acknowledged


async def test_pipelined_publishers_on_two_nodes_get_one_gapless_sequence_each_stored_once(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str, e2e_database: Database
) -> None:
    channels = [f"group-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    per_publisher, publishers_per_node = 60, 3
    total = len(two_nodes) * publishers_per_node * per_publisher
    subscribers = [
        (await subscribe(node.ws_url, channel))[0] for node in two_nodes for channel in channels
    ]
    collectors = [
        asyncio.create_task(collect_messages(s, total // len(channels), timeout=60))
        for s in subscribers
    ]
    publishers = [
        Publisher(await open_ws(node.ws_url, token=publisher_token), channels, f"{n}-{p}")
        for n, node in enumerate(two_nodes)
        for p in range(publishers_per_node)
    ]
    await asyncio.gather(*(p.run(count=per_publisher) for p in publishers))

    for publisher in publishers:
        replies = [reply for reply, _ in publisher.replies.values()]
        assert all(r["type"] == "published" for r in replies), replies
        # One connection's publishes to a channel take seqs in the order it sent them.
        for channel in channels:
            seqs = [
                r["seq"]
                for _, r in sorted((r["id"], r) for r in replies)
                if r["channel"] == channel
            ]
            assert seqs == sorted(seqs)
    stored = await asyncio.to_thread(_stored, e2e_database, channels)
    assert sum(len(rows) for rows in stored.values()) == total, "stored exactly once"
    acknowledged = _assert_acknowledged_are_stored(publishers, stored)
    assert len(acknowledged) == total
    for received in await asyncio.gather(*collectors):
        channel = received[0]["channel"]
        expected = [(seq, message_id) for seq, message_id, _ in stored[channel]]
        assert [(m["seq"], m["message_id"]) for m in received] == expected
    for ws in [*subscribers, *(p.ws for p in publishers)]:
        await ws.close()


# ----- PostgreSQL cut off mid-batch ---------------------------------------------------------


@pytest.fixture
def database_proxy(e2e_database: Database) -> Iterator[OwnedProcess]:
    proxy = tcp_proxy(free_port(), e2e_database.host, e2e_database.port, LOG_DIR)
    yield proxy.start()
    proxy.stop()


@pytest.fixture
def node_behind_proxy(
    e2e_env: dict[str, str], e2e_database: Database, database_proxy: OwnedProcess
) -> Iterator[ServerNode]:
    url = f"postgres://{e2e_database.user}@127.0.0.1:{database_proxy.port}/{e2e_database.name}"
    env = {**e2e_env, "DATABASE_URL": url, "PUSH_WRITE_CONNECT_TIMEOUT_SECS": "1"}
    node = ServerNode(env, name="pipeline-behind-proxy").start()
    yield node
    node.stop()


# Every publish is answered within this, PostgreSQL gone or not (the write timeout is
# 10 s; a refused connection answers at once).
ANSWER_WITHIN_SECS = 5.0


@pytest.mark.timeout(120)
async def test_postgres_cut_mid_batch_loses_nothing_acknowledged_and_recovers(
    node_behind_proxy: ServerNode,
    database_proxy: OwnedProcess,
    publisher_token: str,
    e2e_database: Database,
) -> None:
    channels = [f"cut-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    publishers = [
        Publisher(await open_ws(node_behind_proxy.ws_url, token=publisher_token), channels, str(p))
        for p in range(4)
    ]
    stop = asyncio.Event()
    publishing = asyncio.gather(*(p.run(until=stop) for p in publishers))

    def published(since: float) -> bool:
        return any(
            reply["type"] == "published" and p.sent_at[reply["id"]] > since
            for p in publishers
            for reply, _ in p.replies.values()
        )

    await wait_until(lambda: published(0.0), "a first acknowledged publish")
    await asyncio.to_thread(database_proxy.stop)
    cut_at = time.monotonic()
    await asyncio.sleep(2.0)  # the point: publishes made while PostgreSQL is away
    database_proxy.launch()
    await asyncio.to_thread(database_proxy.wait_answering)
    restored_at = time.monotonic()
    # Publishing works again once PostgreSQL is back: wait for a fresh acknowledgement.
    await wait_until(lambda: published(restored_at), "a publish acknowledged", timeout=30)
    stop.set()
    await asyncio.wait_for(publishing, 30)

    replies = [(r, secs, p.sent_at[r["id"]]) for p in publishers for r, secs in p.replies.values()]
    refused = [r for r, _, _ in replies if r["type"] == "error"]
    assert refused, "some publishes were made while PostgreSQL was away"
    assert {r["code"] for r in refused} == {"UNAVAILABLE"}
    assert max(secs for _, secs, _ in replies) < ANSWER_WITHIN_SECS
    # While the proxy was down (after the batch in flight at the cut) nothing committed.
    down = [r for r, _, sent in replies if cut_at + 0.5 < sent < restored_at - 0.1]
    assert down and all(r["type"] == "error" for r in down)
    assert any(r["type"] == "published" and sent > restored_at for r, _, sent in replies)
    stored = await asyncio.to_thread(_stored, e2e_database, channels)
    _assert_acknowledged_are_stored(publishers, stored)
    for publisher in publishers:
        await publisher.ws.close()
