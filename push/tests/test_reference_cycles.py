"""What a node makes for each refused handshake or request is freed as soon as it is
done with, not left in reference cycles for the garbage collector, whose collections
stop the event loop (``push_gc_pause_seconds``). An exception keeps the frames of its
traceback, and each frame the frames that called it: one that ends up referring back
to itself holds the whole call until a collection."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from common.db import db_call
from common.errors import ErrorCode, PushError
from push.api.handler import LoopHandler


class Marker:
    """Something a frame refers to, to see when the frame is freed."""


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collector")
async def test_an_error_raised_on_a_database_thread_leaves_no_cycle() -> None:
    markers: list[weakref.ref[Marker]] = []

    def refuse() -> None:
        marker = Marker()  # held by this frame, which the error's traceback holds
        markers.append(weakref.ref(marker))
        raise PushError(ErrorCode.FORBIDDEN, "not this one")

    try:
        await db_call(refuse)()
    except PushError as exc:
        assert exc.code == ErrorCode.FORBIDDEN
    assert markers and markers[0]() is None


@pytest.mark.usefixtures("no_collector")
async def test_a_request_whose_client_left_leaves_no_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Django's handler listens for the client leaving in a task of its own; that
    task's ``RequestAborted`` must not be raised again where the task is referred to."""
    listeners: list[weakref.ref[asyncio.Task[Any]]] = []
    create_task = asyncio.create_task

    def recording(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = create_task(coro, **kwargs)
        if coro.__qualname__.endswith("listen_for_disconnect"):
            listeners.append(weakref.ref(task))
        return task

    monkeypatch.setattr(asyncio, "create_task", recording)
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict[str, Any]:
        # The body, then the client is gone.
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)  # the client leaves while the answer is under way

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/metrics",
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    await LoopHandler()(scope, receive, send)
    assert listeners and listeners[0]() is None
