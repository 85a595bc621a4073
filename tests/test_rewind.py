"""``rewind`` against real nodes: the channel's last N messages, then live, with no gap
or duplicate at the seam while both nodes publish; over WebSocket and SSE."""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import httpx
import pytest

from tests.servers import ServerNode, publish_rest
from tests.sseclient import SseStream, sse_url

# resume_nodes (tests/conftest.py): the resume tests' two kinds of node pair, rewinding
# from memory, or from PostgreSQL with live messages held during the read.
from tests.test_resume import _publish_steadily, _read_for
from tests.wsclient import RECEIVE_TIMEOUT_SECS, collect_messages, open_ws, request

pytestmark = pytest.mark.e2e

SUBSCRIBERS = 12
REWIND = 20


def _channel(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_rewind_at_the_seam_while_both_nodes_publish_has_no_gap_or_duplicate(
    resume_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = _channel("rewind")
    rng = random.Random(20261203)
    stop = asyncio.Event()
    publishers = [
        asyncio.create_task(_publish_steadily(node.ws_url, publisher_token, channel, 600, stop))
        for node in resume_nodes
    ]
    await asyncio.sleep(0.3)  # the channel has a history before the first rewind
    readers = []
    sockets = []
    for n in range(SUBSCRIBERS):
        ws = await open_ws(resume_nodes[n % 2].ws_url)
        sockets.append(ws)
        reply = await request(ws, {"type": "subscribe", "channel": channel, "rewind": REWIND})
        assert reply["type"] == "subscribed" and "recovered" not in reply, reply
        seen: list[int] = []
        readers.append((reply["seq"], seen, asyncio.create_task(_read_for(ws, 1.5, seen))))
        await asyncio.sleep(rng.uniform(0.02, 0.1))
    for _, _, task in readers:
        await task
    stop.set()
    await asyncio.gather(*publishers)
    # Dropped here: left open, they would hold the nodes' drain at the end of the
    # session until its deadline, answering nothing once this test's loop is gone.
    for ws in sockets:
        ws.transport.abort()
    await asyncio.gather(*(ws.wait_closed() for ws in sockets))
    for latest, seen, _ in readers:
        first = max(1, latest - REWIND + 1)
        assert seen, "a subscriber received nothing"
        assert seen == list(range(first, seen[-1] + 1)), (latest, seen)
        assert seen[-1] > latest, "nothing live followed the rewind"


async def test_rewind_beyond_the_stored_history_sends_what_there_is(
    resume_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = _channel("short")
    for n in range(3):
        await publish_rest(resume_nodes[0], publisher_token, channel, {"n": n})
    ws = await open_ws(resume_nodes[1].ws_url)
    reply = await request(ws, {"type": "subscribe", "channel": channel, "rewind": 100})
    assert reply == {"type": "subscribed", "channel": channel, "seq": 3}
    messages = await collect_messages(ws, 3, timeout=RECEIVE_TIMEOUT_SECS)
    assert [m["data"] for m in messages] == [{"n": 0}, {"n": 1}, {"n": 2}]
    await publish_rest(resume_nodes[0], publisher_token, channel, {"n": 3})
    assert [m["seq"] for m in await collect_messages(ws, 1)] == [4]
    await ws.close()


async def test_rewind_one_is_the_latest_value_and_an_empty_channel_has_none(
    resume_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = _channel("latest")
    ws = await open_ws(resume_nodes[0].ws_url)
    reply = await request(ws, {"type": "subscribe", "channel": channel, "rewind": 1})
    assert reply["seq"] == 0
    for n in range(4):
        await publish_rest(resume_nodes[1], publisher_token, channel, {"price": n})
    late = await open_ws(resume_nodes[1].ws_url)
    assert (await request(late, {"type": "subscribe", "channel": channel, "rewind": 1}))["seq"] == 4
    assert [m["data"] for m in await collect_messages(late, 1)] == [{"price": 3}]
    assert [m["seq"] for m in await collect_messages(ws, 4)] == [1, 2, 3, 4]
    await ws.close()
    await late.close()


async def test_rewind_with_since_or_out_of_range_is_refused(
    resume_nodes: tuple[ServerNode, ServerNode],
) -> None:
    ws = await open_ws(resume_nodes[0].ws_url)
    for bad in ({"since": 0, "rewind": 5}, {"rewind": 0}, {"rewind": 101}, {"rewind": "5"}):
        reply = await request(ws, {"type": "subscribe", "channel": "news", **bad})
        assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE", (bad, reply)
    await ws.close()


async def test_rewind_over_sse_then_a_reconnect_resumes_instead(
    resume_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    channel = _channel("sse")
    for n in range(6):
        await publish_rest(resume_nodes[1], publisher_token, channel, n)
    url = sse_url(resume_nodes[0].http_url, [channel], rewind="2")
    timeout = httpx.Timeout(10.0, read=None)

    async def seqs(headers: dict[str, str], count: int) -> list[int]:
        async with (
            httpx.AsyncClient(timeout=timeout) as http,
            http.stream("GET", url, headers=headers) as response,
        ):
            assert response.status_code == 200
            events = SseStream(response).events()
            assert (await asyncio.wait_for(anext(events), 10)).event == "connection_established"
            return [(await asyncio.wait_for(anext(events), 10)).data["seq"] for _ in range(count)]

    assert await seqs({}, 2) == [5, 6]
    await publish_rest(resume_nodes[1], publisher_token, channel, 6)
    assert await seqs({"Last-Event-ID": f"{channel}:6"}, 1) == [7]
    # A stream resumes the channels its cursor names and rewinds the others.
    other = _channel("sse-other")
    await publish_rest(resume_nodes[1], publisher_token, other, "x")
    url = sse_url(resume_nodes[0].http_url, [channel, other], rewind="3", since=f"{channel}:5")
    assert sorted(await seqs({}, 3)) == [1, 6, 7]
    async with httpx.AsyncClient(timeout=10) as http:
        bad = await http.get(sse_url(resume_nodes[0].http_url, [channel], rewind="500"))
    assert bad.status_code == 400
    assert json.loads(bad.text)["code"] == "INVALID_MESSAGE"
