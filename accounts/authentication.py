"""REST authentication: ``Authorization: Token <key>`` with a user token or a service
token; the request's ``auth`` is then the caller's ``Principal``. Plain Django views
(Pusher's authorization endpoints) find theirs the same way (``plain_request_principal``).

DRF authenticates before it throttles, so a wrong key, and a session cookie that
names no session, is counted here against the client's address
(``accounts.auth_failures``), as the streams count them: past the budget the answer is
429 without a look at the key or the session."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from rest_framework.authentication import (
    BaseAuthentication,
    SessionAuthentication,
    get_authorization_header,
)
from rest_framework.exceptions import AuthenticationFailed, Throttled
from rest_framework.request import Request

from accounts.auth_failures import WINDOW_SECS, auth_failure_record, auth_failures_exceeded
from accounts.principal_cache import kept_token_principal, token_principal
from accounts.principals import Principal, principal_for_user
from common.errors import ErrorCode, PushError

TOO_MANY_FAILURES = "Too many failed authentications from this address."


class ServiceAccount:
    """What DRF sees as ``request.user`` for a service token: authenticated, no person."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    pk = None

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    def __str__(self) -> str:
        return f"service:{self.principal.name}"


class PushTokenAuthentication(BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request: Request) -> tuple[Any, Principal] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None
        if len(parts) != 2:
            raise AuthenticationFailed("Authorization must be: Token <key>")
        # REMOTE_ADDR is the client's address from behind the trusted proxies
        # (realtime_project.asgi), the one the anonymous throttle counts too.
        address = request.META.get("REMOTE_ADDR")
        try:
            principal = token_principal(parts[1].decode("latin-1"), address)
        except PushError as exc:
            if exc.code is not ErrorCode.RATE_LIMITED:
                raise
            # The address failed too often this minute: 429 without a look at the key.
            raise Throttled(WINDOW_SECS, TOO_MANY_FAILURES) from exc
        if principal is None:
            raise AuthenticationFailed("Invalid or revoked token.")
        return _drf_user(principal), principal

    async def authenticate_kept(self, request: Request) -> tuple[Any, Principal] | None:
        """``authenticate`` on the event loop for a token this process kept
        (``kept_token_principal``); None when ``authenticate`` must decide."""
        parts = get_authorization_header(request).split()
        if len(parts) != 2 or parts[0].lower() != self.keyword.lower().encode():
            return None
        address = request.META.get("REMOTE_ADDR")
        principal = await kept_token_principal(parts[1].decode("latin-1"), address)
        return None if principal is None else (_drf_user(principal), principal)

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class PushSessionAuthentication(SessionAuthentication):
    """DRF's session authentication (with its CSRF check), where a session cookie that
    names no session is a failed authentication of the client's address."""

    def authenticate(self, request: Request) -> tuple[Any, None] | None:
        if not request._request.COOKIES.get(settings.SESSION_COOKIE_NAME):
            return super().authenticate(request)
        address = request.META.get("REMOTE_ADDR")
        if auth_failures_exceeded(address):
            raise Throttled(WINDOW_SECS, TOO_MANY_FAILURES)
        found = super().authenticate(request)
        # Django's session store forgets a key it found no session for.
        if request._request.session.session_key is None:
            auth_failure_record(address)
        return found


def _drf_user(principal: Principal) -> Any:
    """What DRF shows as ``request.user`` for a token's principal."""
    return principal.user if principal.kind == "user" else ServiceAccount(principal)


def request_principal(request: Request) -> Principal:
    """The caller's principal, built once per request (throttles and views both ask)."""
    if isinstance(request.auth, Principal):
        return request.auth
    cached = getattr(request, "_push_principal", None)
    if cached is None:
        cached = principal_for_user(request.user)
        request._push_principal = cached  # type: ignore[attr-defined]  # our own per-request cache
    return cached


def plain_request_principal(request: HttpRequest) -> tuple[Principal, str]:
    """The principal of a request to a plain Django view (not DRF), found as the REST
    API finds it: ``Authorization: Token <key>`` (a user or a service token) first, else
    the session's user. Returns it with how it came: "token", "session" or "anonymous"
    (a session-authenticated request needs the caller's CSRF defence; a token one does
    not, since a browser never attaches a token by itself). Sync: it may read
    PostgreSQL (token, session, grants)."""
    parts = request.headers.get("Authorization", "").split()
    if parts and parts[0].lower() == PushTokenAuthentication.keyword.lower():
        if len(parts) != 2:
            raise PushError(ErrorCode.FORBIDDEN, "Authorization must be: Token <key>")
        # Counted against the address as the REST API counts it (RATE_LIMITED past it).
        principal = token_principal(parts[1], request.META.get("REMOTE_ADDR"))
        if principal is None:
            raise PushError(ErrorCode.FORBIDDEN, "Invalid or revoked token.")
        return principal, "token"
    user = getattr(request, "user", None)
    principal = principal_for_user(user)
    return principal, "session" if principal.is_authenticated else "anonymous"
