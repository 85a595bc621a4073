"""Processes started from outside the server: launched with their output in a log,
waited for until they answer, and stopped by PID.

One module for every place that starts one: ``scripts/cluster.py`` (``make cluster``
and the fault tests' cluster), ``tests/servers.py`` (end-to-end nodes),
``tests/faults/services.py`` (redis-server, the TCP proxy) and ``bench/servers.py``.
A process is only ever signalled by the PID it was started with (and, for one that
leads a session of its own, the process group that PID leads), never by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POLL_SECS = 0.1
START_TIMEOUT_SECS = 15.0
STOP_TIMEOUT_SECS = 10.0
LOG_TAIL_BYTES = 2_000
PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """Raised when a process exits before it answers, does not answer in time, or a
    short command fails."""


# ----- ports and answers ----------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_secs: float = 1.0) -> bool:
    """Whether ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_secs) as response:  # noqa: S310 - ours
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def http_answers(host: str, port: int, path: str = "/health") -> bool:
    """Whether ``host:port`` speaks HTTP at all, whatever the status (the benchmark's
    reference servers have no /health)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def log_tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return data[-size:].decode(errors="replace")


# ----- commands ---------------------------------------------------------------------------


def runnode_command(server: str, port: int, *args: str, host: str | None = None) -> list[str]:
    """``manage.py runnode``: one node of ours under ``server`` (daphne or uvicorn)."""
    where = ["--host", host] if host else []
    return [
        *(sys.executable, "manage.py", "runnode", "--server", server),
        *where,
        *("--port", str(port)),
        *args,
    ]


def redis_server_command(port: int, work_dir: Path, *extra: str) -> list[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    return [
        binary,
        *("--port", str(port), "--bind", HOST),
        # Nothing on disk, as the machine's own Redis: a restart comes back empty.
        *("--save", "", "--appendonly", "no", "--dir", str(work_dir)),
        *extra,
    ]


def run_or_fail(
    command: list[str], env: Mapping[str, str], what: str, *, timeout_secs: float = 180.0
) -> str:
    """Run a short command to completion; its output, or its error output in the
    exception if it fails."""
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_secs,
        check=False,
    )
    if result.returncode != 0:
        raise ProcessError(f"{what} failed:\n{result.stderr[-LOG_TAIL_BYTES:]}")
    return result.stdout


def manage(env: Mapping[str, str], *args: str, timeout_secs: float = 180.0) -> str:
    """Run ``manage.py`` with ``args`` to completion; its output."""
    command = [sys.executable, "manage.py", *args]
    return run_or_fail(command, env, f"manage.py {' '.join(args)}", timeout_secs=timeout_secs)


# ----- starting ---------------------------------------------------------------------------


def die_with_parent(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (tests).

    Strictly, when the parent's *thread* that started it exits: start tied processes
    from a thread that lives as long as they should (not from ``asyncio.to_thread``).
    """
    parent = os.getppid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def spawn(
    command: list[str],
    env: Mapping[str, str],
    log_path: Path,
    *,
    death_signal: int | None,
    own_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``command`` from the repository root, output appended to ``log_path``.

    ``own_session``: a Ctrl-C in the terminal that started it does not reach it, and
    the process group it leads holds its children. ``death_signal`` (tests): the kernel
    sends it when our process exits.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
            preexec_fn=None if death_signal is None else (lambda: die_with_parent(death_signal)),
        )


@dataclass(eq=False)
class OwnedProcess:
    """One process we start as our child: ``start`` waits until it answers, ``stop``
    signals its PID (its process group, when it leads one) and waits for it."""

    name: str
    port: int
    command: list[str]
    log_path: Path
    answers: Callable[[], bool]
    env: Mapping[str, str] | None = None  # None: ours, read at launch
    start_timeout_secs: float = START_TIMEOUT_SECS
    stop_timeout_secs: float = STOP_TIMEOUT_SECS
    # The kernel kills it with SIGKILL when the thread that launched it exits (tests).
    dies_with_us: bool = True
    own_session: bool = True
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ProcessError(f"{self.name} was never started")
        return self.process.pid

    def start(self) -> OwnedProcess:
        self.launch()
        self.wait_answering()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it. With ``dies_with_us``, call it on
        the thread that will outlive it: the kernel's death signal fires when the
        starting *thread* exits, so a process launched from ``asyncio.to_thread`` would
        die with that worker."""
        self.process = spawn(
            self.command,
            dict(os.environ if self.env is None else self.env),
            self.log_path,
            death_signal=signal.SIGKILL if self.dies_with_us else None,
            own_session=self.own_session,
        )

    def wait_answering(self) -> None:
        """Wait until ``answers``; on exit or timeout, raise with the log's tail."""
        deadline = time.monotonic() + self.start_timeout_secs
        while time.monotonic() < deadline:
            if not self.running:
                code = None if self.process is None else self.process.returncode
                raise ProcessError(f"{self.name} exited ({code}):\n{self.log()}")
            if self.answers():
                return
            time.sleep(POLL_SECS / 2)
        self.stop()
        raise ProcessError(
            f"{self.name} did not answer within {self.start_timeout_secs:.0f} s:\n{self.log()}"
        )

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; SIGKILL if it is still running after the stop timeout."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self._signal(sig)
            try:
                process.wait(self.stop_timeout_secs)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                process.wait(self.stop_timeout_secs)
        if self.own_session:
            # Children that outlived their parent are still in the group it led.
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.own_session:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def log(self) -> str:
        return log_tail(self.log_path)


def redis_server(port: int, work_dir: Path) -> OwnedProcess:
    """A redis-server of the caller's own on ``port``, answering once it pings back."""
    import redis  # only the callers that start one need the client

    def answers() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    command = redis_server_command(port, work_dir)
    return OwnedProcess("redis-server", port, command, work_dir / "redis.log", answers)


# ----- processes found again by PID and kernel start time ---------------------------------


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            children.append(int(entry.name))
    return children


@dataclass
class ProcessRecord:
    """A process started earlier, perhaps by another run of a command (the cluster's
    state file): a recycled PID is never signalled, because its start time differs."""

    role: str
    name: str
    pid: int
    start_ticks: int
    port: int | None = None

    @classmethod
    def of(cls, role: str, name: str, pid: int, port: int | None = None) -> ProcessRecord:
        ticks = process_start_ticks(pid)
        if ticks is None:
            raise ProcessError(f"{name} (pid {pid}) exited right after it started")
        return cls(role=role, name=name, pid=pid, start_ticks=ticks, port=port)

    def is_alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_ticks

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if this is still the process we started; whether it was sent."""
        if not self.is_alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


def wait_until_gone(records: Iterable[ProcessRecord], timeout_secs: float) -> list[ProcessRecord]:
    """Wait for the records' processes to exit; the ones still alive at the deadline."""
    pending = list(records)
    deadline = time.monotonic() + timeout_secs
    while pending and time.monotonic() < deadline:
        pending = [record for record in pending if record.is_alive()]
        if pending:
            time.sleep(POLL_SECS)
    return [record for record in pending if record.is_alive()]


def wait_for_http(url: str, timeout_secs: float, *, alive: ProcessRecord | None = None) -> None:
    """Wait until ``url`` answers 200; raise if ``alive`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_secs
    while time.monotonic() < deadline:
        if alive is not None and not alive.is_alive():
            raise ProcessError(f"{alive.name} exited before answering {url}")
        if http_ok(url):
            return
        time.sleep(0.2)
    raise ProcessError(f"{url} did not answer 200 within {timeout_secs:.0f} s")
