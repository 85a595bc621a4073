"""Pusher's authorization endpoints (``POST /pusher/auth``, ``POST /pusher/user-auth``):
signatures for the Django user of a request, decided by ``accounts.permissions`` as
every other transport decides.

- ``private-`` channels (``private-encrypted-`` too) need the right to subscribe, as our
  own protocol's subscribe does.
- ``presence-`` channels also need the presence right: a Pusher subscriber receives the
  member list with its subscription, which our own protocol shows only to holders of
  that right (the ``presence`` request). The member is who our own protocol makes of
  the same principal (``push.cluster.presence.presence_member``), so a user shows as
  one member on both protocols: ``user_id`` the user's id as a string, ``user_info``
  ``{"username": ...}``.
- User sign-in signs the same identity as ``user_data`` (``id``, ``user_info``).

Which app signs: the request's ``app_key`` when it names one, else the environment's
app (``PUSHER_APP_*``), else the one enabled app: a plain pusher-js configuration sends
no ``app_key``.
Anonymous requests are refused: there is no one to sign for.
"""

from __future__ import annotations

import uuid
from typing import Any

from accounts.permissions import authorize_presence, authorize_subscribe
from accounts.principals import Principal
from common.conf import push_settings
from common.errors import ErrorCode, PushError
from push.cluster.presence import presence_member
from push.services.pusher_apps import (
    PusherApp,
    all_apps,
    app_by_key,
    channel_auth,
    compact_json,
    configured_app,
    encryption_shared_secret,
    user_auth,
)
from push.services.pusher_http import is_pusher_channel_name
from push.wire.pusher import SOCKET_ID, pusher_user_id

# Pusher's prefixes, case-sensitive as pusher-js matches them.
PRIVATE_PREFIX = "private-"
ENCRYPTED_PREFIX = "private-encrypted-"
PRESENCE_PREFIX = "presence-"
# presence_member names a connection only for an anonymous principal, which is refused
# before: any id will do.
_NO_CONNECTION = uuid.UUID(int=0)


def auth_app(app_key: str | None) -> PusherApp:
    """The app that signs: the enabled one with ``app_key``; without it the
    environment's app, or the only enabled app (several, none from the environment:
    the request must name one)."""
    if app_key:
        app = app_by_key(app_key)
        if app is None:
            raise PushError(ErrorCode.NOT_FOUND, "no enabled Pusher app has this key")
        return app
    configured = configured_app()
    if configured is not None:
        return configured
    enabled = [app for app in all_apps() if app.enabled]
    if not enabled:
        raise PushError(ErrorCode.NOT_FOUND, "no Pusher app is configured")
    if len(enabled) > 1:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            "several Pusher apps are enabled: name one with app_key",
            field="app_key",
        )
    return enabled[0]


def pusher_member(principal: Principal) -> dict[str, Any]:
    """``{"user_id", "user_info"}``: who ``principal`` is on a presence channel, the same
    member our own protocol records for it."""
    member = presence_member(principal, _NO_CONNECTION, None)
    return {"user_id": pusher_user_id(member["user_id"]), "user_info": member["info"]}


def _socket_id(socket_id: object) -> str:
    if not isinstance(socket_id, str) or not SOCKET_ID.match(socket_id):
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "socket_id must be Pusher's socket id", field="socket_id"
        )
    return socket_id


def _signed_in(principal: Principal) -> None:
    if not principal.is_authenticated:
        raise PushError(ErrorCode.FORBIDDEN, "sign in first: anonymous requests are not signed")


def channel_authorize(
    *, principal: Principal, app: PusherApp, socket_id: object, channel: object
) -> dict[str, str]:
    """The body of ``/pusher/auth``: ``auth`` (with ``channel_data`` on presence channels,
    ``shared_secret`` on encrypted ones) when ``principal`` may subscribe."""
    socket_id = _socket_id(socket_id)
    if not is_pusher_channel_name(channel):
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "channel_name is not a channel name", field="channel_name"
        )
    if not channel.startswith((PRIVATE_PREFIX, PRESENCE_PREFIX)):
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            "only private- and presence- channels need authorization",
            field="channel_name",
        )
    _signed_in(principal)
    if channel.startswith(PRESENCE_PREFIX):
        authorize_presence(principal, channel)
        channel_data = compact_json(pusher_member(principal))
        return {
            "auth": channel_auth(app, socket_id, channel, channel_data),
            "channel_data": channel_data,
        }
    authorize_subscribe(principal, channel)
    body = {"auth": channel_auth(app, socket_id, channel, None)}
    if channel.startswith(ENCRYPTED_PREFIX):
        master_key = push_settings.PUSHER_APP_ENCRYPTION_MASTER_KEY
        if not master_key:
            raise PushError(
                ErrorCode.INVALID_MESSAGE,
                "encrypted channels need PUSHER_APP_ENCRYPTION_MASTER_KEY on the server",
                field="channel_name",
            )
        body["shared_secret"] = encryption_shared_secret(master_key, channel)
    return body


def user_authenticate(*, principal: Principal, app: PusherApp, socket_id: object) -> dict[str, str]:
    """The body of ``/pusher/user-auth``: ``auth`` and ``user_data`` for Pusher's user
    sign-in (``pusher:signin``) as ``principal``."""
    socket_id = _socket_id(socket_id)
    _signed_in(principal)
    member = pusher_member(principal)
    user_data = compact_json({"id": member["user_id"], "user_info": member["user_info"]})
    return {"auth": user_auth(app, socket_id, user_data), "user_data": user_data}
