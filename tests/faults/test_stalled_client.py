"""A client that subscribes through nginx and then stops reading does not slow the
others, and is disconnected (4002) once its send queue is full."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from devtools.cluster import Cluster
from tests.faults import clients
from tests.faults.report import measure
from tests.wsclient import stalled_subscriber

pytestmark = pytest.mark.faults

HEALTHY_CLIENTS = 10
BLOB_BYTES = 64 * 1024
PUBLISH_RATE_PER_SEC = 40.0
# ~38 MB: more than every buffer between the node and the stalled client (the node's
# socket, nginx's, the kernel's on both of nginx's connections) plus the send queue.
MAX_MESSAGES = 600
CLIENT_RECEIVE_BUFFER_BYTES = 4096
DISCONNECT_METRIC = "push_slow_consumer_disconnects_total"


async def slow_consumer_disconnects(cluster: Cluster) -> float:
    """The cluster's slow-consumer disconnects so far, from every node's /metrics."""
    total = 0.0
    async with httpx.AsyncClient(timeout=5) as http:
        for record in cluster.node_records():
            body = (await http.get(f"{cluster.node_url(record.name)}/metrics")).text
            for line in body.splitlines():
                if line.startswith((DISCONNECT_METRIC + " ", DISCONNECT_METRIC + "{")):
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def read_until_closed(ws: ClientConnection, timeout_secs: float = 30.0) -> int | None:
    """Read what nginx and the kernel still hold for the stalled client; its close code."""
    # The close code is the answer, whichever way the read ends.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_secs):
            async for _frame in ws:
                pass
    return ws.close_code


async def publish_until_disconnected(
    cluster: Cluster, publisher: clients.RestPublisher, before: float
) -> float | None:
    """Publish until a slow consumer is disconnected; the seconds it took, or None."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index in range(MAX_MESSAGES):
        await publisher.publish(index)
        publisher.sent = index + 1
        if index % 10 == 9 and await slow_consumer_disconnects(cluster) > before:
            return loop.time() - started
        await asyncio.sleep(max(0.0, started + (index + 1) / PUBLISH_RATE_PER_SEC - loop.time()))
    return None


@pytest.mark.timeout(180)
async def test_a_stalled_client_is_cut_off_without_slowing_the_others(
    cluster: Cluster, channel: str, publisher_token: str
) -> None:
    before = await slow_consumer_disconnects(cluster)
    async with (
        await stalled_subscriber(
            cluster.proxy_ws_url,
            channel,
            receive_buffer_bytes=CLIENT_RECEIVE_BUFFER_BYTES,
            compression=None,
        ) as stalled,
        clients.audience(cluster.proxy_ws_url, channel, HEALTHY_CLIENTS) as healthy,
        clients.RestPublisher(
            cluster.proxy_url, publisher_token, channel, blob_bytes=BLOB_BYTES
        ) as publisher,
    ):
        disconnect_secs = await publish_until_disconnected(cluster, publisher, before)
        last_seq = publisher.last_seq
        await healthy.wait_until_received(last_seq, 30.0)
        close_code = await read_until_closed(stalled)

    assert disconnect_secs is not None, f"no slow-consumer disconnect after {MAX_MESSAGES}"
    assert close_code == 4002
    assert healthy.wrong_sequences(last_seq) == []
    assert healthy.disconnected() == [], "no healthy client was disconnected"
    latencies = healthy.latencies()
    p50, p99 = clients.percentile(latencies, 0.5), clients.percentile(latencies, 0.99)
    assert p99 < 1.0, "the others' deliveries kept flowing"
    name = "stalled client (64 KB messages, 40/s)"
    megabytes = last_seq * BLOB_BYTES / 2**20
    measure(
        name,
        "disconnected (4002) after / published by then",
        f"{disconnect_secs:.2f} s / {last_seq} messages ({megabytes:.0f} MB)",
    )
    measure(
        name,
        f"latency of the {HEALTHY_CLIENTS} other clients meanwhile (p50 / p99 / max)",
        f"{p50 * 1000:.0f} / {p99 * 1000:.0f} / {max(latencies) * 1000:.0f} ms",
    )
    queue_limit_kb = int(cluster.env["PUSH_SEND_QUEUE_MAX_BYTES"]) // 1024
    measure(name, "server send queue limit (PUSH_SEND_QUEUE_MAX_BYTES)", f"{queue_limit_kb} KB")
