"""Per-channel seq for the Channels reference: one Redis INCR per publish.

The tutorial has no seq; the load generator needs one, and a Redis counter keeps it
right across nodes the way the contract asks.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis_asyncio
from django.conf import settings

SEQ_KEY_PREFIX = "benchref:seq:"
_clients: dict[int, Any] = {}


def _client() -> Any:
    # One client per event loop: redis.asyncio connections belong to the loop that
    # opened them, and Django's async_to_sync may run views on another loop.
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    if loop_id not in _clients:
        _clients[loop_id] = redis_asyncio.Redis.from_url(settings.REDIS_URL)
    return _clients[loop_id]


async def next_seq(channel: str) -> int:
    return int(await _client().incr(SEQ_KEY_PREFIX + channel))


async def current_seq(channel: str) -> int:
    return int(await _client().get(SEQ_KEY_PREFIX + channel) or 0)
