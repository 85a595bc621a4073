"""What the storm benchmarks (``resume_storm``, ``rewind_storm``) share: the node
target, the messages stored before the storm, and reading a node's counters."""

from __future__ import annotations

import asyncio
import collections
import os
import resource

import httpx

from bench.servers import Target
from bench.targets import build_targets

# REST publishers storing the messages before a storm.
PUBLISHERS = 16


def storm_target(*, no_cache: bool) -> Target:
    """Our node, against ``BENCH_DATABASE_URL``, ``BENCH_REDIS_URL`` and
    ``BENCH_REDIS_PREFIX``, with the open-file limit raised for thousands of sockets;
    ``no_cache`` turns the Redis recent cache off."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    database_url = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    (target,) = build_targets(
        ["ours"],
        database_url=database_url,
        redis_url=redis_url,
        ours_command="runnode",
        redis_prefix=os.environ.get("BENCH_REDIS_PREFIX", "pushbench"),
    )
    if no_cache:
        target.env["PUSH_RECENT_CACHE_SIZE"] = "0"
    return target


def counter(http_url: str, name: str) -> float:
    """A counter of the node's ``/metrics`` (``name`` with its labels, if any); 0 if absent."""
    for line in httpx.get(f"{http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def publish(http_url: str, token: str, channels: list[str], count: int) -> dict[str, int]:
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
