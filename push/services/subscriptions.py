"""A client session's life on a node, whatever carries it (WebSocket or SSE).

Opening (limits, greeting, registry, events), subscribing (permissions, resume,
presence) and closing (release everything, record why) are the same for both
transports; the transport only decides how frames travel and how requests arrive.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from django.utils import timezone

from accounts.permissions import authorize_subscribe, is_presence_channel, subscription_refusal
from accounts.principals import Principal
from accounts.subscription_tokens import subscription_token_verify
from common import metrics
from common.conf import push_settings
from common.errors import CloseCode, ErrorCode, PushError
from push.cluster.address_budgets import subscription_allowed
from push.cluster.live import LiveConnection, channels_held
from push.cluster.occupancy import Occupancy
from push.cluster.overload import LoopLag
from push.cluster.presence import (
    PresenceStore,
    leave_presence,
    members_after,
    presence_member,
)
from push.cluster.presence_views import PresenceViews
from push.cluster.registry import ConnectionRecord, ConnectionRegistry
from push.fanout.delta import FOSSIL
from push.fanout.hub import Hub
from push.ops import events
from push.ops.events import EventLog
from push.ops.logs import log_connection_closed, log_connection_opened
from push.wire import protocol

Reply = Callable[[int, bool | None], None]

# How long an anonymous subscription to a new channel waits for its turn on an
# overloaded node (push.cluster.overload) before it is refused: within the time a client
# waits for a reply, and a small share of the heartbeat timeout, since the connection's
# other requests wait behind it.
OVERLOAD_SUBSCRIBE_WAIT_SECS = 10.0


class SessionNode(Protocol):
    """What a session uses of the node it runs on (``push.cluster.node.Node``): its
    limits, overload signal, hub, registry, event stream and presence, and nothing
    else."""

    server_id: str
    draining: bool
    # Its admitted connections: one no longer here was let go by the drain (which
    # announced its disconnect).
    connections: dict[uuid.UUID, LiveConnection]
    hub: Hub
    registry: ConnectionRegistry
    events: EventLog
    presence: PresenceStore
    presence_views: PresenceViews
    occupancy: Occupancy
    overload: LoopLag

    def admit(self, connection: LiveConnection) -> bool: ...

    def release(self, connection: LiveConnection) -> None: ...

    def release_subscriptions(self, connection: LiveConnection) -> None: ...

    async def announce_presence(self, kind: str, channel: str, member: dict[str, Any]) -> None: ...


def client_ip(scope: Mapping[str, Any]) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def session_open(
    node: SessionNode, connection: LiveConnection, greet: Callable[[], None] | None = None
) -> CloseCode | None:
    """Admit the connection and greet it, or say with which code to close it (the node
    is draining, or the client is over its connection limits). ``greet`` sends another
    protocol's greeting (Pusher's ``connection_established``) instead of ours."""
    if node.draining:
        # This node is shutting down: go to another one and resume there.
        return CloseCode.GOING_AWAY
    if not node.admit(connection):
        return CloseCode.TRY_AGAIN_LATER
    if greet is not None:
        greet()
    else:
        connection.send_envelope(
            protocol.connection_established(
                connection_id=str(connection.connection_id),
                server_id=node.server_id,
                heartbeat_interval=push_settings.HEARTBEAT_INTERVAL_SECS,
                timestamp=time.time(),
            )
        )
    node.registry.opened(
        ConnectionRecord(
            connection_id=connection.connection_id,
            user_id=connection.principal.user_id,
            ip=connection.ip,
            wire_format=connection.codec.name,
            connected_at=timezone.now(),
        )
    )
    node.events.emit(
        events.CONNECT,
        connection_id=str(connection.connection_id),
        principal=connection.principal.key,
        ip=connection.ip,
        wire_format=connection.codec.name,
    )
    metrics.CONNECTIONS_OPENED.labels(connection.codec.name).inc()
    metrics.CONNECTIONS_ACTIVE.labels(connection.codec.name).inc()
    log_connection_opened(connection, server_id=node.server_id)
    return None


def session_closed(node: SessionNode, connection: LiveConnection, close_code: int | None) -> None:
    """Everything an admitted connection leaves behind when it ends: subscriptions,
    presence, limits, the registry row, the disconnect event and the metrics."""
    log_connection_closed(
        connection, close_code, by_server=not connection.is_open, server_id=node.server_id
    )
    if connection.connection_id in node.connections:
        node.events.emit(
            events.DISCONNECT,
            connection_id=str(connection.connection_id),
            principal=connection.principal.key,
            close_code=connection.close_code if not connection.is_open else close_code,
            duration_secs=round(time.monotonic() - connection.opened_at, 3),
            channels=channels_held(connection),
        )
    node.release_subscriptions(connection)
    connection.mark_closed(close_code)
    node.release(connection)
    node.registry.closed(connection.connection_id, connection.close_code)
    metrics.CONNECTIONS_ACTIVE.labels(connection.codec.name).dec()
    metrics.CONNECTIONS_CLOSED.labels(str(connection.close_code or "peer")).inc()


def _record_change(node: SessionNode, connection: LiveConnection, kind: str, channel: str) -> None:
    """A subscribe or unsubscribe went through: the registry row and the event stream."""
    node.registry.subscriptions_changed(connection)
    node.events.emit(
        kind,
        connection_id=str(connection.connection_id),
        principal=connection.principal.key,
        channel=channel,
    )


async def channel_subscribe(
    node: SessionNode,
    connection: LiveConnection,
    channel: str,
    *,
    since: int | None,
    token: str | None,
    reply: Reply,
    rewind: int | None = None,
    occupancy: bool = False,
    delta: str | None = None,
    authorized: dict[str, Any] | None = None,
    join_presence: bool = True,
    admitted: bool = False,
) -> None:
    """Subscribe after the permission check (or a signed subscription token): resume
    from ``since`` when given (or send the last ``rewind`` messages first), join
    presence on ``presence-`` channels, and with ``occupancy`` tell the subscriber the
    channel's subscriber count now and as it changes.

    ``reply(seq, recovered)`` is called before the first message of the channel reaches
    the connection.

    ``authorized``: the claims of an authorization the transport checked already (a
    Pusher channel signature), instead of a token or the permission decider. With
    ``join_presence`` False the caller has joined presence itself (a Pusher presence
    subscription answers with a member list that holds the subscriber). With
    ``admitted`` the caller has passed ``subscription_admit`` itself (before that join).

    The consumer awaits this inline and reads the client's disconnect only after it
    returns: every step that can wait (the replay above all) checks ``connection.gone``
    and stops, so no work goes on for a client that left."""
    if connection.gone:
        return
    claims = authorized
    if authorized is None:
        claims = subscription_authorize(connection.principal, channel, token=token)
    existing = connection.subscriptions.get(channel)
    if existing is not None and existing.active:
        _remember_token_expiry(connection, channel, claims)
        # Already receiving the channel's stream without a gap: nothing to replay.
        reply(
            max(existing.channel.delivered_seq, existing.last_seq), None if since is None else True
        )
        if occupancy:
            await node.occupancy.watch(existing)
        return
    if not admitted:
        await subscription_admit(node, connection, channel)
    if connection.gone:
        return
    subscription = await node.hub.subscribe(
        connection, channel, since=since, reply=reply, rewind=rewind, delta=delta == FOSSIL
    )
    if connection.gone or not subscription.active:
        node.hub.unsubscribe(subscription)
        return
    connection.subscriptions[channel] = subscription
    _remember_token_expiry(connection, channel, claims)
    _record_change(node, connection, events.SUBSCRIBE, channel)
    if occupancy:
        await node.occupancy.watch(subscription)
    if join_presence and is_presence_channel(channel):
        joined = presence_member(connection.principal, connection.connection_id, claims)
        try:
            if await node.presence.join(channel, str(connection.connection_id), joined):
                await node.announce_presence("join", channel, joined)
        finally:
            if connection.subscriptions.get(channel) is not subscription:
                # Closed (or unsubscribed) meanwhile: its leave may have run before
                # this join, which would then stay for good.
                await leave_presence(
                    node.presence, node.announce_presence, str(connection.connection_id), [channel]
                )


def subscription_authorize(
    principal: Principal, channel: str, *, token: str | None
) -> dict[str, Any] | None:
    """May ``principal`` subscribe to ``channel``: with a signed subscription token, the
    token alone decides (its claims, or its ``FORBIDDEN``); without one, the permission
    decider (None, or its refusal). Every transport's subscribe asks this, so a token
    opens the same channels over WebSocket and SSE."""
    if token is not None:
        return subscription_token_verify(token, channel=channel)
    authorize_subscribe(principal, channel)
    return None


async def presence_list(node: SessionNode, channel: str) -> list[dict[str, Any]]:
    """The members of ``channel`` as its subscribers here know them: with the joins and
    leaves this node passed on while they were read applied. A read answered after
    such an event (a slow read, a busy loop) would otherwise list a member the
    subscriber was just told left, or lack one it was told joined."""
    heard = node.presence.listen(channel)
    try:
        # What they were told, where the node keeps it (``PresenceViews``); the heard
        # events applied again change nothing there (a member's last event decides).
        listed = await node.presence_views.members(channel)
        if listed is None:
            listed = await node.presence.members(channel)
        return members_after(listed, heard)
    finally:
        node.presence.unlisten(channel, heard)


async def subscription_admit(node: SessionNode, connection: LiveConnection, channel: str) -> None:
    """The limits a new subscription must pass before it costs anything: the
    connection's subscription limit, its address's budget, the node's overload."""
    if len(connection.subscriptions) >= push_settings.MAX_SUBSCRIPTIONS_PER_CONNECTION:
        raise PushError(
            ErrorCode.FORBIDDEN,
            f"subscription limit of {push_settings.MAX_SUBSCRIPTIONS_PER_CONNECTION} reached",
        )
    if not subscription_allowed(connection.address_budget):
        # A new channel costs a broker join and a read of its recent messages: the
        # costliest request a client can repeat (push.cluster.address_budgets).
        raise PushError(
            ErrorCode.RATE_LIMITED, "too many subscriptions from this address; slow down"
        )
    if (
        connection.principal.kind == "anonymous"
        and channel not in node.hub.channels
        and not await node.overload.admitted("subscribe", OVERLOAD_SUBSCRIBE_WAIT_SECS)
    ):
        # The same cost, asked by anyone: while the node is overloaded it waits its
        # turn. A channel the node carries already costs neither a join nor a read.
        raise PushError(ErrorCode.RATE_LIMITED, "the node is overloaded; subscribe again later")


def subscription_delta(
    node: SessionNode, connection: LiveConnection, channel: str, asked: str | None
) -> str | None:
    """The delta algorithm a subscribe gets (``subscribed`` repeats it), or None: only
    fossil; never on a drop-oldest channel, whose dropped frames would leave deltas
    without their base; and for a channel already subscribed, what that subscription
    has (subscribing again changes nothing)."""
    existing = connection.subscriptions.get(channel)
    if existing is not None and existing.active:
        return FOSSIL if existing.delta else None
    if asked != FOSSIL or node.hub.drops_oldest(channel):
        return None
    return FOSSIL


def _remember_token_expiry(
    connection: LiveConnection, channel: str, claims: dict[str, Any] | None
) -> None:
    """A subscription a signed token granted lasts until the token expires (the node's
    revocation check ends it); one the decider granted does not. Subscribing again
    with a fresh token extends it.

    Called only for a subscription the connection holds, with no await since it was
    recorded: kept for a subscribe that was then refused (a limit, the overload, a
    failed join), the expiry would be held for a channel the connection does not have,
    and looked at by every revocation check of the connection's life."""
    if claims is not None:
        if connection.token_expiry is None:
            connection.token_expiry = {}
        # A Pusher channel signature has no expiry: it grants for the connection's life.
        connection.token_expiry[channel] = float(claims.get("exp", math.inf))
    elif connection.token_expiry:
        connection.token_expiry.pop(channel, None)


async def channel_unsubscribe(node: SessionNode, connection: LiveConnection, channel: str) -> bool:
    """End one subscription (the client asked, or the server revoked it): stop its
    messages and leave presence. False when the connection was not subscribed."""
    subscription = connection.subscriptions.pop(channel, None)
    if connection.token_expiry:
        connection.token_expiry.pop(channel, None)
    if subscription is None:
        return False
    node.hub.unsubscribe(subscription)
    _record_change(node, connection, events.UNSUBSCRIBE, channel)
    if is_presence_channel(channel):
        await leave_presence(
            node.presence, node.announce_presence, str(connection.connection_id), [channel]
        )
    return True


async def subscriptions_revoke(node: SessionNode, connection: LiveConnection, now: float) -> int:
    """End every subscription of ``connection`` that its principal may no longer hold
    (grant removed or narrowed, signed token expired), each with a FORBIDDEN error that
    names the channel; the connection stays open. Returns how many ended."""
    expiry = connection.token_expiry or {}
    refused = [
        (channel, refusal)
        for channel in list(connection.subscriptions)
        if (
            refusal := subscription_refusal(
                connection.principal, channel, token_expires_at=expiry.get(channel), now=now
            )
        )
        is not None
    ]
    for channel, refusal in refused:
        # Told first: the client learns the channel ended before any later frame.
        connection.send_error(refusal, None, channel=channel)
        await channel_unsubscribe(node, connection, channel)
    if refused and not connection.subscriptions and connection.ends_without_subscriptions:
        connection.close(CloseCode.POLICY)
    return len(refused)
