"""DRF's ``APIView`` served on the event loop: the REST publish and history views are
coroutines, so a node serves concurrent requests concurrently and a request waiting on
the database holds no database connection of its own.

DRF's own hooks stay as they are: authentication, permissions and throttles are sync
and may read PostgreSQL (token, session, grants) and Redis (throttle counters), so
``initial`` runs them on the database threads (``common.db``), where a slow query holds
one of those threads and never the loop. Except when none of them would block: a
token this process verified a moment ago (``accounts.principal_cache``) is checked
with one async Redis round trip, and when no throttle counts the caller (a back-end's
service token), ``initial`` runs on the loop (``_initial_on_loop``).

Parsing, rendering (the browsable API too), ``handle_exception`` with the one exception
handler (``push.api.exceptions``) and ``finalize_response`` are DRF's own code,
unchanged; a JSON response is rendered here, on the loop (``_render_on_loop``).

Not adrf: it runs ``initial`` through ``sync_to_async(thread_sensitive=True)``, which
under Django's ASGI handler is the request's own thread, whose database connection
stays checked out of the pool until the request ends (as with a sync view): as many
connections as requests in flight. Here the database threads bound them.
"""

from __future__ import annotations

import inspect
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import PushTokenAuthentication, request_principal
from accounts.throttling import PrincipalRateThrottle
from common.db import db_call


def _initial(view: APIView, request: Request, args: Any, kwargs: Any) -> None:
    view.initial(request, *args, **kwargs)
    # The principal of a session user reads their grants: here, not on the loop.
    request_principal(request)


_initial_off_loop = db_call(_initial)


async def _initial_on_loop(view: APIView, request: Request, args: Any, kwargs: Any) -> bool:
    """DRF's ``initial`` on the loop when nothing in it blocks: a token this process
    kept (``PushTokenAuthentication.authenticate_kept``, one async round trip) and no
    throttle that counts the caller (a back-end's service token, by default). False
    when it cannot be: ``_initial_off_loop`` then runs it (authentication done here
    is not done again). Saves a back-end's REST publish its thread hop."""
    authenticators = request.authenticators
    if not authenticators or not isinstance(authenticators[0], PushTokenAuthentication):
        return False
    found = await authenticators[0].authenticate_kept(request)
    if found is None:
        return False
    request._authenticator = authenticators[0]  # type: ignore[attr-defined]  # what DRF's own _authenticate sets
    request.user, request.auth = found
    principal = found[1]
    throttles = view.get_throttles()
    if not all(isinstance(t, PrincipalRateThrottle) and not t.counts(principal) for t in throttles):
        return False
    view.initial(request, *args, **kwargs)
    return True


def _render_on_loop(response: Response) -> None:
    """Render a JSON response now and leave Django's async handler a coroutine
    ``render`` that returns it, which the handler awaits.

    Django renders every ``SimpleTemplateResponse`` (every DRF response) through
    ``sync_to_async``: one more thread hop per request, for a ``json.dumps``. The
    browsable API's HTML (templates, forms that may read the database) still renders
    on the request's thread."""
    if not isinstance(getattr(response, "accepted_renderer", None), JSONRenderer):
        return
    response.render()

    async def rendered() -> Response:
        return response

    response.render = rendered  # type: ignore[method-assign]  # the instance's own, for the async handler only


class AsyncAPIView(APIView):
    """An ``APIView`` whose handlers (``get``, ``post``...) are ``async def``.

    DRF's own sync handlers (``options``, which may check permissions) run on the
    database threads like ``initial``."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        if not self.view_is_async:
            return super().dispatch(request, *args, **kwargs)
        return self._dispatch_async(request, *args, **kwargs)

    async def _dispatch_async(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Response:
        # DRF's APIView.dispatch, with ``initial`` off the loop and the handler awaited.
        self.args = args
        self.kwargs = kwargs
        drf_request = self.initialize_request(request, *args, **kwargs)
        self.request = drf_request
        self.headers = self.default_response_headers
        try:
            # Served by Django's async handler: the loop lasts (a test client's does not,
            # and a Redis client of its own per request would outlive it).
            served = isinstance(request, ASGIRequest)
            if not (served and await _initial_on_loop(self, drf_request, args, kwargs)):
                await _initial_off_loop(self, drf_request, args, kwargs)
            method = drf_request.method.lower()  # type: ignore[union-attr]  # set by the server
            handler = (
                getattr(self, method, self.http_method_not_allowed)
                if method in self.http_method_names
                else self.http_method_not_allowed
            )
            if inspect.iscoroutinefunction(handler):
                response = await handler(drf_request, *args, **kwargs)
            else:
                response = await db_call(handler)(drf_request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(drf_request, response, *args, **kwargs)
        if isinstance(request, ASGIRequest):  # served by Django's async handler
            _render_on_loop(self.response)
        return self.response
