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

from django.contrib.auth.backends import BaseBackend, ModelBackend
from django.contrib.auth.models import User
from django.contrib.auth.signals import user_login_failed
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

from accounts.auth_failures import auth_failure_record, auth_failures_exceeded


class AddressFailuresBackend(BaseBackend):
    """First of ``AUTHENTICATION_BACKENDS``: stops ``authenticate`` (which then tries
    no other backend, so hashes nothing) for an address past its failed
    authentications; otherwise lets the next backend decide."""

    def authenticate(self, request: HttpRequest | None, **credentials: Any) -> None:
        if request is not None and auth_failures_exceeded(request.META.get("REMOTE_ADDR")):
            raise PermissionDenied
        return None

    def get_user(self, user_id: Any) -> User | None:
        # A sign-in that names no backend (``force_login``, ``login`` of a user that
        # ``authenticate`` did not return) is recorded in the session as the first
        # backend's: its user is the model's.
        return _MODEL_BACKEND.get_user(user_id)


_MODEL_BACKEND = ModelBackend()


def _count_failed_sign_in(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any
) -> None:
    if request is not None:
        # REMOTE_ADDR is the client's address from behind the trusted proxies
        # (realtime_project.asgi).
        auth_failure_record(request.META.get("REMOTE_ADDR"))


def connect_signals() -> None:
    user_login_failed.connect(_count_failed_sign_in, dispatch_uid="accounts-failed-sign-in")
