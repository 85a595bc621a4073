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
from collections.abc import Iterator

import httpx
import pytest

from devtools.cluster import Cluster
from devtools.processes import OwnedProcess, free_port, redis_server
from tests.faults.report import MEASUREMENTS
from tests.faults.services import tcp_proxy
from tests.servers import ROOT, Database, create_token

ARTIFACTS = ROOT / "artifacts" / "faults"
NODES = 3
READY_TIMEOUT_SECS = 30.0

# The stalled-client test fills a send queue quickly with these; the other tests' clients
# keep well below them (small messages, replays of at most a few hundred frames).
SEND_QUEUE_MAX_BYTES = 512 * 1024
SEND_QUEUE_MAX_FRAMES = 512


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
        # The publishers retry fast while a dependency is down; the default REST budget
        # (6000/min) is for one credential's normal traffic.
        "PUSH_REST_RATE": "60000/min",
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


def wait_all_ready(cluster: Cluster) -> None:
    """Every node answers /ready (database and Redis reachable) and nginx answers."""
    urls = [f"{cluster.node_url(r.name)}/ready" for r in cluster.node_records()]
    urls.append(f"{cluster.proxy_url}/health")
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    pending = urls
    while pending and time.monotonic() < deadline:
        pending = [url for url in pending if not _answers_200(url)]
        if pending:
            time.sleep(0.2)
    assert not pending, f"not ready after {READY_TIMEOUT_SECS:.0f} s: {pending}"


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_all_publish(cluster: Cluster, token: str) -> None:
    """Every node stores a REST publish: /ready needs one working database connection,
    a publish needs the node's pool back after an outage, which can take longer. A test
    that starts before would measure the previous test's fault as well as its own."""
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    for record in cluster.node_records():
        url = f"{cluster.node_url(record.name)}/api/v1/channels/faults-warmup/messages"
        while not _publishes(url, token):
            assert time.monotonic() < deadline, f"{record.name} does not publish"
            time.sleep(0.2)


def _publishes(url: str, token: str) -> bool:
    try:
        response = httpx.post(
            url, json={"data": "warm-up"}, headers={"Authorization": f"Token {token}"}, timeout=5
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 201


@pytest.fixture
def cluster(
    cluster_processes: Cluster,
    pg_proxy: OwnedProcess,
    own_redis: OwnedProcess,
    publisher_token: str,
) -> Cluster:
    """The cluster with every process up and publishing, whatever the previous test
    broke."""
    for process in (pg_proxy, own_redis):
        if not process.running:
            process.start()
    cluster_processes.restart_dead()
    wait_all_ready(cluster_processes)
    wait_all_publish(cluster_processes, publisher_token)
    return cluster_processes


@pytest.fixture
def channel() -> str:
    """A channel of the test's own: its seqs start at 1."""
    return f"faults-{uuid.uuid4().hex[:12]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASUREMENTS:
        return
    terminalreporter.section("fault test measurements")
    for test, name, value in MEASUREMENTS:
        terminalreporter.line(f"{test}: {name} = {value}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rows = [{"test": t, "measurement": n, "value": v} for t, n, v in MEASUREMENTS]
    (ARTIFACTS / "measurements.json").write_text(json.dumps(rows, indent=2) + "\n")
