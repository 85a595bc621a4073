"""Hands a committed message to the fan-out path, from whatever thread committed it.

In a server process the node (hub + broker) runs on the event loop, and the commit
happens on a database thread: the message is passed to the loop without waiting.
Elsewhere (a management command, a shell, a worker) there is no node, and the message
goes straight to the channel layer so the server nodes receive it.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from common.conf import push_settings
from common.redis_client import redis_prefix, redis_sync
from push.cluster.broker import channel_group
from push.cluster.node import running_node
from push.fanout.message import ChannelMessage
from push.storage.recent_cache import APPEND_SCRIPT, append_arguments

logger = logging.getLogger(__name__)


def broadcast_from_sync(message: ChannelMessage) -> None:
    node = running_node()
    if node is not None and node.is_running and not node.loop.is_closed():
        try:
            node.loop.call_soon_threadsafe(node.broadcast, message)
            return
        except RuntimeError:  # the loop closed in between (shutdown)
            pass
    try:
        _cache_without_node(message)
        async_to_sync(_publish_without_node)(message)
    except Exception:
        # Stored and committed: nodes catch up from the database on their next sync.
        logger.exception("broadcast of %r failed; subscribers catch up from history", message)


async def broadcast_async(message: ChannelMessage) -> None:
    """``broadcast_from_sync`` for a message committed on an event loop (a recent
    channel's, committed in Redis): to this loop's node at once, so local subscribers
    and the broker get it before the publisher's reply is sent."""
    node = running_node()
    if node is not None and node.is_running and not node.loop.is_closed():
        if node.serves_here():
            node.broadcast(message)
            return
        try:
            node.loop.call_soon_threadsafe(node.broadcast, message)
            return
        except RuntimeError:
            pass
    try:
        await _publish_without_node(message)
    except Exception:
        logger.exception("broadcast of %r failed; subscribers catch up from history", message)


# The cache's append script on a sync client, made on first use.
_sync_append: Any = None


def _cache_without_node(message: ChannelMessage) -> None:
    """Append to the recent-history cache from a process without a node."""
    global _sync_append
    size = push_settings.RECENT_CACHE_SIZE
    if not settings.REDIS_URL or size <= 0:
        return
    if _sync_append is None:
        client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
        _sync_append = client.register_script(APPEND_SCRIPT.source)
    keys, args = append_arguments(
        redis_prefix(),
        [message],
        size,
        push_settings.RECENT_CACHE_TTL_SECS,
        push_settings.RECENT_CACHE_MAX_BYTES,
    )
    _sync_append(keys=keys, args=args)


async def _publish_without_node(message: ChannelMessage) -> None:
    layer = get_channel_layer()
    if layer is not None and not message.relayed:
        await layer.group_send(channel_group(message.channel), message.to_broker())
