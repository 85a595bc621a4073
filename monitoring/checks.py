"""Dependency checks for readiness: can this node reach PostgreSQL and Redis?"""

from __future__ import annotations

import asyncio

from common.db import db_call
from common.redis_client import redis_async
from push.models import Channel

DEPENDENCY_TIMEOUT_SECS = 2.0


def _database_read() -> None:
    # A read of a table the node serves rather than SELECT 1: a database that answers
    # but cannot be read (not migrated, privileges missing) is not ready either. On a
    # database thread, through the pool, as every request's reads.
    Channel.objects.exists()


_database_read_async = db_call(_database_read)


async def check_database() -> str | None:
    try:
        await asyncio.wait_for(_database_read_async(), DEPENDENCY_TIMEOUT_SECS)
    except Exception as exc:
        return f"database: {type(exc).__name__}: {exc}"[:300]
    return None


async def check_redis(redis_url: str | None) -> str | None:
    if not redis_url:
        return None
    client = redis_async(
        socket_connect_timeout=DEPENDENCY_TIMEOUT_SECS,
        socket_timeout=DEPENDENCY_TIMEOUT_SECS,
    )
    try:
        await asyncio.wait_for(client.ping(), DEPENDENCY_TIMEOUT_SECS)  # type: ignore[arg-type]  # redis-py types sync and asyncio commands alike
    except Exception as exc:
        return f"redis: {type(exc).__name__}: {exc}"[:300]
    finally:
        await client.aclose()
    return None
