"""Measurement steps shared by the scenarios: connect, publish, collect, compute.

A step runs on live nodes and the worker pool; it returns plain numbers. Server
figures are summed over every node's process tree; Redis CPU comes from INFO, since
a design that leans on Redis moves its cost there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis

from bench import pusher
from bench.options import Options
from bench.pool import WorkerPool
from bench.procinfo import Usage, usage_of
from bench.publisher import MAX_LANES, PublishOutcome, PublishSpec
from bench.servers import Node, Target, start_nodes, stop_nodes
from bench.stats import DeliveryStats, merge_all
from bench.subscriber import SubscribeSpec

DELIVERY_CEILING_PER_SEC = 200_000  # sizes the publisher lanes; above any server here
CONNECT_TIMEOUT_PER_CONN_SECS = 0.05
CONNECT_TIMEOUT_MIN_SECS = 60.0
COMMAND_SLACK_SECS = 60.0
TRANSPORT_PATHS = {"ws": "/ws/", "sse": "/sse/", "pusher": pusher.PATH}
WATCH_INTERVAL_SECS = 0.25
MIB = 1024 * 1024

# Called every WATCH_INTERVAL_SECS while a publish phase runs; True ends the phase.
Watch = Callable[[], bool]
Row = dict[str, Any]


@dataclass
class RunContext:
    """One target under one server, with the client workers that drive it."""

    options: Options
    target: Target
    server: str
    pool: WorkerPool
    tag: str
    port_cursor: int = 0

    def next_ports(self, count: int) -> int:
        """First of ``count`` fresh ports, so no phase meets a previous one's sockets."""
        first = self.options.base_port + self.port_cursor
        self.port_cursor = (self.port_cursor + count) % 400
        return first

    def channel(self, name: str) -> str:
        return f"bench-{self.tag}-{name}"


@dataclass
class ConnectResult:
    """How a connect phase went."""

    opened: int
    failures: dict[str, int]
    elapsed_secs: float

    @property
    def rate_per_sec(self) -> float:
        return self.opened / self.elapsed_secs if self.elapsed_secs > 0 else 0.0


def connect_subscribers(
    ctx: RunContext,
    ports: list[int],
    channels: list[str],
    count: int,
    local_hosts: tuple[str, ...] = (),
    *,
    transport: str = "ws",
    base_seqs: dict[str, int] | None = None,
    stall: bool = False,
) -> ConnectResult:
    """Open ``count`` subscribed connections spread over the subscriber workers.

    ``transport="sse"`` opens Server-Sent Events streams instead of WebSockets, each
    resuming after its channel's seq in ``base_seqs`` (0 when absent); ``"pusher"``
    Pusher-protocol WebSockets, counting from that seq. ``stall=True``
    opens stalled ones: they stop reading once subscribed, and are counted apart."""
    workers = ctx.pool.subscriber_count
    calls: dict[int, dict[str, Any]] = {}
    offset = 0
    for index in range(workers):
        share = count // workers + (1 if index < count % workers else 0)
        spec = SubscribeSpec(
            host=ctx.options.host,
            port=ports[0],
            path=TRANSPORT_PATHS[transport],
            channels=channels,
            count=share,
            offset=offset,
            concurrency=ctx.options.connect_concurrency,
            fmt=ctx.options.fmt,
            local_hosts=local_hosts,
            ports=tuple(ports),
            transport=transport,
            base_seqs=dict(base_seqs or {}),
            stall=stall,
        )
        calls[index] = {"spec": spec}
        offset += share
    timeout = max(CONNECT_TIMEOUT_MIN_SECS, count * CONNECT_TIMEOUT_PER_CONN_SECS)
    answers = ctx.pool.call_each("subscribe", calls, timeout).values()
    failures: dict[str, int] = {}
    for answer in answers:
        for reason, number in answer["failures"].items():
            failures[reason] = failures.get(reason, 0) + number
    started = min(answer["started"] for answer in answers)
    finished = max(answer["finished"] for answer in answers)
    opened = sum(answer["opened"] for answer in answers)
    return ConnectResult(opened, failures, finished - started)


def close_subscribers(ctx: RunContext) -> None:
    ctx.pool.call_subscribers("close", COMMAND_SLACK_SECS)


def publisher_lanes(options: Options, subscribers_per_channel: int) -> int:
    """Enough publishing connections that the per-connection cap is not the limit."""
    if options.lane_rate <= 0:
        return 4
    wanted_rate = DELIVERY_CEILING_PER_SEC / max(1, subscribers_per_channel)
    return max(2, min(MAX_LANES, math.ceil(wanted_rate / options.lane_rate)))


def base_publish_spec(ctx: RunContext, port: int, channels: list[str], fanout: int) -> PublishSpec:
    options = ctx.options
    return PublishSpec(
        host=options.host,
        port=port,
        channels=channels,
        token=ctx.target.token,
        window=options.window,
        lanes=publisher_lanes(options, fanout),
        lane_rate=options.lane_rate,
        payload_bytes=options.payload_bytes,
        fmt=options.fmt,
    )


def redis_cpu_secs(redis_url: str) -> float:
    try:
        info = redis.Redis.from_url(redis_url).info("cpu")
    except redis.RedisError:
        return 0.0
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class PublishResult:
    """What one publish phase delivered and what it cost."""

    outcome: PublishOutcome
    stats: DeliveryStats
    server: Usage
    clients: Usage
    redis_cpu_secs: float
    wall_secs: float


def _run_publisher(pool: WorkerPool, spec: PublishSpec, watch: Watch | None) -> PublishOutcome:
    """The publish phase in the publisher worker, with ``watch`` called meanwhile."""
    index = pool.publisher
    timeout = spec.duration_secs + COMMAND_SLACK_SECS
    if watch is None:
        return pool.call_each("publish", {index: {"spec": spec}}, timeout)[index]
    deadline = time.monotonic() + timeout
    pool.send(index, "publish", spec=spec)
    stopping = False
    while time.monotonic() < deadline and not pool.answered(index, WATCH_INTERVAL_SECS):
        if not stopping and watch():
            pool.interrupt(index)
            stopping = True
    return pool.receive(index, max(0.1, deadline - time.monotonic()))


def publish_and_collect(
    ctx: RunContext, nodes: list[Node], spec: PublishSpec, watch: Watch | None = None
) -> PublishResult:
    """Run one publish phase, wait for the deliveries, and take the costs."""
    pool = ctx.pool
    node_pids = [node.pid for node in nodes]
    server_before = usage_of(node_pids)
    clients_before = usage_of(pool.pids)
    redis_before = redis_cpu_secs(ctx.options.redis_url)
    wall_start = time.time()
    outcome = _run_publisher(pool, spec, watch)
    drain = ctx.options.drain_secs
    parts = pool.call_subscribers(
        "collect",
        drain + COMMAND_SLACK_SECS,
        final_seq=outcome.final_seq,
        drain_secs=drain,
    )
    return PublishResult(
        outcome=outcome,
        stats=merge_all(parts),
        server=usage_of(node_pids) - server_before,
        clients=usage_of(pool.pids) - clients_before,
        redis_cpu_secs=redis_cpu_secs(ctx.options.redis_url) - redis_before,
        wall_secs=time.time() - wall_start,
    )


def publish_metrics(result: PublishResult) -> dict[str, Any]:
    """The report's delivery figures from one publish phase."""
    stats, outcome = result.stats, result.outcome
    span = (stats.last_rx - outcome.started) if stats.last_rx else 0.0
    received = stats.received
    per_delivery = 1e6 / received if received else 0.0
    publish_span = max(1e-9, outcome.finished - outcome.started)
    return {
        **stats.summary(),
        "published": outcome.published,
        "publish_failed": outcome.failed,
        "publish_errors": outcome.errors,
        "publish_per_s": round(outcome.published / publish_span, 1),
        "requests_per_s": round(outcome.requests / publish_span, 1),
        # Request sent -> its reply (`published`, or the REST response): the publisher's
        # acknowledgement latency.
        **outcome.ack_latency.summary_ms("ack"),
        "stalled": outcome.stalled,
        "deliveries_per_s": round(received / span, 1) if span > 0 else 0.0,
        "server_cpu_us_per_delivery": round(result.server.cpu_secs * per_delivery, 2),
        "client_cpu_us_per_delivery": round(result.clients.cpu_secs * per_delivery, 2),
        "redis_cpu_us_per_delivery": round(result.redis_cpu_secs * per_delivery, 2),
        "server_rss_growth_mb": round(result.server.rss_bytes / MIB, 1),
        "server_cores_busy": round(result.server.cpu_secs / result.wall_secs, 2),
        "client_cores_busy": round(result.clients.cpu_secs / result.wall_secs, 2),
    }


def with_overrides(spec: PublishSpec, **changes: Any) -> PublishSpec:
    return replace(spec, **changes)


def step_row(ctx: RunContext, scenario: str, step: str, **figures: Any) -> Row:
    """One row of the report: what was measured, where, and its figures."""
    return {
        "scenario": scenario,
        "step": step,
        "server": ctx.server,
        "target": ctx.target.name,
        **figures,
    }


class running_nodes:
    """Start nodes for one scenario; always stop them and drop the subscribers."""

    def __init__(self, ctx: RunContext, count: int = 1, env: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        self.count = count
        self.env = env or {}  # on top of the target's own environment
        self.nodes: list[Node] = []

    def __enter__(self) -> list[Node]:
        ctx = self.ctx
        first = ctx.next_ports(self.count)
        target = replace(ctx.target, env={**ctx.target.env, **self.env})
        self.nodes = start_nodes(target, ctx.server, ctx.options.host, first, self.count)
        return self.nodes

    def __exit__(self, *exc: object) -> None:
        try:
            close_subscribers(self.ctx)
        finally:
            stop_nodes(self.nodes)
