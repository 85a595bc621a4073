"""A client that stops reading never slows the others and is disconnected with 4002,
under both servers; on a drop-oldest channel it loses old messages instead."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import psutil
import pytest

from tests.servers import ServerNode, small_queue_env
from tests.waiting import QUERY_INTERVAL_SECS, wait_until
from tests.wsclient import collect_messages, flood, stalled_subscriber, subscribe

pytestmark = pytest.mark.e2e

PAYLOAD_BYTES = 64 * 1024
MESSAGES = 300  # ~19 MB: more than the kernel's socket buffers and the send queue


async def _flood(node: ServerNode, token: str, channel: str) -> None:
    await flood(node.ws_url, token, channel, MESSAGES, PAYLOAD_BYTES)


async def test_stalled_reader_is_disconnected_and_others_get_everything(
    small_queue_node: ServerNode, publisher_token: str
) -> None:
    channel = f"flood-{uuid.uuid4().hex[:8]}"
    before = small_queue_node.metric("push_slow_consumer_disconnects_total")
    stalled = await stalled_subscriber(small_queue_node.ws_url, channel)
    healthy, _ = await subscribe(small_queue_node.ws_url, channel)
    collecting = asyncio.create_task(collect_messages(healthy, MESSAGES, timeout=60))
    await _flood(small_queue_node, publisher_token, channel)
    received = await collecting
    assert [m["seq"] for m in received] == list(range(1, MESSAGES + 1))
    assert small_queue_node.metric("push_slow_consumer_disconnects_total") == before + 1
    # Once the stalled client reads again it finds the close code the contract gives.
    close_code = None
    try:
        while True:
            await asyncio.wait_for(stalled.recv(), 10)
    except Exception:
        close_code = stalled.close_code
    assert close_code == 4002
    await healthy.close()


async def test_stalled_reader_on_drop_oldest_channel_stays_connected(
    small_queue_node: ServerNode, publisher_token: str
) -> None:
    channel = f"ticker:{uuid.uuid4().hex[:8]}"
    before = small_queue_node.metric("push_slow_consumer_disconnects_total")
    stalled = await stalled_subscriber(small_queue_node.ws_url, channel)
    await _flood(small_queue_node, publisher_token, channel)
    assert small_queue_node.metric("push_slow_consumer_disconnects_total") == before
    assert small_queue_node.metric("push_dropped_frames_total") > 0
    seqs = []
    try:
        while True:
            envelope = json.loads(await asyncio.wait_for(stalled.recv(), 3))
            if envelope["type"] == "message":
                seqs.append(envelope["seq"])
                if envelope["seq"] == MESSAGES:
                    break
    except TimeoutError:
        pass
    assert seqs == sorted(seqs) and seqs[-1] == MESSAGES
    assert len(seqs) < MESSAGES, "the client sees the gap where old messages were dropped"
    await stalled.close()


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def quick_close_node(
    request: pytest.FixtureRequest, e2e_env: dict[str, str]
) -> Iterator[ServerNode]:
    env = small_queue_env(e2e_env, PUSH_CLOSE_TIMEOUT_SECS="1")
    node = ServerNode(env, server=request.param, name=f"quick-close-{request.param}").start()
    yield node
    node.stop()


def _server_holds_socket_of(node: ServerNode, client_port: int) -> bool:
    assert node.process is not None
    connections = psutil.Process(node.process.pid).net_connections(kind="tcp")
    return any(c.raddr and c.raddr.port == client_port for c in connections)


async def test_a_dropped_reader_that_never_reads_again_leaves_no_socket_behind(
    quick_close_node: ServerNode, publisher_token: str
) -> None:
    """Closed with 4002, the client still reads nothing: after PUSH_CLOSE_TIMEOUT_SECS
    the server lets go of its socket, so a client cannot hold sockets past its limits."""
    channel = f"flood-{uuid.uuid4().hex[:8]}"
    before = quick_close_node.metric("push_slow_consumer_disconnects_total")
    stalled = await stalled_subscriber(quick_close_node.ws_url, channel)
    client_port = stalled.local_address[1]
    await _flood(quick_close_node, publisher_token, channel)
    assert quick_close_node.metric("push_slow_consumer_disconnects_total") == before + 1
    await wait_until(
        lambda: not _server_holds_socket_of(quick_close_node, client_port),
        "the server to let go of the stalled client's socket",
        interval=QUERY_INTERVAL_SECS,
    )
    stalled.transport.abort()
