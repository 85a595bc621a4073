"""The one place that decides who may subscribe, publish and see presence on a channel.

The WebSocket consumer, the REST API and the SSE stream all ask these functions, so a
rule changes in one place for every transport. Reserved prefixes (the contract):
``private-`` needs a grant, ``user:<id>`` belongs to that user alone (only the server
and staff publish to it), ``presence-`` is private plus a member list. Prefixes are
matched without regard to case, so ``Private-x`` is as closed as ``private-x``.
Signed-in users publish to public channels (``PUSH_USERS_PUBLISH``, on by default, so a
token made with ``drf_create_token`` publishes as the contract describes); everything
else needs a grant (or staff), and anonymous clients never publish. A service token has
no rights but its scopes (grants): it publishes where a publish scope allows, and it
subscribes to, and reads the history of, only the channels a subscribe scope names,
public ones included.

``ChannelPermission`` is the same decider as a DRF permission class, for the REST views.
A signed subscription token in the ``X-Subscription-Token`` header opens the reads that
need the subscribe right (history, a channel's details) on its channel, as the same
token opens a WebSocket subscribe; it never opens a publish.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from rest_framework import exceptions
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from accounts.authentication import request_principal
from accounts.principals import Grant, Principal
from accounts.subscription_tokens import subscription_token_verify
from common.conf import push_settings
from common.errors import ErrorCode, PushError

PRIVATE_PREFIX = "private-"
PRESENCE_PREFIX = "presence-"
USER_PREFIX = "user:"
RESERVED_PREFIXES = (PRIVATE_PREFIX, PRESENCE_PREFIX, USER_PREFIX)
# Where a REST read carries a signed subscription token: a header, not the query string,
# so the token stays out of access logs, proxies' logs and the pages' ``next`` URLs.
SUBSCRIPTION_TOKEN_HEADER = "X-Subscription-Token"  # noqa: S105 (a header name)


def is_public_channel(channel: str) -> bool:
    return not channel.lower().startswith(RESERVED_PREFIXES)


def is_presence_channel(channel: str) -> bool:
    return channel.lower().startswith(PRESENCE_PREFIX)


def _is_user_channel(channel: str) -> bool:
    return channel.lower().startswith(USER_PREFIX)


def _owns_user_channel(principal: Principal, channel: str) -> bool:
    # Compared as exact strings: "user:01", "user:+1" and "USER:1" are not user 1's.
    return principal.kind == "user" and channel == f"{USER_PREFIX}{principal.id}"


# Bits of ``Principal.granted_rights``: the rights a principal's grants give on a channel.
SUBSCRIBE = 1
PUBLISH = 2
PRESENCE = 4
# Channels a principal remembers its rights on, at most: names come from clients, and a
# node holds a principal per connection, tens of thousands. Full, it starts over, so a
# client trying many names costs its old price and ~3 KB of dict (plus the names) at
# worst, and a publisher's working set of a few dozen channels stays remembered.
MAX_REMEMBERED_CHANNELS = 128


def _grant_rights(grant: Grant) -> int:
    return (
        (SUBSCRIBE if grant.subscribe else 0)
        | (PUBLISH if grant.publish else 0)
        | (PRESENCE if grant.presence else 0)
    )


def _matched_rights(grants: tuple[Grant, ...], channel: str) -> int:
    """The rights of every grant whose pattern matches ``channel``."""
    rights = 0
    for grant in grants:
        # A grant that adds no right not already held needs no match.
        adds = _grant_rights(grant) & ~rights
        if adds and fnmatch.fnmatchcase(channel, grant.pattern):
            rights |= adds
    return rights


def _granted(principal: Principal, channel: str, right: int) -> bool:
    """Whether one of ``principal``'s grants gives ``right`` (a bit above) on ``channel``."""
    if not principal.grants:
        return False
    remembered = principal.granted_rights
    rights = remembered.get(channel)
    if rights is None:
        rights = _matched_rights(principal.grants, channel)
        if len(remembered) >= MAX_REMEMBERED_CHANNELS:
            remembered.clear()
        remembered[channel] = rights
    return rights & right != 0


def can_subscribe(principal: Principal, channel: str) -> bool:
    if principal.is_staff:
        return True
    if _is_user_channel(channel):
        return _owns_user_channel(principal, channel)
    if principal.kind == "service":
        # A service token holds only its scopes: one made to publish a ticker must not
        # read other channels, public ones included, if its key leaks.
        return _granted(principal, channel, SUBSCRIBE)
    if is_public_channel(channel):
        return principal.is_authenticated or push_settings.ANONYMOUS_SUBSCRIBE
    return _granted(principal, channel, SUBSCRIBE)


def can_publish(principal: Principal, channel: str) -> bool:
    if principal.is_staff:
        return True
    if not principal.is_authenticated:
        return False
    if principal.kind == "service":
        # Only its scopes, on every channel: a back-end service may publish to user
        # channels with a grant such as "user:*". Asked first, as the publishers at a
        # node's maximum are services: a user channel's test (lower-casing the name)
        # changes nothing for them.
        return _granted(principal, channel, PUBLISH)
    if _is_user_channel(channel):
        # Users never publish to each other's channels.
        return False
    if principal.kind == "user" and is_public_channel(channel) and push_settings.USERS_PUBLISH:
        return True
    return _granted(principal, channel, PUBLISH)


def can_see_presence(principal: Principal, channel: str) -> bool:
    if principal.is_staff:
        return True
    return can_subscribe(principal, channel) and _granted(principal, channel, PRESENCE)


def authorize_subscribe(principal: Principal, channel: str) -> None:
    if not can_subscribe(principal, channel):
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel!r}")


def authorize_publish(principal: Principal, channel: str) -> None:
    if not can_publish(principal, channel):
        if not principal.is_authenticated:
            raise PushError(ErrorCode.FORBIDDEN, "anonymous clients may not publish")
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to publish to {channel!r}")


def subscription_refusal(
    principal: Principal, channel: str, *, token_expires_at: float | None, now: float
) -> PushError | None:
    """Why a live subscription must end now, or None while it may go on: it lasts while
    the principal (as it is now) may subscribe, or until the signed subscription token
    that granted it expires."""
    if can_subscribe(principal, channel):
        return None
    if token_expires_at is None:
        return PushError(ErrorCode.FORBIDDEN, f"no longer allowed to subscribe to {channel!r}")
    if token_expires_at > now:
        return None
    return PushError(ErrorCode.FORBIDDEN, f"the subscription token for {channel!r} expired")


def authorize_presence(principal: Principal, channel: str) -> None:
    if not is_presence_channel(channel):
        raise PushError(
            ErrorCode.INVALID_MESSAGE, f"{channel!r} is not a presence- channel", field="channel"
        )
    if not can_see_presence(principal, channel):
        raise PushError(ErrorCode.FORBIDDEN, f"not allowed to see presence on {channel!r}")


_AUTHORIZE = {
    "subscribe": authorize_subscribe,
    "publish": authorize_publish,
    "presence": authorize_presence,
}


class ChannelPermission(BasePermission):
    """The REST views' door to the decider above, so REST answers as WebSocket and SSE do.

    A view says which right each HTTP method needs (``channel_rights``, e.g.
    ``{"GET": "subscribe", "POST": "publish"}``; a method not named needs none) and which
    channel a request is about (``request_channel()``, which validates the name). A
    refusal raises the decider's own ``PushError`` (403 FORBIDDEN in the contract's error
    envelope, from ``push.api.exceptions``); an anonymous publish is 401, asking for a
    token.

    A read that needs the subscribe right and carries ``X-Subscription-Token`` is
    decided by that token alone, as a WebSocket subscribe with a token is: genuine,
    unexpired and for this channel, else the verifier's 403 ``FORBIDDEN``."""

    def has_permission(self, request: Request, view: Any) -> bool:
        method = "GET" if request.method == "HEAD" else request.method
        right = getattr(view, "channel_rights", {}).get(method)
        if right is None:
            return True
        channel = view.request_channel()
        token = request.headers.get(SUBSCRIPTION_TOKEN_HEADER)
        if right == "subscribe" and token is not None:
            subscription_token_verify(token, channel=channel)
            return True
        principal = request_principal(request)
        if right == "publish" and not principal.is_authenticated:
            raise exceptions.NotAuthenticated()
        _AUTHORIZE[right](principal, channel)
        return True
