"""Principal: who is on the other end of a connection or request, with their grants.

Built once per connection (and per REST request) from a session, a user token or a
service token, so every permission decision after that is a pure function of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.db.models import Q

from accounts.models import ChannelGrant, ServiceToken, hash_service_key


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
    # ("service", id) or ("session", user id).
    credential: tuple[str, Any] | None = field(default=None, compare=False)

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


def _grants(queryset: Any) -> tuple[Grant, ...]:
    return tuple(
        Grant(g.pattern, g.can_subscribe, g.can_publish, g.can_presence)
        for g in queryset.only("pattern", "can_subscribe", "can_publish", "can_presence")
    )


def principal_for_user(user: Any, credential: tuple[str, Any] | None = None) -> Principal:
    if user is None or not user.is_authenticated or not user.is_active:
        return ANONYMOUS
    grants = ChannelGrant.objects.filter(Q(user=user) | Q(group__in=user.groups.all()))
    return Principal(
        kind="user",
        id=user.pk,
        user=user,
        is_staff=bool(user.is_staff),
        grants=_grants(grants),
        name=user.get_username(),
        credential=credential or ("session", user.pk),
    )


def principal_for_service(token: ServiceToken) -> Principal:
    return Principal(
        kind="service",
        id=token.pk,
        user=AnonymousUser(),
        grants=_grants(token.grants.all()),
        name=token.name,
        credential=("service", token.pk),
    )


def authenticate_key(key: str) -> Principal | None:
    """The principal of a user token or a service token key; None if neither is valid."""
    from rest_framework.authtoken.models import Token

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


def credentials_still_valid(credentials: set[tuple[str, Any]]) -> set[tuple[str, Any]]:
    """Which of these credentials are still valid (for closing revoked connections)."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    by_kind: dict[str, list[Any]] = {}
    for kind, value in credentials:
        by_kind.setdefault(kind, []).append(value)
    valid: set[tuple[str, Any]] = set()
    if keys := by_kind.get("token"):
        valid |= {
            ("token", k)
            for k in Token.objects.filter(key__in=keys, user__is_active=True).values_list(
                "key", flat=True
            )
        }
    if ids := by_kind.get("service"):
        valid |= {
            ("service", i)
            for i in ServiceToken.objects.filter(pk__in=ids, revoked_at__isnull=True).values_list(
                "pk", flat=True
            )
        }
    if ids := by_kind.get("session"):
        valid |= {
            ("session", i)
            for i in get_user_model()
            .objects.filter(pk__in=ids, is_active=True)
            .values_list("pk", flat=True)
        }
    return valid
