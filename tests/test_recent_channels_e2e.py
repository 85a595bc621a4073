"""Recent-only channels across two real daphne nodes, with a redis-server of the test's
own that is killed and started again: seqs stay one gapless sequence while Redis
lives, and after it lost everything they jump forward, never back."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from devtools.processes import OwnedProcess
from tests.servers import Database, ServerNode, node_pair
from tests.waiting import wait_until
from tests.wsclient import (
    collect_messages,
    open_ws,
    publish_over_ws,
    request,
    subscribe,
    subscribe_envelope,
)

pytestmark = pytest.mark.e2e

WINDOW = 50


@pytest.fixture(scope="module")
def recent_nodes(
    e2e_env: dict[str, str], own_redis: OwnedProcess
) -> Iterator[tuple[ServerNode, ServerNode]]:
    env = {
        **e2e_env,
        "REDIS_URL": f"redis://127.0.0.1:{own_redis.port}/0",
        "PUSH_HISTORY_MODES": "tick:*=recent",
        "PUSH_RECENT_WINDOW_MESSAGES": str(WINDOW),
    }
    with node_pair(env, "recent") as nodes:
        yield nodes


def _channel() -> str:
    return f"tick:{uuid.uuid4().hex[:8]}"


async def _publish_rest(node: ServerNode, token: str, channel: str, data: object) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(
            f"{node.http_url}/api/v1/channels/{channel}/messages",
            json={"data": data},
            headers={"Authorization": f"Token {token}"},
        )


async def _publish_rest_many(node: ServerNode, token: str, channel: str, count: int) -> list[int]:
    seqs = []
    for i in range(count):
        response = await _publish_rest(node, token, channel, {"rest": i})
        assert response.status_code == 201, response.text
        seqs.append(response.json()["seq"])
    return seqs


async def test_two_nodes_publishing_make_one_gapless_sequence(
    recent_nodes: tuple[ServerNode, ServerNode],
    publisher_token: str,
    e2e_database: Database,
) -> None:
    node_a, node_b = recent_nodes
    channel = _channel()
    on_a, _ = await subscribe(node_a.ws_url, channel)
    on_b, _ = await subscribe(node_b.ws_url, channel)
    over_ws, over_rest = await asyncio.gather(
        publish_over_ws(node_a.ws_url, publisher_token, channel, [{"ws": i} for i in range(60)]),
        _publish_rest_many(node_b, publisher_token, channel, 40),
    )
    assert sorted(over_ws + over_rest) == list(range(1, 101))
    for subscriber in (on_a, on_b):
        received = await collect_messages(subscriber, 100, timeout=20)
        assert [m["seq"] for m in received] == list(range(1, 101))
        await subscriber.close()
    assert e2e_database.stored_messages(channel) == 0

    # Resume on the other node than the one that published, within and beyond the window.
    resumed, subscribed = await subscribe(node_b.ws_url, channel, since=100 - WINDOW)
    assert (subscribed["seq"], subscribed["recovered"]) == (100, True)
    assert [m["seq"] for m in await collect_messages(resumed, WINDOW, timeout=10)] == list(
        range(100 - WINDOW + 1, 101)
    )
    await resumed.close()
    late, subscribed = await subscribe(node_a.ws_url, channel, since=10)
    assert (subscribed["seq"], subscribed["recovered"]) == (100, False)
    # It never reads the window sent after the reply: a closing handshake would wait
    # behind it (websockets' close timeout, 10 s).
    late.transport.abort()
    await late.wait_closed()
    async with httpx.AsyncClient(timeout=10) as http:
        history = await http.get(f"{node_a.http_url}/api/v1/channels/{channel}/messages?since=0")
    assert [m["seq"] for m in history.json()["results"]] == list(range(100 - WINDOW + 1, 101))


async def test_a_redis_restart_jumps_the_seq_forward_and_never_repeats_it(
    recent_nodes: tuple[ServerNode, ServerNode],
    publisher_token: str,
    own_redis: OwnedProcess,
) -> None:
    node_a, node_b = recent_nodes
    channel = _channel()
    live, _ = await subscribe(node_a.ws_url, channel)
    before = await _publish_rest_many(node_b, publisher_token, channel, 3)
    assert before == [1, 2, 3]
    assert [m["seq"] for m in await collect_messages(live, 3, timeout=10)] == [1, 2, 3]

    own_redis.stop(signal.SIGKILL)
    started = time.monotonic()
    response = await _publish_rest(node_b, publisher_token, channel, "while down")
    assert response.status_code == 503 and response.json()["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 10, "Redis down is answered, not waited out"

    own_redis.launch()
    await asyncio.to_thread(own_redis.wait_answering)

    async def published_seq() -> int | None:
        response = await _publish_rest(node_b, publisher_token, channel, "after")
        return response.json()["seq"] if response.status_code == 201 else None

    # The node's clients reconnect within a few attempts.
    seq = await wait_until(published_seq, "a publish to succeed again", interval=0.2)
    # Past the block reserved before the restart (1000 seqs): a jump, no repeat.
    assert seq == 1001
    after = await collect_messages(live, 1, timeout=15)
    assert [m["seq"] for m in after] == [1001]
    await live.close()

    resumed, subscribed = await subscribe(node_b.ws_url, channel, since=2)
    assert (subscribed["seq"], subscribed["recovered"]) == (1001, False)
    assert [m["seq"] for m in await collect_messages(resumed, 1, timeout=10)] == [1001]
    await resumed.close()


async def test_a_restart_from_a_snapshot_never_hands_a_seq_out_again(
    recent_nodes: tuple[ServerNode, ServerNode],
    publisher_token: str,
    own_redis: OwnedProcess,
) -> None:
    """Redis comes back with a snapshot taken before the last publishes: both nodes
    reconnect by themselves, and the leases it restores are behind what they handed
    out. Neither may number from them, nor serve their window as a recovered resume."""
    node_a, node_b = recent_nodes
    channel = _channel()
    live, _ = await subscribe(node_a.ws_url, channel)
    assert await _publish_rest_many(node_b, publisher_token, channel, 3) == [1, 2, 3]
    admin = redis.Redis(port=own_redis.port)
    snapshot = Path(admin.config_get("dir")["dir"]) / "dump.rdb"
    admin.save()  # the counter at 3
    admin.close()
    assert await _publish_rest_many(node_a, publisher_token, channel, 2) == [4, 5]
    assert [m["seq"] for m in await collect_messages(live, 5, timeout=10)] == [1, 2, 3, 4, 5]

    own_redis.stop(signal.SIGKILL)
    own_redis.launch()
    await asyncio.to_thread(own_redis.wait_answering)
    snapshot.unlink()  # the module's later restarts come back empty

    async def published_seq(node: ServerNode) -> int | None:
        response = await _publish_rest(node, publisher_token, channel, "after")
        return response.json()["seq"] if response.status_code == 201 else None

    async def resumed_from_2() -> dict[str, Any] | None:
        # Answered UNAVAILABLE while the node reconnects: asked again.
        ws = await open_ws(node_b.ws_url)
        try:
            reply = await request(ws, subscribe_envelope(channel, 2))
        finally:
            ws.transport.abort()
            await ws.wait_closed()
        return reply if reply["type"] == "subscribed" else None

    # The window the snapshot holds lacks 4 and 5: not a recovered resume.
    subscribed = await wait_until(resumed_from_2, "a resume to be answered", interval=0.2)
    assert subscribed["recovered"] is False, subscribed
    seqs = [
        await wait_until(lambda node=node: published_seq(node), "a publish", interval=0.2)
        for node in (node_a, node_b, node_a)
    ]
    assert seqs[0] > 5 and seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2], seqs
    after = await collect_messages(live, 3, timeout=15)
    assert [m["seq"] for m in after] == seqs
    await live.close()
