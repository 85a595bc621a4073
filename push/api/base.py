"""DRF's ``APIView`` served on the event loop, so one node answers concurrent REST
publishes and history reads concurrently instead of one request thread each.

DRF's own hooks stay as they are: authentication, permissions and throttles are sync
and may read PostgreSQL (token, session, grants) and Redis (throttle counters), so
``initial`` runs them on the database threads (``push.db``), where a slow query holds
one of those threads and never the loop. Parsing, rendering (the browsable API too),
``handle_exception`` with the one exception handler (``push.api.exceptions``) and
``finalize_response`` are DRF's own code, unchanged.

Not adrf: its ``APIView`` runs ``initial`` through ``sync_to_async`` with
``thread_sensitive=True``, on the request's one sync thread, and this module is the
few lines of DRF's ``dispatch`` that change.
"""

from __future__ import annotations

import inspect
from typing import Any

from django.http import HttpRequest
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import request_principal
from push.db import db_call


def _initial(view: APIView, request: Request, args: Any, kwargs: Any) -> None:
    view.initial(request, *args, **kwargs)
    # The principal of a session user reads their grants: here, not on the loop.
    request_principal(request)


_initial_off_loop = db_call(_initial)


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
            await _initial_off_loop(self, drf_request, args, kwargs)
            method = drf_request.method.lower()
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
        return self.response
