"""End-to-end fixtures: real daphne/uvicorn nodes sharing PostgreSQL and Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.processes import OwnedProcess, free_port, redis_server
from tests.pusherclient import shared_pusher_env
from tests.servers import (
    NO_ADDRESS_BUDGETS,
    SUBSCRIPTION_TOKEN_SECRET,
    Database,
    ServerNode,
    create_token,
    manage,
    node_pair,
    small_queue_env,
    stop_manage_workers,
)


@pytest.fixture(scope="session", autouse=True)
def _manage_workers() -> Iterator[None]:
    """The processes ``manage`` runs its commands in end with the session."""
    yield
    stop_manage_workers()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnedProcess]:
    """A redis-server of the test module's own, which its tests may kill, start again
    or reconfigure (never the machine's shared one)."""
    server = redis_server(free_port(), Path(tmp_path_factory.mktemp("own-redis")))
    yield server.start()
    server.stop()


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
        # Nor about overload, which a slow test machine would cause by chance
        # (tests/test_overload.py sets its own).
        "PUSH_OVERLOAD_LAG_MS": "0",
        "PUSH_CLUSTER_ANNOUNCE_SECS": "0.5",
        "PUSH_NODE_DEAD_AFTER_SECS": "3",
        # The suite's nodes, on two workers, keep within PostgreSQL's 100 connections:
        # a pool keeps what it grew to, and a node of these tests needs a few at most.
        "DATABASE_POOL_MAX": "6",
    }
    manage(env, "migrate", "--no-input")
    return env


@pytest.fixture(scope="session")
def publisher_token(e2e_env: dict[str, str]) -> str:
    return create_token(e2e_env, "e2e-publisher")


# Shared nodes: a node costs ~2 s of the suite's two cores to start, most of it
# importing Django. Every test that only connects, subscribes and publishes, each on
# channels and users of its own, uses one of these; a test that stops, kills or
# reconfigures a node, or measures one, starts its own.


@pytest.fixture(scope="session")
def two_nodes(e2e_env: dict[str, str]) -> Iterator[tuple[ServerNode, ServerNode]]:
    """Two daphne nodes of ``e2e_env``."""
    with node_pair(e2e_env, "node") as nodes:
        yield nodes


@pytest.fixture
def other_node(two_nodes: tuple[ServerNode, ServerNode]) -> ServerNode:
    """The second shared node, where a test publishes what its client on the first gets."""
    return two_nodes[1]


@pytest.fixture
def own_node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    """A daphne node of ``e2e_env`` for this test alone, which it may stop and start."""
    node = ServerNode(e2e_env, name=f"own-{uuid.uuid4().hex[:6]}").start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def token_node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    """A node that knows SUBSCRIPTION_TOKEN_SECRET and checks signed tokens' expiry every
    0.2 s, so that a subscription whose token expired ends at once: the clients' token
    tests (tests/test_python_client_tokens.py, tests/test_token_js_e2e.py)."""
    env = {
        **e2e_env,
        "PUSH_SUBSCRIPTION_TOKEN_SECRET": SUBSCRIPTION_TOKEN_SECRET,
        "PUSH_REVOCATION_CHECK_SECS": "0.2",
    }
    node = ServerNode(env, name=f"tokens-{uuid.uuid4().hex[:6]}").start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def pusher_nodes(e2e_env: dict[str, str]) -> Iterator[tuple[ServerNode, ServerNode]]:
    """A daphne and a uvicorn node of the Pusher app (``shared_pusher_env``): the Pusher
    protocol, HTTP API, pusher-js and browser tests."""
    with node_pair(shared_pusher_env(e2e_env), "pusher", server_b="uvicorn") as nodes:
        yield nodes


@pytest.fixture(scope="session", params=["recent-in-memory", "replayed-from-postgresql"])
def resume_nodes(
    request: pytest.FixtureRequest, e2e_env: dict[str, str]
) -> Iterator[tuple[ServerNode, ServerNode]]:
    """Two nodes that serve resumes (and rewinds) from the messages they hold, or (one
    message held, no Redis cache) from PostgreSQL with live messages buffered during the
    replay: tests/test_resume.py and tests/test_rewind.py."""
    env = e2e_env
    if request.param == "replayed-from-postgresql":
        env = {**e2e_env, "PUSH_RECENT_PER_CHANNEL": "1", "PUSH_RECENT_CACHE_SIZE": "0"}
    with node_pair(env, request.param) as nodes:
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
