"""Pusher's HTTP endpoints: the HTTP API (``/apps/<id>/...``, signed with an app's
secret) and the authorization endpoints pusher-js calls (``/pusher/auth``,
``/pusher/user-auth``). Each view reads the request, calls ``push.services.pusher_http``
or ``push.services.pusher_auth`` and writes the answer.

Errors: the HTTP API answers as Pusher does, plain text with Pusher's status (the server
libraries raise on the status and show the text); the authorization endpoints answer
with the REST API's error envelope (JSON) and status, which pusher-js reports as the
status of a failed authorization.

CSRF. Django's CSRF middleware does not guard these views (``csrf_exempt``):

- The HTTP API carries no cookie; its signature is the credential, and a forging page
  does not have the secret.
- ``/pusher/auth`` and ``/pusher/user-auth`` change nothing: what a forged cross-site
  request gets is a signature in the response body, which the browser does not let the
  forging page read (no CORS headers here). Still, a session cookie is ambient, so a
  request authenticated by one must come from an allowed page: its ``Origin`` (without
  one, its ``Referer``) must be this server's own origin or one of ``ALLOWED_ORIGINS``,
  the pages that may open a WebSocket with the same cookie. Browsers send ``Origin``
  with every script POST, so pusher-js needs no CSRF token configured; a request with
  neither header is refused. A request with ``Authorization: Token`` is not checked: a
  browser never attaches that header by itself, so a forging page cannot send the
  victim's token.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

from channels.security.websocket import OriginValidator
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from accounts.authentication import plain_request_principal
from accounts.principals import Principal
from accounts.throttling import principal_within_rate
from common.db import db_call
from common.errors import ErrorCode, PushError
from push.services import pusher_auth, pusher_http
from push.services.pusher_apps import PusherApp
from push.services.pusher_http import PusherRefusal, SignedRequest

_request_principal = db_call(plain_request_principal)
_auth_app = db_call(pusher_auth.auth_app)
# The REST API's budget per credential: signing is cheap, but not free of Redis and
# the permission decider.
_within_rate = db_call(principal_within_rate)


# ----- the HTTP API ----------------------------------------------------------------------------


def _text(status: int, message: str) -> HttpResponse:
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


def _signed_request(request: HttpRequest) -> SignedRequest:
    paths = [request.path]
    # The path as it arrived, in case a client signed it percent-encoded.
    raw = getattr(request, "scope", {}).get("raw_path")
    if raw and raw.decode("latin-1") != request.path:
        paths.append(raw.decode("latin-1"))
    return SignedRequest(
        method=request.method or "",
        paths=tuple(paths),
        params=request.GET.dict(),
        body=request.body,
    )


async def _api(
    request: HttpRequest,
    app_id: str | None,
    handle: Callable[[SignedRequest], Awaitable[dict[str, Any]]],
) -> HttpResponse:
    try:
        signed = _signed_request(request)
        await pusher_http.api_request_app(app_id=app_id, request=signed, now=time.time())
        return JsonResponse(await handle(signed))
    except RequestDataTooBig:
        return _text(413, "Request body too large")
    except SuspiciousOperation as exc:  # such as more than DATA_UPLOAD_MAX_NUMBER_FIELDS
        return _text(400, str(exc))
    except PusherRefusal as exc:
        return _text(exc.status, exc.message)
    except PushError as exc:
        return _text(exc.http_status, exc.message)


@csrf_exempt
@require_POST
async def events(request: HttpRequest, app_id: str) -> HttpResponse:
    return await _api(request, app_id, lambda signed: pusher_http.events_trigger(body=signed.body))


@csrf_exempt
@require_POST
async def batch_events(request: HttpRequest, app_id: str) -> HttpResponse:
    return await _api(request, app_id, lambda signed: pusher_http.batch_trigger(body=signed.body))


@require_GET
async def channels(request: HttpRequest, app_id: str) -> HttpResponse:
    return await _api(
        request, app_id, lambda signed: pusher_http.channels_list(params=signed.params)
    )


@require_GET
async def channel(request: HttpRequest, app_id: str, channel: str) -> HttpResponse:
    return await _api(
        request,
        app_id,
        lambda signed: pusher_http.channel_state(channel=channel, params=signed.params),
    )


@require_GET
async def channel_users(request: HttpRequest, app_id: str, channel: str) -> HttpResponse:
    return await _api(request, app_id, lambda _: pusher_http.channel_users(channel=channel))


@csrf_exempt
@require_POST
async def terminate_connections(
    request: HttpRequest, user_id: str, app_id: str | None = None
) -> HttpResponse:
    async def terminate(_: SignedRequest) -> dict[str, Any]:
        await pusher_http.user_connections_terminate(user_id=user_id)
        return {}

    return await _api(request, app_id, terminate)


# ----- authorization ---------------------------------------------------------------------------


def _error(exc: PushError) -> JsonResponse:
    body: dict[str, Any] = {"type": "error", "code": exc.code.value, "message": exc.message}
    if exc.field:
        body["field"] = exc.field
    return JsonResponse(body, status=exc.http_status)


def _origin_allowed(request: HttpRequest) -> bool:
    """Whether a session-authenticated request comes from this server's own pages or
    from ``ALLOWED_ORIGINS`` (see the module's docstring)."""
    origin = request.headers.get("Origin")
    if origin is None:
        referer = urlparse(request.headers.get("Referer", ""))
        if not referer.scheme or not referer.netloc:
            return False
        origin = f"{referer.scheme}://{referer.netloc}"
    if origin == f"{request.scheme}://{request.get_host()}":
        return True
    return bool(OriginValidator(None, settings.ALLOWED_ORIGINS).validate_origin(urlparse(origin)))


async def _authorize(
    request: HttpRequest, sign: Callable[[Principal, PusherApp], dict[str, str]]
) -> JsonResponse:
    try:
        principal, method = await _request_principal(request)
        if not await _within_rate(principal, request.META.get("REMOTE_ADDR")):
            raise PushError(ErrorCode.RATE_LIMITED, "too many requests; slow down")
        if method == "session" and not _origin_allowed(request):
            raise PushError(
                ErrorCode.FORBIDDEN,
                "a request signed in by session cookie must come from an allowed Origin",
            )
        app = await _auth_app(request.POST.get("app_key") or request.GET.get("app_key"))
        return JsonResponse(sign(principal, app))
    except RequestDataTooBig:
        return _error(PushError(ErrorCode.MESSAGE_TOO_LARGE, "request body too large"))
    except PushError as exc:
        return _error(exc)


@csrf_exempt
@require_POST
async def channel_authorization(request: HttpRequest) -> JsonResponse:
    """``POST /pusher/auth`` (form fields ``socket_id``, ``channel_name``, ``app_key``)."""
    return await _authorize(
        request,
        lambda principal, app: pusher_auth.channel_authorize(
            principal=principal,
            app=app,
            socket_id=request.POST.get("socket_id"),
            channel=request.POST.get("channel_name"),
        ),
    )


@csrf_exempt
@require_POST
async def user_authentication(request: HttpRequest) -> JsonResponse:
    """``POST /pusher/user-auth`` (form fields ``socket_id``, ``app_key``)."""
    return await _authorize(
        request,
        lambda principal, app: pusher_auth.user_authenticate(
            principal=principal, app=app, socket_id=request.POST.get("socket_id")
        ),
    )
