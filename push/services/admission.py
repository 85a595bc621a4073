"""Whether a client may still open a stream or make a REST request on this node, before
any work is done for it: the handshake and REST budgets of its address
(``push.cluster.address_budgets``; the frame and subscription budgets are taken where
frames and subscriptions arrive), and, for anonymous clients, whether the node is
overloaded (``push.cluster.overload``). Service tokens are back-ends and are held to
neither."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from accounts.middleware import header_token, session_key
from accounts.principal_cache import is_known_service_key
from accounts.principals import Principal
from common.conf import push_settings
from push.cluster.node import Node, running_node
from push.services.runtime import get_node
from push.services.subscriptions import client_ip

logger = logging.getLogger(__name__)

# How long a REST history read waits for the reads its address has in flight to leave
# room in its byte budget before it is refused: they read one page each, which takes
# milliseconds; seconds of waiting mean the address sends far more than it reads.
HISTORY_PATIENCE_SECS = 5.0


def shed_anonymous(principal: Principal, kind: str) -> bool:
    """Whether to refuse this new stream of an anonymous client because the node is
    overloaded (counted by ``kind``, the transport)."""
    if principal.kind != "anonymous":
        return False
    return _overloaded(kind)


def shed_anonymous_rest(scope: dict[str, Any]) -> bool:
    """The same for a REST request, before authentication: one without a token or a
    session cookie is anonymous (a made-up credential is held to the address's REST
    budget and the failed-authentication budget instead)."""
    if header_token(scope) is not None or session_key(scope):
        return False
    return _overloaded("rest")


def _overloaded(kind: str) -> bool:
    node = running_node()
    return node is not None and node.overload.shed(kind)


async def handshake_allowed(scope: Mapping[str, Any], principal: Principal) -> bool:
    """Take one WebSocket or SSE handshake from the budget of the scope's address."""
    if principal.kind == "service":
        return True
    try:
        node = await get_node()
    except Exception:  # the transport reports a node that cannot start, once
        return True
    return node.addresses.handshake_allowed(client_ip(scope))


def rest_refused(scope: dict[str, Any], *, take: bool = True) -> float | None:
    """Take one REST request from the budget of the scope's address: None when it may
    go on, else the seconds until it may. A request with the key of a service token
    this node verified lately is not counted; any other key (one never seen, a made-up
    one) counts, so a made-up key buys no way around the budget. Without a running
    node (Redis down at its start) nothing is counted. With ``take`` false nothing is
    taken, only looked at: for the requests charged only when they fail
    (``rest_failed``)."""
    node = _budgeting_node(scope)
    return None if node is None else node.addresses.rest_refused(client_ip(scope), take=take)


def rest_failed(scope: dict[str, Any]) -> None:
    """Charge a request that ``rest_refused`` let in without taking from the budget,
    and that failed, to the budget of the scope's address."""
    node = _budgeting_node(scope)
    if node is not None:
        node.addresses.rest_failed(client_ip(scope))


def _budgeting_node(scope: dict[str, Any]) -> Node | None:
    """The node whose budgets hold this request, or None when none do (no running
    node, or the key of a service token this node verified lately)."""
    node = running_node()
    key = header_token(scope)
    if node is None or (key is not None and is_known_service_key(key)):
        return None
    return node


async def history_admitted(scope: Mapping[str, Any], principal: Principal) -> float | None:
    """Whether this client's address may read a REST page of history now: None when it
    may, else the seconds until it may. Service tokens are not held to it.

    Let in, the read reserves one message at its largest (a page holds at least one)
    and ``history_read`` settles its page's bytes after: reads sent together take from
    the budget before any finished, so an address has about as many in flight as fit
    in its burst (16 by default); the others wait for one of those to finish (up to
    HISTORY_PATIENCE_SECS), and an address that read past its budget is refused."""
    node = running_node()
    if node is None or principal.kind == "service":
        return None
    return await node.addresses.history_admitted(
        client_ip(scope), push_settings.MAX_FRAME_BYTES, HISTORY_PATIENCE_SECS
    )


def history_read(scope: Mapping[str, Any], principal: Principal, nbytes: int) -> None:
    """Settle a REST read let in by ``history_admitted`` that read ``nbytes`` (0 when
    it failed)."""
    node = running_node()
    if node is not None and principal.kind != "service":
        node.addresses.history_read(client_ip(scope), nbytes, push_settings.MAX_FRAME_BYTES)
