"""Publishes per second one node acknowledges over WebSocket.

    python -m bench.publish_rate ws://127.0.0.1:8000/ws/?token=KEY --connections 16 \
        --in-flight 8 --secs 10

Each connection keeps ``--in-flight`` publishes unanswered, on one of ``--channels``
channels; lift the node's rate limit first (PUSH_RATE_BURST, PUSH_RATE_PER_SEC).
Against 127.0.0.1 only: it publishes as fast as the node answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

from websockets.asyncio.client import ClientConnection, connect


async def _publisher(
    url: str, channel: str, in_flight: int, stop_at: float, answers: Counter[str]
) -> None:
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # connection_established
        sent = 0

        async def send(ws: ClientConnection) -> None:
            nonlocal sent
            sent += 1
            frame = {"type": "publish", "id": sent, "channel": channel, "data": {"i": sent}}
            await ws.send(json.dumps(frame))

        for _ in range(in_flight):
            await send(ws)
        pending = in_flight
        while pending:
            reply = json.loads(await ws.recv())
            if reply.get("type") not in ("published", "error"):
                continue
            answers[reply.get("code") or "published"] += 1
            pending -= 1
            if time.monotonic() < stop_at:
                await send(ws)
                pending += 1


async def measure(url: str, connections: int, in_flight: int, secs: float, channels: int) -> None:
    answers: Counter[str] = Counter()
    started = time.monotonic()
    await asyncio.gather(
        *(
            _publisher(url, f"bench-{i % channels}", in_flight, started + secs, answers)
            for i in range(connections)
        )
    )
    elapsed = time.monotonic() - started
    published = answers.pop("published", 0)
    print(
        f"{published} publishes acknowledged in {elapsed:.1f} s: "
        f"{published / elapsed:,.0f}/s; errors: {dict(answers) or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--secs", type=float, default=10.0)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(measure(args.url, args.connections, args.in_flight, args.secs, args.channels))


if __name__ == "__main__":
    main()
