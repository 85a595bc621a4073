"""Command line of the benchmark: choose scenarios, servers and targets; run; report.

    python -m bench [--scenario NAME ...] [--server uvicorn|daphne|both] [--quick]

Order of a run: the scenarios that need no server (``db_floor``), once; then for each
server, for each target, every other chosen scenario (each one starts and stops its own
nodes); then the table, the ratios to the references, one JSON line on stdout, and the
same document in bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench.delta import DELTA_RUNNERS
from bench.measure import RunContext
from bench.options import ALL_SCENARIOS, SERVERLESS_SCENARIOS, Options, apply_quick
from bench.pool import WorkerError, WorkerPool
from bench.procinfo import raise_fd_limit
from bench.publishing import PUBLISH_RUNNERS, db_floor
from bench.report import (
    check_publish_targets,
    compare_pusher_to_fanout,
    compare_slow_to_fanout,
    compute_ratios,
    format_publish_targets,
    format_pusher_comparison,
    format_ratios,
    format_slow_comparison,
    format_table,
    json_line,
    write_results,
)
from bench.scenarios import SCENARIOS, Row
from bench.servers import SERVERS, ServerStartError, Target
from bench.targets import TARGET_NAMES, TargetSetupError, build_targets

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _latency_points(text: str) -> list[tuple[int, float]]:
    points = []
    for part in text.split(","):
        count, rate = part.split("@")
        points.append((int(count), float(rate)))
    return points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "--scenario",
        action="append",
        choices=ALL_SCENARIOS,
        help="repeatable; default: all but scale_100k, delta, pusher_fanout, sse_*, slow_*",
    )
    add("--server", choices=(*SERVERS, "both"), default="both")
    add(
        "--target",
        action="append",
        choices=TARGET_NAMES,
        help="repeatable; default: all three",
    )
    add(
        "--quick",
        action="store_true",
        help="a small smoke run, about a minute per target",
    )
    add("--format", dest="fmt", default="json", help="wire format: json, msgpack or protobuf")
    add("--workers", type=int, help="subscriber worker processes (default 2)")
    add("--idle-connections", type=int)
    add("--fanout-sweep", type=_int_list, help="e.g. 1000,2500,5000")
    add("--fanout-secs", type=float)
    add("--latency-points", type=_latency_points, help="e.g. 1000@10,5000@2")
    add("--latency-secs", type=float)
    add("--many-connections", type=int)
    add("--many-channels", type=int)
    add("--rest-subscribers", type=int)
    add("--two-node-subscribers", type=int)
    add("--publish-connections", type=int, help="publish scenarios, db_floor: K (16)")
    add("--publish-inflight", type=int, help="publish scenarios: W per WebSocket (8)")
    add("--publish-channels", type=int, help="publish scenarios, db_floor: C (64)")
    add("--publish-secs", type=float, help="publish scenarios, db_floor: per step (8)")
    add("--publish-fixed-rate", type=float, help="publish scenarios: fixed point (2000/s)")
    add("--publish-batch", type=int, help="publish_rest: messages per batch (100)")
    add("--scale-connections", type=int)
    add("--stalled-fraction", type=float, help="slow_ scenarios: stalled per healthy (0.01)")
    add("--stalled-min", type=int, help="slow_ scenarios: at least this many stalled (10)")
    add("--slow-secs", type=float, help="slow_ scenarios: longest flood (30)")
    add("--slow-queue-frames", type=int, help="slow_ scenarios: server's send queue frames")
    add("--slow-queue-bytes", type=int, help="slow_ scenarios: server's send queue bytes")
    add("--window", type=int, help="max-rate mode: messages not yet seen by the probe")
    add(
        "--lane-rate",
        type=float,
        help="publishes/s per publishing connection, 0 = no cap",
    )
    add("--payload-bytes", type=int)
    add("--delta-subscribers", type=int, help="delta: subscribers (1000)")
    add("--delta-messages", type=int, help="delta: ~5 KB states published per step (100)")
    add("--delta-rate", type=float, help="delta: states published per second (5)")
    add("--base-port", type=int)
    add("--database-url")
    add("--redis-url")
    add("--redis-prefix", help="REDIS_PREFIX of our nodes (default pushbench)")
    add(
        "--ours-command",
        help="'runnode' (default), 'raw' (uvicorn/daphne on the ASGI app) "
        "or a template with {python} {server} {host} {port} {app}",
    )
    add(
        "--results",
        help="where to write the JSON document (default bench/results/latest.json)",
    )
    return parser


OPTION_FLAGS = {
    "fmt": "fmt",
    "workers": "subscriber_workers",
    "idle_connections": "idle_connections",
    "fanout_sweep": "fanout_sweep",
    "fanout_secs": "fanout_secs",
    "latency_points": "latency_points",
    "latency_secs": "latency_secs",
    "many_connections": "many_connections",
    "many_channels": "many_channels",
    "rest_subscribers": "rest_subscribers",
    "two_node_subscribers": "two_node_subscribers",
    "publish_connections": "publish_connections",
    "publish_inflight": "publish_inflight",
    "publish_channels": "publish_channels",
    "publish_secs": "publish_secs",
    "publish_fixed_rate": "publish_fixed_rate",
    "publish_batch": "publish_batch",
    "scale_connections": "scale_connections",
    "stalled_fraction": "stalled_fraction",
    "stalled_min": "stalled_min",
    "slow_secs": "slow_secs",
    "slow_queue_frames": "slow_queue_frames",
    "slow_queue_bytes": "slow_queue_bytes",
    "window": "window",
    "lane_rate": "lane_rate",
    "payload_bytes": "payload_bytes",
    "delta_subscribers": "delta_subscribers",
    "delta_messages": "delta_messages",
    "delta_rate": "delta_rate",
    "base_port": "base_port",
    "database_url": "database_url",
    "redis_url": "redis_url",
    "redis_prefix": "redis_prefix",
    "ours_command": "ours_command",
    "results": "results_path",
}


def options_from(args: argparse.Namespace) -> Options:
    options = Options()
    if args.quick:
        apply_quick(options)
    if args.scenario:
        options.scenarios = list(dict.fromkeys(args.scenario))
    if args.target:
        options.targets = list(dict.fromkeys(args.target))
    options.servers = list(SERVERS) if args.server == "both" else [args.server]
    for flag, field_name in OPTION_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(options, field_name, value)
    return options


def _prepare_targets(options: Options) -> tuple[list[Target], list[Row]]:
    """Build every target; one that cannot be prepared becomes a failed row."""
    targets, failures = [], []
    for name in options.targets:
        try:
            targets += build_targets(
                [name],
                database_url=options.database_url,
                redis_url=options.redis_url,
                ours_command=options.ours_command,
                redis_prefix=options.redis_prefix,
            )
        except TargetSetupError as exc:
            print(f"[bench] skipping {name}: {exc}", file=sys.stderr)
            failures.append(
                {
                    "scenario": "setup",
                    "step": "-",
                    "server": "-",
                    "target": name,
                    "error": str(exc).splitlines()[0],
                }
            )
    return targets, failures


def _run_scenario(ctx: RunContext, name: str) -> list[Row]:
    started = time.monotonic()
    print(
        f"[bench] {ctx.server} {ctx.target.name} {name} ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        rows = RUNNERS[name](ctx)
    except (ServerStartError, WorkerError, OSError) as exc:
        print(f"[bench]   failed: {exc}", file=sys.stderr, flush=True)
        rows = [
            {
                "scenario": name,
                "step": "-",
                "server": ctx.server,
                "target": ctx.target.name,
                "error": str(exc).splitlines()[0][:200],
            }
        ]
        if isinstance(exc, WorkerError):
            raise _PoolBroken(rows) from exc
    for row in rows:
        row["elapsed_s"] = round(time.monotonic() - started, 1)
    return rows


class _PoolBroken(Exception):
    """Raised when a worker timed out: its late answers would confuse the next step."""

    def __init__(self, rows: list[Row]) -> None:
        super().__init__("worker pool broken")
        self.rows = rows


RUNNERS = {**SCENARIOS, **PUBLISH_RUNNERS, **DELTA_RUNNERS}


def _run_serverless(options: Options, tag: str) -> list[Row]:
    rows: list[Row] = []
    if "db_floor" in options.scenarios:
        print("[bench] db_floor (pgbench) ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        rows += db_floor(options, tag)
        for row in rows:
            row["elapsed_s"] = round(time.monotonic() - started, 1)
    return rows


def run(options: Options) -> list[Row]:
    targets, rows = _prepare_targets(options)
    tag = f"{int(time.time()) % 1_000_000:06d}"
    rows += _run_serverless(options, tag)
    scenarios = [name for name in options.scenarios if name not in SERVERLESS_SCENARIOS]
    pool = WorkerPool(options.subscriber_workers)
    step = 0
    try:
        for server in options.servers:
            for target in targets:
                ctx = RunContext(options, target, server, pool, tag)
                for name in scenarios:
                    # Fresh channel names per scenario: seqs in Redis or Postgres persist.
                    step += 1
                    ctx.tag = f"{tag}s{step}"
                    try:
                        rows += _run_scenario(ctx, name)
                    except _PoolBroken as broken:
                        rows += broken.rows
                        pool.close()
                        pool = WorkerPool(options.subscriber_workers)
                        ctx.pool = pool
    finally:
        pool.close()
    return rows


def _document(options: Options, rows: list[Row], ratios: list[Row], wall: float) -> dict[str, Any]:
    return {
        "bench": "push-server",
        "version": 1,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_secs": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "options": {
            key: value for key, value in vars(options).items() if key not in ("database_url",)
        },
        "rows": rows,
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    options = options_from(build_parser().parse_args(argv))
    raise_fd_limit()
    started = time.monotonic()
    rows = run(options)
    ratios = compute_ratios(rows)
    print(format_table(rows))
    print()
    print(format_ratios(ratios))
    document = _document(options, rows, ratios, time.monotonic() - started)
    slow = compare_slow_to_fanout(rows)
    if slow:
        print()
        print(format_slow_comparison(slow))
        document["slow_consumer_vs_fanout"] = slow
    beside = compare_pusher_to_fanout(rows)
    if beside:
        print()
        print(format_pusher_comparison(beside))
        document["pusher_vs_fanout"] = beside
    checks = check_publish_targets(rows, ratios)
    if checks:
        print()
        print(format_publish_targets(checks))
        document["publish_targets"] = checks
    print(json_line(document))
    write_results(
        Path(options.results_path) if options.results_path else DEFAULT_RESULTS,
        document,
    )
    return 1 if any(row.get("error") for row in rows) else 0
