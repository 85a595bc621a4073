"""Redis killed and started again on the same port while messages are published: the
nodes reconnect by themselves, and no acknowledged (201) message is lost for anyone."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
from typing import Any

import pytest

from devtools.cluster import Cluster
from devtools.processes import OwnedProcess
from tests.faults import clients
from tests.faults.report import measure
from tests.pusherclient import PusherClient
from tests.servers import Database

pytestmark = pytest.mark.faults

CLIENTS = 150
PUBLISH_RATE_PER_SEC = 20.0
STREAM_BEFORE_SECS = 2.0
REDIS_DOWN_SECS = 2.0
STREAM_AFTER_SECS = 6.0
CATCH_UP_TIMEOUT_SECS = 30.0


def stored_data(database: Database, channel: str) -> list[str]:
    """The data of every stored message of ``channel``, in seq order, as JSON text."""
    rows = database.query(
        "SELECT m.data FROM push_message m JOIN push_channel c ON c.id = m.channel_id "
        "WHERE c.name = %s ORDER BY m.seq",
        channel,
    )
    return [json.dumps(json.loads(row[0]), separators=(",", ":")) for row in rows]


class PusherListener:
    """A Pusher-protocol subscriber of the channel, through nginx: it has no resume, so
    it must get every message from its node's hub, which repairs gaps from history."""

    def __init__(self, client: PusherClient) -> None:
        self.client = client
        self.data: list[str] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            frame = await self.client.receive(timeout=3600)
            if frame["event"] == "message":
                self.data.append(frame["data"])


async def join_presence(cluster: Cluster, channel: str) -> dict[str, Any]:
    """A Pusher client joining ``presence-<channel>``: the answer it got."""
    client = await PusherClient.connect(cluster.proxy_url.replace("http://", "ws://", 1))
    try:
        data = json.dumps({"user_id": "joiner"})
        return await client.subscribe(f"presence-{channel}", channel_data=data)
    finally:
        await client.close()


def stored_last_seq(database: Database, channel: str) -> int:
    rows = database.query("SELECT last_seq FROM push_channel WHERE name = %s", channel)
    return int(rows[0][0]) if rows else 0


@pytest.mark.timeout(180)
async def test_a_redis_restart_loses_no_acknowledged_message(
    cluster: Cluster,
    channel: str,
    publisher_token: str,
    own_redis: OwnedProcess,
    faults_database: Database,
) -> None:
    loop = asyncio.get_running_loop()
    pusher_client = await PusherClient.connect(cluster.proxy_url.replace("http://", "ws://", 1))
    assert (await pusher_client.subscribe(channel))["event"].endswith("subscription_succeeded")
    listener = PusherListener(pusher_client)
    async with (
        clients.audience(cluster.proxy_ws_url, channel, CLIENTS) as audience,
        clients.RestPublisher(cluster.proxy_url, publisher_token, channel) as publisher,
    ):
        async with publisher.steadily(PUBLISH_RATE_PER_SEC):
            await asyncio.sleep(STREAM_BEFORE_SECS)
            killed_at = loop.time()
            await asyncio.to_thread(own_redis.stop, signal.SIGKILL)
            joining = loop.create_task(join_presence(cluster, channel))
            await asyncio.sleep(REDIS_DOWN_SECS)
            own_redis.launch()
            await asyncio.to_thread(own_redis.wait_answering)
            restarted_at = loop.time()
            await asyncio.sleep(STREAM_AFTER_SECS)
        # Every stored message, not only the acknowledged ones: a publish whose reply
        # was lost is stored too, and subscribers must get it like any other.
        last_seq = await asyncio.to_thread(stored_last_seq, faults_database, channel)
        catch_up_secs = await audience.wait_until_received(last_seq, CATCH_UP_TIMEOUT_SECS)
        stored = await asyncio.to_thread(stored_data, faults_database, channel)
        deadline = loop.time() + CATCH_UP_TIMEOUT_SECS
        while len(listener.data) < len(stored) and loop.time() < deadline:
            await asyncio.sleep(0.05)
    listener.task.cancel()
    await pusher_client.close()
    # Presence lives in Redis: a join while it is away is refused with 503 (or, if the
    # answer came after the restart, succeeds), never left without an answer.
    answer = await joining
    assert answer["event"] == "pusher_internal:subscription_succeeded" or (
        answer["event"] == "pusher:subscription_error"
        and json.loads(answer["data"])["status"] == 503
    ), answer
    assert listener.data == stored, "the Pusher subscriber got every stored message in order"

    acknowledged = set(publisher.acked.values())
    assert acknowledged <= set(range(1, last_seq + 1))
    assert audience.wrong_sequences(last_seq) == []
    assert "500" not in publisher.failures, "Redis down is 503 UNAVAILABLE, not a crash"

    pauses = [clients.max_gap(s.received_at, killed_at, restarted_at) for s in audience]
    name = f"Redis killed and restarted (down {REDIS_DOWN_SECS:.0f} s)"
    measure(
        name,
        "subscribers / messages stored / acknowledged",
        f"{CLIENTS} / {last_seq} / {len(acknowledged)}",
    )
    measure(
        name,
        "pause clients saw (longest gap between receipts; median / max)",
        f"{statistics.median(pauses):.2f} s / {max(pauses):.2f} s",
    )
    measure(name, "publish failures retried (by reason)", str(dict(publisher.failures)))
    measure(name, "clients disconnected", str(len(audience.disconnected())))
    measure(name, "last client caught up after publishing stopped", f"{catch_up_secs:.2f} s")
