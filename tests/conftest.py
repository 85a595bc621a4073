"""End-to-end fixtures: real daphne/uvicorn nodes sharing PostgreSQL and Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.servers import (
    NO_ADDRESS_BUDGETS,
    Database,
    ServerNode,
    create_token,
    manage,
    node_pair,
    small_queue_env,
)


@pytest.fixture(scope="session")
def e2e_database() -> Iterator[Database]:
    database = Database(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"))
    database.create()
    yield database
    database.drop()


@pytest.fixture(scope="session")
def e2e_env(e2e_database: Database) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": e2e_database.url,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        # Pub/sub channels are shared by every Redis database: a prefix of our own keeps
        # other test runs and servers on this machine out of these tests.
        "REDIS_PREFIX": f"e2e{uuid.uuid4().hex[:8]}",
        "DEBUG": "0",
        "SECRET_KEY": "e2e-secret",
        "PUSH_SYNC_INTERVAL_SECS": "0.5",
        # These tests publish hundreds of messages a second from one connection.
        "PUSH_RATE_BURST": "100000",
        "PUSH_RATE_PER_SEC": "100000",
        # Every test client is 127.0.0.1: one test's refused tokens must not make the
        # next one's valid token wait for the minute (accounts/tests count failures).
        "PUSH_AUTH_FAILURES_PER_MIN": "100000",
        **NO_ADDRESS_BUDGETS,
        "PUSH_CLUSTER_ANNOUNCE_SECS": "0.5",
        "PUSH_NODE_DEAD_AFTER_SECS": "3",
    }
    manage(env, "migrate", "--no-input")
    return env


@pytest.fixture(scope="session")
def publisher_token(e2e_env: dict[str, str]) -> str:
    return create_token(e2e_env, "e2e-publisher")


@pytest.fixture(scope="module")
def two_nodes(e2e_env: dict[str, str]) -> Iterator[tuple[ServerNode, ServerNode]]:
    with node_pair(e2e_env, "node") as nodes:
        yield nodes


@pytest.fixture(scope="session", params=["daphne", "uvicorn"])
def small_queue_node(
    request: pytest.FixtureRequest, e2e_env: dict[str, str]
) -> Iterator[ServerNode]:
    """A node whose send queues are small, so a reader that stops reading overflows
    quickly; ``ticker:*`` channels drop their oldest frames instead."""
    env = small_queue_env(e2e_env, PUSH_DROP_OLDEST_CHANNELS="ticker:*")
    node = ServerNode(env, server=request.param, name=f"slow-{request.param}").start()
    yield node
    node.stop()
