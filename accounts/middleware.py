"""WebSocket authentication: a DRF token in ``?token=`` or the session cookie.

An invalid or revoked token is refused at the handshake (HTTP 403), never downgraded
to anonymous. A connection with neither token nor session cookie is anonymous without
a trip to the database thread, which keeps anonymous connects cheap.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs

from channels.auth import get_user
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from push.db import db_call
from push.errors import PushError


def _token_user(key: str) -> Any | None:
    from rest_framework.authtoken.models import Token

    token = Token.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return None
    return token.user


_token_user_async = db_call(_token_user)


def query_token(scope: dict[str, Any]) -> str | None:
    query = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(query).get("token")
    return values[0] if values else None


def session_key(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookie = SimpleCookie()
            cookie.load(value.decode("latin-1"))
            morsel = cookie.get(settings.SESSION_COOKIE_NAME)
            if morsel is not None and morsel.value:
                return morsel.value
    return None


async def _session_user(scope: dict[str, Any], key: str) -> Any:
    engine = import_module(settings.SESSION_ENGINE)
    scope["session"] = engine.SessionStore(key)
    return await get_user(scope)


class TokenAuthMiddleware:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        token = query_token(scope)
        if token is not None:
            try:
                user = await _token_user_async(token)
            except PushError:  # database down: refuse rather than guess
                user = None
            if user is None:
                return await WebsocketDenier()(scope, receive, send)
        else:
            key = session_key(scope)
            user = await _session_user(dict(scope), key) if key else AnonymousUser()
        return await self.inner(dict(scope, user=user), receive, send)
