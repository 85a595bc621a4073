"""Server side of the benchmark: how each target is launched, checked and stopped.

A target is what is measured (our server, or a reference); a server is the ASGI
server it runs under (uvicorn with uvloop and per-message deflate off, or daphne).
Every node is a subprocess in its own session, started here and stopped here by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = Path(__file__).resolve().parent / "results" / "logs"
READY_TIMEOUT_SECS = 60.0
READY_POLL_SECS = 0.2
STOP_TIMEOUT_SECS = 10.0
LISTEN_BACKLOG = 2048  # uvicorn's default; daphne (Twisted) would otherwise use 50
LOG_TAIL_BYTES = 2_000

SERVERS = ("uvicorn", "daphne")
OURS_APP = "realtime_project.asgi:application"
BARE_APP = "bench.references.bare_hub:app"
CHANNELS_REF_APP = "bench.references.channels_ref.asgi:application"
RUNNODE_TEMPLATE = "{python} manage.py runnode --server {server} --host {host} --port {port}"


class ServerStartError(Exception):
    """Raised when a node exits or does not answer HTTP before the ready timeout."""


def asgi_command(server: str, app: str, host: str, port: int) -> list[str]:
    """The raw command that serves ``app`` under ``server`` on ``host:port``."""
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", app),
            *("--host", host, "--port", str(port)),
            *(
                "--loop",
                "uvloop",
                "--ws",
                os.environ.get("BENCH_UVICORN_WS", "websockets"),
                "--ws-per-message-deflate",
                "false",
            ),
            *(
                "--log-level",
                "warning",
                "--no-access-log",
                "--backlog",
                str(LISTEN_BACKLOG),
            ),
        ]
    if server == "daphne":
        endpoint = f"tcp:port={port}:interface={host}:backlog={LISTEN_BACKLOG}"
        return [sys.executable, "-m", "daphne", "-e", endpoint, "-v", "0", app]
    raise ValueError(f"unknown server {server!r}; known: {', '.join(SERVERS)}")


@dataclass(frozen=True)
class Target:
    """One thing to measure: how to launch a node of it and what it needs around it."""

    name: str
    app: str
    env: dict[str, str] = field(default_factory=dict)
    command_template: str = ""  # empty: the raw uvicorn/daphne command for ``app``
    multi_node_env: dict[str, str] = field(default_factory=dict)
    token: str = ""  # publishers' API token, when the target checks one
    service_token: str = ""  # a service token's key (the publish scenarios); else token
    serves_sse: bool = False  # answers GET /sse/ (the sse_ scenarios need it)
    # Bounds each send queue, with 4002 or drop-oldest (the slow_ scenarios need it).
    bounds_send_queues: bool = False

    def command(self, server: str, host: str, port: int) -> list[str]:
        if not self.command_template:
            return asgi_command(server, self.app, host, port)
        text = self.command_template.format(
            python=sys.executable, server=server, host=host, port=port, app=self.app
        )
        return text.split()


@dataclass
class Node:
    """One running server process."""

    target: str
    server: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def _port_answers_http(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def _log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return data[-LOG_TAIL_BYTES:].decode(errors="replace")


def start_node(target: Target, server: str, host: str, port: int, multi_node: bool) -> Node:
    """Start one node and wait until it answers HTTP; raise with its log if not."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{target.name}-{server}-{port}.log"
    env = {**os.environ, **target.env, **(target.multi_node_env if multi_node else {})}
    env["PYTHONPATH"] = str(REPO_ROOT)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            target.command(server, host, port),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() gets children too
        )
    node = Node(target.name, server, host, port, process, log_path)
    _wait_ready(node)
    return node


def _wait_ready(node: Node) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise ServerStartError(
                f"{node.target}/{node.server} exited with {node.process.returncode}:\n"
                + _log_tail(node.log_path)
            )
        if _port_answers_http(node.host, node.port):
            return
        time.sleep(READY_POLL_SECS)
    stop_node(node)
    raise ServerStartError(
        f"{node.target}/{node.server} not ready in {READY_TIMEOUT_SECS:.0f} s:\n"
        + _log_tail(node.log_path)
    )


def stop_node(node: Node) -> None:
    """SIGTERM the node's process group (its PID), then SIGKILL if it lingers."""
    if node.process.poll() is None:
        _signal_group(node.pid, signal.SIGTERM)
        try:
            node.process.wait(STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            _signal_group(node.pid, signal.SIGKILL)
            node.process.wait(STOP_TIMEOUT_SECS)
    # Children that outlived their parent are still in the group the node led.
    _signal_group(node.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def start_nodes(target: Target, server: str, host: str, first_port: int, count: int) -> list[Node]:
    """Start ``count`` nodes on consecutive ports; on any failure stop those started."""
    nodes: list[Node] = []
    try:
        for index in range(count):
            nodes.append(start_node(target, server, host, first_port + index, count > 1))
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes: list[Node]) -> None:
    for node in nodes:
        stop_node(node)
