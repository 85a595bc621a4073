"""Whether a client address may still open a stream or make a REST request on this
node, before any work is done for it: the handshake and REST budgets of
``push.cluster.address_budgets`` (the frame and subscription budgets are taken where
frames and subscriptions arrive). Service tokens are back-ends and are not held to
them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from accounts.middleware import header_token
from accounts.principal_cache import is_known_service_key
from accounts.principals import Principal
from push.cluster.node import running_node
from push.services.runtime import get_node
from push.services.subscriptions import client_ip

logger = logging.getLogger(__name__)


async def handshake_allowed(scope: Mapping[str, Any], principal: Principal) -> bool:
    """Take one WebSocket or SSE handshake from the budget of the scope's address."""
    if principal.kind == "service":
        return True
    try:
        node = await get_node()
    except Exception:  # the transport reports a node that cannot start, once
        return True
    return node.addresses.handshake_allowed(client_ip(scope))


def rest_refused(scope: dict[str, Any]) -> float | None:
    """Take one REST request from the budget of the scope's address: None when it may
    go on, else the seconds until it may. A request with the key of a service token
    this node verified lately is not counted; any other key (one never seen, a made-up
    one) counts, so a made-up key buys no way around the budget. Without a running
    node (Redis down at its start) nothing is counted."""
    node = running_node()
    if node is None:
        return None
    key = header_token(scope)
    if key is not None and is_known_service_key(key):
        return None
    return node.addresses.rest_refused(client_ip(scope))
