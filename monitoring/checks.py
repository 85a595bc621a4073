"""Dependency checks for readiness: can this node reach PostgreSQL and Redis?"""

from __future__ import annotations

import asyncio

from django.db import connection

from common.db import db_call
from common.redis_client import redis_async

DEPENDENCY_TIMEOUT_SECS = 2.0


def _database_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


_database_ping_async = db_call(_database_ping)


async def check_database() -> str | None:
    try:
        await asyncio.wait_for(_database_ping_async(), DEPENDENCY_TIMEOUT_SECS)
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
