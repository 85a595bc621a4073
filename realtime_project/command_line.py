"""manage.py's entry point: Django's, except that what an operator causes or meets (a
setting that cannot be read, PostgreSQL or Redis unreachable) ends the command with
one line that says so and exit status 1, not a traceback of a hundred lines with the
cause at its foot. ``--traceback`` still shows the traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def execute(argv: Sequence[str]) -> int:
    """Run the command ``argv`` (as ``sys.argv``); the process's exit status."""
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(list(argv))
    except Exception as exc:
        message = operator_error(exc)
        if message is None or "--traceback" in argv:
            raise
        _close_database_pools(exc)
        sys.stderr.write(f"{message}\n")
        return 1
    return 0


def _close_database_pools(exc: Exception) -> None:
    """After a database error, stop the pool's threads, which go on trying to connect,
    and logging each attempt, until the process exits: after the one line, burying it.
    (After another error the settings may not even load.)"""
    from django.db import OperationalError, connections

    if not isinstance(exc, OperationalError):
        return
    for connection in connections.all(initialized_only=True):
        close_pool = getattr(connection, "close_pool", None)
        if close_pool is not None:
            close_pool()


def operator_error(exc: BaseException) -> str | None:
    """What to tell an operator about ``exc``, or None when it is a bug (a traceback)."""
    import redis.exceptions
    from django.db import OperationalError

    from common.conf import ImproperlyConfiguredEnv

    if isinstance(exc, ImproperlyConfiguredEnv):
        return f"configuration error: {exc}"
    if isinstance(exc, OperationalError):
        # Connecting failed, or the server ended the session: the pool's warnings above
        # give the cause of each attempt.
        return f"database error ({database_address()}): {exc}"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"Redis unreachable: {exc}"
    return None


def database_address() -> str:
    """Where ``DATABASE_URL`` points, without its password."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    if "sqlite" in database["ENGINE"]:
        return f"SQLite {database['NAME']}"
    return f"PostgreSQL {database.get('HOST') or 'localhost'}:{database.get('PORT') or 5432}"
