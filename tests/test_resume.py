"""Resume across reconnects and nodes while both nodes publish: every seq exactly once."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from websockets.asyncio.client import ClientConnection

from tests.servers import Database, ServerNode
from tests.wsclient import RECEIVE_TIMEOUT_SECS, collect_messages, open_ws, subscribe

pytestmark = pytest.mark.e2e

RECONNECTS = 20


async def _publish_steadily(
    url: str, token: str, channel: str, count: int, stop: asyncio.Event
) -> int:
    ws = await open_ws(url, token=token)
    sent = 0
    for i in range(count):
        await ws.send(json.dumps({"type": "publish", "channel": channel, "data": i}))
        sent += 1
        await asyncio.sleep(random.uniform(0.002, 0.01))  # pacing: a steady, uneven stream
        if stop.is_set():
            break
    replies = 0
    while replies < sent:
        reply = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        assert reply["type"] == "published", reply
        replies += 1
    await ws.close()
    return sent


async def _read_for(ws: ClientConnection, seconds: float, seen: list[int]) -> None:
    """Read messages for ``seconds``, recording each seq in arrival order."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        try:
            frame = await asyncio.wait_for(ws.recv(), remaining)
        except TimeoutError:
            return
        envelope = json.loads(frame)
        if envelope["type"] == "message":
            seen.append(envelope["seq"])


async def test_subscriber_reconnecting_at_random_moments_sees_every_seq_once(
    resume_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    two_nodes = resume_nodes
    channel = f"resume-{uuid.uuid4().hex[:8]}"
    rng = random.Random(20261126)
    seen: list[int] = []
    stop = asyncio.Event()
    publishers = [
        asyncio.create_task(_publish_steadily(node.ws_url, publisher_token, channel, 400, stop))
        for node in two_nodes
    ]
    # The first subscribe already says since=0: the client wants the channel from
    # its very beginning, while both nodes are already publishing.
    last_seq = 0
    for attempt in range(RECONNECTS + 1):
        node = two_nodes[attempt % 2]
        ws = await open_ws(node.ws_url)
        request = {"type": "subscribe", "channel": channel, "since": last_seq}
        await ws.send(json.dumps(request))
        reply = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        assert reply["type"] == "subscribed", reply
        assert reply["recovered"] is True
        await _read_for(ws, rng.uniform(0.05, 0.3), seen)
        # Drop the connection abruptly, mid-stream, as a phone in a tunnel would.
        ws.transport.abort()
        last_seq = seen[-1] if seen else 0
    stop.set()
    published = sum(await asyncio.gather(*publishers))
    # After publishing stops, one last resume collects the tail.
    ws = await open_ws(two_nodes[0].ws_url)
    await ws.send(json.dumps({"type": "subscribe", "channel": channel, "since": last_seq}))
    await _read_for(ws, 2.0, seen)
    await ws.close()
    missing = sorted(set(range(1, published + 1)) - set(seen))
    repeated = sorted({seq for seq in seen if seen.count(seq) > 1})
    assert (missing, repeated) == ([], []), f"lost {missing}, repeated {repeated}"
    assert seen == list(range(1, published + 1)), "a seq arrived out of order"


async def test_idempotent_retries_racing_on_two_nodes_publish_once(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = f"idem-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Token {publisher_token}", "Idempotency-Key": "pay-42"}
    subscriber = await open_ws(two_nodes[1].ws_url)
    await subscriber.send(json.dumps({"type": "subscribe", "channel": channel}))
    assert json.loads(await subscriber.recv())["type"] == "subscribed"
    async with httpx.AsyncClient(timeout=10) as http:
        responses = await asyncio.gather(
            *[
                http.post(
                    f"{two_nodes[i % 2].http_url}/api/v1/channels/{channel}/messages",
                    json={"data": {"payment": 42}},
                    headers=headers,
                )
                for i in range(10)
            ]
        )
        history = await http.get(f"{two_nodes[0].http_url}/api/v1/channels/{channel}/messages")
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert len({r.json()["message_id"] for r in responses}) == 1
    assert [m["seq"] for m in history.json()["results"]] == [1]
    received: list[int] = []
    await _read_for(subscriber, 1.0, received)
    await subscriber.close()
    assert received == [1], "the subscriber must see the retried publish exactly once"


# ----- a resume costs nothing once its client has left -------------------------------

DEEP_HISTORY = 6000


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def replaying_node(request: pytest.FixtureRequest, e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    """A node that serves every resume from PostgreSQL (one message in memory, no
    Redis cache), as a node does for a channel whose recent messages do not reach back."""
    env = {**e2e_env, "PUSH_RECENT_PER_CHANNEL": "1", "PUSH_RECENT_CACHE_SIZE": "0"}
    node = ServerNode(env, server=request.param, name=f"replaying-{request.param}").start()
    yield node
    node.stop()


def _store_history(database: Database, channel: str, count: int) -> None:
    """``count`` stored messages of ~200 bytes, written straight into the tables."""
    with psycopg.connect(database.url) as conn:
        row = conn.execute(
            "INSERT INTO push_channel (name, last_seq, created_at) VALUES (%s, %s, now())"
            " RETURNING id",
            (channel, count),
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO push_message (channel_id, seq, message_id, data, created_at)"
            " SELECT %s, s, gen_random_uuid(), '\"' || repeat('x', 200) || '\"', now()"
            " FROM generate_series(1, %s) AS s",
            (row[0], count),
        )


async def _subscribe_and_leave(url: str, channel: str) -> None:
    ws = await open_ws(url)
    await ws.send(json.dumps({"type": "subscribe", "channel": channel, "since": 0}))
    # The point: leave as the replay begins. Its reply comes once the first page is
    # read (a fixed 10 ms could end before any read began, on a loaded machine: then
    # nothing was read at all, and the test proved nothing).
    reply = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
    assert reply["type"] == "subscribed", reply
    ws.transport.abort()


async def test_resumes_whose_clients_leave_at_once_stop_reading_history(
    replaying_node: ServerNode, e2e_database: Database
) -> None:
    """Anonymous clients resume from 0 on a channel of 6,000 messages and leave as
    their replay begins: the node reads a page or so for each, and nothing after they
    left."""
    node = replaying_node
    channel = f"deep-{uuid.uuid4().hex[:8]}"
    _store_history(e2e_database, channel, DEEP_HISTORY)
    rows = "push_history_rows_read_total"
    before = node.metric(rows)
    clients = 20
    await asyncio.gather(*(_subscribe_and_leave(node.ws_url, channel) for _ in range(clients)))
    # Windows, not waits: the reads begun before the clients left land within the
    # first; a replay that went on after they left would read within the second.
    await asyncio.sleep(1.0)
    settled = node.metric(rows) - before
    await asyncio.sleep(2.0)
    assert node.metric(rows) - before == settled, "history was still read after they left"
    assert 0 < settled <= clients * DEEP_HISTORY / 4
    # The slots the leavers held are free again: a client that stays is served in full.
    ws, reply = await subscribe(node.ws_url, channel, since=DEEP_HISTORY - 600)
    assert (reply["seq"], reply["recovered"]) == (DEEP_HISTORY, True)
    messages = await collect_messages(ws, 600)
    await ws.close()
    assert [m["seq"] for m in messages] == list(range(DEEP_HISTORY - 599, DEEP_HISTORY + 1))
