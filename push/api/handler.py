"""Django's ASGI handler for the event loop (``LoopHandler``): middleware hooks that
cannot block run on the loop (``push.api.middleware``), each request's sync calls run
on a thread lent to it, a request that needed no thread starts and ends without one,
and what a request made is freed when it ends, not left to the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import MethodType
from typing import Any

from asgiref.sync import ThreadSensitiveContext, iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.cache import close_caches
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import reset_urlconf
from django.db import close_old_connections, reset_queries
from django.dispatch import Signal
from django.http import HttpRequest, HttpResponseBase
from django.urls import set_script_prefix

from push.api.middleware import LoopSafe, run_hook
from push.wire.protocol import body_too_large

# Request threads kept between requests, at most; more run while more requests need one
# at once, and stop when their request ends.
IDLE_REQUEST_THREADS = 16

# Django's own receivers of request_started and request_finished. Each acts on the
# calling thread's database connections (thread-critical) or on context-local state
# (caches, the URLconf), so on the loop they touch nothing of a request thread's.
BOUNDARY_RECEIVERS_ON_LOOP: frozenset[Callable[..., Any]] = frozenset(
    {close_old_connections, reset_queries, close_caches, reset_urlconf}
)


class RequestExecutor(ThreadPoolExecutor):
    """One thread, lent to one request at a time, that knows whether the request ran
    anything on it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="push-request")
        self.used = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.used = True
        return super().submit(fn, *args, **kwargs)


class RequestThreads:
    """Single-thread executors lent to requests, one each, for their thread-sensitive
    sync work (a session write, a static file, DRF's authentication of a token not seen
    a moment ago).

    Django's handler gives each request a ``ThreadSensitiveContext`` of its own, so
    concurrent requests do not queue on one thread; but that context starts a new
    thread for the request's first sync call and another one to join it when the
    request ends, and the loop waits for each ``Thread.start``. Measured on one node
    (REST single publish, 16 keep-alive clients), that was a sixth of the event loop's
    time. A lent executor keeps the guarantee (one request's sync calls run on one
    thread, one at a time) and its thread serves the next request."""

    def __init__(self, idle_max: int = IDLE_REQUEST_THREADS) -> None:
        self._idle: list[RequestExecutor] = []
        self._idle_max = idle_max

    def lend(self) -> RequestExecutor:
        executor = self._idle.pop() if self._idle else RequestExecutor()
        executor.used = False
        return executor

    def give_back(self, executor: RequestExecutor) -> None:
        if len(self._idle) < self._idle_max:
            self._idle.append(executor)
        else:
            # Not waited for: a call still running ends on its own, then the thread.
            executor.shutdown(wait=False)


class LoopHandler(ASGIHandler):
    """Django's ASGI handler, running the ``process_view`` and
    ``process_template_response`` hooks of ``LoopSafe`` middleware on the loop, and
    each request's thread-sensitive calls on a lent thread (``RequestThreads``).

    Django sends ``request_started`` and closes the response (which sends
    ``request_finished``) through ``sync_to_async``: two thread hops for every request,
    a tenth of the node's loop for REST single publishes (py-spy). Where the receivers
    are Django's own, they only close what the calling thread opened; a request that ran
    nothing on its lent thread opened nothing there (the request before it closed what
    it had), so it starts and ends on the loop. One that did use its thread ends there,
    as Django would end it, and other receivers keep Django's way."""

    def __init__(self) -> None:
        super().__init__()
        self.request_threads = RequestThreads()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # Django's own error
            return await super().__call__(scope, receive, send)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and declared_body_length(scope) > limit:
            return await send_body_too_large(send, limit)
        executor = self.request_threads.lend()
        try:
            # Django's handler awaits every task it starts before it returns, so no
            # call of this request reaches the executor after it is lent again.
            async with ThreadSensitiveContext(executor=executor):
                if receivers_on_loop(signals.request_started, self.__class__):
                    await self._handle_lent(executor, scope, receive, send)
                else:
                    await self.handle(scope, receive, send)
        except BodyTooLarge:
            await send_body_too_large(send, limit)
        finally:
            self.request_threads.give_back(executor)

    def create_request(self, scope: Any, body_file: Any) -> Any:
        """Django's, and a body sent without ``Content-Length`` (chunked) gets one, its
        size as read: DRF reads a body of ``Content-Length`` bytes and none without
        the header, so a chunked REST publish was answered "data: This field is
        required." (The body was read whole, within ``read_body``'s bound.)"""
        request, error = super().create_request(scope, body_file)
        if request is not None and "CONTENT_LENGTH" not in request.META:
            size = body_file.seek(0, os.SEEK_END)
            body_file.seek(0)
            if size:
                request.META["CONTENT_LENGTH"] = str(size)
        return request, error

    async def read_body(self, receive: Any) -> Any:
        """Django's ``read_body``, which reads every byte a client sends (spooled to
        disk past ``FILE_UPLOAD_MAX_MEMORY_SIZE``) before any view can refuse it, and
        checks ``DATA_UPLOAD_MAX_MEMORY_SIZE`` only when a view reads the body. Here it
        stops at that limit: a body without ``Content-Length`` (chunked) that goes
        past it is answered 413 and not read further (one with a larger
        ``Content-Length`` is answered before any of it is read, in ``__call__``)."""
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is None:
            return await super().read_body(receive)
        received = 0

        async def bounded() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
            return message

        return await super().read_body(bounded)

    async def _handle_lent(
        self, executor: RequestExecutor, scope: Any, receive: Any, send: Any
    ) -> None:
        """Django's ``ASGIHandler.handle`` (5.2), but for where the request starts and
        ends, and for letting go of its objects once it ended (``_release``)."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            set_script_prefix(get_script_prefix(scope))
            signals.request_started.send(sender=self.__class__, scope=scope)
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                assert error_response is not None  # Django's create_request gives one
                await self.send_response(error_response, send)
                await self._close(error_response, executor)
                return
            response = await self._respond(request, receive, send)
            if response is None:
                await signals.request_finished.asend(sender=self.__class__)
            else:
                await self._close(response, executor)
                _release(request, response)
        finally:
            body_file.close()

    async def _respond(
        self, request: HttpRequest, receive: Any, send: Any
    ) -> HttpResponseBase | None:
        """The response sent, or None when the client left first (Django's way: the
        view is cancelled when a disconnect comes first)."""

        async def process_request() -> HttpResponseBase:
            response = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # the client left meanwhile
                await self.send_response(response, send)
            return response

        listening = asyncio.create_task(self.listen_for_disconnect(receive))
        responding = asyncio.create_task(process_request())
        tasks = (listening, responding)
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in tasks:
            # A client that left is read, not raised again here: raised, its exception
            # would hold this frame in its traceback, and this frame the task holding
            # it, a reference cycle left to the garbage collector for every request
            # whose client left. Anything else is raised, as Django raises it.
            if not task.cancelled() and not isinstance(task.exception(), RequestAborted):
                task.result()
        return None if responding.cancelled() or responding.exception() else responding.result()

    async def _close(self, response: HttpResponseBase, executor: RequestExecutor) -> None:
        if executor.used or not receivers_on_loop(signals.request_finished, self.__class__):
            await sync_to_async(response.close)()
        else:
            response.close()

    def adapt_method_mode(
        self,
        is_async: bool,
        method: Any,
        method_is_async: bool | None = None,
        debug: bool = False,
        name: str | None = None,
    ) -> Any:
        owner = getattr(method, "__self__", None)
        if (
            is_async
            and isinstance(owner, LoopSafe)
            and owner.loop_safe()
            and not iscoroutinefunction(method)
        ):
            return _on_loop(method)
        return super().adapt_method_mode(is_async, method, method_is_async, debug, name)


class BodyTooLarge(Exception):
    """A request body went past ``DATA_UPLOAD_MAX_MEMORY_SIZE`` while being read."""


def declared_body_length(scope: Any) -> int:
    """The request's ``Content-Length``, 0 without one (or with one that is no number:
    Django reads that as 0 as well)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def send_body_too_large(send: Any, limit: int) -> None:
    """413 ``MESSAGE_TOO_LARGE`` in the contract's error envelope, for any path."""
    body = json.dumps(body_too_large(limit)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _release(request: HttpRequest, response: HttpResponseBase) -> None:
    """Let go of what a finished request made, at once.

    Django and DRF link a request's objects both ways (the request and its messages
    storage, DRF's request and its view, the view and its response, the view and its
    own bound methods), so none of them was freed when the request ended: a REST
    request left about 100 objects to the cyclic garbage collector, whose collections
    stop the event loop (30-80 ms each on a node under load). Nothing refers to the
    requests and the view once the response is sent and closed, so emptying them
    breaks every such cycle. The response is left whole (a view might return one it
    keeps) but for what refers back to it: DRF's renderer context, which names it, and
    the coroutine ``push.api.base`` gave it to render."""
    context = getattr(response, "renderer_context", None) or {}
    for part in (context.get("view"), context.get("request"), request):
        if part is not None:
            vars(part).clear()
    for link in ("renderer_context", "render"):
        vars(response).pop(link, None)


def receivers_on_loop(signal: Signal, sender: type = ASGIHandler) -> bool:
    """Whether every receiver of ``signal`` is one of Django's own that may run on the
    loop. It reads the signal's receivers the way ``Signal.send`` does (Django 5.x,
    pinned); on a Django without that method, requests go Django's way.

    Asked twice for every request the REST fast path takes, so the answer is kept in
    the signal's own ``sender_receivers_cache`` (``_KeptVerdicts``), which Django
    empties whenever a receiver is connected or disconnected; while a receiver was
    found dead (``_dead_receivers``), it is worked out again. (Kept beside the signal,
    with the receivers' state to compare, a check cost 0.2 us; this way 0.06 us.)"""
    cache = signal.sender_receivers_cache
    kept = cache.get(_KeptVerdicts)
    if kept is not None:
        verdict = kept.get(sender)
        if verdict is not None:  # so a signal has _live_receivers, and this flag
            dead = signal._dead_receivers  # type: ignore[attr-defined]  # Django's, unstubbed
            if not dead:
                return verdict
    if kept is None:
        # Put in before the receivers are read: a receiver connected meanwhile empties
        # the cache, and this verdict is then kept nowhere.
        kept = cache[_KeptVerdicts] = _KeptVerdicts()
    live_receivers = getattr(signal, "_live_receivers", None)
    if live_receivers is None:
        return False
    sync_receivers, async_receivers = live_receivers(sender)
    verdict = not async_receivers and all(r in BOUNDARY_RECEIVERS_ON_LOOP for r in sync_receivers)
    kept[sender] = verdict
    return verdict


class _KeptVerdicts(dict[type, bool]):
    """``receivers_on_loop``'s answers for one signal, by sender. The class itself is
    their key in the signal's ``sender_receivers_cache``: no sender is this class, and
    a class may key the weak dictionary a signal made with ``use_caching``."""


def _on_loop(method: Any) -> Any:
    """``method`` as a coroutine method of the same middleware (Django names the
    middleware of a hook that returned nothing by its ``__self__``)."""

    async def hook(owner: LoopSafe, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        blocks = method.__name__ == "process_view" and owner.view_blocks(request, args[0])
        return await run_hook(method, blocks, request, *args, **kwargs)

    return MethodType(hook, method.__self__)
