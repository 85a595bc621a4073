"""Server-Sent Events against real nodes (daphne and uvicorn): the stream's format,
resume across forced drops and nodes with every seq exactly once, permissions,
heartbeat pings and the slow-reader policy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.servers import ServerNode, create_token, node_pair, publish_rest
from tests.sseclient import SseEvent, SseStream, sse_url
from tests.waiting import QUERY_INTERVAL_SECS, wait_until
from tests.wsclient import flood, open_ws, request

pytestmark = pytest.mark.e2e

DROPS = 12
RECEIVE_TIMEOUT = 10.0
# Streams wait for events as long as a test lets them; connecting still times out.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def sse_nodes(
    request: pytest.FixtureRequest, e2e_env: dict[str, str]
) -> Iterator[tuple[ServerNode, ServerNode]]:
    env = {**e2e_env, "PUSH_HEARTBEAT_INTERVAL_SECS": "1"}
    with node_pair(env, f"sse-{request.param}", server=request.param) as nodes:
        yield nodes


def _channel(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _next_event(events: Any, timeout: float = RECEIVE_TIMEOUT) -> SseEvent:
    return await asyncio.wait_for(anext(events), timeout)


async def test_stream_carries_several_channels_with_a_cursor_in_each_id(
    sse_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    reader_node, publisher_node = sse_nodes
    news, chat = _channel("news"), _channel("chat")
    async with (
        httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http,
        http.stream("GET", sse_url(reader_node.http_url, [news, chat])) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        events = SseStream(response).events()
        hello = await _next_event(events)
        assert hello.event == "connection_established"
        assert hello.data["type"] == "connection_established"
        assert hello.data["server_id"] and hello.data["heartbeat_interval"] == 1
        for channel in (news, chat, news, news, chat):
            await publish_rest(publisher_node, publisher_token, channel, {"on": channel})
        cursor = {news: 0, chat: 0}
        for _ in range(5):
            event = await _next_event(events)
            assert event.event == "message"
            message = event.data
            assert message["type"] == "message" and message["data"] == {"on": message["channel"]}
            assert message["seq"] == cursor[message["channel"]] + 1
            cursor[message["channel"]] = message["seq"]
            assert event.id == f"{news}:{cursor[news]},{chat}:{cursor[chat]}"
        assert cursor == {news: 3, chat: 2}


async def test_resume_by_since_and_by_last_event_id_which_wins(
    sse_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    node = sse_nodes[0]
    channel = _channel("resume")
    for n in range(5):
        await publish_rest(sse_nodes[1], publisher_token, channel, n)

    async def seqs_after(url: str, headers: dict[str, str], count: int) -> list[int]:
        async with (
            httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http,
            http.stream("GET", url, headers=headers) as response,
        ):
            events = SseStream(response).events()
            assert (await _next_event(events)).event == "connection_established"
            return [(await _next_event(events)).data["seq"] for _ in range(count)]

    url = sse_url(node.http_url, [channel], since=f"{channel}:2")
    assert await seqs_after(url, {}, 3) == [3, 4, 5]
    # A browser reconnects to the same URL and sends its newer cursor: that one counts.
    newer = {"Last-Event-ID": f"{channel}:4"}
    assert await seqs_after(url, newer, 1) == [5]


async def _publish_steadily(
    node: ServerNode, token: str, channels: list[str], count: int, stop: asyncio.Event
) -> dict[str, int]:
    ws = await open_ws(node.ws_url, token=token)
    sent = dict.fromkeys(channels, 0)
    for i in range(count):
        channel = channels[i % len(channels)]
        reply = await request(ws, {"type": "publish", "channel": channel, "data": i})
        assert reply["type"] == "published", reply
        sent[channel] += 1
        await asyncio.sleep(random.uniform(0.002, 0.01))  # pacing: a steady, uneven stream
        if stop.is_set():
            break
    await ws.close()
    return sent


async def _read_until(
    url: str, last_event_id: str | None, seconds: float, seen: dict[str, list[int]]
) -> str | None:
    """Read the stream for ``seconds``, then drop it abruptly; return the last id."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with (
        httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http,
        http.stream("GET", url, headers=headers) as response,
    ):
        stream = SseStream(response, last_event_id=last_event_id)

        async def read() -> None:
            async for event in stream.events():
                if event.event == "message":
                    seen[event.data["channel"]].append(event.data["seq"])

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), seconds)
        return stream.last_event_id


async def test_every_seq_once_across_forced_drops_while_another_node_publishes(
    sse_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channels = [_channel("drop-a"), _channel("drop-b")]
    seen: dict[str, list[int]] = {c: [] for c in channels}
    rng = random.Random(20261130)
    stop = asyncio.Event()
    # Messages come from the node the reader is not on, then from both.
    publishers = [
        asyncio.create_task(_publish_steadily(node, publisher_token, channels, 300, stop))
        for node in sse_nodes
    ]
    # The first stream already carries a cursor at 0: the client wants the channels from
    # their beginning, while both nodes are already publishing. (Without one, a stream
    # starts at the latest seq, and seq 1 may be committed before it opens.)
    last_id: str | None = ",".join(f"{channel}:0" for channel in channels)
    for drop in range(DROPS):
        node = sse_nodes[drop % 2]
        last_id = await _read_until(
            sse_url(node.http_url, channels), last_id, rng.uniform(0.05, 0.3), seen
        )
    stop.set()
    sent: dict[str, int] = dict.fromkeys(channels, 0)
    for result in await asyncio.gather(*publishers):
        for channel, count in result.items():
            sent[channel] += count
    await _read_until(sse_url(sse_nodes[0].http_url, channels), last_id, 2.0, seen)
    for channel in channels:
        expected = list(range(1, sent[channel] + 1))
        missing = sorted(set(expected) - set(seen[channel]))
        assert not missing, f"{channel}: lost {missing}"
        assert seen[channel] == expected, f"{channel}: repeated or out of order"


async def test_permissions_are_the_websockets(
    sse_nodes: tuple[ServerNode, ServerNode], e2e_env: dict[str, str]
) -> None:
    node = sse_nodes[0]
    public, private = _channel("open"), _channel("private-team")
    async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http:
        # Anonymous: the public channel streams, the private one and another user's
        # channel are refused with an error event each, and the stream stays open.
        url = sse_url(node.http_url, [public, private, "user:1"])
        async with http.stream("GET", url) as response:
            events = SseStream(response).events()
            assert (await _next_event(events)).event == "connection_established"
            errors = [await _next_event(events) for _ in range(2)]
            assert [e.event for e in errors] == ["error", "error"]
            assert [e.data["code"] for e in errors] == ["FORBIDDEN", "FORBIDDEN"]
            assert [e.data["channel"] for e in errors] == [private, "user:1"]
            token = create_token(e2e_env, f"sse-writer-{uuid.uuid4().hex[:6]}")
            await publish_rest(sse_nodes[1], token, public, "hello")
            message = await _next_event(events)
            assert message.data["channel"] == public and message.data["data"] == "hello"

        # Nothing could be subscribed: the error is fatal and the stream ends.
        async with http.stream("GET", sse_url(node.http_url, [private])) as response:
            kinds = [event.event async for event in SseStream(response).events()]
        assert kinds == ["connection_established", "error"]

        # The grant holder reads the private channel, authenticated by header.
        async with http.stream(
            "GET", sse_url(node.http_url, [private]), headers={"Authorization": f"Token {token}"}
        ) as response:
            events = SseStream(response).events()
            assert (await _next_event(events)).event == "connection_established"
            await publish_rest(sse_nodes[1], token, private, "secret")
            assert (await _next_event(events)).data["data"] == "secret"

        refused = {
            "bad token": await http.get(sse_url(node.http_url, [public], token="nope")),
            "bad cursor": await http.get(sse_url(node.http_url, [public], since="x:y")),
            "huge seq": await http.get(
                sse_url(node.http_url, [public], since=f"{public}:{'9' * 5000}")
            ),
            "no channel": await http.get(f"{node.http_url}/sse/"),
            "bad channel": await http.get(sse_url(node.http_url, ["no spaces"])),
        }
        post = await http.post(sse_url(node.http_url, [public]))
    statuses = {name: (r.status_code, r.json()["code"]) for name, r in refused.items()}
    assert statuses == {
        "bad token": (403, "FORBIDDEN"),
        "bad cursor": (400, "INVALID_MESSAGE"),
        "huge seq": (400, "INVALID_MESSAGE"),
        "no channel": (400, "INVALID_MESSAGE"),
        "bad channel": (400, "INVALID_MESSAGE"),
    }
    assert post.status_code == 405


async def test_idle_stream_gets_ping_comments(sse_nodes: tuple[ServerNode, ServerNode]) -> None:
    async with (
        httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http,
        http.stream("GET", sse_url(sse_nodes[0].http_url, [_channel("idle")])) as response,
    ):
        stream = SseStream(response)
        events = stream.events()
        assert (await _next_event(events)).event == "connection_established"
        with pytest.raises(TimeoutError):
            await _next_event(events, timeout=2.5)
    assert "ping" in stream.comments


# ----- slow readers ------------------------------------------------------------------------

PAYLOAD_BYTES = 64 * 1024
MESSAGES = 200


def _stalled_stream(node: ServerNode, channel: str) -> socket.socket:
    """A client that sends the request and never reads the response."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", node.port))
    sock.sendall(
        f"GET /sse/?channel={channel} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def _announced_subscribers(node: ServerNode, channel: str) -> int:
    """The channel's subscribers on ``node``, as its last announcement to the cluster
    (every PUSH_CLUSTER_ANNOUNCE_SECS) gives them."""
    client = redis.Redis.from_url(node.env["REDIS_URL"])
    try:
        raw = client.get(f"{node.env['REDIS_PREFIX']}:node:{node.name}")
    finally:
        client.close()
    channels = json.loads(raw)["channels"] if raw else []
    return sum(c["subscribers"] for c in channels if c["name"] == channel)


def _read_to_end(sock: socket.socket, timeout: float) -> bool:
    """Drain what the server sent; True once it ended the response (or the socket)."""
    sock.settimeout(timeout)
    tail = b""
    try:
        while chunk := sock.recv(1 << 20):
            tail = (tail + chunk)[-16:]
            if tail.endswith(b"0\r\n\r\n"):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def test_stalled_sse_reader_is_dropped_and_others_get_everything(
    small_queue_node: ServerNode, publisher_token: str
) -> None:
    channel = _channel("sse-flood")
    before = small_queue_node.metric("push_slow_consumer_disconnects_total")
    stalled = _stalled_stream(small_queue_node, channel)
    await wait_until(
        lambda: _announced_subscribers(small_queue_node, channel) == 1,
        "the stalled stream's subscription",
        interval=QUERY_INTERVAL_SECS,
    )
    async with (
        httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http,
        http.stream("GET", sse_url(small_queue_node.http_url, [channel])) as response,
    ):
        events = SseStream(response).events()
        assert (await _next_event(events)).event == "connection_established"

        async def collect() -> list[int]:
            return [(await _next_event(events, timeout=30)).data["seq"] for _ in range(MESSAGES)]

        collecting = asyncio.create_task(collect())
        await flood(small_queue_node.ws_url, publisher_token, channel, MESSAGES, PAYLOAD_BYTES)
        received = await collecting
    assert received == list(range(1, MESSAGES + 1))
    ended = await asyncio.to_thread(_read_to_end, stalled, 15.0)
    stalled.close()
    assert ended, "the stalled stream was not ended"
    assert small_queue_node.metric("push_slow_consumer_disconnects_total") == before + 1
