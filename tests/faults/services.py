"""The TCP proxy the fault tests put in front of PostgreSQL: stopped, the database is
unreachable for the nodes behind it; started again on the same port, it is back. The
process itself is a ``devtools.processes.OwnedProcess`` like the tests' redis-server."""

from __future__ import annotations

import sys
from pathlib import Path

from devtools.processes import OwnedProcess, port_accepts

HERE = Path(__file__).resolve().parent


def tcp_proxy(listen_port: int, target_host: str, target_port: int, log_dir: Path) -> OwnedProcess:
    command = [
        sys.executable,
        str(HERE / "tcp_proxy.py"),
        *("--listen-port", str(listen_port)),
        *("--target-host", target_host, "--target-port", str(target_port)),
    ]
    return OwnedProcess(
        "tcp-proxy",
        listen_port,
        command,
        log_dir / "tcp_proxy.log",
        lambda: port_accepts(listen_port),
    )
