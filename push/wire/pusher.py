"""The Pusher Channels protocol (version 7) on the wire: its frames, and the mapping
between a Pusher event and a channel message of our own protocol.

Channels are shared between the protocols. A Pusher event ``E`` with data ``D`` (a
string) is stored as a message whose data is ``{"event": E, "data": D}``; a message whose
data is an object with a string ``event`` and a ``data`` member reaches Pusher clients
as that event (a non-string ``data`` as its JSON text), unless ``event`` is named as
Pusher's own are (``pusher:``, ``pusher_internal:``); any other as event ``message``
with the JSON text of its data.

``PusherCodec`` is the fan-out's codec for Pusher connections: the hub encodes each
message once per codec, so every Pusher subscriber of a node shares one frame, as our
own formats' subscribers do. It is never offered as a subprotocol: a connection to
``/app/<key>`` gets it.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from push.wire.codecs.base import Codec, Payload, WireMessage
from push.wire.codecs.json_codec import JsonCodec

PROTOCOL_VERSION = 7
# Pusher's own default message (event) name for a message that names none.
DEFAULT_EVENT = "message"
# Pusher limits an event name to 200 characters, a channel name to 164.
MAX_EVENT_NAME = 200
MAX_CHANNEL_NAME = 164
# Pusher's bounds on what one client sends: a client event's data, a presence member's
# channel_data (its user id's: accounts.subscription_tokens.MAX_USER_ID_CHARS).
MAX_CLIENT_EVENT_BYTES = 10_240
MAX_CHANNEL_DATA_BYTES = 1_024
SOCKET_ID = re.compile(r"\A\d+\.\d+\Z")

CONNECTION_ESTABLISHED = "pusher:connection_established"
SUBSCRIBE = "pusher:subscribe"
UNSUBSCRIBE = "pusher:unsubscribe"
PING = "pusher:ping"
PONG = "pusher:pong"
SIGNIN = "pusher:signin"
SIGNIN_SUCCESS = "pusher:signin_success"
ERROR = "pusher:error"
SUBSCRIPTION_ERROR = "pusher:subscription_error"
CACHE_MISS = "pusher:cache_miss"
SUBSCRIPTION_SUCCEEDED = "pusher_internal:subscription_succeeded"
MEMBER_ADDED = "pusher_internal:member_added"
MEMBER_REMOVED = "pusher_internal:member_removed"
CLIENT_EVENT_PREFIX = "client-"
# Pusher's own events: never the name of a channel message's event (``as_pusher_event``).
_RESERVED_PREFIXES = ("pusher:", "pusher_internal:")

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_json = JsonCodec()


class PusherError:
    """``pusher:error`` codes as Pusher defines them (4000-4099: do not reconnect with the
    same parameters; 4100-4199: reconnect after a back-off; 4200-4299: reconnect now)."""

    SSL_ONLY = 4000
    APP_NOT_FOUND = 4001
    APP_DISABLED = 4003
    OVER_CONNECTION_QUOTA = 4004
    PATH_NOT_FOUND = 4005
    INVALID_VERSION = 4006
    UNSUPPORTED_VERSION = 4007
    NO_VERSION = 4008
    UNAUTHORIZED = 4009
    OVER_CAPACITY = 4100
    GENERIC_RECONNECT = 4200
    PONG_NOT_RECEIVED = 4201
    CLOSED_AFTER_INACTIVITY = 4202
    CLIENT_EVENT_RATE_LIMIT = 4301


def new_socket_id() -> str:
    """A socket id in Pusher's form (two numbers joined by a dot), unguessable."""
    return f"{secrets.randbelow(10**9)}.{secrets.randbelow(10**9)}"


def event_frame(event: str, data: Any = None, channel: str | None = None, **extra: Any) -> str:
    """One Pusher frame. ``data`` that is not a string is sent as its JSON text, as
    Pusher sends every ``data`` from the server (pusher-js parses it back)."""
    frame: dict[str, Any] = {"event": event}
    if channel is not None:
        frame["channel"] = channel
    if data is not None:
        frame["data"] = data if isinstance(data, str) else _encoder.encode(data)
    frame.update(extra)
    return _encoder.encode(frame)


def json_text(value: Any) -> str:
    return _encoder.encode(value)


def error_frame(code: int | None, message: str) -> str:
    # pusher:error carries its data as an object, not as JSON text (pusher-js reads
    # data.code to decide whether to reconnect).
    return _encoder.encode({"event": ERROR, "data": {"code": code, "message": message}})


def subscription_error_frame(channel: str, status: int, error: str) -> str:
    return event_frame(
        SUBSCRIPTION_ERROR, {"type": "AuthError", "error": error, "status": status}, channel
    )


# ----- the mapping between the protocols ---------------------------------------------------


def message_data(event: str, data: str) -> dict[str, str]:
    """Our message data for a Pusher event."""
    return {"event": event, "data": data}


def as_pusher_event(data: Any) -> tuple[str, str]:
    """(event, data text) that a message with ``data`` reaches Pusher clients as. An
    event named as Pusher names its own (``pusher:``, ``pusher_internal:``) is not
    passed on as one: pusher-js would take it for the server's (a presence member, a
    sign-in), and whoever may publish on a channel could forge those."""
    if (
        isinstance(data, dict)
        and isinstance(data.get("event"), str)
        and "data" in data
        and not data["event"].startswith(_RESERVED_PREFIXES)
    ):
        inner = data["data"]
        return data["event"], inner if isinstance(inner, str) else _encoder.encode(inner)
    return DEFAULT_EVENT, _encoder.encode(data)


def pusher_user_id(user_id: Any) -> str:
    """Pusher's user ids are strings; ours may be numbers."""
    return user_id if isinstance(user_id, str) else _encoder.encode(user_id)


def member_user_id(user_id: str | int) -> str | int:
    """The presence member id of a Pusher user id. Pusher's ids are strings and our own
    protocol's user members are numbers (the Django user's id): a canonical integer
    string ("7", not "07") is that number, so one user is one member on both
    protocols."""
    if isinstance(user_id, str) and (user_id == "0" or (user_id.isdigit() and user_id[0] != "0")):
        return int(user_id) if user_id.isascii() else user_id
    return user_id


def member_frame(kind: str, channel: str, member: dict[str, Any]) -> str:
    """``member_added`` / ``member_removed`` for one of our presence changes."""
    user_id = pusher_user_id(member.get("user_id"))
    if kind == "join":
        return event_frame(
            MEMBER_ADDED, {"user_id": user_id, "user_info": member.get("info") or {}}, channel
        )
    return event_frame(MEMBER_REMOVED, {"user_id": user_id}, channel)


def presence_data(members: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``presence`` object of a presence channel's ``subscription_succeeded``."""
    by_id = {pusher_user_id(m.get("user_id")): m.get("info") or {} for m in members}
    return {"presence": {"ids": list(by_id), "hash": by_id, "count": len(by_id)}}


class PusherCodec(Codec):
    """Our server envelopes as Pusher frames (see the module's docstring)."""

    name = "pusher"
    subprotocol = ""
    binary = False

    def decode(self, payload: Payload) -> Any:
        return _json.decode(payload)

    def encode(self, envelope: dict[str, Any]) -> str:
        kind = envelope.get("type")
        if kind == "message":
            event, data = as_pusher_event(envelope.get("data"))
            return event_frame(event, data, envelope.get("channel"))
        if kind in ("join", "leave"):
            return member_frame(kind, envelope["channel"], envelope["member"])
        if kind == "error":
            if envelope.get("channel"):
                # A subscription the server ended (its grant was revoked).
                return subscription_error_frame(envelope["channel"], 403, envelope["message"])
            return error_frame(None, envelope.get("message", ""))
        if "event" in envelope:
            return _encoder.encode(envelope)
        # Anything else of our protocol (occupancy, say) has no Pusher counterpart:
        # pusher-js ignores pusher_internal events it does not know.
        return event_frame(f"pusher_internal:{kind}", envelope, envelope.get("channel"))

    def encode_message(self, message: WireMessage) -> str:
        event, data = as_pusher_event(message.data)
        return event_frame(event, data, message.channel)


PUSHER_CODEC = PusherCodec()
