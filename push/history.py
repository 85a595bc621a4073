"""The hub's view of stored history, read from PostgreSQL on the database threads."""

from __future__ import annotations

from push import selectors
from push.db import db_call
from push.selectors import HistoryPage

_history_page = db_call(selectors.history_page)
_latest_seqs = db_call(selectors.channel_latest_seqs)
_history_recent = db_call(selectors.history_recent)


class DatabaseHistory:
    async def latest_seqs(self, channels: list[str]) -> dict[str, int]:
        return await _latest_seqs(channels=channels)  # type: ignore[no-any-return]

    async def page(self, channel: str, since: int, limit: int) -> HistoryPage:
        return await _history_page(channel=channel, since=since, limit=limit)  # type: ignore[no-any-return]

    async def recent(self, channel: str, count: int) -> HistoryPage:
        return await _history_recent(channel=channel, count=count)  # type: ignore[no-any-return]
