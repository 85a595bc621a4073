"""The headers Django's security and clickjacking middleware add to a response, for an
answer sent without them (``push.api.fast_publish``).

They are made by the middleware's own ``process_response``, once per scheme, so they
follow the settings (``SECURE_*``, ``X_FRAME_OPTIONS``) exactly as Django applies them."""

from __future__ import annotations

import functools

from django.http import HttpRequest, HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware


class _SchemeRequest(HttpRequest):
    """A request that is only its scheme: all those two middleware read of it."""

    def __init__(self, secure: bool) -> None:
        super().__init__()
        self._secure = secure

    def _get_scheme(self) -> str:
        return "https" if self._secure else "http"


@functools.cache
def security_headers(secure: bool) -> tuple[tuple[bytes, bytes], ...]:
    """The headers, lower-cased names, for a request over https (``secure``) or not."""
    request = _SchemeRequest(secure)
    response = HttpResponse()
    bare = set(response.headers)
    for middleware in (SecurityMiddleware, XFrameOptionsMiddleware):
        # Only process_response is called: the middleware never calls get_response.
        middleware(HttpResponse).process_response(request, response)
    return tuple(
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers.items()
        if name not in bare
    )
