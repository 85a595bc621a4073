"""Awaitable forms of the services, for the consumers: each runs its ORM work on the
database threads (``push.db``); a recent-only channel's publish runs on the event loop
(it needs Redis, and PostgreSQL only once per block of seqs)."""

from __future__ import annotations

from typing import Any

from push import recent_store
from push.db import db_call
from push.history_modes import is_recent
from push.message import ChannelMessage
from push.protocol import validate_channel_name
from push.services import encode_data, message_publish

_message_publish_stored = db_call(message_publish)


async def message_publish_async(
    *, channel: str, data: Any, publisher_id: int | None = None
) -> ChannelMessage:
    if is_recent(channel):
        validate_channel_name(channel)
        return await recent_store.publish(channel, encode_data(data), publisher_id)
    return await _message_publish_stored(  # type: ignore[no-any-return]
        channel=channel, data=data, publisher_id=publisher_id
    )
