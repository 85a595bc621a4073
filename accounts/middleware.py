"""Stream authentication (WebSocket and SSE): a user or service token in ``?token=`` or
an ``Authorization: Token`` header, or the session.

An invalid or revoked token is refused at the handshake (HTTP 403), never downgraded
to anonymous. A connection with neither token nor session cookie is anonymous without
a trip to the database thread, which keeps anonymous connects cheap. ``push.entry``
puts the result in the scope as ``principal`` (who, with their grants) and ``user``.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs

from channels.auth import get_user
from django.conf import settings
from django.db import DatabaseError

from accounts.principals import ANONYMOUS, Principal, authenticate_key, principal_for_user
from push.db import database_unavailable, db_call

_authenticate_key = db_call(authenticate_key)
_principal_for_user = db_call(principal_for_user)


def query_token(scope: dict[str, Any]) -> str | None:
    query = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(query).get("token")
    return values[0] if values else None


def session_key(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except CookieError:
                return None
            morsel = cookie.get(settings.SESSION_COOKIE_NAME)
            if morsel is not None and morsel.value:
                return morsel.value
    return None


def header_token(scope: dict[str, Any]) -> str | None:
    """The key of an ``Authorization: Token <key>`` header (what the REST API takes)."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "token" and key.strip():
                return key.strip()
    return None


async def _session_principal(scope: dict[str, Any], key: str) -> Principal:
    engine = import_module(settings.SESSION_ENGINE)
    session_scope = dict(scope, session=engine.SessionStore(key))
    user = await get_user(session_scope)
    if not user.is_authenticated:
        return ANONYMOUS
    return await _principal_for_user(user, ("session", key))  # type: ignore[no-any-return]


async def resolve_principal(scope: dict[str, Any]) -> Principal | None:
    """The scope's principal; None when a token was given and is not valid.

    Raises ``PushError(UNAVAILABLE)`` when the database cannot say (it is down): the
    client is told to try again later, never that its valid token is invalid."""
    token = query_token(scope) or header_token(scope)
    if token is not None:
        return await _authenticate_key(token)  # type: ignore[no-any-return]
    key = session_key(scope)
    if not key:
        return ANONYMOUS
    try:
        return await _session_principal(scope, key)
    except DatabaseError as exc:
        raise database_unavailable(exc) from exc
