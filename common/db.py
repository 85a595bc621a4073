"""Running ORM work from the event loop.

Database calls run on a small pool of threads (``thread_sensitive=False``), each
holding a connection for the length of a call, instead of Channels' one shared
database thread, so a slow query never queues every other connection's work behind it.
History pages (up to 4 MiB of message data each, which anonymous clients may ask for)
run on threads of their own (``db_call(..., history=True)``): however many of them
wait, a handshake's token check or a subscription's query does not wait behind them.
"""

from __future__ import annotations

import functools
import logging
import select
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, IntegrityError, close_old_connections, connections

from common import metrics
from common.errors import ErrorCode, PushError

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger(__name__)

# Each thread holds at most one connection, so these bound the connections the node's
# database calls take from the pool (plus Django's own request threads').
DATABASE_THREADS = 6
HISTORY_THREADS = 3
_executor = ThreadPoolExecutor(max_workers=DATABASE_THREADS, thread_name_prefix="push-db")
_history_executor = ThreadPoolExecutor(
    max_workers=HISTORY_THREADS, thread_name_prefix="push-db-history"
)


def closed_by_server(socket: int) -> bool:
    """Whether the server ended the idle PostgreSQL connection on ``socket``. An idle
    connection is sent nothing unless the server is going away (a restart or
    ``pg_terminate_backend`` sends a FATAL notice, a dead backend's socket reads EOF):
    anything to read means the connection is done. One ``poll`` with no wait;
    ``select`` would refuse the descriptors above 1024 a busy node has."""
    poller = select.poll()
    poller.register(socket, select.POLLIN)
    return bool(poller.poll(0))


def database_unavailable(exc: BaseException) -> PushError:
    return PushError(ErrorCode.UNAVAILABLE, f"database unavailable: {type(exc).__name__}")


def _guarded(func: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        # Drops a connection that failed or outlived CONN_MAX_AGE, so a restarted
        # PostgreSQL costs one failed call, not a dead thread.
        close_old_connections()
        started = time.perf_counter()
        try:
            return func(*args, **kwargs)
        except IntegrityError:
            raise
        except DatabaseError as exc:
            logger.warning("database call %s failed: %s", func.__name__, exc)
            raise database_unavailable(exc) from exc
        finally:
            # Back to the pool at once (CONN_MAX_AGE is 0), failed or not: one kept by
            # an idle thread until its next call missed the pool's check, and after an
            # outage came back dead (measured: ~1 s more to recover).
            close_old_connections()
            metrics.DATABASE_CALL_SECONDS.labels(func.__name__).observe(
                time.perf_counter() - started
            )

    return run


def _caught(func: Callable[P, R]) -> Callable[P, tuple[R | None, list[BaseException]]]:
    """``func`` returning what it raised, in a list the caller empties, instead of
    raising it (see ``db_call``)."""

    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> tuple[R | None, list[BaseException]]:
        try:
            return func(*args, **kwargs), []
        except Exception as exc:
            return None, [exc]

    return run


def db_call(func: Callable[P, R], *, history: bool = False) -> Callable[P, Coroutine[Any, Any, R]]:
    """Wrap a sync ORM function as an awaitable that runs on the database threads (the
    history threads with ``history``: reads of pages of messages).

    What the function raises crosses to the loop as a value, and only the caller's frame
    raises it again. An exception keeps the frames of its traceback, and each of them
    the frames that called it: raised through the thread's and asgiref's futures (or
    returned in a value the thread's frames still hold), it made a reference cycle with
    the whole call, all it referred to included, which only the cyclic garbage
    collector freed, whose collections stop the event loop (30-80 ms of CPU each under
    the abuse suite, whose refused handshakes left about a thousand such frames for
    each). Taken out of the list it came in, nothing the thread held refers to it."""
    executor = _history_executor if history else _executor
    call = sync_to_async(_caught(_guarded(func)), thread_sensitive=False, executor=executor)

    @functools.wraps(func)
    async def awaited(*args: P.args, **kwargs: P.kwargs) -> R:
        result, raised = await call(*args, **kwargs)
        if raised:
            error = raised.pop()
            try:
                raise error
            finally:
                del error  # this frame is in its traceback: no reference back to it
        return result  # type: ignore[return-value]  # None only when it raised

    return awaited


def close_database_threads() -> None:
    """Close every database thread's connection (tests, shutdown).

    A barrier makes each worker thread take exactly one of the jobs, so every
    thread-local connection is reached.
    """
    for executor, threads in ((_executor, DATABASE_THREADS), (_history_executor, HISTORY_THREADS)):
        barrier = threading.Barrier(threads)

        def close_in_this_thread(barrier: threading.Barrier = barrier) -> None:
            barrier.wait(timeout=10)
            connections.close_all()

        futures = [executor.submit(close_in_this_thread) for _ in range(threads)]
        for future in futures:
            future.result(timeout=15)
