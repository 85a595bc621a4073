"""Real server processes for end-to-end tests: a database of their own, nodes started
with ``manage.py runnode`` on free ports, stopped by PID when the tests are done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dj_database_url
import httpx
import psycopg

from devtools.processes import (
    LOG_TAIL_BYTES,
    ROOT,
    OwnedProcess,
    ProcessError,
    free_port,
    http_ok,
    log_tail,
    runnode_command,
)

LOG_DIR = ROOT / "artifacts" / "e2e-logs"
# Every test client connects from 127.0.0.1: with the per-address budgets on, one
# test's handshakes, frames and requests would hold back the next test's. The tests of
# the budgets (tests/test_address_budgets.py) and the abuse suite set their own.
NO_ADDRESS_BUDGETS = {
    "PUSH_ADDRESS_HANDSHAKE_PER_SEC": "0",
    "PUSH_ADDRESS_FRAME_PER_SEC": "0",
    "PUSH_ADDRESS_SUBSCRIBE_PER_SEC": "0",
    "PUSH_ADDRESS_REST_PER_SEC": "0",
    "PUSH_ADDRESS_FRAME_BYTES_PER_SEC": "0",
}
# The key of the signed subscription tokens the tests mint as an app's back-end does
# (the nodes of the ``token_node`` fixture know it).
SUBSCRIPTION_TOKEN_SECRET = "e2e-subscription-token-secret"
START_TIMEOUT_SECS = 30.0
STOP_TIMEOUT_SECS = 10.0


class Database:
    """A PostgreSQL database created for one test session and dropped after it."""

    def __init__(self, base_url: str, name: str | None = None) -> None:
        config = dj_database_url.parse(base_url)
        self.host = config.get("HOST") or "127.0.0.1"
        self.port = int(config.get("PORT") or 5432)
        self.user = config.get("USER") or "postgres"
        self.name = name or f"push_e2e_{os.getpid()}"
        self.url = f"postgres://{self.user}@{self.host}:{self.port}/{self.name}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        )

    def create(self) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def query(self, sql: str, *params: object) -> list[tuple]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def stored_messages(self, channel: str) -> int:
        """How many messages of ``channel`` are in PostgreSQL (none for a recent-only
        channel)."""
        rows = self.query(
            "SELECT count(*) FROM push_message m JOIN push_channel c ON c.id = m.channel_id "
            "WHERE c.name = %s",
            channel,
        )
        return int(rows[0][0])


class ManageWorker:
    """``tests/manage_worker.py`` for one environment: ``manage.py`` commands without
    starting Django for each. One command at a time (tests call it from threads too)."""

    def __init__(self, env: dict[str, str]) -> None:
        digest = hashlib.sha256(json.dumps(sorted(env.items())).encode()).hexdigest()[:8]
        self.log_path = LOG_DIR / f"manage-{digest}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.manage_worker"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._lock = threading.Lock()

    def run(self, args: tuple[str, ...], timeout_secs: float) -> str:
        what = f"manage.py {' '.join(args)}"
        with self._lock:
            line = self._ask(args, timeout_secs)
        if line is None:
            self.stop()
            raise ProcessError(f"{what} did not finish within {timeout_secs:.0f} s")
        if not line:
            raise ProcessError(f"{what}: the worker exited\n{log_tail(self.log_path)}")
        answer = json.loads(line)
        if "error" in answer:
            raise ProcessError(f"{what} failed:\n{answer['error'][-LOG_TAIL_BYTES:]}")
        return str(answer["output"])

    def _ask(self, args: tuple[str, ...], timeout_secs: float) -> str | None:
        """The answer's line; "" if the worker is gone, None if it did not answer."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(args) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return ""
        # One answer a request, and nothing read ahead of it: select sees it coming.
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_secs)
        return self.process.stdout.readline() if ready else None

    def stop(self) -> None:
        """Close its stdin (it ends), then wait; SIGKILL if it does not."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_SECS)


_workers: dict[str, ManageWorker] = {}
_workers_lock = threading.Lock()


def manage(env: dict[str, str], *args: str, timeout_secs: float = 180.0) -> str:
    """Run ``manage.py`` with ``args`` in ``env`` to completion; its output. In the
    worker of that environment, started at its first command."""
    key = json.dumps(sorted(env.items()))
    with _workers_lock:
        worker = _workers.get(key)
        if worker is None or worker.process.poll() is not None:
            worker = _workers[key] = ManageWorker(env)
    return worker.run(args, timeout_secs)


def stop_manage_workers() -> None:
    with _workers_lock:
        workers = list(_workers.values())
        _workers.clear()
    for worker in workers:
        worker.stop()


def create_token(
    env: dict[str, str], username: str, *, staff: bool = False, grant: bool = True
) -> str:
    """An API token of ``username``; with ``grant``, a grant to publish anywhere, else
    only what the settings allow every signed-in user."""
    grant_line = (
        "from accounts.models import ChannelGrant;"
        "ChannelGrant.objects.get_or_create(user=u, pattern='*', can_publish=True);"
    )
    script = (
        "from django.contrib.auth.models import User;"
        "from rest_framework.authtoken.models import Token;"
        f"u, _ = User.objects.get_or_create(username={username!r},"
        f" defaults={{'is_staff': {staff}}});"
        + (grant_line if grant else "")
        + "print('TOKEN=' + Token.objects.get_or_create(user=u)[0].key)"
    )
    output = manage(env, "shell", "-c", script)
    return next(line[6:] for line in output.splitlines() if line.startswith("TOKEN="))


def create_superuser(env: dict[str, str], username: str, password: str) -> None:
    script = (
        "from django.contrib.auth.models import User;"
        f"User.objects.filter(username={username!r}).exists() or "
        f"User.objects.create_superuser({username!r}, '', {password!r})"
    )
    manage(env, "shell", "-c", script)


async def admin_client(node: ServerNode, username: str, password: str) -> httpx.AsyncClient:
    """An HTTP client logged in to ``node``'s admin; POSTs need ``csrf_headers``."""
    client = httpx.AsyncClient(base_url=node.http_url, timeout=10)
    await client.get("/admin/login/")
    response = await client.post(
        "/admin/login/?next=/admin/",
        data={"username": username, "password": password, "next": "/admin/"},
        headers=csrf_headers(client),
    )
    assert response.status_code == 302, response.text
    return client


def csrf_headers(client: httpx.AsyncClient) -> dict[str, str]:
    return {"X-CSRFToken": client.cookies["csrftoken"]}


class ServerNode:
    """One ``manage.py runnode`` process, in the test run's own session (a Ctrl-C stops
    it too) and not tied to the starting thread (tests start nodes from worker threads)."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        server: str = "daphne",
        name: str = "",
        args: tuple[str, ...] = (),
    ) -> None:
        self.server = server
        self.args = args
        self.name = name or f"{server}-{uuid.uuid4().hex[:6]}"
        self.env = {**env, "NODE_ID": self.name}
        self.port = free_port()
        self.log_path = LOG_DIR / f"{self.name}.log"
        self._owned = OwnedProcess(
            self.name,
            self.port,
            runnode_command(server, self.port, *args),
            self.log_path,
            lambda: http_ok(f"{self.http_url}/health"),
            env=self.env,
            start_timeout_secs=START_TIMEOUT_SECS,
            stop_timeout_secs=STOP_TIMEOUT_SECS,
            dies_with_us=False,
            own_session=False,
        )

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._owned.process

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/"

    @property
    def pusher_url(self) -> str:
        """Where Pusher clients connect: ``<this>/app/<key>``."""
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> ServerNode:
        self._owned.start()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it to answer (``start_together``)."""
        self._owned.launch()

    def wait_answering(self) -> ServerNode:
        self._owned.wait_answering()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` and wait; SIGKILL if it still runs after STOP_TIMEOUT_SECS."""
        self._owned.stop(sig)

    def metric(self, name: str) -> float:
        """The current value of an unlabelled metric on this node's /metrics."""
        body = httpx.get(f"{self.http_url}/metrics", timeout=5).text
        for line in body.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log(self) -> str:
        """The node's whole log (tests look for lines in it)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def publish_rest(node: ServerNode, token: str, channel: str, data: Any) -> int:
    """Publish over REST on ``node``; the new message's seq."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{node.http_url}/api/v1/channels/{channel}/messages",
            json={"data": data},
            headers={"Authorization": f"Token {token}"},
        )
    assert response.status_code == 201, response.text
    return int(response.json()["seq"])


def small_queue_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """Send queues so small that a reader that stops reading overflows within seconds."""
    return {
        **env,
        "PUSH_SEND_QUEUE_MAX_BYTES": str(512 * 1024),
        "PUSH_SEND_QUEUE_MAX_FRAMES": "64",
        **extra,
    }


def start_together(nodes: Sequence[ServerNode]) -> None:
    """Launch every node, then wait for each to answer: a node spends its ~2 s of start
    importing Django and its server, so two starting at once take little longer than
    one on the suite's two cores."""
    for node in nodes:
        node.launch()
    for node in nodes:
        node.wait_answering()


@contextlib.contextmanager
def node_pair(
    env: dict[str, str], name: str, *, server: str = "daphne", server_b: str | None = None
) -> Iterator[tuple[ServerNode, ServerNode]]:
    """Two nodes sharing ``env`` (``<name>-a`` under ``server`` and ``<name>-b`` under
    ``server_b``, the same unless given), both stopped after, also when one of them
    fails to start."""
    nodes = (
        ServerNode(env, server=server, name=f"{name}-a"),
        ServerNode(env, server=server_b or server, name=f"{name}-b"),
    )
    try:
        start_together(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def worker_log(name: str) -> Path:
    return LOG_DIR / f"worker-{name}.log"


def start_event_worker(env: dict[str, str], name: str, *options: str) -> subprocess.Popen[bytes]:
    """A ``manage.py run_event_worker`` process named ``name`` (its log in LOG_DIR), with
    further command-line ``options``; the caller stops it by its PID."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = worker_log(name).open("ab")
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_event_worker", "--consumer", name, *options],
        cwd=ROOT,
        env={**env, "EVENT_SINK_WORKER": name},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
