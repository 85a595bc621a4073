"""The Pusher HTTP API (``/apps/<id>/...``): requests signed as Pusher signs them, events
published through our own write path, and what the API tells of channels.

A request names its app by id in the path (by ``auth_key`` alone on the one path
pusher-http-python 3.3 sends without it), and is signed with that app's secret
(``api_request_verify``). Every refusal is a ``PusherRefusal``: Pusher's status and a
plain-text message, which the view sends as it is.

An event goes through ``messages_publish_batches``, the REST API's write path: stored and
numbered per channel like any message, its data ``{"event": E, "data": D}``
(``push.wire.pusher.message_data``), so our own protocol's subscribers get it and may
resume past it. ``socket_id`` keeps the triggering Pusher connection from receiving it
live, as Pusher does.

Counts come from what the REST channel info reads (``push.cluster.occupancy``,
``push.cluster.presence``): a second or two behind, like the ``occupancy`` events.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeGuard, TypeVar

from asgiref.sync import sync_to_async

from common import metrics
from common.conf import push_settings
from common.errors import ErrorCode, PushError
from push.cluster.directory import connections_disconnect
from push.cluster.node import running_node
from push.cluster.occupancy import occupied_channels, subscriber_totals
from push.cluster.presence import presence_members_sync
from push.services.publishing import messages_publish_batches
from push.services.pusher_apps import (
    AUTH_VERSION,
    PusherApp,
    app_by_id_async,
    app_by_key_async,
    body_md5,
    http_signature,
    http_string_to_sign,
)
from push.storage.history_modes import is_recent
from push.wire.pusher import (
    MAX_CHANNEL_NAME,
    MAX_EVENT_NAME,
    SOCKET_ID,
    message_data,
    pusher_user_id,
)

# Pusher's own limits: channels of one trigger, events of one batch.
MAX_TRIGGER_CHANNELS = 100
MAX_BATCH_EVENTS = 10
# Pusher's channel name characters; its prefixes are case-sensitive.
PUSHER_CHANNEL_NAME = re.compile(r"\A[A-Za-z0-9_\-=@,.;]+\Z")
# pusher-http-python's bound on a user id (a sign-in may name any string).
MAX_USER_ID = 200
PRESENCE_PREFIX = "presence-"
SUBSCRIPTION_COUNT = "subscription_count"
USER_COUNT = "user_count"
INFO_ATTRIBUTES = (SUBSCRIPTION_COUNT, USER_COUNT)

P = ParamSpec("P")
R = TypeVar("R")


def _off_loop(func: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """``func`` (sync Redis reads) run on a worker thread, not the loop. Not for the
    database: that is ``common.db.db_call``'s, whose threads give their connection back."""
    return sync_to_async(func, thread_sensitive=False)


class PusherRefusal(Exception):
    """Raised when a Pusher HTTP API request is refused: ``status`` and the plain-text
    ``message`` Pusher answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----- the signature -------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedRequest:
    method: str
    # The path as the client may have signed it: decoded, and as received if different.
    paths: tuple[str, ...]
    # The query parameters, decoded (what Pusher signs).
    params: Mapping[str, str]
    body: bytes


def api_request_verify(
    app: PusherApp | None, request: SignedRequest, *, now: float, tolerance_secs: int
) -> PusherApp:
    """``app`` if ``request`` is signed with its key and secret, recently, over this
    body; else a ``PusherRefusal`` (404 for no app, 401 for the rest). The signature is
    checked before the timestamp and the body, so only a holder of the secret learns
    more than "invalid signature"."""
    if app is None:
        raise PusherRefusal(404, "Unknown app")
    params = request.params
    key = params.get("auth_key")
    if not key:
        raise PusherRefusal(401, "Missing auth_key")
    if not hmac.compare_digest(key.encode("utf-8", "surrogatepass"), app.key.encode()):
        raise PusherRefusal(401, "Invalid auth_key")
    if params.get("auth_version") != AUTH_VERSION:
        raise PusherRefusal(401, f"auth_version must be {AUTH_VERSION}")
    signature = params.get("auth_signature", "").encode("utf-8", "surrogatepass")
    expected = [http_signature(app.secret, request.method, path, params) for path in request.paths]
    # Every candidate is compared, so the time taken does not tell which one failed.
    if not sum(hmac.compare_digest(e.encode(), signature) for e in expected):
        string_to_sign = http_string_to_sign(request.method, request.paths[0], params)
        raise PusherRefusal(
            401,
            "Invalid signature: you should have sent HmacSHA256Hex("
            f"{json.dumps(string_to_sign)}, your_secret_key)",
        )
    try:
        timestamp = int(params.get("auth_timestamp", ""))
    except ValueError:
        raise PusherRefusal(401, "auth_timestamp must be seconds since 1970") from None
    if abs(now - timestamp) > tolerance_secs:
        raise PusherRefusal(
            401,
            f"Timestamp expired: given timestamp {timestamp} is not within "
            f"{tolerance_secs}s of server time {int(now)}",
        )
    sent_md5 = params.get("body_md5")
    if (request.body or sent_md5 is not None) and not hmac.compare_digest(
        (sent_md5 or "").encode("utf-8", "surrogatepass"), body_md5(request.body).encode()
    ):
        raise PusherRefusal(401, "body_md5 does not match the body")
    return app


async def api_app(*, app_id: str | None, params: Mapping[str, str]) -> PusherApp | None:
    """The enabled app a request names: by id, or by ``auth_key`` where the path has
    no id (``/users/<id>/terminate_connections``, as pusher-http-python 3.3 sends it)."""
    if app_id is not None:
        return await app_by_id_async(app_id)
    return await app_by_key_async(params.get("auth_key", ""))


# ----- triggering events ---------------------------------------------------------------------


@dataclass(frozen=True)
class TriggeredEvent:
    channel: str
    name: str
    data: str
    socket_id: str | None = None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise PusherRefusal(400, "The body is not valid JSON") from None
    if not isinstance(value, dict):
        raise PusherRefusal(400, "The body must be a JSON object")
    return value


def is_pusher_channel_name(channel: object) -> TypeGuard[str]:
    """Whether ``channel`` is a name Pusher accepts (its characters, at most 164)."""
    return (
        isinstance(channel, str)
        and len(channel) <= MAX_CHANNEL_NAME
        and PUSHER_CHANNEL_NAME.match(channel) is not None
    )


def pusher_channel_validate(channel: object) -> str:
    if not is_pusher_channel_name(channel):
        raise PusherRefusal(
            400, f"Invalid channel name {channel!r}: 1 to {MAX_CHANNEL_NAME} of A-Z a-z 0-9 _-=@,.;"
        )
    return channel


def _event_fields(fields: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(name, data, socket_id) of an event, checked as Pusher checks them."""
    name = fields.get("name")
    if not isinstance(name, str) or not name:
        raise PusherRefusal(400, "name must be a non-empty string")
    if len(name) > MAX_EVENT_NAME:
        raise PusherRefusal(400, f"Event name longer than {MAX_EVENT_NAME} characters")
    data = fields.get("data")
    if not isinstance(data, str):
        raise PusherRefusal(400, "data must be a string")
    limit = push_settings.MAX_FRAME_BYTES
    if len(data.encode("utf-8", "surrogatepass")) > limit:
        raise PusherRefusal(413, f"Event data larger than {limit} bytes")
    socket_id = fields.get("socket_id")
    if socket_id is not None and (not isinstance(socket_id, str) or not SOCKET_ID.match(socket_id)):
        raise PusherRefusal(400, f"Invalid socket_id: {socket_id!r}")
    return name, data, socket_id


def info_attributes(info: object) -> tuple[str, ...]:
    """The attributes a comma-separated ``info`` asks for (Pusher's two counts)."""
    if info is None or info == "":
        return ()
    if not isinstance(info, str):
        raise PusherRefusal(400, "info must be a comma-separated string")
    asked = tuple(dict.fromkeys(a.strip() for a in info.split(",") if a.strip()))
    unknown = [a for a in asked if a not in INFO_ATTRIBUTES]
    if unknown:
        raise PusherRefusal(
            400, f"Unknown info attribute {unknown[0]!r}: ask for {', '.join(INFO_ATTRIBUTES)}"
        )
    return asked


def trigger_read(body: bytes) -> tuple[list[TriggeredEvent], tuple[str, ...]]:
    """The events of a ``POST /events`` body (one per channel, in the order named) and
    the ``info`` attributes it asks for."""
    fields = _json_object(body)
    if "channel" in fields and "channels" in fields:
        raise PusherRefusal(400, "Give channel or channels, not both")
    channels = [fields["channel"]] if "channel" in fields else fields.get("channels")
    if not isinstance(channels, list) or not channels:
        raise PusherRefusal(400, "channels must be a non-empty list of channel names")
    if len(channels) > MAX_TRIGGER_CHANNELS:
        raise PusherRefusal(400, f"An event may go to at most {MAX_TRIGGER_CHANNELS} channels")
    # A channel named twice gets the event once, as in Pusher.
    names = list(dict.fromkeys(pusher_channel_validate(c) for c in channels))
    name, data, socket_id = _event_fields(fields)
    events = [TriggeredEvent(c, name, data, socket_id) for c in names]
    return events, info_attributes(fields.get("info"))


def batch_read(body: bytes) -> tuple[list[TriggeredEvent], list[tuple[str, ...]]]:
    """The events of a ``POST /batch_events`` body and each one's ``info`` attributes."""
    batch = _json_object(body).get("batch")
    if not isinstance(batch, list) or not batch:
        raise PusherRefusal(400, "batch must be a non-empty list of events")
    if len(batch) > MAX_BATCH_EVENTS:
        raise PusherRefusal(400, f"Batch too large: at most {MAX_BATCH_EVENTS} events")
    events, infos = [], []
    for index, fields in enumerate(batch):
        try:
            if not isinstance(fields, dict):
                raise PusherRefusal(400, "an event must be a JSON object")
            channel = pusher_channel_validate(fields.get("channel"))
            name, data, socket_id = _event_fields(fields)
            infos.append(info_attributes(fields.get("info")))
        except PusherRefusal as exc:
            raise PusherRefusal(exc.status, f"batch[{index}]: {exc.message}") from None
        events.append(TriggeredEvent(channel, name, data, socket_id))
    return events, infos


def commit_units(events: Sequence[TriggeredEvent]) -> list[tuple[str | None, list[TriggeredEvent]]]:
    """``events`` cut into the publishes that store them: as few as the write path
    allows. One publish is one transaction with one excluded socket, and a recent-only
    channel commits alone (``push.services.publishing``): an event joins the last
    publish of its store and socket id unless a later one holds its channel, so a
    trigger's durable channels share one transaction in whatever order they are named,
    and a channel's events keep their order."""
    units: list[tuple[tuple[str | None, str | None], list[TriggeredEvent]]] = []
    for event in events:
        key = (event.channel if is_recent(event.channel) else None, event.socket_id)
        joined = _unit_to_join(units, key, event.channel)
        if joined is None:
            units.append((key, [event]))
        else:
            joined.append(event)
    return [(socket_id, unit) for (_, socket_id), unit in units]


def _unit_to_join(
    units: list[tuple[tuple[str | None, str | None], list[TriggeredEvent]]],
    key: tuple[str | None, str | None],
    channel: str,
) -> list[TriggeredEvent] | None:
    for unit_key, unit in reversed(units):
        if unit_key == key:
            return unit
        if any(event.channel == channel for event in unit):
            return None  # joining an earlier publish would put it before this one
    return None


async def events_publish(events: Sequence[TriggeredEvent]) -> None:
    """Store and deliver ``events``, all or none refused: a channel named in several
    gets them in order. A trigger's durable channels share one transaction."""
    batches = [
        ([(e.channel, message_data(e.name, e.data)) for e in unit], exclude)
        for exclude, unit in commit_units(events)
    ]
    for messages, replayed in await messages_publish_batches(batches=batches):
        if not replayed:
            metrics.MESSAGES_PUBLISHED.labels("pusher_http").inc(len(messages))


# ----- what the API tells of channels ---------------------------------------------------------


def _presence_user_ids(channel: str) -> list[str]:
    """The distinct users of a presence channel, as Pusher names them (strings)."""
    node = running_node()
    members = presence_members_sync(channel, local=node.presence if node is not None else None)
    return list(dict.fromkeys(pusher_user_id(m.get("user_id")) for m in members))


def _counts(channels: list[str], attributes: Sequence[str]) -> dict[str, dict[str, int]]:
    node = running_node()
    counts: dict[str, dict[str, int]] = {channel: {} for channel in channels}
    try:
        if SUBSCRIPTION_COUNT in attributes:
            local = node.occupancy.local_count if node is not None else None
            for channel, total in subscriber_totals(channels, local=local).items():
                counts[channel][SUBSCRIPTION_COUNT] = total
        if USER_COUNT in attributes:
            for channel in channels:
                if channel.startswith(PRESENCE_PREFIX):
                    counts[channel][USER_COUNT] = len(_presence_user_ids(channel))
    except Exception as exc:
        raise PushError(ErrorCode.UNAVAILABLE, "subscriber counts are unavailable") from exc
    return counts


def _triggered_info_sync(
    events: Sequence[TriggeredEvent], asked: Sequence[tuple[str, ...]]
) -> list[dict[str, int]]:
    wanted = sorted({a for attributes in asked for a in attributes})
    counts = _counts(list(dict.fromkeys(e.channel for e in events)), wanted)
    return [
        {a: n for a, n in counts[e.channel].items() if a in attributes}
        for e, attributes in zip(events, asked, strict=True)
    ]


async def triggered_info(
    events: Sequence[TriggeredEvent], asked: Sequence[tuple[str, ...]]
) -> list[dict[str, int]]:
    """Each event's channel's counts, those its ``info`` asked for (``user_count`` on
    presence channels only), after it was published."""
    return await _off_loop(_triggered_info_sync)(events, asked)


def _channels_list_sync(params: Mapping[str, str]) -> dict[str, Any]:
    prefix = params.get("filter_by_prefix", "")
    attributes = info_attributes(params.get("info"))
    if USER_COUNT in attributes and not prefix.startswith(PRESENCE_PREFIX):
        raise PusherRefusal(400, "user_count may only be asked with filter_by_prefix=presence-")
    node = running_node()
    try:
        occupied = occupied_channels(prefix, local=node.hub if node is not None else None)
    except Exception as exc:
        raise PushError(ErrorCode.UNAVAILABLE, "subscriber counts are unavailable") from exc
    names = sorted(occupied)
    counts = _counts(names, [a for a in attributes if a != SUBSCRIPTION_COUNT])
    channels: dict[str, dict[str, int]] = {}
    for name in names:
        channels[name] = {}
        if SUBSCRIPTION_COUNT in attributes:
            channels[name][SUBSCRIPTION_COUNT] = occupied[name]
        channels[name].update(counts[name])
    return {"channels": channels}


async def channels_list(*, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET /channels``: the occupied channels (``filter_by_prefix``), with the counts
    ``info`` asks for (``user_count`` only with a ``presence-`` prefix)."""
    return await _off_loop(_channels_list_sync)(params)


def _channel_state_sync(channel: str, params: Mapping[str, str]) -> dict[str, Any]:
    pusher_channel_validate(channel)
    attributes = info_attributes(params.get("info"))
    if USER_COUNT in attributes and not channel.startswith(PRESENCE_PREFIX):
        raise PusherRefusal(400, "user_count is only for presence channels")
    counts = _counts([channel], (SUBSCRIPTION_COUNT, *attributes))[channel]
    state: dict[str, Any] = {"occupied": counts[SUBSCRIPTION_COUNT] > 0}
    state.update((a, counts[a]) for a in attributes)
    return state


async def channel_state(*, channel: str, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET /channels/<channel>``: ``occupied``, and the counts ``info`` asks for."""
    return await _off_loop(_channel_state_sync)(channel, params)


def _channel_users_sync(channel: str) -> dict[str, Any]:
    pusher_channel_validate(channel)
    if not channel.startswith(PRESENCE_PREFIX):
        raise PusherRefusal(400, "users are only listed for presence channels")
    try:
        ids = _presence_user_ids(channel)
    except Exception as exc:
        raise PushError(ErrorCode.UNAVAILABLE, "presence is unavailable") from exc
    return {"users": [{"id": user_id} for user_id in ids]}


async def channel_users(*, channel: str) -> dict[str, Any]:
    """``GET /channels/<presence channel>/users``: each member once, by Pusher user id."""
    return await _off_loop(_channel_users_sync)(channel)


async def user_connections_terminate(*, user_id: str) -> None:
    """Close every connection signed in (``pusher:signin``) as ``user_id``, on every node."""
    if len(user_id) > MAX_USER_ID:
        raise PusherRefusal(400, f"User id longer than {MAX_USER_ID} characters")
    # Closed as the server closes a connection on policy: pusher:error 4009, after
    # which pusher-js does not reconnect by itself (push.transport.pusher).
    await _off_loop(connections_disconnect)(pusher_user_ids=[user_id])


# ----- the endpoints ---------------------------------------------------------------------------


async def api_request_app(*, app_id: str | None, request: SignedRequest, now: float) -> PusherApp:
    """The app a request is for, once its signature is checked (``api_request_verify``)."""
    app = await api_app(app_id=app_id, params=request.params)
    return api_request_verify(
        app, request, now=now, tolerance_secs=push_settings.PUSHER_TIMESTAMP_TOLERANCE_SECS
    )


async def events_trigger(*, body: bytes) -> dict[str, Any]:
    """``POST /events``: one event on one or more channels; ``{}``, or each channel's
    counts when ``info`` asks for them."""
    events, info = trigger_read(body)
    await events_publish(events)
    if not info:
        return {}
    counts = await triggered_info(events, [info] * len(events))
    return {"channels": {e.channel: c for e, c in zip(events, counts, strict=True)}}


async def batch_trigger(*, body: bytes) -> dict[str, Any]:
    """``POST /batch_events``: up to ten events; ``{}``, or ``{"batch": [...]}`` with
    each event's counts (``{}`` for one that asked none) when any asks."""
    events, infos = batch_read(body)
    await events_publish(events)
    if not any(infos):
        return {}
    return {"batch": await triggered_info(events, infos)}
