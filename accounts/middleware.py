"""Stream authentication (WebSocket and SSE): a user or service token in ``?token=`` or
an ``Authorization: Token`` header, or the session.

An invalid or revoked token is refused at the handshake (HTTP 403), never downgraded
to anonymous. A connection with neither token nor session cookie is anonymous without
a trip to the database thread, which keeps anonymous connects cheap, and so is one
whose session cookie cannot be a session key at all. Tokens and sessions are looked up
on the database threads of ``common.db`` (several, bounded), never on Channels' one
shared thread, where a flood of made-up session cookies would queue every real login
behind it; failures count against the client's address (``accounts.auth_failures``).
``push.transport.entry`` puts the result in the scope as ``principal`` (who, with their grants)
and ``user``.
"""

from __future__ import annotations

import re
from importlib import import_module
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings
from django.contrib import auth
from django.db import DatabaseError
from django.http.cookie import parse_cookie

from accounts.auth_failures import auth_failure_record, auth_failures_exceeded, too_many_failures
from accounts.principal_cache import token_principal
from accounts.principals import ANONYMOUS, Principal, principal_for_user
from common.db import database_unavailable, db_call

# Django's session stores that keep the session server-side name it by 32 characters
# from [a-z0-9] (SessionBase._get_new_session_key); anything else is no session of
# theirs, and is not worth a query.
SESSION_KEY = re.compile(r"[a-z0-9]{32}")
SERVER_SIDE_SESSION_ENGINES = frozenset(
    {
        "django.contrib.sessions.backends.db",
        "django.contrib.sessions.backends.cache",
        "django.contrib.sessions.backends.cached_db",
        "django.contrib.sessions.backends.file",
    }
)


def query_token(scope: dict[str, Any]) -> str | None:
    query = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(query).get("token")
    return values[0] if values else None


def session_key(scope: dict[str, Any]) -> str | None:
    """The session cookie's value, read as Django's SessionMiddleware reads it
    (``parse_cookie``). The standard library's ``SimpleCookie`` made an object of every
    cookie: 38 ms of CPU on the event loop for a 60 KB header of 8,000 cookies, sent
    with every anonymous REST request, handshake and stream (``parse_cookie``: 1.8).
    A header without the cookie's name is not parsed at all: the name is in the header
    as sent wherever the parser finds it (15,000 semicolons cost ~1 ms to parse)."""
    wanted = settings.SESSION_COOKIE_NAME
    for name, value in scope.get("headers", []):
        if name == b"cookie" and wanted.encode("latin-1") in value:
            key = parse_cookie(value.decode("latin-1")).get(wanted)
            if key:
                return key
    return None


def header_token(scope: dict[str, Any]) -> str | None:
    """The key of an ``Authorization: Token <key>`` header (what the REST API takes)."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "token" and key.strip():
                return key.strip()
    return None


def client_ip(scope: dict[str, Any]) -> str | None:
    # realtime_project.asgi put the address from behind the trusted proxies here.
    client = scope.get("client")
    return client[0] if client else None


def session_key_plausible(key: str) -> bool:
    if settings.SESSION_ENGINE in SERVER_SIDE_SESSION_ENGINES:
        return SESSION_KEY.fullmatch(key) is not None
    return True


def session_principal(key: str, address: str | None) -> Principal:
    """The principal of the session ``key``: its user's, or anonymous when the session
    is unknown (a failure of ``address``) or nobody is signed in to it."""
    if auth_failures_exceeded(address):
        raise too_many_failures()
    engine = import_module(settings.SESSION_ENGINE)
    session = engine.SessionStore(key)
    # What django.contrib.auth.get_user reads of a request is its session; it checks
    # the session's password hash as the views' AuthenticationMiddleware does.
    user = auth.get_user(SimpleNamespace(session=session))  # type: ignore[arg-type]  # see above
    if session.session_key is None:
        auth_failure_record(address)
    if not user.is_authenticated:
        return ANONYMOUS
    return principal_for_user(user, ("session", key))


_token_principal = db_call(token_principal)
_session_principal = db_call(session_principal)


async def resolve_principal(scope: dict[str, Any]) -> Principal | None:
    """The scope's principal; None when a token was given and is not valid.

    Raises ``PushError(UNAVAILABLE)`` when the database cannot say (it is down): the
    client is told to try again later, never that its valid token is invalid; and
    ``PushError(RATE_LIMITED)`` when its address failed too often this minute."""
    token = query_token(scope) or header_token(scope)
    if token is not None:
        return await _token_principal(token, client_ip(scope))
    key = session_key(scope)
    if not key or not session_key_plausible(key):
        return ANONYMOUS
    try:
        return await _session_principal(key, client_ip(scope))
    except DatabaseError as exc:
        raise database_unavailable(exc) from exc
