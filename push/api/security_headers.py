"""The headers Django's security and clickjacking middleware add to a response, for an
answer sent without them (``push.api.fast_publish``).

They are made by the middleware's own ``process_response``, once per scheme, so they
follow the settings (``SECURE_*``, ``X_FRAME_OPTIONS``) exactly as Django applies them,
and in the order Django's answer has them: each middleware adds its headers on the way
out, innermost first, and ``CommonMiddleware`` adds ``Content-Length`` where it stands
in ``MIDDLEWARE``."""

from __future__ import annotations

import functools

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.module_loading import import_string

Headers = tuple[tuple[bytes, bytes], ...]
# Where Content-Length goes among the headers made here (a name no middleware sends).
_LENGTH_MARK = "X-Push-Content-Length-Here"


class _SchemeRequest(HttpRequest):
    """A request that is only its scheme: all those two middleware read of it."""

    def __init__(self, secure: bool) -> None:
        super().__init__()
        self._secure = secure

    def _get_scheme(self) -> str:
        return "https" if self._secure else "http"


@functools.cache
def security_headers(secure: bool) -> tuple[Headers, Headers]:
    """The headers, lower-cased names, for a request over https (``secure``) or not:
    those Django's answer has before its ``Content-Length``, and those after it."""
    request = _SchemeRequest(secure)
    response = HttpResponse()
    bare = set(response.headers)
    for path in reversed(settings.MIDDLEWARE):  # the order of process_response
        middleware = import_string(path)
        if issubclass(middleware, CommonMiddleware):
            response[_LENGTH_MARK] = ""
        elif issubclass(middleware, (SecurityMiddleware, XFrameOptionsMiddleware)):
            # Only process_response is called: the middleware never calls get_response.
            middleware(HttpResponse).process_response(request, response)
    headers = [(name, value) for name, value in response.headers.items() if name not in bare]
    names = [name for name, _value in headers]
    at = names.index(_LENGTH_MARK) if _LENGTH_MARK in names else len(headers)
    return _encoded(headers[:at]), _encoded(headers[at + 1 :])


def _encoded(headers: list[tuple[str, str]]) -> Headers:
    return tuple(
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
    )
