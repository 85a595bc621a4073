"""Fault tests: a cluster of their own (nginx, three daphne nodes), its own redis-server,
and PostgreSQL behind a TCP proxy, so each dependency can be killed and brought back
without touching the machine's shared services.

Run with ``make test-faults`` (``pytest -m faults tests/faults``); the default run
leaves these tests out (``-m "not faults"`` in pyproject's addopts).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import pytest

from devtools.cluster import Cluster
from devtools.processes import OwnedProcess, ProcessError, free_port, redis_server
from tests.faults.report import MEASUREMENTS
from tests.faults.services import tcp_proxy
from tests.pusherclient import APP_ID, APP_KEY, APP_SECRET
from tests.servers import NO_ADDRESS_BUDGETS, ROOT, Database, create_token, manage

ARTIFACTS = ROOT / "artifacts" / "faults"
NODES = 3
READY_TIMEOUT_SECS = 30.0
# Above the database threads of a node (common.db.DATABASE_THREADS, 6) and the
# subscribes a node takes at once when an audience opens (batches of 50 over 3 nodes).
READ_BURST = 24

# The stalled-client test fills a send queue quickly with these; the other tests' clients
# keep well below them (small messages, replays of at most a few hundred frames).
SEND_QUEUE_MAX_BYTES = 512 * 1024
SEND_QUEUE_MAX_FRAMES = 512

# Channels named so are recent-only (their seq and window in Redis); the other fault
# tests' channels (``faults-...``) and the warm-up channel stay durable.
RECENT_CHANNEL_PREFIX = "faultrecent-"


@pytest.fixture(scope="session")
def django_db_setup() -> None:
    """These tests talk to their own cluster over the network; the in-process test
    database that the other suites create is not needed (nor its migration time)."""


@pytest.fixture(scope="session")
def artifacts_dir() -> Iterator[None]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    yield


@pytest.fixture(scope="session")
def faults_database(artifacts_dir: None) -> Iterator[Database]:
    database = Database(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
        name=f"push_faults_{os.getpid()}",
    )
    database.create()
    yield database
    database.drop()


@pytest.fixture(scope="session")
def pg_proxy(faults_database: Database) -> Iterator[OwnedProcess]:
    proxy = tcp_proxy(free_port(), faults_database.host, faults_database.port, ARTIFACTS)
    yield proxy.start()
    proxy.stop()


@pytest.fixture(scope="session")
def own_redis(artifacts_dir: None) -> Iterator[OwnedProcess]:
    server = redis_server(free_port(), ARTIFACTS)
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def cluster_env(
    faults_database: Database, pg_proxy: OwnedProcess, own_redis: OwnedProcess
) -> dict[str, str]:
    database = faults_database
    return {
        **os.environ,
        "DATABASE_URL": (f"postgres://{database.user}@127.0.0.1:{pg_proxy.port}/{database.name}"),
        "REDIS_URL": f"redis://127.0.0.1:{own_redis.port}/0",
        "REDIS_PREFIX": f"faults{uuid.uuid4().hex[:8]}",
        "DEBUG": "0",
        "SECRET_KEY": "faults-secret",
        "PUSH_SEND_QUEUE_MAX_BYTES": str(SEND_QUEUE_MAX_BYTES),
        "PUSH_SEND_QUEUE_MAX_FRAMES": str(SEND_QUEUE_MAX_FRAMES),
        "PUSH_HISTORY_MODES": f"{RECENT_CHANNEL_PREFIX}*=recent",
        # The publishers retry fast while a dependency is down; the default REST budget
        # (6000/min) is for one credential's normal traffic.
        "PUSH_REST_RATE": "60000/min",
        # Every client reaches the nodes through nginx from 127.0.0.1, and crowds of
        # them reconnect at once: these tests are about failing parts, not budgets.
        **NO_ADDRESS_BUDGETS,
        # The crowd of 1,000 anonymous clients (test_node_killed) lands on one node.
        "PUSH_MAX_ANONYMOUS_CONNECTIONS_PER_IP": "0",
        # A Pusher-protocol subscriber rides through the Redis restart beside ours.
        "PUSHER_APP_ID": APP_ID,
        "PUSHER_APP_KEY": APP_KEY,
        "PUSHER_APP_SECRET": APP_SECRET,
    }


@pytest.fixture(scope="session")
def cluster_processes(cluster_env: dict[str, str]) -> Iterator[Cluster]:
    cluster = Cluster(ARTIFACTS / "cluster", cluster_env, tie_to_parent=True)
    cluster.start(nodes=NODES, proxy_port=free_port())
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def publisher_token(cluster_processes: Cluster, cluster_env: dict[str, str]) -> str:
    return create_token(cluster_env, "faults-publisher")


@pytest.fixture
def backend_key(cluster_processes: Cluster, cluster_env: dict[str, str]) -> str:
    """A service token (a back-end): a node that verified it a moment ago answers its
    REST publishes without Django's middleware and DRF (push/api/fast_publish.py)."""
    name = f"faults-backend-{uuid.uuid4().hex[:8]}"
    output = manage(cluster_env, "service_token", "create", name, "--scope", "publish:*")
    return output.strip().splitlines()[-1]


@pytest.fixture
def unseen_token(cluster_processes: Cluster, cluster_env: dict[str, str]) -> str:
    """A valid token no node has verified yet, so none holds its principal
    (``accounts/principal_cache.py``): checking it needs the database."""
    return create_token(cluster_env, f"faults-unseen-{uuid.uuid4().hex[:8]}")


def wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {READY_TIMEOUT_SECS:.0f} s"
        time.sleep(0.2)


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def _serves_reads(base_url: str, token: str) -> bool:
    """READ_BURST history reads at once, all answered 200: the node's database pool
    hands out working connections to every database thread, not only to the one
    that answered /ready."""
    url = f"{base_url}/api/v1/channels/faults-warmup/messages"
    headers = {"Authorization": f"Token {token}"}
    with httpx.Client(timeout=5.0, headers=headers) as http:

        def read(_: int) -> bool:
            try:
                return http.get(url).status_code == 200
            except httpx.HTTPError:
                return False

        with ThreadPoolExecutor(READ_BURST) as pool:
            return all(pool.map(read, range(READ_BURST)))


def _publishes(base_url: str, token: str) -> bool:
    try:
        response = httpx.post(
            f"{base_url}/api/v1/channels/faults-warmup/messages",
            json={"data": "warm-up"},
            headers={"Authorization": f"Token {token}"},
            timeout=5,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 201


def _manage_reads_the_database(env: dict[str, str]) -> bool:
    try:
        manage(env, "service_token", "list")
    except ProcessError:
        return False
    return True


def wait_all_serving(cluster: Cluster, token: str) -> None:
    """Every node is ready (database and Redis reachable), serves a burst of database
    reads and stores a publish, and nginx answers. A test that started before would
    measure the previous test's fault as well as its own: after PostgreSQL was away,
    one working connection answers /ready well before every request gets one."""
    for record in cluster.node_records():
        base_url = cluster.node_url(record.name)
        wait_until(f"{record.name} ready", partial(_answers_200, f"{base_url}/ready"))
        wait_until(f"{record.name} serves reads", partial(_serves_reads, base_url, token))
        wait_until(f"{record.name} publishes", partial(_publishes, base_url, token))
    wait_until("nginx answers", partial(_answers_200, f"{cluster.proxy_url}/health"))


@pytest.fixture
def cluster(
    cluster_processes: Cluster,
    cluster_env: dict[str, str],
    pg_proxy: OwnedProcess,
    own_redis: OwnedProcess,
    publisher_token: str,
) -> Cluster:
    """The cluster with every process up and serving, whatever the previous test
    broke."""
    for process in (pg_proxy, own_redis):
        if not process.running:
            process.start()
    cluster_processes.restart_dead()
    wait_all_serving(cluster_processes, publisher_token)
    # The tests' manage.py worker (``backend_key``, ``unseen_token``) keeps pooled
    # connections too, dead after a PostgreSQL outage it sat through idle: its commands
    # read the database again before a test uses it, as the nodes' reads above do. (The
    # first dead connection its pool's check finds drains the pool, so that is its first
    # command: common/postgresql/base.py.)
    wait_until("manage.py reads the database", partial(_manage_reads_the_database, cluster_env))
    return cluster_processes


@pytest.fixture
def channel() -> str:
    """A channel of the test's own: its seqs start at 1."""
    return f"faults-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def recent_channel() -> str:
    """A recent-only channel of the test's own (``PUSH_HISTORY_MODES`` above)."""
    return f"{RECENT_CHANNEL_PREFIX}{uuid.uuid4().hex[:12]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASUREMENTS:
        return
    terminalreporter.section("fault test measurements")
    for test, name, value in MEASUREMENTS:
        terminalreporter.line(f"{test}: {name} = {value}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rows = [{"test": t, "measurement": n, "value": v} for t, n, v in MEASUREMENTS]
    (ARTIFACTS / "measurements.json").write_text(json.dumps(rows, indent=2) + "\n")
