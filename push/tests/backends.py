"""Ending PostgreSQL backends as a restart ends them, for the tests of what recovers."""

from __future__ import annotations

import psycopg


def terminate_backends(*pids: int) -> None:
    """End these backends, each waited for (up to 5 s) until it exited: the server's
    farewell is then on the socket of each one's client. On a connection of its own, so
    the calling thread keeps no connection it did not have."""
    from django.db import connection

    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM unnest(%s::int[]) AS pid", [list(pids)]
        ).fetchall()
    assert ended == [(True,)] * len(pids)
