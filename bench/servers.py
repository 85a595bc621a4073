"""Server side of the benchmark: how each target is launched, checked and stopped.

A target is what is measured (our server, or a reference); a server is the ASGI
server it runs under (uvicorn with uvloop and per-message deflate off, or daphne).
Every node is a subprocess in its own session, started here and stopped here by PID.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from devtools.processes import ROOT, OwnedProcess, ProcessError, http_answers

LOG_DIR = Path(__file__).resolve().parent / "results" / "logs"
READY_TIMEOUT_SECS = 60.0
STOP_TIMEOUT_SECS = 10.0
LISTEN_BACKLOG = 2048  # uvicorn's default; daphne (Twisted) would otherwise use 50

SERVERS = ("uvicorn", "daphne")
OURS_APP = "realtime_project.asgi:application"
BARE_APP = "bench.references.bare_hub:app"
CHANNELS_REF_APP = "bench.references.channels_ref.asgi:application"
RUNNODE_TEMPLATE = "{python} manage.py runnode --server {server} --host {host} --port {port}"


class ServerStartError(ProcessError):
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
    serves_pusher: bool = False  # serves /app/<key> (pusher_fanout needs it)

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
    owned: OwnedProcess

    @property
    def pid(self) -> int:
        return self.owned.pid

    @property
    def log_path(self) -> Path:
        return self.owned.log_path


def start_node(target: Target, server: str, host: str, port: int, multi_node: bool) -> Node:
    """Start one node and wait until it answers HTTP; raise with its log if not.

    In a session of its own, so stopping it signals its process group (children too);
    any HTTP answer will do, as the references have no /health.
    """
    env = {**os.environ, **target.env, **(target.multi_node_env if multi_node else {})}
    env["PYTHONPATH"] = str(ROOT)
    owned = OwnedProcess(
        f"{target.name}/{server}",
        port,
        target.command(server, host, port),
        LOG_DIR / f"{target.name}-{server}-{port}.log",
        lambda: http_answers(host, port),
        env=env,
        start_timeout_secs=READY_TIMEOUT_SECS,
        stop_timeout_secs=STOP_TIMEOUT_SECS,
        dies_with_us=False,
    )
    owned.log_path.unlink(missing_ok=True)  # one run's log per file
    try:
        owned.start()
    except ProcessError as exc:
        raise ServerStartError(str(exc)) from exc
    return Node(target.name, server, host, port, owned)


def stop_node(node: Node) -> None:
    """SIGTERM the node's process group (its PID), then SIGKILL if it lingers."""
    node.owned.stop(signal.SIGTERM)


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
