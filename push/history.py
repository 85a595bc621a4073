"""The hub's view of stored history: PostgreSQL on the database threads, with the
recent messages of a channel it joins read from the Redis cache when it has them."""

from __future__ import annotations

import logging

from push import selectors
from push.db import db_call
from push.recent_cache import RecentCache
from push.selectors import HistoryPage

logger = logging.getLogger(__name__)

_history_page = db_call(selectors.history_page)
_latest_seqs = db_call(selectors.channel_latest_seqs)
_history_recent = db_call(selectors.history_recent)


class DatabaseHistory:
    async def latest_seqs(self, channels: list[str]) -> dict[str, int]:
        return await _latest_seqs(channels=channels)  # type: ignore[no-any-return]

    async def page(self, channel: str, since: int, limit: int, max_bytes: int) -> HistoryPage:
        return await _history_page(  # type: ignore[no-any-return]
            channel=channel, since=since, limit=limit, max_bytes=max_bytes
        )

    async def recent(self, channel: str, count: int, max_bytes: int) -> HistoryPage:
        return await _history_recent(  # type: ignore[no-any-return]
            channel=channel, count=count, max_bytes=max_bytes
        )


class CachedHistory(DatabaseHistory):
    """Recent history from the Redis cache, everything else from PostgreSQL."""

    def __init__(self, cache: RecentCache) -> None:
        self.cache = cache

    async def recent(self, channel: str, count: int, max_bytes: int) -> HistoryPage:
        try:
            messages = await self.cache.read(channel, count, max_bytes)
        except Exception as exc:
            logger.warning("recent-history cache read of %s failed: %s", channel, exc)
            messages = []
        if not messages:
            return await super().recent(channel, count, max_bytes)
        # The cache's newest seq stands for the channel's latest: if a newer message
        # exists, the hub sees the channel move past it and repairs from history.
        return HistoryPage(
            since=messages[0].seq - 1, messages=messages, latest_seq=messages[-1].seq
        )
