"""The abuse suite's node: one node with the default settings and server (only what the
harness needs: its own database and Redis prefix, DEBUG off, a SECRET_KEY; the
environment's ``ABUSE_SERVER=daphne`` runs it under daphne instead), and the channels
the attacks aim at, filled before the attack.

Run with ``make test-abuse`` (``pytest -m abuse tests/abuse``); the default run leaves
it out (``-m "not abuse"`` in pyproject's addopts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from tests.servers import ROOT, Database, ServerNode, create_token, manage

HONEST_CHANNELS = [f"busy-{i}" for i in range(5)]
RESUME_CHANNEL = "resume"
RESUME_MESSAGES = 6_000
BOMB_CHANNEL = "bomb"
BOMB_MESSAGES = 100
# token_urlsafe(750,000) is 1,000,000 characters of random base64: ~1 MB that
# PostgreSQL cannot compress, inside a 1 MiB REST body.
BOMB_ENTROPY_BYTES = 750_000
SEED_CONCURRENCY = 4


@dataclass
class AbuseNode:
    node: ServerNode
    database: Database
    publisher_token: str


@pytest.fixture(scope="session")
def django_db_setup() -> None:
    """The suite talks to its node over the network; the in-process test database that
    the other suites create is not needed."""


@pytest.fixture(scope="module")
def abuse_database() -> Iterator[Database]:
    database = Database(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
        name=f"push_abuse_{os.getpid()}",
    )
    database.create()
    yield database
    database.drop()


def node_env(database: Database) -> dict[str, str]:
    """The node's environment: the defaults, with only what the harness needs."""
    # Settings the caller's environment may carry (PUSH_*, LOG_*) are left out: the
    # suite proves the defaults.
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PUSH_", "LOG_", "DATABASE_", "REDIS_"))
    }
    return {
        **inherited,
        "DATABASE_URL": database.url,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "REDIS_PREFIX": f"abuse{uuid.uuid4().hex[:8]}",
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_hex(32),
    }


@pytest.fixture(scope="module")
def abuse_env(abuse_database: Database) -> Iterator[dict[str, str]]:
    env = node_env(abuse_database)
    manage(env, "migrate", "--no-input")
    yield env
    forget_redis_keys(env)


def forget_redis_keys(env: dict[str, str]) -> None:
    # The bomb channel's recent-history cache is ~100 MB of the shared Redis.
    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        keys = list(client.scan_iter(match=f"{env['REDIS_PREFIX']}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def seed_resume_channel(database: Database) -> None:
    """6,000 small messages, written straight to the tables: publishing them through the
    API would take a minute at the per-connection and per-credential rates."""
    database.query(
        "WITH c AS (INSERT INTO push_channel (name, last_seq, created_at)"
        " VALUES (%s, %s, now()) RETURNING id)"
        " INSERT INTO push_message (channel_id, seq, message_id, data, created_at)"
        " SELECT c.id, n, gen_random_uuid(), '{\"n\":' || n || '}', now()"
        " FROM c, generate_series(1, %s) AS n RETURNING 1",
        RESUME_CHANNEL,
        RESUME_MESSAGES,
        RESUME_MESSAGES,
    )


def settle_database(database: Database) -> None:
    """The seeded database as a long-running one is, before the baseline is taken.

    - Statistics for the seeded tables, as autovacuum gathers after such inserts:
      without them the planner takes the 6,000-row table for empty and scans it whole
      for each page, and the rows-read bound would count the scans rather than what
      was read.
    - The seeding's 100 MB on disk: a checkpoint and a sync now, or PostgreSQL's
      checkpointer and the kernel's writeback flush them during the attack, and every
      commit's WAL flush waits behind them (honest latency spikes of 100-200 ms every
      few seconds with no attack at all: the setup measured, not the attack)."""
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("ANALYZE push_channel, push_message")
        conn.execute("CHECKPOINT")
    os.sync()


async def seed_bomb_channel(node: ServerNode, token: str) -> None:
    """100 messages of ~1 MB, published over REST by a signed-in user without any grant
    (the defaults let users publish to public channels)."""
    gate = asyncio.Semaphore(SEED_CONCURRENCY)

    async def publish(http: httpx.AsyncClient) -> None:
        async with gate:
            response = await http.post(
                f"/api/v1/channels/{BOMB_CHANNEL}/messages",
                json={"data": secrets.token_urlsafe(BOMB_ENTROPY_BYTES)},
                headers={"Authorization": f"Token {token}"},
            )
            assert response.status_code == 201, response.text[:300]

    async with httpx.AsyncClient(base_url=node.http_url, timeout=60) as http:
        await asyncio.gather(*(publish(http) for _ in range(BOMB_MESSAGES)))


@contextlib.contextmanager
def seeded_node(env: dict[str, str], database: Database) -> Iterator[AbuseNode]:
    """A node on ``env``, its channels seeded; stopped after."""
    seed_resume_channel(database)
    token = create_token(env, "abuse-publisher", grant=False)
    # runnode's default server (DEFAULT_SERVER there); ABUSE_SERVER=daphne runs the other.
    server = os.environ.get("ABUSE_SERVER", "uvicorn")
    node = ServerNode(env, server=server, name=f"abuse-{uuid.uuid4().hex[:6]}").start()
    try:
        asyncio.run(seed_bomb_channel(node, token))
        settle_database(database)
        yield AbuseNode(node, database, token)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def abuse_node(abuse_env: dict[str, str], abuse_database: Database) -> Iterator[AbuseNode]:
    with seeded_node(abuse_env, abuse_database) as abuse:
        yield abuse


async def run_attackers(
    abuse: AbuseNode,
    *,
    secret: str,
    duration_secs: float,
    report_path: Path,
    log_path: Path,
    only: list[str] | None = None,
    addresses: int = 0,
) -> asyncio.subprocess.Process:
    """The attackers' process (``tests/abuse/attacks.py``) against ``abuse``'s node:
    every attack, or those named in ``only``; each from its own address, or from
    ``addresses`` shared ones."""
    args = [
        *("--http-url", abuse.node.http_url),
        *("--secret", secret),
        *("--resume-channel", RESUME_CHANNEL),
        *("--bomb-channel", BOMB_CHANNEL),
        *("--duration", str(duration_secs)),
        *("--report", str(report_path)),
    ]
    for channel in HONEST_CHANNELS:
        args += ["--honest-channel", channel]
    for name in only or ():
        args += ["--only", name]
    args += ["--addresses", str(addresses)]
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.abuse.attacks", *args, cwd=ROOT, stdout=log, stderr=log
        )
