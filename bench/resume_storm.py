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
import contextlib
import json
import os
import time
from typing import Any

from websockets.asyncio.client import connect

from bench.servers import start_node, stop_node
from bench.storms import counter, publish, storm_target

CHANNEL = "storm"
CACHE_HITS = 'push_recent_cache_reads_total{result="hit"}'
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


async def _close_quietly(client: Client) -> None:
    # The node went away, which is the point: however the socket ends is fine.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.ws.wait_closed(), 10)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    target = storm_target(no_cache=args.no_cache)
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
        first_last = await publish(http_b, target.token, channels, 2)
        await asyncio.gather(*(c.read_until(first_last[c.channel]) for c in clients))
        stop_node(node_a)
        await asyncio.gather(*(_close_quietly(c) for c in clients))
        final = await publish(http_b, target.token, channels, args.missed)
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
            "channels_read_from_cache": int(counter(f"http://127.0.0.1:{port_a}", CACHE_HITS)),
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
