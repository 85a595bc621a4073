"""Readiness names the dependency that is down, health stays up, and a node is ready
again, serving reads, as soon as PostgreSQL is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from django.test import AsyncClient

from devtools.processes import free_port
from monitoring import checks, views
from tests.faults.services import tcp_proxy
from tests.servers import Database, ServerNode

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("down", ["database", "redis"])
def test_ready_is_503_naming_the_unreachable_dependency(e2e_env: dict[str, str], down: str) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = dict(e2e_env)
    if down == "database":
        env["DATABASE_URL"] = f"postgres://postgres@{closed}/nowhere"
    else:
        env["REDIS_URL"] = f"redis://{closed}/0"
    node = ServerNode(env, name=f"ready-{down}").start()
    try:
        assert httpx.get(f"{node.http_url}/health", timeout=5).status_code == 200
        response = httpx.get(f"{node.http_url}/ready", timeout=10)
        assert response.status_code == 503
        failing = response.json()["failing"]
        assert len(failing) == 1 and failing[0].startswith(down)
    finally:
        node.stop()


# Four times the node's database threads (common.db.DATABASE_THREADS): every thread
# takes connections from the pool, more than the pool kept while PostgreSQL was away.
READ_BURST = 24
# Long enough for psycopg_pool's reconnection backoff (1, 2, 4 s...) to reach 4 s.
OUTAGE_SECS = 8.0
RECOVERY_TIMEOUT_SECS = 3.0


async def _burst_of_reads(node: ServerNode, token: str) -> list[int]:
    """The statuses of READ_BURST history reads sent at once."""
    url = f"{node.http_url}/api/v1/channels/ready-reads/messages"
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Token {token}"}) as http:
        responses = await asyncio.gather(*(http.get(url) for _ in range(READ_BURST)))
    return [response.status_code for response in responses]


def _ready(node: ServerNode) -> httpx.Response:
    return httpx.get(f"{node.http_url}/ready", timeout=10)


async def test_ready_follows_postgresql_and_reads_work_as_soon_as_it_is_back(
    e2e_env: dict[str, str], e2e_database: Database, publisher_token: str, tmp_path: Path
) -> None:
    """While PostgreSQL is unreachable the node is not ready; once it is back, the
    node is ready within moments and serves a burst of reads, none timing out on a
    connection pool still backing off or handing out connections that died."""
    port = free_port()
    proxy = tcp_proxy(port, e2e_database.host, e2e_database.port, tmp_path).start()
    url = f"postgres://{e2e_database.user}@127.0.0.1:{port}/{e2e_database.name}"
    node = ServerNode({**e2e_env, "DATABASE_URL": url}, name="ready-postgres").start()
    try:
        assert set(await _burst_of_reads(node, publisher_token)) == {200}
        proxy.stop()
        outage_ends = time.monotonic() + OUTAGE_SECS
        while time.monotonic() < outage_ends:
            response = await asyncio.to_thread(_ready, node)
            assert response.status_code == 503, response.text
            assert response.json()["failing"][0].startswith("database")
        proxy.launch()
        await asyncio.to_thread(proxy.wait_answering)
        back_at = time.monotonic()
        while (await asyncio.to_thread(_ready, node)).status_code != 200:
            assert time.monotonic() - back_at < RECOVERY_TIMEOUT_SECS, "not ready again"
            await asyncio.sleep(0.1)
        assert set(await _burst_of_reads(node, publisher_token)) == {200}
    finally:
        node.stop()
        proxy.stop()


@pytest.mark.django_db(transaction=True)
async def test_a_burst_of_ready_requests_costs_one_round_of_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone may ask /ready: each answer opened a Redis connection and read the
    database, as many at once as requests came. A burst now shares one round."""
    rounds: list[str | None] = []
    check_redis = checks.check_redis

    async def counted(redis_url: str | None) -> str | None:
        rounds.append(redis_url)
        return await check_redis(redis_url)

    monkeypatch.setattr(checks, "check_redis", counted)
    monkeypatch.setattr(views, "check_redis", counted, raising=False)
    client = AsyncClient()
    responses = await asyncio.gather(*(client.get("/ready") for _ in range(20)))
    assert len({(r.status_code, r.content) for r in responses}) == 1, "one answer for all"
    assert len(rounds) == 1
