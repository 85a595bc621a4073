"""Slow consumers: a fan-out with stalled subscribers on the channel.

``slow_consumer``: N healthy subscribers and S stalled ones (``--stalled-fraction`` of N,
at least ``--stalled-min``) on one channel, published to as fast as the healthy ones
receive. A stalled subscriber completes the handshake and its subscription, then stops
reading its socket (``bench.subscriber``); the server must close it with 4002 once its
send queue is full, and go on delivering to the others as in ``fanout`` (name both
scenarios in one run: the report sets each step beside the ``fanout`` step of the same
N). ``slow_drop_oldest``: the same on a channel the node drops the oldest frames of
(``PUSH_DROP_OLDEST_CHANNELS``, set for that node): the stalled subscribers stay
connected and lose frames instead.

While the flood runs, the orchestrator reads the node's RSS and its counters
(``push_slow_consumer_disconnects_total``, ``push_dropped_frames_total``) every
``WATCH_INTERVAL_SECS``: when the first and the last stalled subscriber were closed, and
how far memory grew. The flood ends at ``--slow-secs``, or earlier once ``--fanout-secs``
have passed and every stalled subscriber was closed (drop-oldest: has dropped many
frames). Then the stalled subscribers read again, to find what the server left them:
the close code, or the gaps in seq.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.measure import (
    COMMAND_SLACK_SECS,
    MIB,
    PublishResult,
    RunContext,
    connect_subscribers,
    publish_and_collect,
    with_overrides,
)
from bench.options import Options
from bench.procinfo import usage_of
from bench.publisher import PublishSpec
from bench.servers import Node
from bench.stats import merge_all

SLOW_DISCONNECTS = "push_slow_consumer_disconnects_total"
DROPPED_FRAMES = "push_dropped_frames_total"
DROP_OLDEST_PATTERN = "ticker:*"  # the node's PUSH_DROP_OLDEST_CHANNELS
DROP_OLDEST_PREFIX = "ticker:"  # so the scenario's channel matches it
# Drop-oldest: enough frames dropped per stalled subscriber (on average) to end early.
DROPPED_PER_STALLED_ENOUGH = 100
METRICS_TIMEOUT_SECS = 2.0
# Reading again, a stalled subscriber gets what piled up for it, then the close frame.
UNSTALL_DRAIN_SECS = 10.0


@dataclass(frozen=True)
class Flood:
    """One slow-consumer variant: stalled subscribers closed with 4002, or dropped from."""

    drop_oldest: bool

    def channel(self, ctx: RunContext) -> str:
        name = ctx.channel("slow")
        return DROP_OLDEST_PREFIX + name if self.drop_oldest else name

    def node_env(self, options: Options) -> dict[str, str]:
        """What the node needs on top of the target's environment."""
        env = {}
        if options.slow_queue_frames:
            env["PUSH_SEND_QUEUE_MAX_FRAMES"] = str(options.slow_queue_frames)
        if options.slow_queue_bytes:
            env["PUSH_SEND_QUEUE_MAX_BYTES"] = str(options.slow_queue_bytes)
        if self.drop_oldest:
            env["PUSH_DROP_OLDEST_CHANNELS"] = DROP_OLDEST_PATTERN
        return env


def stalled_count(options: Options, healthy: int) -> int:
    return max(options.stalled_min, math.ceil(healthy * options.stalled_fraction))


def read_counters(node: Node) -> dict[str, float]:
    """The slow-consumer counters on the node's ``/metrics`` (0 until first counted)."""
    url = f"http://{node.host}:{node.port}/metrics"
    values = {SLOW_DISCONNECTS: 0.0, DROPPED_FRAMES: 0.0}
    for line in httpx.get(url, timeout=METRICS_TIMEOUT_SECS).text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


class FloodWatch:
    """Samples one node while the flood runs; says when the flood has done its work."""

    def __init__(self, node: Node, flood: Flood, stalled: int, min_secs: float) -> None:
        self.node = node
        self.flood = flood
        self.stalled = stalled
        self.min_secs = min_secs
        self.baseline = read_counters(node)
        self.rss_before = self.rss_peak = usage_of([node.pid]).rss_bytes
        self.started = time.time()
        self.closes = 0
        self.dropped = 0
        self.first_close_at = 0.0
        self.last_close_at = 0.0

    def __call__(self) -> bool:
        now = time.time()
        self.rss_peak = max(self.rss_peak, usage_of([self.node.pid]).rss_bytes)
        try:
            counters = read_counters(self.node)
        except httpx.HTTPError:  # a busy node answering late: the next sample counts
            return False
        closes = int(counters[SLOW_DISCONNECTS] - self.baseline[SLOW_DISCONNECTS])
        if closes > self.closes:
            self.first_close_at = self.first_close_at or now
            self.last_close_at = now
            self.closes = closes
        self.dropped = int(counters[DROPPED_FRAMES] - self.baseline[DROPPED_FRAMES])
        if now - self.started < self.min_secs:
            return False
        if self.flood.drop_oldest:
            return self.dropped >= self.stalled * DROPPED_PER_STALLED_ENOUGH
        return self.closes >= self.stalled


def flood_step(
    ctx: RunContext,
    nodes: list[Node],
    channel: str,
    healthy: int,
    spec: PublishSpec,
    flood: Flood,
) -> tuple[PublishResult, dict[str, Any]]:
    """Add stalled subscribers to the channel, flood it, let them read again: the
    healthy subscribers' result and the stalled ones' figures."""
    options = ctx.options
    node = nodes[0]
    count = stalled_count(options, healthy)
    stalled = connect_subscribers(ctx, [node.port], [channel], count, stall=True)
    watch = FloodWatch(node, flood, stalled.opened, options.fanout_secs)
    spec = with_overrides(spec, duration_secs=options.slow_secs)
    result = publish_and_collect(ctx, nodes, spec, watch)
    counters = read_counters(node)
    parts = ctx.pool.call_subscribers(
        "unstall",
        UNSTALL_DRAIN_SECS + COMMAND_SLACK_SECS,
        final_seq=result.outcome.final_seq,
        drain_secs=UNSTALL_DRAIN_SECS,
    )
    seen = merge_all(parts)
    started = result.outcome.started

    def after_start(moment: float) -> float | None:
        return round(moment - started, 2) if moment else None

    return result, {
        "stalled_subscribers": stalled.opened,
        "stalled_connect_failures": stalled.failures,
        "stalled_closed_4002": int(counters[SLOW_DISCONNECTS] - watch.baseline[SLOW_DISCONNECTS]),
        "first_4002_after_s": after_start(watch.first_close_at),
        "last_4002_after_s": after_start(watch.last_close_at),
        "dropped_frames": int(counters[DROPPED_FRAMES] - watch.baseline[DROPPED_FRAMES]),
        # What the stalled subscribers found when they read again.
        "stalled_close_codes": dict(seen.close_codes),
        "stalled_received": seen.received,
        "stalled_gaps": seen.gaps,
        "flood_secs": round(result.outcome.finished - started, 1),
        "rss_before_mb": round(watch.rss_before / MIB, 1),
        "rss_peak_growth_mb": round((watch.rss_peak - watch.rss_before) / MIB, 1),
    }
