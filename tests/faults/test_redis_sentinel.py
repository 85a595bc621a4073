"""Redis behind Sentinel: the master is killed while messages are published, Sentinel
promotes the replica, and two nodes find the new master by themselves (channel layer,
directory, presence, cache, readiness), losing no acknowledged message.

The nodes' history sync is slowed to 30 s here, so what reaches the subscribers after
the failover came through the new master, not through the database's safety net."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from devtools.processes import OwnedProcess, free_port, port_accepts, redis_server
from tests.faults import clients
from tests.faults.report import measure
from tests.servers import ServerNode, create_token, node_pair

pytestmark = pytest.mark.faults

MASTER = "pushmaster"
CLIENTS = 50
PUBLISH_RATE_PER_SEC = 20.0
STREAM_BEFORE_SECS = 2.0
STREAM_AFTER_FAILOVER_SECS = 4.0
FAILOVER_TIMEOUT_SECS = 30.0
CATCH_UP_TIMEOUT_SECS = 30.0


def _sentinel(port: int, master_port: int, work_dir: Path) -> OwnedProcess:
    config = work_dir / "sentinel.conf"
    # Sentinel rewrites its configuration file as it learns, so it gets its own copy.
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {work_dir}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 5000\n"
    )
    binary = redis_server(0, work_dir).command[0]
    return OwnedProcess(
        "redis-sentinel",
        port,
        [binary, str(config), "--sentinel"],
        work_dir / "sentinel.log",
        lambda: port_accepts(port),
    )


def _replica(port: int, master_port: int, work_dir: Path) -> OwnedProcess:
    replica = redis_server(port, work_dir)
    replica.command += ["--replicaof", "127.0.0.1", str(master_port)]
    replica.log_path = work_dir / "replica.log"
    return replica


def _master_port(sentinel_port: int) -> int | None:
    try:
        answer = redis.Redis(port=sentinel_port, socket_timeout=1).sentinel_get_master_addr_by_name(
            MASTER
        )
    except redis.RedisError:
        return None
    return int(answer[1]) if answer else None


def _wait(what: str, check: object, timeout: float) -> float:
    started = time.monotonic()
    while not check():  # type: ignore[operator]  # check: any callable
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OwnedProcess]]:
    master_dir, replica_dir, sentinel_dir = (
        tmp_path_factory.mktemp(name) for name in ("master", "replica", "sentinel")
    )
    master = redis_server(free_port(), master_dir).start()
    replica = _replica(free_port(), master.port, replica_dir).start()
    sentinel = _sentinel(free_port(), master.port, sentinel_dir).start()
    processes = {"master": master, "replica": replica, "sentinel": sentinel}
    try:
        _wait(
            "the replica is in sync",
            lambda: redis.Redis(port=master.port).info("replication")["connected_slaves"] == 1,
            15,
        )
        _wait("Sentinel knows the master", lambda: _master_port(sentinel.port) == master.port, 15)
        yield processes
    finally:
        for process in processes.values():
            process.stop()


@pytest.fixture(scope="module")
def sentinel_nodes(
    sentinel_setup: dict[str, OwnedProcess], e2e_env: dict[str, str]
) -> Iterator[tuple[ServerNode, ServerNode]]:
    env = {
        **e2e_env,
        # The host in REDIS_URL is not used with Sentinel: only the database number.
        "REDIS_URL": "redis://sentinel-managed/0",
        "REDIS_SENTINELS": f"127.0.0.1:{sentinel_setup['sentinel'].port}",
        "REDIS_SENTINEL_MASTER": MASTER,
        "PUSH_SYNC_INTERVAL_SECS": "30",
        "PUSH_REST_RATE": "60000/min",
    }
    with node_pair(env, "sentinel") as nodes:
        yield nodes


def _ready(node: ServerNode) -> bool:
    try:
        return httpx.get(f"{node.http_url}/ready", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(180)
async def test_a_sentinel_failover_loses_no_acknowledged_message(
    sentinel_setup: dict[str, OwnedProcess],
    sentinel_nodes: tuple[ServerNode, ServerNode],
    e2e_env: dict[str, str],
) -> None:
    subscriber_node, publisher_node = sentinel_nodes
    sentinel, master, replica = (sentinel_setup[k] for k in ("sentinel", "master", "replica"))
    assert all(_ready(node) for node in sentinel_nodes)
    token = create_token(e2e_env, "sentinel-publisher")
    channel = f"sentinel-{time.monotonic_ns() % 10**8}"
    loop = asyncio.get_running_loop()
    async with (
        clients.audience(subscriber_node.ws_url, channel, CLIENTS) as audience,
        clients.RestPublisher(publisher_node.http_url, token, channel) as publisher,
    ):
        async with publisher.steadily(PUBLISH_RATE_PER_SEC):
            await asyncio.sleep(STREAM_BEFORE_SECS)
            killed_at = loop.time()
            await asyncio.to_thread(master.stop, signal.SIGKILL)
            failover_secs = await asyncio.to_thread(
                _wait,
                "Sentinel promoted the replica",
                lambda: _master_port(sentinel.port) == replica.port,
                FAILOVER_TIMEOUT_SECS,
            )
            promoted_at = loop.time()
            await asyncio.sleep(STREAM_AFTER_FAILOVER_SECS)
        last_seq = publisher.last_seq
        catch_up_secs = await audience.wait_until_received(last_seq, CATCH_UP_TIMEOUT_SECS)
    assert audience.wrong_sequences(last_seq) == []
    assert audience.disconnected() == []
    assert "500" not in publisher.failures
    assert all(_ready(node) for node in sentinel_nodes), "both nodes ready on the new master"

    pauses = [clients.max_gap(s.received_at, killed_at, promoted_at + 1) for s in audience]
    name = "Redis master killed behind Sentinel"
    measure(name, "Sentinel promoted the replica after", f"{failover_secs:.2f} s")
    measure(
        name,
        "pause clients saw (longest gap between receipts; median / max)",
        f"{statistics.median(pauses):.2f} s / {max(pauses):.2f} s",
    )
    measure(name, "messages acknowledged, all received once in order", str(last_seq))
    measure(name, "publish failures retried (by reason)", str(dict(publisher.failures)))
    measure(name, "last client caught up after publishing stopped", f"{catch_up_secs:.2f} s")
