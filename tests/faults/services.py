"""Processes the fault tests own besides the cluster: a redis-server and the TCP proxy
in front of PostgreSQL. Each is started, killed and started again on the same port by
PID, and dies with the test run (the kernel kills it when pytest exits)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from scripts.cluster import spawn

HERE = Path(__file__).resolve().parent
START_TIMEOUT_SECS = 15.0
STOP_TIMEOUT_SECS = 10.0


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(eq=False)
class OwnedProcess:
    """One helper process: ``start`` waits until it answers, ``stop`` kills it by PID."""

    name: str
    port: int
    command: list[str]
    log_path: Path
    answers: Callable[[], bool]
    process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> OwnedProcess:
        self.launch()
        self.wait_answering()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it. Call it on the thread that will
        outlive it: the kernel's death signal fires when the starting *thread* exits,
        so a process launched from ``asyncio.to_thread`` would die with that worker."""
        self.process = spawn(
            self.command, dict(os.environ), self.log_path, death_signal=signal.SIGKILL
        )

    def wait_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECS
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            if self.answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT_SECS:.0f} s")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        self.process.wait(STOP_TIMEOUT_SECS)


def redis_server(port: int, work_dir: Path) -> OwnedProcess:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    command = [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1"),
        # Nothing on disk, as the machine's own Redis: a restart comes back empty.
        *("--save", "", "--appendonly", "no", "--dir", str(work_dir)),
    ]

    def answers() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    return OwnedProcess("redis-server", port, command, work_dir / "redis.log", answers)


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
