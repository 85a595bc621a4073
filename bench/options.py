"""Knobs of a benchmark run: sizes, durations and pacing, with full and quick presets.

The full defaults keep a default run (every default scenario, three targets, two
servers) under about 15 minutes on the 2-core machine; ``--quick`` is a smoke run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_SCENARIOS = (
    "idle",
    "fanout",
    "latency",
    "many_channels",
    "rest_publish",
    "two_nodes",
    "publish",
    "publish_rest",
    "publish_recent",
    "db_floor",
)
# The publish scenarios: report.py also divides them by db_floor's figure.
PUBLISH_SCENARIOS = ("publish", "publish_rest", "publish_recent")
# Run once per run, with no node and no server: what PostgreSQL commits alone.
SERVERLESS_SCENARIOS = ("db_floor",)
# Only run when named: scale_100k takes the machine; the SSE, slow-consumer, delta and
# Pusher ones serve only `ours`.
EXPLICIT_SCENARIOS = (
    "scale_100k",
    "sse_idle",
    "sse_fanout",
    "sse_latency",
    "slow_consumer",
    "slow_drop_oldest",
    "delta",
    "pusher_fanout",
)
ALL_SCENARIOS = DEFAULT_SCENARIOS + EXPLICIT_SCENARIOS


@dataclass
class Options:
    """Everything a scenario needs to know about the run."""

    scenarios: list[str] = field(default_factory=lambda: list(DEFAULT_SCENARIOS))
    servers: list[str] = field(default_factory=lambda: ["uvicorn", "daphne"])
    targets: list[str] = field(default_factory=lambda: ["ours", "channels_ref", "bare_ref"])
    fmt: str = "json"
    host: str = "127.0.0.1"
    base_port: int = 18_100
    subscriber_workers: int = 2
    connect_concurrency: int = 64  # handshakes in flight per worker
    idle_connections: int = 10_000
    fanout_sweep: list[int] = field(default_factory=lambda: [1_000, 2_500, 5_000])
    fanout_secs: float = 6.0
    # (subscribers, publishes per second): the two latency targets.
    latency_points: list[tuple[int, float]] = field(
        default_factory=lambda: [(1_000, 10.0), (5_000, 2.0)]
    )
    latency_secs: float = 10.0
    many_connections: int = 5_000
    many_channels: int = 100
    rest_subscribers: int = 1_000
    two_node_subscribers: int = 1_000
    scale_connections: int = 100_000
    scale_conns_per_node: int = 17_000  # under the 20,000 files one process may open
    scale_conns_per_worker: int = 18_000
    # Slow consumers: stalled subscribers per healthy one (at least stalled_min); the
    # flood lasts at most slow_secs, less once every stalled one was dealt with. Keep it
    # under 35 s: uvicorn closes a peer that leaves its 20 s ping unanswered for 20 s.
    stalled_fraction: float = 0.01
    stalled_min: int = 10
    slow_secs: float = 30.0
    slow_queue_frames: int = 0  # PUSH_SEND_QUEUE_MAX_FRAMES of those nodes; 0: default
    slow_queue_bytes: int = 0  # PUSH_SEND_QUEUE_MAX_BYTES of those nodes; 0: default
    window: int = 8  # messages published and not yet seen by the probe
    lane_rate: float = 45.0  # per publishing connection; the contract allows 50/s
    rest_lanes: int = 8
    # The publish scenarios: K publishing connections (a service token), W requests in
    # flight on each WebSocket, C channels with one subscriber each; pgbench's db_floor
    # runs K clients over C channels too.
    publish_connections: int = 16
    publish_inflight: int = 8
    publish_channels: int = 64
    publish_secs: float = 8.0
    publish_fixed_rate: float = 2_000.0  # the acknowledgement-latency point, publishes/s
    publish_batch: int = 100  # messages per POST /api/v1/messages
    payload_bytes: int = 64
    # delta (bench.delta): subscribers, ~5 KB states published, and their rate.
    delta_subscribers: int = 1_000
    delta_messages: int = 100
    delta_rate: float = 5.0
    drain_secs: float = 20.0
    database_url: str = "postgres://postgres@127.0.0.1:5432/bench"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "pushbench"  # our nodes' keys and channel-layer groups
    ours_command: str = "runnode"  # "runnode", "raw", or a template with {server} {port}...
    results_path: str = ""


def apply_quick(options: Options) -> Options:
    """Shrink a run to a ~1 minute smoke check (a few hundred connections)."""
    options.idle_connections = 300
    options.fanout_sweep = [300]
    options.fanout_secs = 3.0
    options.latency_points = [(300, 10.0)]
    options.latency_secs = 3.0
    options.many_connections = 300
    options.many_channels = 10
    options.rest_subscribers = 200
    options.two_node_subscribers = 200
    options.scale_connections = 2_000
    options.slow_secs = 10.0
    options.publish_connections = 4
    options.publish_inflight = 4
    options.publish_channels = 16
    options.publish_secs = 3.0
    options.publish_fixed_rate = 500.0
    options.publish_batch = 20
    options.drain_secs = 10.0
    options.delta_subscribers = 300
    options.delta_messages = 30
    return options
