"""Local cluster: N daphne nodes behind nginx, all on loopback, every process recorded.

    python scripts/cluster.py start --nodes 3 --port 8080   # make cluster N=3
    python scripts/cluster.py status
    python scripts/cluster.py stop                          # make cluster-stop

The nodes run ``manage.py runnode --server daphne --proxy-headers`` against DATABASE_URL
and REDIS_URL from the environment, each on a free loopback port. nginx runs from a
prefix of its own under the runtime directory (``.cluster/`` by default: config, pid
file, temp paths, logs), so it never touches the system's nginx. The shared server
block is ``deploy/nginx/push.conf``; this script writes the upstream and the main
config around it.

Every process started is written to ``state.json`` with its PID and kernel start time;
``stop`` signals exactly those (SIGTERM, so nodes drain and nginx stops, then SIGKILL
for whatever is left), and a recycled PID is never signalled because its start time
differs. The ``Cluster`` class is what the fault tests (``tests/faults``) drive.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNTIME_DIR = ROOT / ".cluster"
PUSH_CONF = ROOT / "deploy" / "nginx" / "push.conf"
PUSH_CONF_LISTEN = re.compile(r"^(\s*)listen 8080;\s*$", re.MULTILINE)
DEFAULT_NODES = 3
DEFAULT_PROXY_PORT = 8080
HOST = "127.0.0.1"

START_TIMEOUT_SECS = 45.0
# Above the nodes' default PUSH_DRAIN_DEADLINE_SECS (20 s): a draining node gets to
# finish before it is killed.
STOP_TIMEOUT_SECS = 30.0
POLL_SECS = 0.1

# One process may hold at most this many files on the machines this runs on; nginx's
# workers hold two per proxied WebSocket (client and node), so 16,384 connections per
# worker are about 8,000 WebSockets each.
MAX_OPEN_FILES = 20_000
WORKER_CONNECTIONS = 16_384

NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """Raised when the cluster cannot be started or a process does not come up."""


# ----- processes, identified by PID and kernel start time ----------------------------------


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
    """One process this cluster started: what it is, and how to recognise it later."""

    role: str  # "node", "nginx" (the master) or "nginx-worker"
    name: str
    pid: int
    start_ticks: int
    port: int | None = None

    @classmethod
    def of(cls, role: str, name: str, pid: int, port: int | None = None) -> ProcessRecord:
        ticks = process_start_ticks(pid)
        if ticks is None:
            raise ClusterError(f"{name} (pid {pid}) exited right after it started")
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
    command: list[str], env: Mapping[str, str], log_path: Path, *, death_signal: int | None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own, output appended to ``log_path``.

    Its own session: a Ctrl-C in the terminal that ran `make cluster` does not reach it.
    ``death_signal`` (tests): the kernel sends it when our process exits.
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if death_signal is None else (lambda: die_with_parent(death_signal)),
        )


def run_or_fail(command: list[str], env: Mapping[str, str], what: str) -> None:
    """Run a short command to completion; its error output in the exception if it fails."""
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    if result.returncode != 0:
        raise ClusterError(f"{what} failed:\n{result.stderr[-2000:]}")


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
    deadline = time.monotonic() + timeout_secs
    while time.monotonic() < deadline:
        if alive is not None and not alive.is_alive():
            raise ClusterError(f"{alive.name} exited before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - our URL
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise ClusterError(f"{url} did not answer 200 within {timeout_secs:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# ----- state ----------------------------------------------------------------------------------


@dataclass
class ClusterState:
    proxy_port: int
    processes: list[ProcessRecord] = field(default_factory=list)

    def nodes(self) -> list[ProcessRecord]:
        return [record for record in self.processes if record.role == "node"]

    def replace(self, record: ProcessRecord) -> None:
        self.processes = [p for p in self.processes if p.name != record.name] + [record]

    @classmethod
    def load(cls, path: Path) -> ClusterState | None:
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        processes = [ProcessRecord(**record) for record in raw["processes"]]
        return cls(proxy_port=raw["proxy_port"], processes=processes)

    def save(self, path: Path) -> None:
        # Written whole and renamed, so a stop never reads half a file.
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        temporary.replace(path)


# ----- nginx configuration --------------------------------------------------------------------


def open_files_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(MAX_OPEN_FILES, hard if hard != resource.RLIM_INFINITY else MAX_OPEN_FILES)


def upstream_config(node_ports: Iterable[int]) -> str:
    servers = "".join(
        f"    server {HOST}:{port} max_fails=1 fail_timeout=5s;\n" for port in node_ports
    )
    # least_conn: after a node dies its clients spread over the others, and a node that
    # comes back gets the next connections instead of waiting for its turn.
    return (
        "# Generated by scripts/cluster.py: this cluster's nodes.\n"
        f"upstream push_nodes {{\n    least_conn;\n{servers}}}\n"
    )


def local_push_conf(proxy_port: int) -> str:
    """deploy/nginx/push.conf with only its listen line changed: loopback and our port."""
    text = PUSH_CONF.read_text()
    if len(PUSH_CONF_LISTEN.findall(text)) != 1:
        raise ClusterError(f"{PUSH_CONF} must have exactly one 'listen 8080;' line")
    return PUSH_CONF_LISTEN.sub(rf"\g<1>listen {HOST}:{proxy_port};", text)


def main_config(prefix: Path) -> str:
    nofile = open_files_limit()
    connections = min(WORKER_CONNECTIONS, nofile - 1024)
    temp_paths = "".join(
        f"    {name}_temp_path {prefix / 'temp' / name};\n" for name in NGINX_TEMP_PATHS
    )
    return f"""# Generated by scripts/cluster.py for the local cluster; the server block is
# deploy/nginx/push.conf (copied with only its listen line changed).
worker_processes auto;
worker_rlimit_nofile {nofile};
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;

events {{
    worker_connections {connections};
}}

http {{
{temp_paths}    include {prefix / "conf" / "upstream.conf"};
    include {prefix / "conf" / "push.conf"};
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found
    # Debian's package; its own service is never started or touched by this script.
    print("cluster: installing nginx from Debian's packages", file=sys.stderr)
    as_root = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*as_root, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*as_root, "apt-get", "install", "-y", "-qq", "nginx"], check=True, env=env)
    return shutil.which("nginx") or "/usr/sbin/nginx"


# ----- the cluster ----------------------------------------------------------------------------


class Cluster:
    """N nodes and nginx, started, inspected, hurt and stopped by PID.

    ``tie_to_parent`` (tests): every process is also killed by the kernel when the
    process that started it exits, and nginx runs in the foreground as our child, so
    nothing outlives a test run that was itself killed.
    """

    def __init__(
        self,
        runtime_dir: Path = DEFAULT_RUNTIME_DIR,
        env: Mapping[str, str] | None = None,
        *,
        tie_to_parent: bool = False,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.env = dict(os.environ if env is None else env)
        self.tie_to_parent = tie_to_parent
        self.state_path = runtime_dir / "state.json"
        self.log_dir = runtime_dir / "logs"
        self.prefix = runtime_dir / "nginx"
        self.state = ClusterState.load(self.state_path)
        # Our own children, so the ones that exit are reaped rather than left as zombies.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ----- addresses --------------------------------------------------------------------

    @property
    def proxy_url(self) -> str:
        return f"http://{HOST}:{self._state().proxy_port}"

    @property
    def proxy_ws_url(self) -> str:
        """The WebSocket endpoint, through nginx."""
        return self.proxy_url.replace("http://", "ws://", 1) + "/ws/"

    def node_records(self) -> list[ProcessRecord]:
        return self._state().nodes()

    def node_url(self, name: str) -> str:
        return f"http://{HOST}:{self._record(name).port}"

    # ----- start ------------------------------------------------------------------------

    def start(self, *, nodes: int = DEFAULT_NODES, proxy_port: int = DEFAULT_PROXY_PORT) -> None:
        if self.state is not None and any(p.is_alive() for p in self.state.processes):
            raise ClusterError(f"a cluster is already running ({self.state_path}); stop it first")
        self._prepare_directories()
        self._migrate()
        self.state = ClusterState(proxy_port=proxy_port)
        try:
            self._start_nodes([(f"node-{i}", free_port()) for i in range(1, nodes + 1)])
            self.start_nginx()
        except BaseException:
            self.stop(timeout_secs=5.0)
            raise

    def _prepare_directories(self) -> None:
        for directory in (self.log_dir, self.prefix / "conf", self.prefix / "logs"):
            directory.mkdir(parents=True, exist_ok=True)
        for name in NGINX_TEMP_PATHS:
            (self.prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
        self._ensure_secret_key()

    def _ensure_secret_key(self) -> None:
        # A cluster without DEBUG needs a SECRET_KEY shared by all its nodes (sessions,
        # signed subscription tokens): made once, kept with the cluster.
        if self.env.get("SECRET_KEY") or self.env.get("DEBUG", "").lower() in ("1", "true"):
            return
        key_path = self.runtime_dir / "secret_key"
        if not key_path.exists():
            key_path.write_text(secrets.token_urlsafe(50))
            key_path.chmod(0o600)
        self.env["SECRET_KEY"] = key_path.read_text().strip()

    def _ensure_database(self) -> None:
        """Create the PostgreSQL database DATABASE_URL names if it does not exist yet."""
        import dj_database_url
        import psycopg

        config = dj_database_url.parse(self.env["DATABASE_URL"])
        if "postgresql" not in config["ENGINE"]:
            return
        with psycopg.connect(
            host=config.get("HOST") or HOST,
            port=int(config.get("PORT") or 5432),
            user=config.get("USER") or "postgres",
            password=config.get("PASSWORD") or None,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            name = config["NAME"]
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(
                    psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name))
                )

    def _migrate(self) -> None:
        self._ensure_database()
        run_or_fail([sys.executable, "manage.py", "migrate", "--no-input"], self.env, "migrate")

    def _start_nodes(self, names_and_ports: list[tuple[str, int]]) -> None:
        # All at once, then wait: Django's start-up is most of a node's start time.
        started = [self._spawn_node(name, port) for name, port in names_and_ports]
        for record in started:
            wait_for_http(f"http://{HOST}:{record.port}/health", START_TIMEOUT_SECS, alive=record)

    def _spawn_node(self, name: str, port: int) -> ProcessRecord:
        # A new NODE_ID on every start: a restarted node is a new member of the cluster,
        # and the others close the dead one's connections in the registry.
        env = {**self.env, "NODE_ID": f"{name}-{uuid.uuid4().hex[:6]}"}
        command = [
            sys.executable,
            "manage.py",
            "runnode",
            "--server",
            "daphne",
            "--proxy-headers",
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        process = self._spawn(command, env, self.log_dir / f"{name}.log", signal.SIGKILL)
        record = ProcessRecord.of("node", name, process.pid, port)
        self._state().replace(record)
        self._save()
        return record

    def _spawn(
        self, command: list[str], env: Mapping[str, str], log_path: Path, death_signal: int
    ) -> subprocess.Popen[bytes]:
        process = spawn(
            command, env, log_path, death_signal=death_signal if self.tie_to_parent else None
        )
        self._children[process.pid] = process
        return process

    def start_nginx(self) -> None:
        state = self._state()
        conf_dir = self.prefix / "conf"
        (conf_dir / "upstream.conf").write_text(upstream_config(n.port for n in state.nodes()))
        (conf_dir / "push.conf").write_text(local_push_conf(state.proxy_port))
        (conf_dir / "nginx.conf").write_text(main_config(self.prefix))
        binary = nginx_binary()
        self._check_nginx_config(binary)
        master = self._launch_nginx(binary)
        state.replace(master)
        self._save()
        wait_for_http(f"{self.proxy_url}/health", START_TIMEOUT_SECS, alive=master)
        self._record_nginx_workers(master)

    def _nginx_command(self, binary: str, *extra: str) -> list[str]:
        return [
            binary,
            "-p",
            f"{self.prefix}/",
            "-c",
            str(self.prefix / "conf" / "nginx.conf"),
            "-e",
            str(self.prefix / "logs" / "error.log"),
            *extra,
        ]

    def _check_nginx_config(self, binary: str) -> None:
        run_or_fail(self._nginx_command(binary, "-t", "-q"), self.env, "nginx -t")

    def _launch_nginx(self, binary: str) -> ProcessRecord:
        # nginx's stdout is the access log (push.conf logs to /dev/stdout, as in a
        # container). Tests keep the master as our child, in the foreground; otherwise
        # it daemonizes and the pid file names the master.
        access_log = self.prefix / "logs" / "access.log"
        pid_file = self.prefix / "nginx.pid"
        pid_file.unlink(missing_ok=True)
        daemon = "off" if self.tie_to_parent else "on"
        command = self._nginx_command(binary, "-g", f"daemon {daemon};")
        process = self._spawn(command, self.env, access_log, signal.SIGTERM)
        if self.tie_to_parent:
            return ProcessRecord.of("nginx", "nginx", process.pid, self._state().proxy_port)
        if process.wait(timeout=30) != 0:
            raise ClusterError(f"nginx did not start; see {self.prefix / 'logs' / 'error.log'}")
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(POLL_SECS)
        master_pid = int(pid_file.read_text().strip())
        return ProcessRecord.of("nginx", "nginx", master_pid, self._state().proxy_port)

    def _record_nginx_workers(self, master: ProcessRecord) -> None:
        # The workers too: if the master had to be killed, they would be left holding
        # the port, and stop must find them.
        for index, pid in enumerate(child_pids(master.pid), start=1):
            ticks = process_start_ticks(pid)
            if ticks is not None:
                worker = ProcessRecord("nginx-worker", f"nginx-worker-{index}", pid, ticks)
                self._state().replace(worker)
        self._save()

    # ----- faults and restarts ----------------------------------------------------------

    def signal_node(self, name: str, sig: int = signal.SIGKILL, *, wait_secs: float = 10.0) -> None:
        """Send ``sig`` to one node and wait until it has exited."""
        record = self._record(name)
        record.signal(sig)
        if wait_until_gone([record], wait_secs):
            raise ClusterError(f"{name} still runs {wait_secs:.0f} s after signal {sig}")
        self._reap()

    def restart_node(self, name: str) -> None:
        """Start a node again on its own port (after it was killed or stopped)."""
        record = self._record(name)
        if record.is_alive():
            return
        self._start_nodes([(name, int(record.port or 0))])

    def restart_dead(self) -> list[str]:
        """Start every recorded node and nginx that is not running; their names."""
        dead = [record for record in self.node_records() if not record.is_alive()]
        self._start_nodes([(record.name, int(record.port or 0)) for record in dead])
        restarted = [record.name for record in dead]
        master = self._record("nginx")
        if not master.is_alive():
            self.start_nginx()
            restarted.append("nginx")
        return restarted

    # ----- stop and status --------------------------------------------------------------

    def stop(self, *, timeout_secs: float = STOP_TIMEOUT_SECS) -> list[str]:
        """SIGTERM every recorded process, wait, SIGKILL what is left; the killed ones."""
        if self.state is None:
            return []
        records = self._with_current_nginx_workers(self.state.processes)
        for record in records:
            # Workers go with their master; they are only killed below if it failed.
            if record.role != "nginx-worker":
                record.signal(signal.SIGTERM)
        left = wait_until_gone(records, timeout_secs)
        for record in left:
            record.signal(signal.SIGKILL)
        wait_until_gone(left, 5.0)
        self._reap()
        self.state_path.unlink(missing_ok=True)
        self.state = None
        return [record.name for record in left]

    def _with_current_nginx_workers(self, records: list[ProcessRecord]) -> list[ProcessRecord]:
        # A worker the master started after a crash is not in the state file yet.
        current = list(records)
        known = {record.pid for record in records}
        for master in (r for r in records if r.role == "nginx" and r.is_alive()):
            for pid in child_pids(master.pid):
                ticks = process_start_ticks(pid)
                if pid not in known and ticks is not None:
                    current.append(ProcessRecord("nginx-worker", f"nginx-worker-{pid}", pid, ticks))
        return current

    def status(self) -> list[tuple[ProcessRecord, bool]]:
        if self.state is None:
            return []
        return [(record, record.is_alive()) for record in self.state.processes]

    # ----- helpers ----------------------------------------------------------------------

    def _state(self) -> ClusterState:
        if self.state is None:
            raise ClusterError(f"no cluster recorded in {self.state_path}")
        return self.state

    def _record(self, name: str) -> ProcessRecord:
        for record in self._state().processes:
            if record.name == name:
                return record
        raise ClusterError(f"no process named {name!r} in this cluster")

    def _save(self) -> None:
        self._state().save(self.state_path)

    def _reap(self) -> None:
        for pid, process in list(self._children.items()):
            if process.poll() is not None:
                del self._children[pid]


# ----- command line ---------------------------------------------------------------------------


def _print_status(cluster: Cluster) -> bool:
    rows = cluster.status()
    if not rows:
        print(f"no cluster recorded in {cluster.state_path}")
        return False
    for record, alive in rows:
        where = f" port {record.port}" if record.port else ""
        print(f"{record.name:16} pid {record.pid:<8} {'up' if alive else 'DOWN'}{where}")
    print(f"proxy: {cluster.proxy_url}  (WebSocket {cluster.proxy_ws_url})")
    return all(alive for _, alive in rows)


def _command_start(cluster: Cluster, args: argparse.Namespace) -> int:
    for variable in ("DATABASE_URL", "REDIS_URL"):
        if not cluster.env.get(variable):
            print(f"cluster: {variable} must be set (the nodes share it)", file=sys.stderr)
            return 2
    cluster.start(nodes=args.nodes, proxy_port=args.port)
    _print_status(cluster)
    print(f"logs: {cluster.log_dir} and {cluster.prefix / 'logs'}; stop with: make cluster-stop")
    return 0


def _command_stop(cluster: Cluster, args: argparse.Namespace) -> int:
    if cluster.state is None:
        print(f"no cluster recorded in {cluster.state_path}")
        return 0
    killed = cluster.stop(timeout_secs=args.timeout)
    print("cluster stopped" + (f" (killed after {args.timeout:.0f} s: {killed})" if killed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="migrate, start N nodes and nginx")
    start.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    start.add_argument("--port", type=int, default=DEFAULT_PROXY_PORT, help="nginx's port")
    stop = commands.add_parser("stop", help="stop exactly the processes started")
    stop.add_argument("--timeout", type=float, default=STOP_TIMEOUT_SECS)
    commands.add_parser("status", help="which recorded processes run")
    args = parser.parse_args(argv)

    cluster = Cluster(args.runtime_dir.resolve())
    try:
        if args.command == "start":
            return _command_start(cluster, args)
        if args.command == "stop":
            return _command_stop(cluster, args)
        return 0 if _print_status(cluster) else 1
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
