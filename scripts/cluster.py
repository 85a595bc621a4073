"""Local cluster: N daphne nodes behind nginx, all on loopback, every process recorded.

    python scripts/cluster.py start --nodes 3 --port 8080   # make cluster N=3
    python scripts/cluster.py status
    python scripts/cluster.py stop                          # make cluster-stop

The cluster itself is ``devtools/cluster.py`` (the fault tests drive it too); this is
its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a file (``python scripts/cluster.py``), Python puts scripts/ on the path, not
# the repository that holds devtools/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.cluster import (
    DEFAULT_NODES,
    DEFAULT_PROXY_PORT,
    DEFAULT_RUNTIME_DIR,
    STOP_TIMEOUT_SECS,
    Cluster,
)
from devtools.processes import ProcessError


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
    except ProcessError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
