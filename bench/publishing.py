"""The publish scenarios: how many publishes one node acknowledges per second, how soon,
and whether each one reaches its subscriber once and in seq order.

- ``publish``: K WebSocket publishers authenticated with a service token (the target's
  user token where it has none), W requests in flight on each, round robin over C
  channels with one subscriber each. First as fast as the node acknowledges (a closed
  loop on the replies), then at a fixed rate, for the acknowledgement latency there.
- ``publish_recent``: ``publish`` on channels named ``ticker:*``, the node started with
  ``PUSH_HISTORY_MODES=ticker:*=recent`` (kept in Redis only). A node that does not know
  the setting stores them as usual: the row then says so (messages found in PostgreSQL).
- ``publish_rest``: K keep-alive HTTP clients, one message per request
  (``POST /api/v1/channels/<c>/messages``), then batches (``POST /api/v1/messages``);
  a node that answers 404 there gets an "unsupported" row for the batches.
- ``db_floor``: pgbench with the same two statements per message (``bench.dbfloor``),
  no server: each scenario's publishes/s is divided by it in the report.
"""

from __future__ import annotations

import httpx
import psycopg

from bench.dbfloor import run_db_floor
from bench.measure import (
    COMMAND_SLACK_SECS,
    Row,
    RunContext,
    connect_subscribers,
    publish_and_collect,
    publish_metrics,
    running_nodes,
    step_row,
    with_overrides,
)
from bench.options import Options
from bench.publisher import BATCH_PUBLISH_PATH, PublishSpec
from bench.servers import Node

RECENT_CHANNEL_PREFIX = "ticker:"
RECENT_NODE_ENV = {"PUSH_HISTORY_MODES": "ticker:*=recent"}
BATCH_PROBE_TIMEOUT_SECS = 10.0
HTTP_NOT_FOUND = 404


def _channels(ctx: RunContext, name: str, prefix: str = "") -> list[str]:
    count = ctx.options.publish_channels
    return [f"{prefix}{ctx.channel(f'{name}{index}')}" for index in range(count)]


def _spec(ctx: RunContext, node: Node, channels: list[str], via: str) -> PublishSpec:
    options = ctx.options
    return PublishSpec(
        host=options.host,
        port=node.port,
        channels=channels,
        via=via,
        token=ctx.target.service_token or ctx.target.token,
        mode="ack",
        lanes=options.publish_connections,
        inflight=options.publish_inflight,
        duration_secs=options.publish_secs,
        payload_bytes=options.payload_bytes,
        fmt=options.fmt,
    )


def _measure(
    ctx: RunContext, nodes: list[Node], scenario: str, step: str, kind: str, spec: PublishSpec
) -> Row:
    """One publish phase on subscribers that count from now."""
    ctx.pool.call_subscribers("reset", COMMAND_SLACK_SECS)
    result = publish_and_collect(ctx, nodes, spec)
    return step_row(ctx, scenario, step, kind=kind, **publish_metrics(result))


def _connect(ctx: RunContext, node: Node, channels: list[str]) -> dict[str, object]:
    connected = connect_subscribers(ctx, [node.port], channels, len(channels))
    return {"connections": connected.opened, "connect_failures": connected.failures}


def publish(ctx: RunContext) -> list[Row]:
    """WebSocket publishers, as fast as acknowledged, then at the fixed rate."""
    return _publish_ws(ctx, "publish", _channels(ctx, "pub"))


def publish_recent(ctx: RunContext) -> list[Row]:
    """``publish`` on recent-only channels (Redis only, when the node knows them)."""
    channels = _channels(ctx, "rec", RECENT_CHANNEL_PREFIX)
    rows = _publish_ws(ctx, "publish_recent", channels, RECENT_NODE_ENV)
    if ctx.target.name == "ours" and not any(row.get("error") for row in rows):
        stored = _stored_in_postgres(ctx.options.database_url, channels)
        note = (
            f"durable, not recent-only: {stored} of these messages are in PostgreSQL "
            "(the node does not know PUSH_HISTORY_MODES)"
            if stored
            else "recent-only: none of these messages is in PostgreSQL"
        )
        for row in rows:
            row.update(stored_in_postgres=stored, note=note)
    return rows


def _publish_ws(
    ctx: RunContext, scenario: str, channels: list[str], env: dict[str, str] | None = None
) -> list[Row]:
    options = ctx.options
    shape = f"K{options.publish_connections} W{options.publish_inflight} C{len(channels)}"
    with running_nodes(ctx, env=env) as nodes:
        subscribed = _connect(ctx, nodes[0], channels)
        spec = _spec(ctx, nodes[0], channels, "ws")
        rate = options.publish_fixed_rate
        rows = [
            _measure(ctx, nodes, scenario, f"max {shape}", "max", spec),
            _measure(
                ctx,
                nodes,
                scenario,
                f"@{rate:g}/s {shape}",
                "rate",
                with_overrides(spec, mode="rate", rate=rate),
            ),
        ]
    return [{**row, **subscribed} for row in rows]


def publish_rest(ctx: RunContext) -> list[Row]:
    """REST publishers: one message per request, then batches of ``publish_batch``."""
    options = ctx.options
    channels = _channels(ctx, "rest")
    shape = f"K{options.publish_connections} C{len(channels)}"
    batch = options.publish_batch
    with running_nodes(ctx) as nodes:
        subscribed = _connect(ctx, nodes[0], channels)
        spec = _spec(ctx, nodes[0], channels, "rest")
        rows = [_measure(ctx, nodes, "publish_rest", f"single {shape}", "single", spec)]
        batch_step = f"batch{batch} {shape}"
        if _batch_supported(spec):
            tuned = with_overrides(spec, batch=batch)
            rows.append(_measure(ctx, nodes, "publish_rest", batch_step, "batch", tuned))
        else:
            reason = f"unsupported: POST {BATCH_PUBLISH_PATH} answered 404"
            rows.append(step_row(ctx, "publish_rest", batch_step, kind="batch", skipped=reason))
    return [{**row, **subscribed} for row in rows]


def _batch_supported(spec: PublishSpec) -> bool:
    """Whether the node has the batch route: an empty batch is refused (400) or
    accepted, never 404, where it exists. Any other failure shows in the phase."""
    headers = {"Authorization": f"Token {spec.token}"} if spec.token else {}
    url = f"http://{spec.host}:{spec.port}{BATCH_PUBLISH_PATH}"
    try:
        reply = httpx.post(
            url, json={"messages": []}, headers=headers, timeout=BATCH_PROBE_TIMEOUT_SECS
        )
    except httpx.HTTPError:
        return True
    return reply.status_code != HTTP_NOT_FOUND


def _stored_in_postgres(database_url: str, channels: list[str]) -> int:
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT count(*) FROM push_message m JOIN push_channel c ON c.id = m.channel_id "
            "WHERE c.name = ANY(%s)",
            (channels,),
        ).fetchone()
    return int(found[0]) if found else 0


def db_floor(options: Options, tag: str) -> list[Row]:
    """pgbench's transactions/s with one message per transaction (no server)."""
    step = f"K{options.publish_connections} C{options.publish_channels}"
    figures = run_db_floor(options, f"bench-{tag}-floor")
    if "ack_mean_ms" in figures:
        figures["note"] = (
            f"pgbench: {figures.get('published', 0):,} transactions, "
            f"{figures.get('publish_failed', 0)} failed, latency average "
            f"{figures['ack_mean_ms']} ms"
        )
    return [{"scenario": "db_floor", "step": step, "server": "-", "target": "pgbench", **figures}]


PUBLISH_RUNNERS = {
    "publish": publish,
    "publish_rest": publish_rest,
    "publish_recent": publish_recent,
}
