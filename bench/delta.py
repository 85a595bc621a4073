"""The ``delta`` scenario (issue 18): N subscribers on one channel whose messages are a
~5 KB JSON state of which a few fields change each time (a price board), published at
a fixed rate; once with plain subscriptions, once with ``delta: "fossil"``. Measured:
bytes on the wire per delivery (WebSocket frames of the channel's messages, headers
included) and the node's CPU seconds per delivery, and the ratios of the two steps.
Targets: at least 5x fewer bytes, at most 1.3x the CPU per delivery.

The subscribers are the bench's cheap WebSocket client (``bench.wsclient``) in this
process, not the worker pool: they only count frames and bytes, and the node's CPU is
read from /proc around the publishing (``bench.procinfo``). Only ``ours`` speaks delta.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from bench.measure import Row, RunContext, running_nodes, step_row
from bench.procinfo import usage_of
from bench.servers import Node
from bench.wsclient import WsConnection, ws_connect

OPCODE_TEXT = 0x1
BOARD_ROWS = 56  # about 5 KB of JSON
CHANGED_ROWS_PER_MESSAGE = 2
CONNECT_CONCURRENCY = 64
SUBSCRIBE_TIMEOUT_SECS = 60.0
DRAIN_TIMEOUT_SECS = 60.0
MESSAGE_MARK = b'"type":"message"'
DELTA_MARK = b'"delta":true'


def board(version: int) -> dict[str, Any]:
    """The state after ``version`` changes: each change moves the bid and ask of two
    rows and the version and clock fields; everything else stays as it was."""
    rows = [
        {
            "symbol": f"SYM{i:03d}",
            "name": f"Instrument number {i}",
            "bid": 100.0 + i,
            "ask": 100.5 + i,
            "volume": 1000 * i,
            "venue": "XPAR" if i % 2 else "XLON",
        }
        for i in range(BOARD_ROWS)
    ]
    for change in range(1, version + 1):
        for k in range(CHANGED_ROWS_PER_MESSAGE):
            row = rows[(change * 7 + k * 13) % BOARD_ROWS]
            row["bid"] = round(row["bid"] + 0.25, 2)
            row["ask"] = round(row["ask"] + 0.25, 2)
    return {"version": version, "as_of": f"2026-01-01T00:00:{version % 60:02d}Z", "rows": rows}


def _frame_bytes(payload: bytes) -> int:
    """The frame's size on the wire: its payload and its (unmasked) header."""
    length = len(payload)
    return length + (2 if length < 126 else 4 if length < 65_536 else 10)


@dataclass
class Tally:
    """What the subscribers saw: one object for all, updated by the receive callback."""

    subscribed: int = 0
    messages: int = 0
    deltas: int = 0
    wire_bytes: int = 0

    def on_frame(self, conn: WsConnection, payload: bytes, now: float) -> None:
        head = payload[:40]
        if MESSAGE_MARK in head:
            self.messages += 1
            self.wire_bytes += _frame_bytes(payload)
            if DELTA_MARK in payload[:160]:
                self.deltas += 1
        elif b'"type":"subscribed"' in head:
            self.subscribed += 1


async def _wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _connect_all(node: Node, count: int, tally: Tally) -> list[WsConnection]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> WsConnection:
        async with gate:
            return await ws_connect(node.host, node.port, "/ws/", tally.on_frame)

    return await asyncio.gather(*(one() for _ in range(count)))


async def _step(
    node: Node, token: str, channel: str, subscribers: int, messages: int, rate: float, delta: bool
) -> dict[str, Any]:
    tally = Tally()
    conns = await _connect_all(node, subscribers, tally)
    publisher = await ws_connect(
        node.host, node.port, f"/ws/?token={token}", lambda conn, payload, now: None
    )
    try:
        request: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if delta:
            request["delta"] = "fossil"
        frame = json.dumps(request).encode()
        for conn in conns:
            conn.send(frame, OPCODE_TEXT)
        await _wait_for("every subscribed", lambda: tally.subscribed >= subscribers, 60)
        states = [
            json.dumps({"type": "publish", "channel": channel, "data": board(n)}).encode()
            for n in range(1, messages + 1)
        ]
        await asyncio.sleep(1.0)  # the handshakes' and subscribes' work is done
        before = usage_of([node.pid])
        started = time.monotonic()
        for index, state in enumerate(states):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            publisher.send(state, OPCODE_TEXT)
        expected = subscribers * messages
        await _wait_for("every delivery", lambda: tally.messages >= expected, DRAIN_TIMEOUT_SECS)
        after = usage_of([node.pid])
    finally:
        for conn in [*conns, publisher]:
            conn.close()
    deliveries = tally.messages
    cpu = after.cpu_secs - before.cpu_secs
    return {
        "deliveries": deliveries,
        "delta_frames": tally.deltas,
        "wire_mb": round(tally.wire_bytes / 1_048_576, 2),
        "bytes_per_delivery": round(tally.wire_bytes / max(1, deliveries)),
        "server_cpu_s": round(cpu, 2),
        "cpu_us_per_delivery": round(cpu / max(1, deliveries) * 1e6, 2),
        "data_bytes": len(json.dumps(board(1), separators=(",", ":"))),
    }


def delta(ctx: RunContext) -> list[Row]:
    """Plain then delta subscribers, on one node, the same states at the same rate."""
    if ctx.target.name != "ours":
        return [step_row(ctx, "delta", "-", skipped="the target has no delta compression")]
    options = ctx.options
    subscribers, messages, rate = (
        options.delta_subscribers,
        options.delta_messages,
        options.delta_rate,
    )
    rows: list[Row] = []
    with running_nodes(ctx) as nodes:
        for mode in ("full", "delta"):
            figures = asyncio.run(
                _step(
                    nodes[0],
                    ctx.target.token,
                    ctx.channel(f"delta-{mode}"),
                    subscribers,
                    messages,
                    rate,
                    mode == "delta",
                )
            )
            rows.append(step_row(ctx, "delta", f"N={subscribers} {mode}", **figures))
    full, compressed = rows
    compressed["bytes_ratio"] = round(
        full["bytes_per_delivery"] / max(1, compressed["bytes_per_delivery"]), 2
    )
    compressed["cpu_ratio"] = round(
        compressed["cpu_us_per_delivery"] / max(1e-9, full["cpu_us_per_delivery"]), 2
    )
    return rows


DELTA_RUNNERS = {"delta": delta}
