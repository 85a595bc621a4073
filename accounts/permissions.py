"""The one place that decides who may subscribe, publish and see presence on a channel.

The WebSocket consumer, the REST API and the SSE stream all ask these functions, so a
rule changes in one place for every transport. Reserved prefixes (the contract):
``private-`` needs a grant, ``user:<id>`` belongs to that user alone (only the server
and staff publish to it), ``presence-`` is private plus a member list. Prefixes are
matched without regard to case, so ``Private-x`` is as closed as ``private-x``.
Signed-in users publish to public channels (``PUSH_USERS_PUBLISH``, on by default, so a
token made with ``drf_create_token`` publishes as the contract describes); everything
else needs a grant (or staff). Service tokens publish only where their scopes allow,
and anonymous clients never publish.
"""

from __future__ import annotations

import fnmatch

from django.db.models import Q, QuerySet

from accounts.principals import Principal
from push.conf import push_settings
from push.errors import ErrorCode, PushError

PRIVATE_PREFIX = "private-"
PRESENCE_PREFIX = "presence-"
USER_PREFIX = "user:"
RESERVED_PREFIXES = (PRIVATE_PREFIX, PRESENCE_PREFIX, USER_PREFIX)


def is_public_channel(channel: str) -> bool:
    return not channel.lower().startswith(RESERVED_PREFIXES)


def is_presence_channel(channel: str) -> bool:
    return channel.lower().startswith(PRESENCE_PREFIX)


def _is_user_channel(channel: str) -> bool:
    return channel.lower().startswith(USER_PREFIX)


def _owns_user_channel(principal: Principal, channel: str) -> bool:
    # Compared as exact strings: "user:01", "user:+1" and "USER:1" are not user 1's.
    return principal.kind == "user" and channel == f"{USER_PREFIX}{principal.id}"


def _granted(principal: Principal, channel: str, right: str) -> bool:
    return any(
        getattr(grant, right) and fnmatch.fnmatchcase(channel, grant.pattern)
        for grant in principal.grants
    )


def can_subscribe(principal: Principal, channel: str) -> bool:
    if principal.is_staff:
        return True
    if _is_user_channel(channel):
        return _owns_user_channel(principal, channel)
    if is_public_channel(channel):
        return principal.is_authenticated or push_settings.ANONYMOUS_SUBSCRIBE
    return _granted(principal, channel, "subscribe")


def can_publish(principal: Principal, channel: str) -> bool:
    if principal.is_staff:
        return True
    if not principal.is_authenticated:
        return False
    if _is_user_channel(channel):
        # Users never publish to each other's channels; a back-end service may, with a
        # grant such as "user:*".
        return principal.kind == "service" and _granted(principal, channel, "publish")
    if principal.kind == "user" and is_public_channel(channel) and push_settings.USERS_PUBLISH:
        return True
    return _granted(principal, channel, "publish")


def can_see_presence(principal: Principal, channel: str) -> bool:
    if principal.is_staff:
        return True
    return can_subscribe(principal, channel) and _granted(principal, channel, "presence")


def authorize_subscribe(principal: Principal, channel: str) -> None:
    if not can_subscribe(principal, channel):
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel!r}")


def authorize_publish(principal: Principal, channel: str) -> None:
    if not can_publish(principal, channel):
        if not principal.is_authenticated:
            raise PushError(ErrorCode.FORBIDDEN, "anonymous clients may not publish")
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to publish to {channel!r}")


def authorize_presence(principal: Principal, channel: str) -> None:
    if not is_presence_channel(channel):
        raise PushError(
            ErrorCode.INVALID_MESSAGE, f"{channel!r} is not a presence- channel", field="channel"
        )
    if not can_see_presence(principal, channel):
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to see presence on {channel!r}")


def visible_channels(principal: Principal, channels: QuerySet, *, after: str = "") -> QuerySet:
    """The channels of ``channels`` whose names ``principal`` may see, after ``after``."""
    if after:
        channels = channels.filter(name__gt=after)
    if principal.is_staff:
        return channels
    reserved = Q()
    for prefix in RESERVED_PREFIXES:
        reserved |= Q(name__istartswith=prefix)
    own = Q(name=f"{USER_PREFIX}{principal.id}") if principal.kind == "user" else Q(pk__in=[])
    visible = channels.filter(~reserved | own)
    if not principal.is_authenticated and not push_settings.ANONYMOUS_SUBSCRIBE:
        return visible.none()
    return visible
