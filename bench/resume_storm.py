"""Resume storm: a node restarts and all its clients reconnect and resume at once.

    python -m bench.resume_storm [--clients 2000] [--missed 50] [--channels 1]
                                 [--server uvicorn] [--no-cache]

Node A serves N subscribers spread over ``--channels`` channels (1: one shared feed;
as many as clients: a channel per user), node B publishes. A is stopped (SIGTERM: its
clients are told to go), B publishes ``--missed`` messages on every channel, A starts
again and every client reconnects to it at the same moment with ``since`` = the last
seq it saw. Printed: the time from A answering until every client has every missed
message, loss/duplicates, and how many channels A's first read found in the Redis
recent-history cache. Resumes are served from the node's memory after one read per
channel: from the Redis cache, or from PostgreSQL with ``--no-cache``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import time
from typing import Any

import httpx
from websockets.asyncio.client import connect

from bench.servers import start_node, stop_node
from bench.targets import build_targets

CHANNEL = "storm"
PUBLISHERS = 16
CONNECT_TIMEOUT_SECS = 30.0
CATCH_UP_TIMEOUT_SECS = 60.0


class Client:
    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = channel
        self.seen: list[int] = []
        self.ws: Any = None

    async def subscribe(self, since: int | None) -> None:
        self.ws = await connect(self.url, open_timeout=CONNECT_TIMEOUT_SECS, max_queue=None)
        await self.ws.recv()
        request: dict[str, Any] = {"type": "subscribe", "channel": self.channel}
        if since is not None:
            request["since"] = since
        await self.ws.send(json.dumps(request))

    async def read_until(self, last_seq: int) -> None:
        while not self.seen or self.seen[-1] < last_seq:
            envelope = json.loads(await self.ws.recv())
            if envelope["type"] == "message":
                self.seen.append(envelope["seq"])


async def _publish(http_url: str, token: str, channels: list[str], count: int) -> dict[str, int]:
    """Publish ``count`` messages on every channel; the last seq of each."""
    last: dict[str, int] = {}
    queue = collections.deque((channel, i) for i in range(count) for channel in channels)

    async def publisher(http: httpx.AsyncClient) -> None:
        while queue:
            channel, i = queue.popleft()
            response = await http.post(
                f"{http_url}/api/v1/channels/{channel}/messages",
                json={"data": {"i": i}},
                headers={"Authorization": f"Token {token}"},
            )
            response.raise_for_status()
            last[channel] = max(last.get(channel, 0), response.json()["seq"])

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(publisher(http) for _ in range(PUBLISHERS)))
    return last


def _cache_hits(http_url: str) -> int:
    metrics = httpx.get(f"{http_url}/metrics", timeout=10).text
    for line in metrics.splitlines():
        if line.startswith('push_recent_cache_reads_total{result="hit"}'):
            return int(float(line.split()[-1]))
    return 0


async def _close_quietly(client: Client) -> None:
    # The node went away, which is the point: however the socket ends is fine.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.ws.wait_closed(), 10)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    database_url = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    (target,) = build_targets(
        ["ours"], database_url=database_url, redis_url=redis_url, ours_command="runnode"
    )
    if args.no_cache:
        target.env["PUSH_RECENT_CACHE_SIZE"] = "0"
    port_a, port_b = args.base_port, args.base_port + 1
    node_a = start_node(target, args.server, "127.0.0.1", port_a, True)
    node_b = start_node(target, args.server, "127.0.0.1", port_b, True)
    http_b = f"http://127.0.0.1:{port_b}"
    run_id = os.urandom(3).hex()
    channels = [f"{CHANNEL}-{run_id}-{n}" for n in range(min(args.channels, args.clients))]
    try:
        clients = [
            Client(f"ws://127.0.0.1:{port_a}/ws/", channels[n % len(channels)])
            for n in range(args.clients)
        ]
        await asyncio.gather(*(c.subscribe(None) for c in clients))
        first_last = await _publish(http_b, target.token, channels, 2)
        await asyncio.gather(*(c.read_until(first_last[c.channel]) for c in clients))
        stop_node(node_a)
        await asyncio.gather(*(_close_quietly(c) for c in clients))
        final = await _publish(http_b, target.token, channels, args.missed)
        node_a = start_node(target, args.server, "127.0.0.1", port_a, True)
        started = time.monotonic()
        await asyncio.gather(*(c.subscribe(c.seen[-1]) for c in clients))
        resubscribed = time.monotonic() - started
        await asyncio.wait_for(
            asyncio.gather(*(c.read_until(final[c.channel]) for c in clients)),
            CATCH_UP_TIMEOUT_SECS,
        )
        caught_up = time.monotonic() - started
        wrong = sum(1 for c in clients if c.seen != list(range(c.seen[0], final[c.channel] + 1)))
        for client in clients:
            await client.ws.close()
        return {
            "bench": "resume_storm",
            "server": args.server,
            "clients": args.clients,
            "channels": len(channels),
            "missed_per_client": args.missed,
            "redis_cache": not args.no_cache,
            "channels_read_from_cache": _cache_hits(f"http://127.0.0.1:{port_a}"),
            "all_resubscribed_secs": round(resubscribed, 3),
            "all_caught_up_secs": round(caught_up, 3),
            "clients_with_loss_or_duplicates": wrong,
        }
    finally:
        stop_node(node_a)
        stop_node(node_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--missed", type=int, default=50)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true", help="PUSH_RECENT_CACHE_SIZE=0")
    parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn")
    parser.add_argument("--base-port", type=int, default=18300)
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
