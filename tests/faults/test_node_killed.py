"""kill -9 one node under 1,000 streaming clients: its clients reconnect through nginx
to the other nodes, resume with `since`, and every client ends with every seq once,
in order."""

from __future__ import annotations

import asyncio
import signal
import statistics

import pytest

from devtools.cluster import Cluster
from tests.faults import clients
from tests.faults.report import measure

pytestmark = pytest.mark.faults

CLIENTS = 1000
PUBLISH_RATE_PER_SEC = 10.0
STREAM_BEFORE_KILL_SECS = 3.0
STREAM_AFTER_KILL_SECS = 8.0
CATCH_UP_TIMEOUT_SECS = 60.0
VICTIM = "node-2"


@pytest.mark.timeout(240)
async def test_clients_of_a_killed_node_resume_elsewhere_without_loss_or_duplicate(
    cluster: Cluster, channel: str, publisher_token: str
) -> None:
    async with (
        clients.audience(cluster.proxy_ws_url, channel, CLIENTS) as audience,
        clients.RestPublisher(cluster.proxy_url, publisher_token, channel) as publisher,
    ):
        on_victim = [s for s in audience if s.server_id.startswith(f"{VICTIM}-")]
        assert on_victim, "nginx sent no client to the node about to be killed"
        async with publisher.steadily(PUBLISH_RATE_PER_SEC):
            await asyncio.sleep(STREAM_BEFORE_KILL_SECS)
            killed_at = asyncio.get_running_loop().time()
            await asyncio.to_thread(cluster.signal_node, VICTIM, signal.SIGKILL)
            await asyncio.sleep(STREAM_AFTER_KILL_SECS)
        last_seq = publisher.last_seq
        catch_up_secs = await audience.wait_until_received(last_seq, CATCH_UP_TIMEOUT_SECS)

    assert last_seq == publisher.sent, "each message index is one seq (Idempotency-Key)"
    assert audience.wrong_sequences(last_seq) == []
    assert audience.disconnected() == on_victim, "only the dead node's clients reconnected"
    assert all(s.server_ids[-1] != s.server_ids[0] for s in on_victim)

    resumes = [r for s in on_victim for r in s.resumes if r.resumed_at is not None]
    reconnect_secs = [r.resumed_at - killed_at for r in resumes]  # type: ignore[operator]  # Nones filtered out above
    name = "kill -9 one of 3 nodes"
    measure(name, "clients / on the killed node", f"{CLIENTS} / {len(on_victim)}")
    measure(
        name,
        "reconnect time until all resumed (median / max)",
        f"{statistics.median(reconnect_secs):.2f} s / {max(reconnect_secs):.2f} s",
    )
    measure(
        name, "messages replayed on resume (all clients)", str(sum(r.replayed for r in resumes))
    )
    measure(name, "messages published, each received by every client once", str(last_seq))
    measure(name, "publish failures retried (by reason)", str(dict(publisher.failures)))
    measure(name, "last client caught up after publishing stopped", f"{catch_up_secs:.2f} s")
