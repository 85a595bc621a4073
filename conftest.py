"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

from push.tests.wsclient import WIRE_FORMATS


@pytest.fixture(params=WIRE_FORMATS)
def wire_format(request: pytest.FixtureRequest) -> str:
    """The subprotocol of one wire format: a test taking it runs once per format."""
    return request.param


@pytest.fixture(autouse=True)
async def fresh_node():
    """Each test's event loop gets its own node; stop it so nothing leaks between tests."""
    from push.services.runtime import stop_node

    yield
    await stop_node()


@pytest.fixture(autouse=True)
def _forget_cached_recent_history():
    """Each test's database starts empty while Redis lives on: drop the recent-history
    cache after a test, or the next one would read another test's messages; and the
    failed-authentication counters, or one test's bad tokens would throttle the next."""
    yield
    from django.conf import settings
    from django.core.cache import cache

    if not settings.REDIS_URL:
        cache.clear()  # the process's own LocMemCache
        return
    from common.redis_client import redis_prefix, redis_sync

    client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
    try:
        # The recent-history cache, recent channels' leases and windows, and the
        # failed-authentication counters.
        patterns = ("recent:*", "rseq:*", "rwin:*", "*:auth-failures:*")
        for pattern in patterns:
            keys = list(client.scan_iter(match=f"{redis_prefix()}:{pattern}", count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session", autouse=True)
def _close_database_threads(django_db_setup, django_db_blocker):  # type: ignore[no-untyped-def]
    """The database threads hold connections; close them before the test database is
    dropped, or PostgreSQL refuses to drop a database that is still in use."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    from common.db import close_database_threads

    with django_db_blocker.unblock():
        close_database_threads()
        # The async ORM and sync_to_async() in tests use asgiref's own thread.
        SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=15)
        connections.close_all()
        # With PostgreSQL's pool the connections outlive close_all(); the pool holds them.
        for connection in connections.all():
            if hasattr(connection, "close_pool"):
                connection.close_pool()
