"""What the node and the services need of a live client connection.

The connection itself (``push.transport.connection.ClientConnection``) belongs to the
transports, above the node: the node holds its connections, closes them and ends their
subscriptions through this protocol, so nothing below a transport imports one.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Protocol

from push.fanout.hub import Subscriber, Subscription

if TYPE_CHECKING:
    from accounts.principals import Principal
    from common.errors import PushError
    from push.cluster.address_budgets import AddressBudget
    from push.wire.protocol import RequestId


class LiveConnection(Subscriber, Protocol):
    connection_id: uuid.UUID
    # Replaced by the revocation check when the credential's grants change.
    principal: Principal
    subscriptions: dict[str, Subscription]
    # The channels ``subscriptions`` held when the node released them, as the close
    # began (``Node.release_subscriptions``): its disconnect event lists them.
    released_channels: tuple[str, ...]
    # Channel -> expiry of the signed subscription token that granted it.
    token_expiry: dict[str, float] | None
    # When the client last sent anything (monotonic clock), and when it connected.
    last_seen: float
    opened_at: float
    close_code: int | None
    # Its client address's budgets on this node (None: a service token, or no
    # address), bound by the node when it admits the connection.
    address_budget: AddressBudget | None

    def bind_address_budget(self, budget: AddressBudget) -> None:
        """Hold ``budget``: the connection's frames take from it too, from now on."""
        ...

    @property
    def is_open(self) -> bool: ...

    @property
    def ends_without_subscriptions(self) -> bool:
        """True for a receive-only stream (SSE): its last subscription ending ends it."""
        ...

    def send_envelope(self, envelope: dict[str, Any]) -> None: ...

    def send_error(
        self, exc: PushError, request_id: RequestId | None, *, channel: str | None = None
    ) -> None: ...

    def close(self, code: int) -> None:
        """Close after the frames already queued are sent."""
        ...

    def check_silence(self, now: float, cutoff: float) -> int:
        """The node's heartbeat check, for a connection silent a while: close it (1) if
        its protocol's rule says so, else 0."""
        ...

    def abort(self, code: int) -> None:
        """Close at once, dropping whatever is queued."""
        ...

    def drop(self) -> None:
        """Let go of the socket now, read or not."""
        ...

    def mark_closed(self, code: int | None) -> None: ...


def channels_held(connection: LiveConnection) -> list[str]:
    """The channels a connection holds, or held when its close began: a close the server
    starts (a drain, a heartbeat timeout, a revocation) releases its subscriptions at
    once, before its disconnect event is written, and the event lists them all the same,
    as it does when the client closes."""
    return list(connection.subscriptions or connection.released_channels)
