"""Dependency checks for readiness: can this node reach PostgreSQL and Redis?"""

from __future__ import annotations

import asyncio
import logging
import weakref

from common.db import db_call
from common.redis_client import redis_async
from push.models import Channel

logger = logging.getLogger(__name__)

DEPENDENCY_TIMEOUT_SECS = 2.0
# How long one round of checks answers every /ready: anyone may ask, as often as they
# like, and each round costs a Redis connection and a database read; a load balancer's
# probe comes every few seconds and sees a change within this.
CHECKS_REUSED_SECS = 1.0

# Each event loop's last round of checks: when it started and its (future) failures.
_rounds: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, tuple[float, asyncio.Future[list[str]]]
] = weakref.WeakKeyDictionary()

# The dependencies this process last said were failing: /ready logs when that changes,
# not on every probe (a load balancer asks every second or so, all through an outage).
_failing_logged: frozenset[str] = frozenset()


def _database_read() -> None:
    # A read of a table the node serves rather than SELECT 1: a database that answers
    # but cannot be read (not migrated, privileges missing) is not ready either. On a
    # database thread, through the pool, as every request's reads.
    Channel.objects.exists()


_database_read_async = db_call(_database_read)


def _failure(dependency: str, exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        # Its text is empty: "database: TimeoutError: " was all a probe said of a
        # database that did not answer (the pool still waiting for a connection).
        return f"{dependency}: no answer within {DEPENDENCY_TIMEOUT_SECS:g} s"
    return f"{dependency}: {type(exc).__name__}: {exc}"[:300]


async def check_database() -> str | None:
    try:
        await asyncio.wait_for(_database_read_async(), DEPENDENCY_TIMEOUT_SECS)
    except Exception as exc:
        return _failure("database", exc)
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
        return _failure("redis", exc)
    finally:
        await client.aclose()
    return None


async def dependency_failures(redis_url: str | None) -> list[str]:
    """What of PostgreSQL and Redis is unreachable: one round of checks at a time, and
    its answer for ``CHECKS_REUSED_SECS`` to every request that asks meanwhile."""
    loop = asyncio.get_running_loop()
    found = _rounds.get(loop)
    if found is None or loop.time() - found[0] >= CHECKS_REUSED_SECS:
        round_ = loop.create_task(_check_all(redis_url))
        found = _rounds[loop] = (loop.time(), round_)
    return list(await asyncio.shield(found[1]))


async def _check_all(redis_url: str | None) -> list[str]:
    results = await asyncio.gather(check_database(), check_redis(redis_url))
    return [failure for failure in results if failure is not None]


def _dependency(failure: str) -> str:
    return failure.split(":", 1)[0]


def log_readiness_change(failures: list[str]) -> None:
    """Log, once each, a dependency that went down and one that came back (at WARNING,
    so that a log kept at WARNING shows when an outage ended as well as when it began)."""
    global _failing_logged
    failing = frozenset(map(_dependency, failures))
    if failing == _failing_logged:
        return
    for failure in failures:
        if _dependency(failure) not in _failing_logged:
            logger.warning("not ready: %s", failure)
    for dependency in sorted(_failing_logged - failing):
        logger.warning("%s answers again", dependency)
    _failing_logged = failing
