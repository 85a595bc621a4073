"""Fire-and-forget tasks that are neither lost nor silent.

The event loop holds its tasks only weakly: a task whose result nobody keeps can be
garbage-collected mid-flight (asyncio's documentation of ``create_task`` says to keep
a reference), and its exception surfaces, if ever, only when it is collected.
``spawn`` keeps each task in a set until it is done and logs its exception at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)

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
