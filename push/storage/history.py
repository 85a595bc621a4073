"""The hub's view of stored history: PostgreSQL on the database threads, with the
recent messages of a channel it joins read from the Redis cache when it has them; for
recent-only channels (``PUSH_HISTORY_MODES``), their window in Redis."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from common.db import db_call
from push.fanout.message import ChannelMessage, HistoryPage, data_bytes
from push.storage import recent_store, selectors
from push.storage.history_modes import is_recent
from push.storage.recent_cache import RecentCache

if TYPE_CHECKING:
    from push.fanout.hub import History

logger = logging.getLogger(__name__)

_history_page = db_call(selectors.history_page, history=True)
_stored_history_page = db_call(selectors.stored_history_page, history=True)
_latest_seqs = db_call(selectors.channel_latest_seqs)
_history_recent = db_call(selectors.history_recent)


class DatabaseHistory:
    async def latest_seqs(self, channels: list[str]) -> dict[str, int]:
        return await _latest_seqs(channels=channels)

    async def page(self, channel: str, since: int, limit: int, max_bytes: int) -> HistoryPage:
        return await _history_page(channel=channel, since=since, limit=limit, max_bytes=max_bytes)

    async def stored_page(
        self, channel: str, since: int, limit: int, max_bytes: int
    ) -> HistoryPage:
        return await _stored_history_page(
            channel=channel, since=since, limit=limit, max_bytes=max_bytes
        )

    async def recent(self, channel: str, count: int, max_bytes: int) -> HistoryPage:
        return await _history_recent(channel=channel, count=count, max_bytes=max_bytes)


class CachedHistory(DatabaseHistory):
    """Recent history from the Redis cache, everything else from PostgreSQL."""

    def __init__(self, cache: RecentCache) -> None:
        self.cache = cache

    async def recent(self, channel: str, count: int, max_bytes: int) -> HistoryPage:
        if self.cache.appending(channel):
            # This node committed a message of the channel that its stream does not
            # hold yet, and the node drops its own relay of it unread: read from the
            # cache, the channel would start behind it, and a joining subscriber would
            # wait for the next sync to get it. PostgreSQL has it.
            return await super().recent(channel, count, max_bytes)
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


async def _window_read(
    channel: str, since: int | None, limit: int
) -> tuple[int, list[ChannelMessage]] | None:
    """``recent_store``'s read of a recent channel's window; one that fails is
    UNAVAILABLE naming Redis, as REST's reads of it are (``window_since``)."""
    try:
        return await recent_store.store().read(
            channel, since, limit, recent_store.Window.from_settings()
        )
    except (RedisError, OSError) as exc:
        raise recent_store.redis_unavailable(exc) from exc


class RecentHistory:
    """A recent channel's history: its window in Redis. While the channel's lease is
    missing (Redis lost it) its latest seq is unknown, and the answers say "nothing
    here, latest 0": the hub then neither skips a seq that may still be handed out nor
    claims to have replayed what was lost (``Hub._attach_with_replay``)."""

    async def latest_seqs(self, channels: list[str]) -> dict[str, int]:
        return await recent_store.store().latest_seqs(channels)

    async def page(self, channel: str, since: int, limit: int, max_bytes: int) -> HistoryPage:
        answer = await _window_read(channel, since, limit)
        if answer is None:
            return HistoryPage(since=since, messages=[], latest_seq=0)
        latest, messages = answer
        kept = _within_bytes([m for m in messages if m.seq > since], max_bytes)
        truncated = len(kept) < len([m for m in messages if m.seq > since])
        return HistoryPage(since=since, messages=kept, latest_seq=latest, truncated=truncated)

    async def stored_page(
        self, channel: str, since: int, limit: int, max_bytes: int
    ) -> HistoryPage:
        # The window is all that is stored of a recent channel: what it lost is gone.
        return await self.page(channel, since, limit, max_bytes)

    async def recent(self, channel: str, count: int, max_bytes: int) -> HistoryPage:
        answer = await _window_read(channel, None, count)
        if answer is None:
            return HistoryPage(
                since=0, messages=[], latest_seq=0, lost=await _seqs_were_handed_out(channel)
            )
        latest, messages = answer
        # The newest that fit: the window's tail, contiguous up to the latest.
        messages = _within_bytes(messages[::-1], max_bytes)[::-1]
        since = messages[0].seq - 1 if messages else latest
        return HistoryPage(since=since, messages=messages, latest_seq=latest)


async def _seqs_were_handed_out(channel: str) -> bool:
    """Whether a recent channel whose lease is missing may have had messages: seqs
    were reserved for it in PostgreSQL (a channel never published to has no row, and
    nothing of it was lost). True when PostgreSQL cannot say."""
    try:
        ceilings = await _latest_seqs(channels=[channel])
    except Exception as exc:
        logger.warning("seq ceiling of %s not read: %s", channel, exc)
        return True
    return ceilings.get(channel, 0) > 0


def _within_bytes(messages: list[ChannelMessage], max_bytes: int) -> list[ChannelMessage]:
    """The first of ``messages`` whose data fits ``max_bytes``, at least one."""
    total = 0
    for count, message in enumerate(messages):
        total += data_bytes(message)
        if count and total > max_bytes:
            return messages[:count]
    return messages


class ModeHistory:
    """Each channel's reads from where its history lives (``push.storage.history_modes``)."""

    def __init__(self, *, durable: History, recent: History) -> None:
        self.durable = durable
        self.recent_only = recent

    def _for(self, channel: str) -> History:
        return self.recent_only if is_recent(channel) else self.durable

    async def latest_seqs(self, channels: list[str]) -> dict[str, int]:
        recent = [c for c in channels if is_recent(c)]
        if not recent:
            return await self.durable.latest_seqs(channels)
        durable = [c for c in channels if not is_recent(c)]
        latest = await self.durable.latest_seqs(durable) if durable else {}
        try:
            latest.update(await self.recent_only.latest_seqs(recent))
        except Exception as exc:
            if not durable:
                raise
            # Redis is down: the durable channels' sync must go on all the more (their
            # broadcasts are lost meanwhile); the recent ones stay unknown this round.
            logger.warning("latest seqs of recent channels not read: %s", exc)
        return latest

    async def page(self, channel: str, since: int, limit: int, max_bytes: int) -> HistoryPage:
        return await self._for(channel).page(channel, since, limit, max_bytes)

    async def stored_page(
        self, channel: str, since: int, limit: int, max_bytes: int
    ) -> HistoryPage:
        return await self._for(channel).stored_page(channel, since, limit, max_bytes)

    async def recent(self, channel: str, count: int, max_bytes: int) -> HistoryPage:
        return await self._for(channel).recent(channel, count, max_bytes)
