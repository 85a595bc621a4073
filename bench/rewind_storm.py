"""Rewind storm: thousands of dashboards open on one channel at once, each asking for
its last messages.

    python -m bench.rewind_storm [--clients 2000] [--rewind 20] [--stored 50] [--nodes 2]
                                 [--server uvicorn] [--no-cache] [--recent 5]

The channel gets ``--stored`` messages first. Then N clients, spread over ``--nodes``
nodes that have never served the channel, connect; once all are connected every one
sends ``subscribe`` with ``rewind`` at the same moment. Printed: the time from the
first subscribe sent until every client has its ``--rewind`` messages (checked: the
channel's last ones, in order), and what the nodes read to serve them: stored rows read
from PostgreSQL (``push_history_rows_read_total``) and channel joins served by the
Redis recent-history cache. A node reads the channel once, when it joins it, and
serves every rewind from those messages in memory: with ``--stored`` under the node's
recent size, one read per node is ``--stored`` rows per node (``--no-cache``; with the
cache it is no PostgreSQL row at all). With ``--recent`` under ``--rewind`` the node's
memory cannot serve them: rewinds read history, and those that start together share
one read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from websockets.asyncio.client import connect

from bench.servers import start_nodes, stop_nodes
from bench.storms import counter, publish, storm_target

CHANNEL = "rewind"
CONNECT_TIMEOUT_SECS = 30.0
# Handshakes in flight at once: a burst of 2,000 overflows the listen backlog.
CONNECTS_IN_FLIGHT = 200
REWIND_TIMEOUT_SECS = 60.0


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[int] = []
        self.ws: Any = None

    async def connect(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            self.ws = await connect(self.url, open_timeout=CONNECT_TIMEOUT_SECS, max_queue=None)
            await self.ws.recv()  # connection_established

    async def rewind(self, channel: str, count: int) -> float:
        """Subscribe with ``rewind``; when the ``count``-th message arrived (monotonic)."""
        request = {"type": "subscribe", "channel": channel, "rewind": count}
        await self.ws.send(json.dumps(request))
        while len(self.seen) < count:
            envelope = json.loads(await self.ws.recv())
            if envelope["type"] == "message":
                self.seen.append(envelope["seq"])
            elif envelope["type"] == "error":
                raise RuntimeError(f"subscribe refused: {envelope}")
        return time.monotonic()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    target = storm_target(no_cache=args.no_cache)
    if args.recent is not None:
        target.env["PUSH_RECENT_PER_CHANNEL"] = str(args.recent)
    nodes = start_nodes(target, args.server, "127.0.0.1", args.base_port, args.nodes)
    urls = [f"http://127.0.0.1:{node.port}" for node in nodes]
    channel = f"{CHANNEL}-{os.urandom(3).hex()}"
    try:
        last = (await publish(urls[0], target.token, [channel], args.stored))[channel]
        rows_before = sum(counter(url, "push_history_rows_read_total") for url in urls)
        clients = [
            Client(f"ws://127.0.0.1:{nodes[n % len(nodes)].port}/ws/") for n in range(args.clients)
        ]
        gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        await asyncio.gather(*(c.connect(gate) for c in clients))
        started = time.monotonic()
        done = await asyncio.wait_for(
            asyncio.gather(*(c.rewind(channel, args.rewind) for c in clients)),
            REWIND_TIMEOUT_SECS,
        )
        expected = list(range(last - args.rewind + 1, last + 1))
        wrong = sum(1 for c in clients if c.seen != expected)
        rows_read = sum(counter(url, "push_history_rows_read_total") for url in urls)
        cache_hits = sum(
            counter(url, 'push_recent_cache_reads_total{result="hit"}') for url in urls
        )
        for client in clients:
            await client.ws.close()
        times = sorted(at - started for at in done)
        return {
            "bench": "rewind_storm",
            "server": args.server,
            "nodes": len(nodes),
            "clients": args.clients,
            "rewind": args.rewind,
            "stored": args.stored,
            "redis_cache": not args.no_cache,
            "recent_per_channel": args.recent,
            "all_rewound_secs": round(times[-1], 3),
            "p50_rewound_secs": round(times[len(times) // 2], 3),
            "postgres_rows_read": int(rows_read - rows_before),
            "channel_joins_from_cache": int(cache_hits),
            "clients_with_wrong_messages": wrong,
        }
    finally:
        stop_nodes(nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rewind", type=int, default=20)
    parser.add_argument("--stored", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--no-cache", action="store_true", help="PUSH_RECENT_CACHE_SIZE=0")
    parser.add_argument(
        "--recent",
        type=int,
        help="PUSH_RECENT_PER_CHANNEL: under --rewind, rewinds read history (shared reads)",
    )
    parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn")
    parser.add_argument("--base-port", type=int, default=18320)
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
