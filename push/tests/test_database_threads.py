"""Database calls from the event loop: history pages run on threads of their own, so
anonymous clients asking for large pages never hold up a handshake's token check or a
subscription's query."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from common.db import DATABASE_THREADS, db_call
from common.postgresql.base import PooledConnectionCheck
from push.tests.backends import terminate_backends


def _wait_for(release: threading.Event) -> str:
    release.wait(timeout=10)
    return threading.current_thread().name


def _quick() -> str:
    return threading.current_thread().name


_history_read = db_call(_wait_for, history=True)
_quick_call = db_call(_quick)


async def test_quick_calls_do_not_wait_behind_history_reads() -> None:
    release = threading.Event()
    # More history reads than there are database threads in all: in one shared pool
    # they would take every thread.
    reads = [asyncio.ensure_future(_history_read(release)) for _ in range(DATABASE_THREADS + 2)]
    try:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        name = await asyncio.wait_for(_quick_call(), timeout=2)
        assert time.monotonic() - started < 1
        assert name.startswith("push-db_")
    finally:
        release.set()
    names = await asyncio.gather(*reads)
    assert all(n.startswith("push-db-history") for n in names)


def _backend_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


_backend_pid_call = db_call(_backend_pid)


@pytest.mark.django_db(transaction=True)
async def test_a_pooled_connection_the_server_ended_is_never_handed_out() -> None:
    """The pool's check sees, without a round trip, that the server ended a connection
    while it sat in the pool (here ``pg_terminate_backend``; a restart does the same):
    no call fails on it."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's pool")
    pool = connection.pool
    assert isinstance(pool._check, PooledConnectionCheck)
    ended = await _backend_pid_call()
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [ended])
    await asyncio.sleep(0.2)  # the server's farewell reaches the socket
    pids = [await _backend_pid_call() for _ in range(12)]  # more than the pool holds idle
    assert ended not in pids
    # Nor is it left in the pool for a later call: every connection there works.
    pool.pop_stats()
    await asyncio.to_thread(pool.check)
    assert pool.pop_stats().get("connections_lost", 0) == 0


def _pooled_backend_pids(pool: ConnectionPool, *, at_least: int) -> set[int]:
    """The backends of the connections idle in ``pool``, at least ``at_least`` of them:
    taken out together (each once, the pool growing as needed) and given back."""
    count = max(at_least, pool.get_stats()["pool_available"])
    taken = [pool.getconn() for _ in range(count)]
    try:
        return {conn.info.backend_pid for conn in taken}
    finally:
        for conn in taken:
            pool.putconn(conn)


@pytest.mark.django_db(transaction=True)
async def test_after_a_restart_ended_every_pooled_connection_the_next_call_is_answered() -> None:
    """What a PostgreSQL restart does to an idle node's pool: every connection in it
    ended at once (only the pool's here, collected through it). The next call gets a
    new connection at once: going through the ended ones, psycopg_pool waits 1 s after
    the second failed check and 2 s after the third, and with four the call was
    answered UNAVAILABLE after the pool's 3 s timeout."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's pool")
    pool = connection.pool
    pids = await asyncio.to_thread(_pooled_backend_pids, pool, at_least=4)
    await asyncio.to_thread(terminate_backends, *pids)
    pool.pop_stats()
    started = time.monotonic()
    assert await _backend_pid_call() not in pids
    assert time.monotonic() - started < 1
    # One ended connection reached the check; the others were replaced with the drain.
    assert pool.pop_stats().get("connections_lost", 0) == 1
