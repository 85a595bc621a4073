"""Fixtures shared by every test package."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from django.db import connections, transaction
from pytest_django import DjangoDbBlocker

from push.tests.wsclient import WIRE_FORMATS

if TYPE_CHECKING:
    from django.test import TransactionTestCase


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing() -> Iterator[None]:
    """Passwords set and checked in this process (``create_user``, ``Client.login``) are
    hashed with MD5, as Django's testing docs advise: its default PBKDF2 hasher took
    ~0.3 s of CPU per password, in every test whose fixtures make a user. The nodes the
    end-to-end tests start keep the default."""
    from django.test import override_settings

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


@pytest.fixture(scope="session", autouse=True)
def _no_overload_shedding() -> Iterator[None]:
    """Nodes in this process count no lag as overload (``PUSH_OVERLOAD_LAG_MS=0``) unless
    a test sets it: a slow or busy test machine would refuse the anonymous clients of
    tests that are not about overload, by chance. push/tests/test_overload.py and
    tests/test_overload.py are about it, and set it. Put in where the settings are read,
    not in ``settings.PUSH``: a test that sets ``PUSH`` whole (``override_settings``)
    kept the default of 25 ms, and a loop stall of 80 ms in a clean-clone CI run had
    ``test_many_connections_cost_one_batch_not_a_write_each`` refused 1013."""
    from unittest import mock

    from common import conf

    load = conf._load

    def load_without_shedding(overrides: dict[str, Any]) -> conf.PushSettings:
        return load({"OVERLOAD_LAG_MS": 0, **overrides})

    with mock.patch.object(conf, "_load", load_without_shedding):
        conf.push_settings.reload()
        yield
    conf.push_settings.reload()


@pytest.fixture(scope="session", autouse=True)
def _cache_clear_keeps_to_its_worker() -> Iterator[None]:
    """Django's ``RedisCache.clear()`` is a ``FLUSHDB``: it emptied the tests' whole Redis
    database, the other test worker's keys among them, mid-test. Two tests clear the
    throttle counts that way, and a ``redis-cli monitor`` of a clean-clone run saw both
    ``FLUSHDB``s: the recent-channel leases of the other worker's running test went with
    them (seen as a publish numbered 1001 where 7 was due, and a history page read
    empty). Here it deletes this worker's cache entries only (``KEY_PREFIX`` is the
    worker's ``REDIS_PREFIX``)."""
    from unittest import mock

    from django.core.cache.backends.redis import RedisCache

    def clear_own_keys(cache: RedisCache) -> None:
        client = cache._cache.get_client(None, write=True)
        pattern = f"{cache.key_prefix}:{cache.version}:*"
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)

    with mock.patch.object(RedisCache, "clear", clear_own_keys):
        yield


# Tables the emptying after a transactional test leaves as the migrations filled them:
# Django's flush empties them too, then re-creates every row (post_migrate), and no test
# changes them.
KEPT_TABLES = frozenset({"django_content_type", "auth_permission"})


@pytest.fixture(scope="session", autouse=True)
def _cheap_emptying_after_transactional_tests() -> Iterator[None]:
    """After each ``transaction=True`` test, Django's TransactionTestCase flushes the
    database: one TRUNCATE of every table, which costs PostgreSQL new files for each
    table and index, then the content types and permissions made again. That was 0.33 s
    of the ~0.4 s of a consumer test (measured on the loaded 2-core machine); a DELETE
    of the few rows a test leaves costs a few milliseconds. The tables end as empty,
    and the lock taken first waits, as TRUNCATE's does, for any transaction still
    writing to them."""
    from django.test import TransactionTestCase

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            TransactionTestCase,
            "_fixture_teardown",
            _emptying(TransactionTestCase._fixture_teardown),
        )
        yield


def _emptying(flush: Callable[[TransactionTestCase], None]) -> Callable[..., None]:
    def fixture_teardown(case: TransactionTestCase) -> None:
        if case.available_apps is not None or case.serialized_rollback:
            flush(case)  # Django's own handling of what these options ask
            return
        for alias in case._databases_names(include_mirrors=False):
            if connections[alias].vendor == "postgresql":
                _empty_tables(alias)
            else:
                flush(case)

    return fixture_teardown


def _empty_tables(alias: str) -> None:
    connection = connections[alias]
    names = connection.introspection.django_table_names(only_existing=True, include_views=False)
    tables = [connection.ops.quote_name(name) for name in names if name not in KEPT_TABLES]
    # Django's foreign keys are DEFERRABLE INITIALLY DEFERRED on PostgreSQL: checked at
    # the commit, when every referencing row is gone too, whatever the order here.
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        for table in tables:
            cursor.execute(f"DELETE FROM {table}")  # noqa: S608 - our models' quoted tables


@pytest.fixture(params=WIRE_FORMATS)
def wire_format(request: pytest.FixtureRequest) -> str:
    """The subprotocol of one wire format: a test taking it runs once per format."""
    return request.param


@pytest.fixture
async def fresh_node() -> AsyncIterator[None]:
    """For a test that starts this process's node (an in-process WebSocket or SSE client,
    ``get_node()``): each test's event loop gets its own node; stop it on that loop so
    nothing leaks into the next test. Such a module says ``usefixtures("fresh_node")``."""
    from push.services.runtime import stop_node

    yield
    await stop_node()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """A node still running after a test that did not ask for ``fresh_node``: stop it
    on its loop (still open here, before the fixtures are torn down) so it cannot leak
    into the next test, and fail the test so that it asks for the fixture. For the
    tests that start no node this is one look at a variable."""
    leaked = "fresh_node" not in item.fixturenames and _stop_leaked_node()
    result = yield
    if leaked:
        pytest.fail("this test started a node: request the fresh_node fixture", pytrace=False)
    return result


def _stop_leaked_node() -> bool:
    from push.cluster.node import running_node
    from push.services.runtime import stop_node

    node = running_node()
    if node is None:
        return False
    if not node.loop.is_closed() and not node.loop.is_running():
        node.loop.run_until_complete(stop_node())
        return True
    # Its loop is gone (a sync test's async_to_sync), so what stop() awaits can never
    # finish: run only its first step, which forgets the node.
    stopping = stop_node()
    with contextlib.suppress(BaseException):
        stopping.send(None)
    stopping.close()
    return True


# Fixtures that give a test the database: only such a test can have written what the
# next one must not see in Redis (publishing and authenticating need the database).
_DATABASE_FIXTURES = {"db", "transactional_db", "django_db_reset_sequences"}


@pytest.fixture(autouse=True)
def _forget_cached_recent_history(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test's database starts empty while Redis lives on: drop what a test left
    there (``_TEST_KEY_KINDS``), or the next one would read another test's messages,
    be throttled by its bad tokens or be told its members left. Only after a test that
    used the database: the others never write these keys."""
    yield
    uses_database = request.node.get_closest_marker("django_db") is not None or bool(
        _DATABASE_FIXTURES & set(request.fixturenames)
    )
    if not uses_database:
        return
    from django.conf import settings
    from django.core.cache import cache

    if not settings.REDIS_URL:
        cache.clear()  # the process's own LocMemCache
        return
    from common.redis_client import redis_prefix, redis_sync

    client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
    prefix = f"{redis_prefix()}:".encode()
    try:
        # One pass over the worker's keys (one SCAN of the keyspace, not one per kind).
        keys = [
            key
            for key in client.scan_iter(match=prefix + b"*", count=1000)
            if _left_by_a_test(key[len(prefix) :])
        ]
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# What a test leaves in Redis that the next one must not find: the recent-history
# cache, recent channels' leases and windows, the failed-authentication counters, and
# presence and occupancy entries. The last two are kept per node, and every test's node
# in a worker has the same NODE_ID: a node that finds entries under its id repairs them
# as a restarted node would, announcing the leave of a member of an earlier test.
_TEST_KEY_KINDS = (b"recent:", b"rseq:", b"rwin:", b"presence", b"occupancy")


def _left_by_a_test(kind: bytes) -> bool:
    return kind.startswith(_TEST_KEY_KINDS) or b":auth-failures:" in kind


@pytest.fixture(scope="session", autouse=True)
def _close_database_threads(
    django_db_setup: None, django_db_blocker: DjangoDbBlocker
) -> Iterator[None]:
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
