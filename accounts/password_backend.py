"""Password sign-ins (the admin's login form; anything that calls Django's
``authenticate`` with a username and password) held to the failed-authentication
budget of their address (``accounts.auth_failures``), as tokens and session cookies
are.

A password check is the costliest thing an anonymous client can ask of a node: Django's
hasher (PBKDF2, 1,000,000 iterations in Django 5.2) took ~360 ms of CPU per attempt, for a
made-up username too (Django hashes anyway, so the time does not tell which users
exist), and the admin's login answered 20 attempts a second per address, which is
more than a node's cores. So every failed sign-in counts as a failed authentication of
its address, and past ``PUSH_AUTH_FAILURES_PER_MIN`` in a minute no password from that
address is checked until the minute is over: the form answers as for a wrong password.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import User
from django.contrib.auth.signals import user_login_failed
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

from accounts.auth_failures import auth_failure_record, auth_failures_exceeded


class AddressLimitedModelBackend(ModelBackend):
    """Django's ``ModelBackend`` that checks no password from an address past its failed
    authentications (``authenticate`` then stops: ``PermissionDenied``).

    It replaces ``ModelBackend`` rather than going in front of it: with one backend,
    application code may still call ``login(request, user)`` without naming a backend,
    as Django allows when only one is configured."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **credentials: Any,
    ) -> User | None:
        if request is not None and auth_failures_exceeded(request.META.get("REMOTE_ADDR")):
            raise PermissionDenied
        return super().authenticate(request, username=username, password=password, **credentials)


def _count_failed_sign_in(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any
) -> None:
    if request is not None:
        # REMOTE_ADDR is the client's address from behind the trusted proxies
        # (realtime_project.asgi).
        auth_failure_record(request.META.get("REMOTE_ADDR"))


def connect_signals() -> None:
    user_login_failed.connect(_count_failed_sign_in, dispatch_uid="accounts-failed-sign-in")
