"""Principal: who is on the other end of a connection or request, with their grants.

Built once per connection (and per REST request) from a session, a user token or a
service token, so every permission decision after that is a pure function of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db.models import Q
from django.utils.crypto import constant_time_compare

from accounts.models import ChannelGrant, ServiceToken, hash_service_key

Credential = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class Grant:
    pattern: str
    subscribe: bool
    publish: bool
    presence: bool


@dataclass(frozen=True)
class Principal:
    kind: str  # "anonymous", "user" or "service"
    id: int | None = None
    user: Any = None
    is_staff: bool = False
    grants: tuple[Grant, ...] = ()
    name: str = ""
    # What to re-check later to notice a revoked credential: ("token", key),
    # ("service", id) or ("session", session key).
    credential: Credential | None = field(default=None, compare=False)
    # The rights its grants give on each channel it was asked about, as bits
    # (``accounts.permissions`` fills and bounds it): matching every grant's pattern on
    # every publish was 3-4% of a node publishing. Grants never change on a principal
    # (a refreshed one is a new object), so an answer kept here stays true. Not an
    # argument (``dataclasses.replace`` starts a new one empty), not compared.
    granted_rights: dict[str, int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def is_authenticated(self) -> bool:
        return self.kind != "anonymous"

    @property
    def key(self) -> str:
        """Stable identity for idempotency keys, throttles and presence."""
        return f"{self.kind}:{self.id}" if self.id is not None else self.kind

    @property
    def user_id(self) -> int | None:
        return self.id if self.kind == "user" else None


ANONYMOUS = Principal(kind="anonymous", user=AnonymousUser())


def _grant(grant: ChannelGrant) -> Grant:
    return Grant(grant.pattern, grant.can_subscribe, grant.can_publish, grant.can_presence)


def _grants(queryset: Any) -> tuple[Grant, ...]:
    # Rows, not models: a service token's related manager would fetch each grant's
    # deferred foreign key with a query of its own.
    return tuple(
        Grant(*row)
        for row in queryset.values_list("pattern", "can_subscribe", "can_publish", "can_presence")
    )


def _user_principal(
    user: Any, grants: tuple[Grant, ...], credential: Credential | None
) -> Principal:
    return Principal(
        kind="user",
        id=user.pk,
        user=user,
        is_staff=bool(user.is_staff),
        grants=grants,
        name=user.get_username(),
        credential=credential,
    )


def _service_principal(token: ServiceToken, grants: tuple[Grant, ...]) -> Principal:
    return Principal(
        kind="service",
        id=token.pk,
        user=AnonymousUser(),
        grants=grants,
        name=token.name,
        credential=("service", token.pk),
    )


def principal_for_user(user: Any, credential: Credential | None = None) -> Principal:
    """``credential`` names what a long-lived connection re-checks later: ("token",
    key) or ("session", session key); a REST request needs none."""
    if user is None or not user.is_authenticated or not user.is_active:
        return ANONYMOUS
    grants = ChannelGrant.objects.filter(Q(user=user) | Q(group__in=user.groups.all()))
    return _user_principal(user, _grants(grants), credential)


def principal_for_service(token: ServiceToken) -> Principal:
    return _service_principal(token, _grants(token.grants.all()))


def authenticate_key(key: str) -> Principal | None:
    """The principal of a user token or a service token key; None if neither is valid."""
    from rest_framework.authtoken.models import Token

    if "\x00" in key:
        # No stored key holds a NUL (PostgreSQL text cannot), and the query would fail
        # as if the database were down: the client would be told to try again later,
        # uncounted by the failed-authentication budget, and a warning logged each time.
        return None
    token = Token.objects.select_related("user").filter(key=key).first()
    if token is not None:
        if not token.user.is_active:
            return None
        return principal_for_user(token.user, credential=("token", key))
    service = ServiceToken.objects.filter(
        key_hash=hash_service_key(key), revoked_at__isnull=True
    ).first()
    if service is not None:
        touch_service_token(service)
        return principal_for_service(service)
    return None


# last_used_at is written at most this often per token, not on every request.
LAST_USED_RESOLUTION_SECS = 60


def touch_service_token(token: ServiceToken) -> None:
    from django.utils import timezone

    now = timezone.now()
    last = token.last_used_at
    if last is None or (now - last).total_seconds() >= LAST_USED_RESOLUTION_SECS:
        ServiceToken.objects.filter(pk=token.pk).update(last_used_at=now)


def principals_refresh(credentials: set[Credential]) -> dict[Credential, Principal]:
    """The current principal behind each credential that is still valid, with its
    grants as they are now; a credential that is gone (token deleted, service token
    revoked, session logged out or expired, user deactivated) is absent.

    A few queries for all of them, however many connections hold them: a node
    re-checks every live connection every ``PUSH_REVOCATION_CHECK_SECS``."""
    by_kind: dict[str, list[Any]] = {}
    for kind, value in credentials:
        by_kind.setdefault(kind, []).append(value)
    users: dict[Credential, Any] = {}
    if keys := by_kind.get("token"):
        users |= _token_users(keys)
    if keys := by_kind.get("session"):
        users |= _session_users(keys)
    grants = _user_grants({user.pk for user in users.values()})
    fresh = {
        credential: _user_principal(user, grants.get(user.pk, ()), credential)
        for credential, user in users.items()
    }
    if ids := by_kind.get("service"):
        fresh |= _services(ids)
    return fresh


def _token_users(keys: list[str]) -> dict[Credential, Any]:
    from rest_framework.authtoken.models import Token

    tokens = Token.objects.select_related("user").filter(key__in=keys, user__is_active=True)
    return {("token", token.key): token.user for token in tokens}


def _session_users(keys: list[str]) -> dict[Credential, Any]:
    """The active user of each session that still exists and still names that user
    the way Django's own ``get_user`` checks it (a changed password ends the others)."""
    from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model

    store_class = import_module(settings.SESSION_ENGINE).SessionStore
    sessions = _session_data(store_class, keys)
    user_ids = {data.get(SESSION_KEY) for data in sessions.values()}
    model = get_user_model()
    by_pk = {
        str(user.pk): user
        for user in model.objects.filter(pk__in=[u for u in user_ids if u], is_active=True)
    }
    users: dict[Credential, Any] = {}
    for key, data in sessions.items():
        user = by_pk.get(str(data.get(SESSION_KEY)))
        if user is not None and _session_hash_verified(user, data.get(HASH_SESSION_KEY)):
            users[("session", key)] = user
    return users


def _session_data(store_class: Any, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Each existing, unexpired session's data, in one query with a database session
    engine (``db``, ``cached_db``); other engines are asked one session at a time."""
    from django.utils import timezone

    if not hasattr(store_class, "get_model_class"):
        return {key: data for key in keys if (data := store_class(key).load())}
    store = store_class()
    rows = store_class.get_model_class().objects.filter(
        session_key__in=keys, expire_date__gt=timezone.now()
    )
    return {row.session_key: store.decode(row.session_data) for row in rows}


def _session_hash_verified(user: Any, session_hash: str | None) -> bool:
    if not session_hash or not hasattr(user, "get_session_auth_hash"):
        return False
    if constant_time_compare(session_hash, user.get_session_auth_hash()):
        return True
    return any(
        constant_time_compare(session_hash, fallback)
        for fallback in user.get_session_auth_fallback_hash()
    )


def _user_grants(user_ids: set[Any]) -> dict[Any, tuple[Grant, ...]]:
    """Each user's grants, their own and their groups', in one query."""
    if not user_ids:
        return {}
    rows = ChannelGrant.objects.filter(
        Q(user_id__in=user_ids) | Q(group__user__in=user_ids)
    ).values_list(
        "user_id", "group__user", "pattern", "can_subscribe", "can_publish", "can_presence"
    )
    grants: dict[Any, list[Grant]] = {}
    for own, via_group, pattern, subscribe, publish, presence in rows:
        grants.setdefault(own or via_group, []).append(Grant(pattern, subscribe, publish, presence))
    return {user_id: tuple(held) for user_id, held in grants.items()}


def _services(ids: list[int]) -> dict[Credential, Principal]:
    tokens = ServiceToken.objects.filter(pk__in=ids, revoked_at__isnull=True).prefetch_related(
        "grants"
    )
    return {
        ("service", token.pk): _service_principal(
            token, tuple(_grant(g) for g in token.grants.all())
        )
        for token in tokens
    }
