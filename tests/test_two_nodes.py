"""Two real daphne nodes sharing Redis and PostgreSQL, driven by real WebSocket clients."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.servers import ServerNode
from tests.wsclient import (
    collect_messages,
    open_ws,
    publish_over_ws,
    request,
    request_raw,
    subscribe,
)

pytestmark = pytest.mark.e2e


def _channel(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_message_published_on_one_node_reaches_the_other(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    node_a, node_b = two_nodes
    channel = _channel("cross")
    subscriber, subscribed = await subscribe(node_a.ws_url, channel)
    assert subscribed["seq"] == 0
    publisher = await open_ws(node_b.ws_url, token=publisher_token)
    reply = await request(
        publisher, {"type": "publish", "channel": channel, "data": {"via": "ws"}, "id": 1}
    )
    assert reply["type"] == "published" and reply["seq"] == 1
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{node_b.http_url}/api/v1/channels/{channel}/messages",
            json={"data": {"via": "rest"}},
            headers={"Authorization": f"Token {publisher_token}"},
        )
    assert response.status_code == 201
    messages = await collect_messages(subscriber, 2, timeout=10)
    assert [(m["seq"], m["data"]["via"]) for m in messages] == [(1, "ws"), (2, "rest")]
    assert messages[0]["message_id"] == reply["message_id"]
    await subscriber.close()
    await publisher.close()


async def _publish_over_rest(url: str, token: str, channel: str, count: int) -> list[int]:
    seqs = []
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(count):
            response = await http.post(
                f"{url}/api/v1/channels/{channel}/messages",
                json={"data": {"rest": i}},
                headers={"Authorization": f"Token {token}"},
            )
            assert response.status_code == 201, response.text
            seqs.append(response.json()["seq"])
    return seqs


async def test_concurrent_publishing_on_both_nodes_is_one_gapless_sequence(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = _channel("race")
    subscribers = [
        (await subscribe(node.ws_url, channel))[0] for node in two_nodes for _ in range(2)
    ]
    ws_publishers, per_publisher, rest_per_node = 4, 40, 15
    total = len(two_nodes) * (ws_publishers * per_publisher + rest_per_node)
    collectors = [asyncio.create_task(collect_messages(s, total, timeout=60)) for s in subscribers]
    publishing = [
        publish_over_ws(
            node.ws_url,
            publisher_token,
            channel,
            [{"tag": f"{n}-{p}", "i": i} for i in range(per_publisher)],
        )
        for n, node in enumerate(two_nodes)
        for p in range(ws_publishers)
    ] + [
        _publish_over_rest(node.http_url, publisher_token, channel, rest_per_node)
        for node in two_nodes
    ]
    acknowledged = await asyncio.gather(*publishing)
    all_seqs = sorted(seq for seqs in acknowledged for seq in seqs)
    assert all_seqs == list(range(1, total + 1)), "seq allocation repeated or skipped"
    for received in await asyncio.gather(*collectors):
        assert [m["seq"] for m in received] == list(range(1, total + 1))
        assert len({m["message_id"] for m in received}) == total
    for ws in subscribers:
        await ws.close()
    _assert_no_broker_errors(two_nodes)


def _assert_no_broker_errors(nodes: tuple[ServerNode, ServerNode]) -> None:
    """Under load a badly matched redis-py raised TimeoutError inside channels_redis."""
    for node in nodes:
        log = node.log()
        assert "TimeoutError" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


async def test_idle_connections_survive_past_redis_socket_timeout(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    """redis-py 8 gives up on a read after 5 s by default, which breaks channels-redis'
    waiting reads; the pinned versions keep an idle node working."""
    node_a, node_b = two_nodes
    channel = _channel("idle")
    subscriber, _ = await subscribe(node_a.ws_url, channel)
    await asyncio.sleep(6.5)  # the point: idle past redis-py's 5 s read timeout
    publisher = await open_ws(node_b.ws_url, token=publisher_token)
    await request(publisher, {"type": "publish", "channel": channel, "data": "after idle"})
    messages = await collect_messages(subscriber, 1, timeout=5)
    assert [m["data"] for m in messages] == ["after idle"]
    _assert_no_broker_errors(two_nodes)
    await subscriber.close()
    await publisher.close()


async def test_uvicorn_and_daphne_nodes_work_together(
    e2e_env: dict[str, str], two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    uvicorn_node = ServerNode(e2e_env, server="uvicorn", name="node-uvicorn").start()
    try:
        channel = _channel("mixed-servers")
        on_uvicorn, _ = await subscribe(uvicorn_node.ws_url, channel)
        on_daphne, _ = await subscribe(two_nodes[0].ws_url, channel)
        publisher = await open_ws(uvicorn_node.ws_url, token=publisher_token)
        for i in range(20):
            await request(publisher, {"type": "publish", "channel": channel, "data": i})
        for ws in (on_uvicorn, on_daphne):
            messages = await collect_messages(ws, 20, timeout=10)
            assert [m["seq"] for m in messages] == list(range(1, 21))
            await ws.close()
        await publisher.close()
    finally:
        uvicorn_node.stop()


async def test_frame_size_limit_on_a_real_server(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    """The server's own WebSocket limit sits above ours, so an oversized frame gets the
    contract's error envelope and then the 1009 close, and one of exactly the limit
    passes."""
    limit = 1_048_576
    ws = await open_ws(two_nodes[0].ws_url, token=publisher_token)
    head = '{"type":"publish","channel":"big","data":"'
    tail = '"}'
    exact = head + "x" * (limit - len(head) - len(tail)) + tail
    assert len(exact.encode()) == limit
    reply = await request_raw(ws, exact)
    assert reply["type"] == "published", reply
    over = head + "x" * (limit - len(head) - len(tail) + 1) + tail
    reply = await request_raw(ws, over)
    assert reply["code"] == "MESSAGE_TOO_LARGE"
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1009
