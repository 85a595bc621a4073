"""This process's node: started on first use, with the services it calls back into.

The node (``push.cluster.node``) runs below the services, so it does not import them:
what it needs of them (ending subscriptions a principal may no longer hold) is handed
to it here, where transports ask for the node.
"""

from __future__ import annotations

import asyncio

from django.conf import settings

from push.cluster.node import Node, running_node
from push.services.subscriptions import subscriptions_revoke

_starting: asyncio.Future[Node] | None = None


async def get_node() -> Node:
    """The running node of this process, started on first use in this event loop."""
    global _starting
    node = running_node()
    if node is not None and node.serves_here():
        return node
    loop = asyncio.get_running_loop()
    if _starting is not None and _starting.get_loop() is loop:
        return await asyncio.shield(_starting)
    _starting = loop.create_future()
    starting = _starting
    try:
        node = Node(server_id=settings.NODE_ID, revoke_subscriptions=subscriptions_revoke)
        await node.start()
    except BaseException as exc:
        starting.set_exception(exc)
        starting.exception()
        _starting = None
        raise
    starting.set_result(node)
    return node


def node_draining() -> bool:
    """Whether this process's node drains, or has drained and stopped: the process is
    going away (readiness answers 503 until it has)."""
    node = running_node()
    starting = _starting
    if node is None and starting is not None and starting.done() and not starting.cancelled():
        node = None if starting.exception() is not None else starting.result()
    return node is not None and node.draining


async def stop_node() -> None:
    global _starting
    node, _starting = running_node(), None
    if node is not None:
        await node.stop()


async def drain_running_node(*, code: int, deadline_secs: float) -> None:
    node = running_node()
    if node is not None and node.is_running:
        await node.drain(code=code, deadline_secs=deadline_secs)
