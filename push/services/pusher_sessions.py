"""What a Pusher connection asks for (docs/pusher.md), on the same node, hub, limits
and presence as our own protocol: subscribe (public, ``private-``, ``presence-``,
``private-encrypted-`` and cache channels), unsubscribe, client events and user
sign-in.

A ``private-`` or ``presence-`` subscription is authorized by the signature Pusher
defines (``<key>:<HMAC-SHA256 of socket_id:channel[:channel_data]>`` with the app's
secret): whoever signed it (``POST /pusher/auth``, or any back-end holding the secret)
decided. A public channel is decided by the same permission decider as our own
protocol's subscriptions, for the connection's principal (anonymous unless a session
cookie or token came with the handshake).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol

from accounts.permissions import PRIVATE_PREFIX, is_presence_channel
from accounts.subscription_tokens import MAX_USER_ID_CHARS, is_member_user_id
from common.errors import PushError
from push.cluster.presence import (
    Member,
    leave_presence,
    member_key,
    members_after,
    presence_member,
)
from push.ops.events import CACHE_MISS, CLIENT_EVENT
from push.services.pusher_apps import PusherApp, channel_auth_valid, user_auth_valid
from push.services.subscriptions import (
    SessionNode,
    channel_subscribe,
    channel_unsubscribe,
    subscription_admit,
)
from push.wire import pusher
from push.wire.protocol import validate_channel_name

logger = logging.getLogger(__name__)

ENCRYPTED_PREFIX = "private-encrypted-"
CACHE_PREFIXES = ("cache-", "private-cache-", "presence-cache-", "private-encrypted-cache-")
# pusher-js subscribes a signed-in connection to this channel of its user by itself.
SERVER_TO_USER_PREFIX = "#server-to-user-"
# A cache_miss webhook at most this often per channel from one node: every subscriber
# of an empty cache channel is told (``pusher:cache_miss``), but the back-end needs one
# call to fill the channel, not one per subscriber (all of them subscribing again at
# once after a deploy or a network blip).
CACHE_MISS_WEBHOOK_INTERVAL_SECS = 5.0
# Channels remembered for that; past it the oldest is forgotten (it may send another
# webhook early), so a client naming endless empty channels holds no memory.
MAX_CACHE_MISS_CHANNELS = 10_000


class PusherProblem(Exception):
    """A request refused with ``pusher:error`` (``code`` None: Pusher's generic error);
    with ``close``, the connection is closed with that code afterwards."""

    def __init__(self, code: int | None, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close


class SubscriptionRefused(Exception):
    """A subscription refused with ``pusher:subscription_error`` (``status`` as HTTP)."""

    def __init__(self, channel: str, status: int, message: str) -> None:
        super().__init__(message)
        self.channel = channel
        self.status = status
        self.message = message


class PusherSession(Protocol):
    """What these services use of a Pusher connection (``push.transport.pusher``)."""

    app: PusherApp
    socket_id: str
    pusher_user_id: str | None
    # A token bucket (push.transport.limits): take() is False past the rate.
    client_event_rate: Any
    # Channel -> the Pusher user id this connection is on that presence channel.
    presence_ids: dict[str, str]
    subscriptions: dict[str, Any]

    def send_frame(self, text: str) -> None: ...


class CacheMissWebhooks:
    """Which cache misses of this node become a ``cache_miss`` webhook: a channel's
    first, then at most one every ``CACHE_MISS_WEBHOOK_INTERVAL_SECS``."""

    clock = staticmethod(time.monotonic)

    def __init__(self) -> None:
        # Channel -> when its last webhook went; oldest first (a channel goes to the
        # end when it is sent again).
        self._sent_at: OrderedDict[str, float] = OrderedDict()

    def due(self, channel: str) -> bool:
        now = self.clock()
        self._forget_older_than(now - CACHE_MISS_WEBHOOK_INTERVAL_SECS)
        if channel in self._sent_at:
            return False
        self._sent_at[channel] = now
        if len(self._sent_at) > MAX_CACHE_MISS_CHANNELS:
            self._sent_at.popitem(last=False)
        return True

    def _forget_older_than(self, cutoff: float) -> None:
        while self._sent_at and next(iter(self._sent_at.values())) <= cutoff:
            self._sent_at.popitem(last=False)


cache_miss_webhooks = CacheMissWebhooks()


def needs_signature(channel: str) -> bool:
    return channel.startswith(PRIVATE_PREFIX) or is_presence_channel(channel)


def is_cache_channel(channel: str) -> bool:
    return channel.startswith(CACHE_PREFIXES)


def _signed_member(session: PusherSession, channel: str, auth: Any, channel_data: Any) -> Any:
    """The claims a valid signature grants: {} on a private channel, the member
    (``user_id``, ``info``) that ``channel_data`` names on a presence channel."""
    presence = is_presence_channel(channel)
    signed_data = channel_data if presence else None
    if presence and not isinstance(channel_data, str):
        raise SubscriptionRefused(channel, 400, "presence channels need channel_data")
    if (
        presence
        and len(channel_data.encode("utf-8", "surrogatepass")) > pusher.MAX_CHANNEL_DATA_BYTES
    ):
        raise SubscriptionRefused(
            channel, 413, f"channel_data is larger than {pusher.MAX_CHANNEL_DATA_BYTES} bytes"
        )
    if not channel_auth_valid(session.app, session.socket_id, channel, auth, signed_data):
        raise SubscriptionRefused(channel, 403, f"Invalid signature for {channel}")
    if not presence:
        return {}
    try:
        member = json.loads(channel_data)
    except ValueError:
        member = None
    user_id = member.get("user_id") if isinstance(member, dict) else None
    if not is_member_user_id(user_id):
        raise SubscriptionRefused(
            channel,
            400,
            f"channel_data must name a user_id of 1 to {MAX_USER_ID_CHARS} characters",
        )
    info = member.get("user_info") if isinstance(member.get("user_info"), dict) else None
    return {"user_id": pusher.member_user_id(user_id), "info": info}


async def pusher_subscribe(
    node: SessionNode,
    session: Any,
    channel: Any,
    *,
    auth: Any = None,
    channel_data: Any = None,
) -> None:
    """Subscribe and answer ``subscription_succeeded`` (with the member list on a
    presence channel, where the connection joins first so the list holds it); on a
    cache channel the last message follows, or ``pusher:cache_miss`` when there is
    none (on a new subscription only; the ``cache_miss`` webhook rate-limited)."""
    if not isinstance(channel, str):
        raise PusherProblem(None, "pusher:subscribe needs a channel")
    if channel.startswith(SERVER_TO_USER_PREFIX):
        _server_to_user(session, channel)
        return
    try:
        validate_channel_name(channel)
    except PushError as exc:
        raise SubscriptionRefused(channel, 400, exc.message) from exc
    claims = (
        _signed_member(session, channel, auth, channel_data) if needs_signature(channel) else None
    )
    presence = is_presence_channel(channel)
    cache = is_cache_channel(channel)
    existing = session.subscriptions.get(channel)
    new = existing is None
    # Subscribed already: answered again, but it is no new subscriber, which alone a
    # cache channel answers with its last event or a cache miss (it got that already).
    repeated = existing is not None and existing.active
    if new:
        # Before a presence join: a refused subscription announces nobody.
        try:
            await subscription_admit(node, session, channel)
        except PushError as exc:
            raise SubscriptionRefused(channel, exc.http_status, exc.message) from exc
    joining = presence and new
    members = _MemberList(node, session, channel) if presence else None

    def reply(seq: int, recovered: bool | None) -> None:
        data = members.answered() if members is not None else {}
        session.send_frame(pusher.event_frame(pusher.SUBSCRIPTION_SUCCEEDED, data, channel))

    try:
        if joining:
            joined = presence_member(session.principal, session.connection_id, claims)
            session.presence_ids[channel] = pusher.pusher_user_id(joined["user_id"])
            if await node.presence.join(channel, str(session.connection_id), joined):
                await node.announce_presence("join", channel, joined)
        if members is not None:
            await members.read()
        await channel_subscribe(
            node,
            session,
            channel,
            since=None,
            token=None,
            reply=reply,
            # A cache channel's last event is its last message: sent first, then live.
            rewind=1 if cache else None,
            authorized=claims,
            join_presence=False,
            admitted=new,
        )
        if cache and not repeated:
            _miss_if_nothing_came(node, session, channel)
        if members is not None:
            await members.put_right()
    except PushError as exc:
        raise SubscriptionRefused(channel, exc.http_status, exc.message) from exc
    finally:
        if members is not None:
            members.close()
        if joining and channel not in session.subscriptions:
            # Joined above (or maybe: a join whose answer was lost), but the
            # subscription did not happen (refused, the announcement or the member list
            # failed, the client left meanwhile): the member leaves again, or nothing
            # would ever make it leave.
            session.presence_ids.pop(channel, None)
            await leave_presence(
                node.presence, node.announce_presence, str(session.connection_id), [channel]
            )


def _miss_if_nothing_came(node: SessionNode, session: Any, channel: str) -> None:
    """``pusher:cache_miss`` for a new cache channel subscription that went live with
    no message replayed: the channel never had one, or retention removed its last
    (``PUSH_RETENTION_MAX_AGE``, a week by default), which the channel's seq alone did
    not tell, and the client heard nothing at all. Called as the subscription went
    live, with no await since, so nothing else was sent after
    ``subscription_succeeded``; a live message held during the replay was replayed
    (``sent_seq``), and is the channel's last event."""
    subscription = session.subscriptions.get(channel)
    if subscription is None or subscription.sent_seq:
        return
    session.send_frame(pusher.event_frame(pusher.CACHE_MISS, None, channel))
    if cache_miss_webhooks.due(channel):
        node.events.emit(CACHE_MISS, channel=channel)


class _MemberList:
    """A presence subscription's member list (``subscription_succeeded``), kept true to
    the ``member_added`` / ``member_removed`` the connection gets after it.

    The list is read before the subscription reaches the channel's events: a join or
    leave in between (the node joining the channel's group and reading its recent
    messages, for its first subscriber here; a slow read) reached the connection
    neither in the list nor as an event, and its member stayed listed, or missing, for
    the connection's life. So the joins and leaves this node hears from before the read
    are applied to the list it answers; those heard until the subscription is live (a
    cache channel's replay) follow it; and when the node did not serve the channel all
    along (it heard nothing before joining its group), the members are read again once
    the subscription is live, and each difference the connection has heard nothing of
    since is sent as its event. Where the node keeps the channel's view (the members
    its subscribers were told, ``PresenceViews``), the list starts from it: what the
    connection then gets is what the others here get, put right with them after an
    outage."""

    def __init__(self, node: SessionNode, session: Any, channel: str) -> None:
        self.node = node
        self.session = session
        self.channel = channel
        self.heard = node.presence.listen(channel)
        # The channel as the node serves it from before the read, if it does.
        self.served = node.hub.live_channel(channel)
        self.listed: list[Member] = []
        self.sent: list[Member] = []
        self.answered_at = 0  # how much of ``heard`` the answer holds
        self.viewed = False  # ``listed`` is the node's view

    async def read(self) -> None:
        viewed = await self.node.presence_views.members(self.channel)
        self.viewed = viewed is not None
        # Heard events re-applied to a view change nothing: the last event of a member
        # decides in both.
        self.listed = (
            viewed if viewed is not None else await self.node.presence.members(self.channel)
        )

    def answered(self) -> dict[str, Any]:
        """The ``presence`` data of ``subscription_succeeded``, sent now."""
        self.sent = members_after(self.listed, self.heard)
        self.answered_at = len(self.heard)
        return pusher.presence_data(self.sent)

    async def put_right(self) -> None:
        """Once the subscription is live: what the connection's list lacks."""
        subscription = self.session.subscriptions.get(self.channel)
        if subscription is None:
            return
        # Heard after the answer, before the subscription went live (the replay).
        for kind, changed in self.heard[self.answered_at :]:
            self._send(kind, changed)
        if subscription.channel is self.served or self.viewed:
            return  # every join and leave since the read was heard, and is applied
        known = members_after(self.sent, self.heard[self.answered_at :])
        live_from = len(self.heard)
        read_since = asyncio.get_running_loop().time()
        try:
            listed = await self.node.presence.members(self.channel, read_since=read_since)
        except Exception as exc:  # Redis away: the subscription stands, as answered
            logger.warning("member list of %s not read again: %s", self.channel, exc)
            return
        if self.session.subscriptions.get(self.channel) is not subscription:
            return
        # A member with an event since the subscription went live is as that event said.
        changed_since = {member_key(m) for _, m in self.heard[live_from:]}
        now = {member_key(m): m for m in listed}
        before = {member_key(m): m for m in known}
        for key, one in now.items():
            if key not in before and key not in changed_since:
                self._send("join", one)
        for key, one in before.items():
            if key not in now and key not in changed_since:
                self._send("leave", one)

    def _send(self, kind: str, changed: Member) -> None:
        self.session.send_frame(pusher.member_frame(kind, self.channel, changed))

    def close(self) -> None:
        self.node.presence.unlisten(self.channel, self.heard)


def _server_to_user(session: PusherSession, channel: str) -> None:
    """The signed-in user's own channel: answered, so pusher-js's sign-in completes, and
    refused to anyone else. Sending to users (Pusher's ``sendToUser``) is not supported
    (docs/pusher.md): nothing is ever published on it."""
    if session.pusher_user_id is None or channel != SERVER_TO_USER_PREFIX + session.pusher_user_id:
        raise SubscriptionRefused(channel, 403, "only the signed-in user may subscribe to this")
    session.send_frame(pusher.event_frame(pusher.SUBSCRIPTION_SUCCEEDED, {}, channel))


async def pusher_unsubscribe(node: SessionNode, session: Any, channel: Any) -> None:
    if isinstance(channel, str) and await channel_unsubscribe(node, session, channel):
        session.presence_ids.pop(channel, None)


async def pusher_client_event(node: Any, session: Any, name: str, channel: Any, data: Any) -> None:
    """Relay a ``client-*`` event to the channel's other Pusher subscribers on every
    node: only when the app allows client events, only on a private or presence
    channel the connection is subscribed to (never an encrypted one, whose data the
    server cannot read and so cannot vouch for), at most
    ``PUSHER_CLIENT_EVENT_RATE`` per second."""
    if not session.app.client_events:
        raise PusherProblem(None, "client events are not enabled for this app")
    if not isinstance(channel, str) or not needs_signature(channel):
        raise PusherProblem(None, "client events are allowed on private and presence channels only")
    if channel.startswith(ENCRYPTED_PREFIX):
        raise PusherProblem(None, "client events are not allowed on encrypted channels")
    if channel not in session.subscriptions:
        raise PusherProblem(None, f"not subscribed to {channel}")
    if len(name) > pusher.MAX_EVENT_NAME:
        raise PusherProblem(None, f"event names are at most {pusher.MAX_EVENT_NAME} characters")
    if not session.client_event_rate.take():
        raise PusherProblem(
            pusher.PusherError.CLIENT_EVENT_RATE_LIMIT, "client event rejected due to rate limit"
        )
    text = data if isinstance(data, str) else pusher.json_text(data)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate (the JSON escape \ud800): no UTF-8 frame can carry it on.
        raise PusherProblem(None, "client event data holds a lone UTF-16 surrogate") from None
    if size > pusher.MAX_CLIENT_EVENT_BYTES:
        raise PusherProblem(
            None, f"client event data is larger than {pusher.MAX_CLIENT_EVENT_BYTES} bytes"
        )
    frame: dict[str, Any] = {"event": name, "channel": channel, "data": text}
    user_id = session.presence_ids.get(channel)
    if user_id is not None:
        frame["user_id"] = user_id
    await node.relay_client_event(channel, frame, session.socket_id)
    node.events.emit(
        CLIENT_EVENT,
        channel=channel,
        event=name,
        data=text,
        socket_id=session.socket_id,
        user_id=user_id,
    )


def pusher_signin(session: Any, data: Mapping[str, Any]) -> None:
    """``pusher:signin``: a user sign-in signed with the app's secret; the connection is
    then that user (``terminate_connections`` ends it). A bad signature closes it (4009)."""
    user_data = data.get("user_data")
    auth = data.get("auth")
    if not isinstance(user_data, str) or not user_auth_valid(
        session.app, session.socket_id, user_data, auth
    ):
        raise PusherProblem(pusher.PusherError.UNAUTHORIZED, "invalid sign-in", close=True)
    try:
        user = json.loads(user_data)
    except ValueError:
        user = None
    user_id = user.get("id") if isinstance(user, dict) else None
    if not isinstance(user_id, str) or not user_id:
        raise PusherProblem(pusher.PusherError.UNAUTHORIZED, "user_data needs an id", close=True)
    session.pusher_user_id = user_id
    session.send_frame(pusher.event_frame(pusher.SIGNIN_SUCCESS, {"user_data": user_data}))
