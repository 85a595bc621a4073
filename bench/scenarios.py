"""The scenarios of issue 3: each starts its own nodes, drives them, stops them.

Every scenario returns rows, one per measured step, with the same keys wherever a
figure applies; report.py lays them out and computes the ratios to the references.
The ``sse_`` scenarios (issue 10) are ``idle``, ``fanout`` and ``latency`` with
Server-Sent Events streams as the subscribers (publishers and the probe stay
WebSockets), for targets that serve ``/sse/``. The ``slow_`` ones are ``fanout`` with
stalled subscribers on the channel (``bench.slowconsumer``), for targets that bound
their send queues. ``pusher_fanout`` (issue 17) is ``fanout`` with Pusher-protocol
subscribers (``/app/<key>``), for targets that serve it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from bench import pusher
from bench.measure import (
    COMMAND_SLACK_SECS,
    Row,
    RunContext,
    base_publish_spec,
    connect_subscribers,
    publish_and_collect,
    publish_metrics,
    running_nodes,
    step_row,
    with_overrides,
)
from bench.pool import WorkerPool
from bench.procinfo import usage_of
from bench.servers import Node
from bench.slowconsumer import Flood, flood_step

IDLE_WARMUP_CONNECTIONS = 50  # loads lazy imports and caches before the baseline
SETTLE_SECS = 2.0
KIB = 1024
SCALE_LOCAL_HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 12))
SCALE_BROADCASTS = 3
SCALE_BROADCAST_INTERVAL_SECS = 2.0
# An SSE stream's head (and first event) comes before the server has subscribed it, and
# nothing says when it has; the streams resume from a known seq, so a late subscription
# loses nothing, but its first deliveries would be replays with inflated latency.
SSE_SUBSCRIBE_SETTLE_SECS = 1.0


def _subscribers_settle(transport: str) -> None:
    if transport == "sse":
        time.sleep(SSE_SUBSCRIBE_SETTLE_SECS)


def _without_sse(ctx: RunContext, scenario: str) -> list[Row] | None:
    """A row saying why an ``sse_`` scenario was skipped, or None if it can run."""
    return _skip_unless(ctx, scenario, ctx.target.serves_sse, "the target serves no /sse/")


def _skip_unless(ctx: RunContext, scenario: str, can_run: bool, reason: str) -> list[Row] | None:
    return None if can_run else [step_row(ctx, scenario, "-", skipped=reason)]


def idle(ctx: RunContext) -> list[Row]:
    """N subscribed, silent connections: connect rate and server RSS per connection."""
    return _idle(ctx, "idle", "ws")


def sse_idle(ctx: RunContext) -> list[Row]:
    """N idle SSE streams on one channel: server RSS per stream (connect rate: to the
    response head, since a stream has no `subscribed` reply)."""
    return _without_sse(ctx, "sse_idle") or _idle(ctx, "sse_idle", "sse")


def _idle(ctx: RunContext, scenario: str, transport: str) -> list[Row]:
    count = ctx.options.idle_connections
    channels = [ctx.channel("idle")]
    with running_nodes(ctx) as nodes:
        ports = [nodes[0].port]
        connect_subscribers(ctx, ports, channels, IDLE_WARMUP_CONNECTIONS, transport=transport)
        time.sleep(SETTLE_SECS / 2)
        before = usage_of([nodes[0].pid])
        connected = connect_subscribers(ctx, ports, channels, count, transport=transport)
        time.sleep(SETTLE_SECS)
        after = usage_of([nodes[0].pid])
    grown = after.rss_bytes - before.rss_bytes
    return [
        step_row(
            ctx,
            scenario,
            f"N={count}",
            connections=connected.opened,
            connect_failures=connected.failures,
            connect_per_s=round(connected.rate_per_sec, 1),
            rss_per_conn_kb=round(grown / max(1, connected.opened) / KIB, 2),
            server_rss_mb=round(after.rss_bytes / KIB / KIB, 1),
        )
    ]


def _publish_step(
    ctx: RunContext,
    scenario: str,
    step: str,
    subscribers: int,
    channels: list[str],
    tune: Callable[[Any, list[Node]], Any],
    node_count: int = 1,
    transport: str = "ws",
) -> Row:
    with running_nodes(ctx, node_count) as nodes:
        connected = connect_subscribers(
            ctx, [nodes[0].port], channels, subscribers, transport=transport
        )
        _subscribers_settle(transport)
        fanout = math.ceil(subscribers / len(channels))
        spec = tune(base_publish_spec(ctx, nodes[-1].port, channels, fanout), nodes)
        result = publish_and_collect(ctx, nodes, spec)
    return step_row(
        ctx,
        scenario,
        step,
        connections=connected.opened,
        connect_failures=connected.failures,
        connect_per_s=round(connected.rate_per_sec, 1),
        **publish_metrics(result),
    )


def fanout(ctx: RunContext) -> list[Row]:
    """One channel, N subscribers, publishing as fast as the server delivers.

    The sweep grows one node's audience: each step adds subscribers to the same
    channel (they start counting at the seq their `subscribed` reply gives), so the
    5,000 step does not pay for 8,500 handshakes and three node starts.
    """
    return _fanout(ctx, "fanout", "ws")


def sse_fanout(ctx: RunContext) -> list[Row]:
    """``fanout`` with SSE streams as the subscribers (each step's new streams resume
    after the seq the previous step's publishers reached)."""
    return _without_sse(ctx, "sse_fanout") or _fanout(ctx, "sse_fanout", "sse")


def pusher_fanout(ctx: RunContext) -> list[Row]:
    """``fanout`` with every subscriber on the Pusher protocol; publishers and the probe
    stay on ours.

    All of them, not half: a node's CPU is one figure for all its subscribers, so only
    a run where every delivery is a Pusher one gives its cost per delivery, beside the
    ``fanout`` row of the same N (the same publishes, probe and write path; what
    differs is the frame each subscriber gets). In a mixed channel the hub also writes
    to one format's subscribers before the other's, which would tilt the latency split
    by protocol.
    """
    reason = "unsupported: the target serves no Pusher endpoint (/app/<key>)"
    skipped = _skip_unless(ctx, "pusher_fanout", ctx.target.serves_pusher, reason)
    return skipped or _fanout(ctx, "pusher_fanout", "pusher", env=pusher.node_env())


def slow_consumer(ctx: RunContext) -> list[Row]:
    """``fanout`` with stalled subscribers on the channel: they must be closed with 4002
    and the healthy ones lose nothing."""
    return _without_bounded_queues(ctx, "slow_consumer") or _fanout(
        ctx, "slow_consumer", "ws", Flood(drop_oldest=False)
    )


def slow_drop_oldest(ctx: RunContext) -> list[Row]:
    """``slow_consumer`` on a drop-oldest channel: the stalled subscribers stay connected
    and lose their oldest queued frames."""
    return _without_bounded_queues(ctx, "slow_drop_oldest") or _fanout(
        ctx, "slow_drop_oldest", "ws", Flood(drop_oldest=True)
    )


def _without_bounded_queues(ctx: RunContext, scenario: str) -> list[Row] | None:
    # A target with unbounded queues would only grow until the machine runs out.
    reason = "the target has no slow-consumer policy"
    return _skip_unless(ctx, scenario, ctx.target.bounds_send_queues, reason)


def _fanout(
    ctx: RunContext,
    scenario: str,
    transport: str,
    flood: Flood | None = None,
    env: dict[str, str] | None = None,
) -> list[Row]:
    duration = ctx.options.fanout_secs
    channels = [flood.channel(ctx) if flood else ctx.channel("fan")]
    seqs: dict[str, int] = {}  # each channel's last published seq
    rows: list[Row] = []
    node_env = {**(env or {}), **(flood.node_env(ctx.options) if flood else {})}
    with running_nodes(ctx, env=node_env) as nodes:
        port = nodes[0].port
        connected_total = 0
        for count in sorted(ctx.options.fanout_sweep):
            ctx.pool.call_subscribers("reset", COMMAND_SLACK_SECS, base_seqs=seqs)
            connected = connect_subscribers(
                ctx,
                [port],
                channels,
                count - connected_total,
                transport=transport,
                base_seqs=seqs,
            )
            _subscribers_settle(transport)
            connected_total = count
            spec = with_overrides(
                base_publish_spec(ctx, port, channels, count), duration_secs=duration
            )
            stalled: Row = {}
            if flood is None:
                result = publish_and_collect(ctx, nodes, spec)
            else:
                result, stalled = flood_step(ctx, nodes, channels[0], count, spec, flood)
            seqs.update(result.outcome.final_seq)
            rows.append(
                step_row(
                    ctx,
                    scenario,
                    f"N={count}",
                    connections=result.stats.connections,
                    connect_failures=connected.failures,
                    connect_per_s=round(connected.rate_per_sec, 1),
                    **publish_metrics(result),
                    **stalled,
                )
            )
    return rows


def latency(ctx: RunContext) -> list[Row]:
    """One channel, N subscribers, a fixed low publish rate: the latency percentiles."""
    return _latency(ctx, "latency", "ws")


def sse_latency(ctx: RunContext) -> list[Row]:
    """``latency`` with SSE streams as the subscribers."""
    return _without_sse(ctx, "sse_latency") or _latency(ctx, "sse_latency", "sse")


def _latency(ctx: RunContext, scenario: str, transport: str) -> list[Row]:
    duration = ctx.options.latency_secs
    rows = []
    for count, rate in ctx.options.latency_points:
        rows.append(
            _publish_step(
                ctx,
                scenario,
                f"N={count} @{rate:g}/s",
                count,
                [ctx.channel(f"lat{count}")],
                lambda spec, nodes, rate=rate: with_overrides(
                    spec, mode="rate", rate=rate, duration_secs=duration, lanes=2
                ),
                transport=transport,
            )
        )
    return rows


def many_channels(ctx: RunContext) -> list[Row]:
    """N connections over K channels, publishes spread round-robin over the channels."""
    count, kinds = ctx.options.many_connections, ctx.options.many_channels
    channels = [ctx.channel(f"many{index}") for index in range(kinds)]
    duration = ctx.options.fanout_secs
    return [
        _publish_step(
            ctx,
            "many_channels",
            f"N={count} K={kinds}",
            count,
            channels,
            lambda spec, nodes: with_overrides(spec, duration_secs=duration),
        )
    ]


def rest_publish(ctx: RunContext) -> list[Row]:
    """One channel, N subscribers, publishes over REST as fast as they are delivered."""
    count = ctx.options.rest_subscribers
    options = ctx.options
    return [
        _publish_step(
            ctx,
            "rest_publish",
            f"N={count}",
            count,
            [ctx.channel("rest")],
            lambda spec, nodes: with_overrides(
                spec,
                via="rest",
                duration_secs=options.fanout_secs,
                lanes=options.rest_lanes,
                lane_rate=0.0,
            ),
        )
    ]


def two_nodes(ctx: RunContext) -> list[Row]:
    """Subscribers on node A, publishers on node B: the cross-node path (Redis)."""
    count = ctx.options.two_node_subscribers
    duration = ctx.options.fanout_secs
    return [
        _publish_step(
            ctx,
            "two_nodes",
            f"N={count}",
            count,
            [ctx.channel("two")],
            lambda spec, nodes: with_overrides(
                spec, duration_secs=duration, probe_port=nodes[0].port
            ),
            node_count=2,
        )
    ]


def scale_100k(ctx: RunContext) -> list[Row]:
    """Many nodes, N connections on one channel: total RSS and broadcast completion."""
    options = ctx.options
    count = options.scale_connections
    node_count = max(1, math.ceil(count / options.scale_conns_per_node))
    workers = max(2, math.ceil(count / options.scale_conns_per_worker))
    channels = [ctx.channel("scale")]
    pool = WorkerPool(workers)
    scaled = RunContext(options, ctx.target, ctx.server, pool, ctx.tag, ctx.port_cursor)
    try:
        with running_nodes(scaled, node_count) as nodes:
            ports = [node.port for node in nodes]
            connected = connect_subscribers(scaled, ports, channels, count, SCALE_LOCAL_HOSTS)
            time.sleep(SETTLE_SECS)
            rss = usage_of([node.pid for node in nodes]).rss_bytes
            spec = with_overrides(
                base_publish_spec(scaled, ports[0], channels, count),
                mode="rate",
                rate=1.0 / SCALE_BROADCAST_INTERVAL_SECS,
                max_messages=SCALE_BROADCASTS,
                duration_secs=SCALE_BROADCASTS * SCALE_BROADCAST_INTERVAL_SECS,
                lanes=1,
            )
            result = publish_and_collect(scaled, nodes, spec)
    finally:
        ctx.port_cursor = scaled.port_cursor
        pool.close()
    metrics = publish_metrics(result)
    return [
        step_row(
            ctx,
            "scale_100k",
            f"N={count} nodes={node_count}",
            connections=connected.opened,
            connect_failures=connected.failures,
            connect_per_s=round(connected.rate_per_sec, 1),
            server_rss_mb=round(rss / KIB / KIB, 1),
            rss_per_conn_kb=round(rss / max(1, connected.opened) / KIB, 2),
            # The slowest connection's wait for a broadcast is the max latency.
            broadcast_complete_ms=metrics["lat_max_ms"],
            **metrics,
        )
    ]


SCENARIOS: dict[str, Callable[[RunContext], list[Row]]] = {
    "idle": idle,
    "fanout": fanout,
    "latency": latency,
    "many_channels": many_channels,
    "rest_publish": rest_publish,
    "two_nodes": two_nodes,
    "scale_100k": scale_100k,
    "sse_idle": sse_idle,
    "sse_fanout": sse_fanout,
    "sse_latency": sse_latency,
    "slow_consumer": slow_consumer,
    "slow_drop_oldest": slow_drop_oldest,
    "pusher_fanout": pusher_fanout,
}
