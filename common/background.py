"""Fire-and-forget tasks that are neither lost nor silent, and objects kept per event
loop.

The event loop holds its tasks only weakly: a task whose result nobody keeps can be
garbage-collected mid-flight (asyncio's documentation of ``create_task`` says to keep
a reference), and its exception surfaces, if ever, only when it is collected.
``spawn`` keeps each task in a set until it is done and logs its exception at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

# How long a cancelled task may run on before it is cancelled again.
RECANCEL_SECS = 0.5

T = TypeVar("T")

# Tasks still running; each removes itself when done.
_running: set[asyncio.Task[Any]] = set()


def spawn(
    coroutine: Coroutine[Any, Any, Any],
    *,
    name: str | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[Any]:
    task = (loop or asyncio.get_running_loop()).create_task(coroutine, name=name)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def running_count() -> int:
    return len(_running)


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=exc)


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], *, timeout: float) -> None:
    """Cancel ``tasks`` and wait, at most ``timeout`` seconds, until they have ended.

    A library can swallow a cancellation (seen with a Redis command cancelled while its
    client was being closed): the task then carries on to its next await as if nothing
    happened, and a loop that only ends when cancelled would run for ever, holding the
    event loop's shutdown. So a task still running after a short wait is cancelled
    again, and what is left at the deadline is logged rather than waited on.
    """
    pending = {task for task in tasks if not task.done()}
    deadline = asyncio.get_running_loop().time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            names = ", ".join(sorted(task.get_name() for task in pending))
            logger.warning("tasks still running after cancellation: %s", names)
            return
        _, pending = await asyncio.wait(pending, timeout=min(remaining, RECANCEL_SECS))


def loop_runs_here(loop: asyncio.AbstractEventLoop, thread_id: int) -> bool:
    """Whether the caller runs on ``loop``, which was running in thread ``thread_id``
    when that was noted, without asking asyncio for the running loop: on Python 3.11
    every ``asyncio.get_running_loop()`` makes a ``getpid()`` system call (1-2 us
    here), and the publish path asked several times per publish. A thread runs one
    loop at a time, and a running loop stays in its thread."""
    return thread_id == threading.get_ident() and loop.is_running()


class LoopLocal(Generic[T]):
    """One ``T`` per event loop, made by ``make`` on first use on that loop: what holds
    an asyncio Redis client or futures belongs to the loop it was made on (tests run
    many loops in one process)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        # The loop asked for last, the thread it ran in, and its value: a node has one
        # loop, and asks on every publish (a weak dictionary's look-up cost about 1 us
        # of it, and asking asyncio for the running loop as much: ``loop_runs_here``).
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], int, T] | None = None

    def get(self) -> T:
        last = self._last
        if last is not None:
            last_loop = last[0]()
            if last_loop is not None and loop_runs_here(last_loop, last[1]):
                return last[2]
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            value = self._values[loop] = self._make()
        self._last = (weakref.ref(loop), threading.get_ident(), value)
        return value

    def pop(self) -> T | None:
        """This loop's value, no longer kept (None if none was made)."""
        self._last = None
        return self._values.pop(asyncio.get_running_loop(), None)


class Wakeup:
    """An ``asyncio.Event`` for one waiter at a time that asks asyncio for the running
    loop once, at its first wait: ``asyncio.Event`` asks on every wait, a ``getpid()``
    system call each on Python 3.11 (``loop_runs_here``), and a write pipeline waits
    once per batch (py-spy: 1.5% of a node's main thread under REST publishing)."""

    __slots__ = ("_loop", "_set", "_waiter")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        assert self._waiter is None, "one waiter at a time"
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
