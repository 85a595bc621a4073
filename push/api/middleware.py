"""The project's middleware (``settings.MIDDLEWARE``) run on the event loop for an async
request, instead of one thread hop per hook.

Django runs every hook of a ``MiddlewareMixin`` of an async request through
``sync_to_async``: for this stack about twenty thread switches per REST request, and
WhiteNoise, which is sync only, sends the rest of the chain back to the loop through
``async_to_sync`` as well. Measured on one node (REST single publish, 16 keep-alive
clients), the stack cost about 1.5-2 ms of CPU per request, a third of the request.

The classes here are Django's, WhiteNoise's and django-prometheus' own, unchanged but
for where their hooks run: a hook that cannot block (headers, counters, lazy objects,
URL resolving) runs on the loop; one that may touch the database, the cache or a
file (a session or messages write, a static file, CSRF in the session) still runs on
the request's thread, as Django would run it. A sync request (WSGI, the test client)
runs them exactly as Django does. ``push.api.handler.LoopHandler`` does the same for the
``process_view`` and ``process_template_response`` hooks, which Django adapts outside the
middleware.

``mirrored_by_fast_publish`` marks a class whose work for a back-end's plain REST
publish ``push.api.fast_publish`` reproduces (headers, counters) or which has none to
do for it (no session, no static file, a CSRF-exempt view): with any middleware in
``settings.MIDDLEWARE`` that does not say so itself, those requests go through Django.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import (
    iscoroutinefunction,
    markcoroutinefunction,
    sync_to_async,
)
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.messages.storage import default_storage
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.middleware import clickjacking, common, csrf, security
from django.utils.functional import SimpleLazyObject, empty
from django_prometheus import middleware as prometheus
from whitenoise import middleware as whitenoise


class LoopSafe:
    """Mixed into a ``MiddlewareMixin`` whose hooks do not block, but where
    ``request_blocks`` or ``response_blocks`` says so."""

    def loop_safe(self) -> bool:
        """Whether the hooks may run on the loop at all with the current settings."""
        return True

    def request_blocks(self, request: HttpRequest) -> bool:
        return False

    def response_blocks(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        return False

    def view_blocks(self, request: HttpRequest, view_func: Any) -> bool:
        return False

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if not self.loop_safe():
            return await super().__acall__(request)  # type: ignore[misc]  # mixed into MiddlewareMixin, which has it
        mixin: Any = self
        response = None
        if hasattr(mixin, "process_request"):
            response = await run_hook(mixin.process_request, self.request_blocks(request), request)
        response = response or await mixin.get_response(request)
        if hasattr(mixin, "process_response"):
            blocks = self.response_blocks(request, response)
            response = await run_hook(mixin.process_response, blocks, request, response)
        return response


async def run_hook(hook: Any, blocks: bool, *args: Any, **kwargs: Any) -> Any:
    if blocks:
        return await sync_to_async(hook, thread_sensitive=True)(*args, **kwargs)
    return hook(*args, **kwargs)


class PrometheusBeforeMiddleware(LoopSafe, prometheus.PrometheusBeforeMiddleware):
    mirrored_by_fast_publish = True


class SecurityMiddleware(LoopSafe, security.SecurityMiddleware):
    mirrored_by_fast_publish = True


class SessionMiddleware(LoopSafe, sessions.SessionMiddleware):
    mirrored_by_fast_publish = True

    # process_request makes a lazy session; the response writes it only when modified.
    def response_blocks(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class CommonMiddleware(LoopSafe, common.CommonMiddleware):
    mirrored_by_fast_publish = True


class CsrfViewMiddleware(LoopSafe, csrf.CsrfViewMiddleware):
    mirrored_by_fast_publish = True

    # The secret is in a cookie unless CSRF_USE_SESSIONS puts it in the session.
    def loop_safe(self) -> bool:
        return not settings.CSRF_USE_SESSIONS

    # Checking an unsafe request reads its form, which may be an upload on disk.
    def view_blocks(self, request: HttpRequest, view_func: Any) -> bool:
        exempt = getattr(view_func, "csrf_exempt", False)
        return not exempt and request.method not in ("GET", "HEAD", "OPTIONS", "TRACE")


class AuthenticationMiddleware(LoopSafe, auth.AuthenticationMiddleware):
    mirrored_by_fast_publish = True

    # request.user is lazy: read on the thread that first asks for it.
    pass


class MessageMiddleware(LoopSafe, messages.MessageMiddleware):
    """Django's, with the storage made only when something reads or adds a message
    (the admin's pages): making one derives a cookie signer's key, about a twentieth
    of a REST publish's CPU, and no API request uses it."""

    mirrored_by_fast_publish = True

    def process_request(self, request: HttpRequest) -> None:
        request._messages = SimpleLazyObject(lambda: default_storage(request))  # type: ignore[attr-defined]  # Django's own attribute for it

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if not _storage_made(request):
            return response
        return super().process_response(request, response)

    # The storage reads and writes the session only when messages were read or added.
    def response_blocks(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        if not _storage_made(request):
            return False
        storage: Any = request._messages  # type: ignore[attr-defined]  # set by process_request
        return bool(storage.used or storage.added_new)


def _storage_made(request: HttpRequest) -> bool:
    storage = getattr(request, "_messages", None)
    if isinstance(storage, SimpleLazyObject):
        return storage._wrapped is not empty  # type: ignore[attr-defined]  # LazyObject's own slot
    return storage is not None


class XFrameOptionsMiddleware(LoopSafe, clickjacking.XFrameOptionsMiddleware):
    mirrored_by_fast_publish = True


class PrometheusAfterMiddleware(LoopSafe, prometheus.PrometheusAfterMiddleware):
    mirrored_by_fast_publish = True


class WhiteNoiseMiddleware(whitenoise.WhiteNoiseMiddleware):
    """WhiteNoise, which is sync only, able to run async: a path that is no static file
    costs a dictionary look-up on the loop; a static file is found (with
    ``WHITENOISE_AUTOREFRESH``, on disk) and opened on the request's thread."""

    mirrored_by_fast_publish = True

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any = None, **kwargs: Any) -> None:
        super().__init__(get_response, **kwargs)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file, thread_sensitive=True)(
                request.path_info
            )
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve, thread_sensitive=True)(static_file, request)
        return await self.get_response(request)
