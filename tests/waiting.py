"""Waiting in tests for a condition to hold, instead of sleeping for a time that is
usually long enough: a wait ends as soon as the condition holds, and on a slow machine
it waits longer instead of failing."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tests.servers import Database

T = TypeVar("T")

# Generous: a wait ends when its condition holds, so the timeout is only the bound on a
# failing test, and a loaded machine (the suite shares two cores) must not trip it.
WAIT_TIMEOUT_SECS = 10.0
POLL_INTERVAL_SECS = 0.01
# For a condition that asks a server or a database (a query, a scrape): often enough,
# and not a load of its own on the machine the servers under test share.
QUERY_INTERVAL_SECS = 0.1


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    seen = "" if last is None or isinstance(last, bool) else f"; last saw {last!r}"
    return AssertionError(f"waited {timeout:g} s for {what}{seen}")


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    what: str,
    *,
    timeout: float = WAIT_TIMEOUT_SECS,
    interval: float = POLL_INTERVAL_SECS,
) -> T:
    """Call ``condition`` (a function or a coroutine function) until it returns a true
    value, and return that value; fail naming ``what`` was awaited after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)


def wait_until_blocking(
    condition: Callable[[], T],
    what: str,
    *,
    timeout: float = WAIT_TIMEOUT_SECS,
    interval: float = POLL_INTERVAL_SECS,
) -> T:
    """``wait_until`` for code without an event loop: blocks the thread between calls."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)


def lock_waiters(database: Database) -> int:
    """How many sessions of ``database`` wait on a lock: what a test that holds a row
    lock waits for before it goes on (a write path that commits several publishes
    together waits on it as one)."""
    rows = database.query(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(rows[0][0])
