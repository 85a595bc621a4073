"""Resume storm: a node restarts and all its clients reconnect and resume at once.

    python -m bench.resume_storm [--clients 2000] [--missed 50] [--server uvicorn]

Node A serves N subscribers of one channel, node B publishes. A is stopped (SIGTERM:
its clients are told to go), B publishes ``--missed`` messages, A starts again and
every client reconnects to it at the same moment with ``since`` = the last seq it saw.
Printed: the time from A answering until every client has every missed message, and
loss/duplicates. The resumes are served from the node's recent-message memory after
one history read per channel, not one PostgreSQL query per client.
"""

from __future__ import annotations

import argparse
import asyncio
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
CONNECT_TIMEOUT_SECS = 30.0
CATCH_UP_TIMEOUT_SECS = 60.0


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[int] = []
        self.ws: Any = None

    async def subscribe(self, since: int | None) -> None:
        self.ws = await connect(self.url, open_timeout=CONNECT_TIMEOUT_SECS, max_queue=None)
        await self.ws.recv()
        request: dict[str, Any] = {"type": "subscribe", "channel": CHANNEL}
        if since is not None:
            request["since"] = since
        await self.ws.send(json.dumps(request))

    async def read_until(self, last_seq: int) -> None:
        while not self.seen or self.seen[-1] < last_seq:
            envelope = json.loads(await self.ws.recv())
            if envelope["type"] == "message":
                self.seen.append(envelope["seq"])


async def _publish(http_url: str, token: str, count: int) -> int:
    last = 0
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(count):
            response = await http.post(
                f"{http_url}/api/v1/channels/{CHANNEL}/messages",
                json={"data": {"i": i}},
                headers={"Authorization": f"Token {token}"},
            )
            response.raise_for_status()
            last = response.json()["seq"]
    return last


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
    port_a, port_b = args.base_port, args.base_port + 1
    node_a = start_node(target, args.server, "127.0.0.1", port_a, True)
    node_b = start_node(target, args.server, "127.0.0.1", port_b, True)
    http_b = f"http://127.0.0.1:{port_b}"
    try:
        clients = [Client(f"ws://127.0.0.1:{port_a}/ws/") for _ in range(args.clients)]
        await asyncio.gather(*(c.subscribe(None) for c in clients))
        first_last = await _publish(http_b, target.token, 10)
        await asyncio.gather(*(c.read_until(first_last) for c in clients))
        stop_node(node_a)
        await asyncio.gather(*(_close_quietly(c) for c in clients))
        final = await _publish(http_b, target.token, args.missed)
        node_a = start_node(target, args.server, "127.0.0.1", port_a, True)
        started = time.monotonic()
        await asyncio.gather(*(c.subscribe(c.seen[-1]) for c in clients))
        resubscribed = time.monotonic() - started
        await asyncio.wait_for(
            asyncio.gather(*(c.read_until(final) for c in clients)), CATCH_UP_TIMEOUT_SECS
        )
        caught_up = time.monotonic() - started
        expected = list(range(clients[0].seen[0], final + 1))
        wrong = sum(1 for c in clients if c.seen != expected)
        for client in clients:
            await client.ws.close()
        return {
            "bench": "resume_storm",
            "server": args.server,
            "clients": args.clients,
            "missed_per_client": args.missed,
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
    parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn")
    parser.add_argument("--base-port", type=int, default=18300)
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
