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

import httpx
import pytest

from common.db import db_call
from common.errors import ErrorCode, PushError
from push.api.handler import LoopHandler
from push.services.runtime import get_node


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


def _left_to_the_collector() -> list[str]:
    """The types of what the cyclic collector would free now, of a request's making
    (httpx's own response objects refer to each other: the test client's)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        names = {f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    # (Not django.db's: a thread that ended meanwhile, one an earlier test started,
    # leaves its connection's wrapper, whose parts refer to it and it to them.)
    ours = ("django.", "rest_framework.", "push.")
    return sorted(n for n in names if n.startswith(ours) and not n.startswith("django.db."))


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_node")
async def test_rest_requests_leave_nothing_to_the_collector(publisher_token: str) -> None:
    """Django's request and its messages storage, DRF's request, view, response and
    serializer: all freed when the request ends (``push.api.handler._release``)."""
    await get_node()
    transport = httpx.ASGITransport(app=LoopHandler())
    auth = {"Authorization": f"Token {publisher_token}"}
    path = "/api/v1/channels/news/messages"
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        requests = [
            http.build_request("POST", path, json={"data": {"n": 1}}, headers=auth),
            http.build_request("GET", path, headers=auth),
            http.build_request("GET", path),  # anonymous
            http.build_request("GET", "/api/v1/channels/", headers=auth),
            http.build_request("GET", path + "?limit=nope", headers=auth),  # refused: 400
        ]
        for request in requests:
            await http.send(request)  # once first: imports, caches and the like
        gc.collect()
        gc.disable()
        try:
            for request in requests:
                response = await http.send(request)
                assert response.status_code in (200, 201, 400), response.text
                assert _left_to_the_collector() == [], request.url
        finally:
            gc.enable()
