"""Django's PostgreSQL backend, whose connection pool checks a connection it hands out
without a round trip to the server (``ENGINE = "common.postgresql"``).

With ``CONN_HEALTH_CHECKS`` Django has psycopg_pool check every connection taken from
the pool by running an empty statement on it: one more round trip for every ORM call,
and with a connection per call (``CONN_MAX_AGE = 0``, see realtime_project/settings.py)
that is every call. Measured on one node (2,000 concurrent ``channel_latest_seq`` calls
through ``common.db``), the check cost 110-125 µs of the 800 µs of CPU a call took,
and 13% of the calls a second.

What the check is for is a connection the server ended while it sat in the pool (a
restart, ``pg_terminate_backend``, a failover): the server's farewell, or the end of
the stream, is then waiting on the socket, which one ``poll`` with no wait sees. A live
idle connection has nothing to read. A connection whose peer vanished without a word
fails its next statement instead, as it would have failed the empty one (it is then
dropped from the pool).

A server that restarts ends every pooled connection at once, and psycopg_pool waits
between the checks that fail in one call (none after the first, then 1 s, then 2 s):
going through the ended connections one by one outlasted ``DATABASE_POOL_TIMEOUT_SECS``
(3 s), and a node idle through a restart answered its first calls UNAVAILABLE though
the server was back. So the first ended connection the check finds drains the pool
(``PooledConnectionCheck``): the idle connections are closed and replaced at once, those
in use when they come back, and the call waits only for a new connection.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base
from psycopg import OperationalError
from psycopg_pool import ConnectionPool

from common.db import closed_by_server


def check_pooled_connection(connection: Any) -> None:
    """psycopg_pool's ``check``: raise for a connection the server has ended, closed
    first (the pool takes back a connection that looks open and idle, and would hand
    this one out again)."""
    if connection.closed:
        raise OperationalError("the connection is closed")
    if closed_by_server(connection.pgconn.socket):
        connection.close()
        raise OperationalError("the server ended this connection while it was pooled")


class PooledConnectionCheck:
    """``check_pooled_connection`` for one pool, which it drains when it finds a
    connection the server ended: the others were most likely ended with it."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def __call__(self, connection: Any) -> None:
        try:
            check_pooled_connection(connection)
        except OperationalError:
            # One older than the last drain is being replaced by it already: calls that
            # meet the dead connections of one restart at once drain the pool once, not
            # each of them again the connections the first drain just made.
            if connection._created_at > self.pool._drained_at:
                self.pool.drain()
            raise


class DatabaseWrapper(base.DatabaseWrapper):
    @property
    def pool(self) -> ConnectionPool | None:
        pool: ConnectionPool | None = super().pool  # type: ignore[misc]  # Django 5.1+, not in the stubs
        # Django gives the pool psycopg_pool's own check when CONN_HEALTH_CHECKS is on
        # and takes no other; the pool keeps it in ``_check``, the time of its last drain
        # in ``_drained_at`` and a connection's birth in ``_created_at`` (psycopg_pool
        # 3.2-3.3; push/tests/test_database_threads.py fails if that changes).
        if pool is not None and pool._check is ConnectionPool.check_connection:
            pool._check = PooledConnectionCheck(pool)
        return pool
