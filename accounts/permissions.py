"""The one place that decides who may subscribe to and publish on a channel.

The WebSocket consumer, the REST API and the SSE stream all ask these functions, so
a rule changes in one place for every transport. Reserved prefixes (the contract):
``private-`` needs a grant, ``user:<id>`` belongs to that user alone (only the server
and staff publish to it), ``presence-`` is private plus a member list.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from push.errors import ErrorCode, PushError

PRIVATE_PREFIX = "private-"
PRESENCE_PREFIX = "presence-"
USER_PREFIX = "user:"


def is_public_channel(channel: str) -> bool:
    return not channel.startswith((PRIVATE_PREFIX, PRESENCE_PREFIX, USER_PREFIX))


def _is_authenticated(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active)


def _owns_user_channel(user: Any, channel: str) -> bool:
    # Compared as strings on purpose: "user:01" and "user:+1" are not user 1.
    return _is_authenticated(user) and channel == f"{USER_PREFIX}{user.pk}"


def can_subscribe(user: Any, channel: str) -> bool:
    if is_public_channel(channel):
        return True
    if channel.startswith(USER_PREFIX):
        return _owns_user_channel(user, channel) or (_is_authenticated(user) and user.is_staff)
    return _is_authenticated(user) and user.is_staff


def can_publish(user: Any, channel: str) -> bool:
    if not _is_authenticated(user):
        return False
    if is_public_channel(channel):
        return True
    return bool(user.is_staff)


def authorize_subscribe(user: Any, channel: str) -> None:
    if not can_subscribe(user, channel):
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel!r}")


def authorize_publish(user: Any, channel: str) -> None:
    if not can_publish(user, channel):
        if not _is_authenticated(user):
            raise PushError(ErrorCode.FORBIDDEN, "anonymous clients may not publish")
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to publish to {channel!r}")


def visible_channels(user: Any, channels: QuerySet, *, after: str = "") -> QuerySet:
    """The channels of ``channels`` whose names ``user`` may see, by name after ``after``."""
    if after:
        channels = channels.filter(name__gt=after)
    if _is_authenticated(user) and user.is_staff:
        return channels
    reserved = (
        Q(name__startswith=PRIVATE_PREFIX)
        | Q(name__startswith=PRESENCE_PREFIX)
        | Q(name__startswith=USER_PREFIX)
    )
    own = Q(name=f"{USER_PREFIX}{user.pk}") if _is_authenticated(user) else Q(pk__in=[])
    return channels.filter(~reserved | own)
