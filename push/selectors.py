"""Reads of stored history and channel state (no writes; services hold those)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db.models import QuerySet

from push import recent_store
from push.history_modes import is_recent
from push.message import ChannelMessage
from push.models import Channel, Message
from push.retention import retention_policy


@dataclass(frozen=True)
class HistoryPage:
    since: int
    messages: list[ChannelMessage]
    # The channel's highest seq when the page was read.
    latest_seq: int

    @property
    def complete_from_since(self) -> bool:
        """True when nothing after ``since`` was trimmed away by retention."""
        if self.latest_seq <= self.since:
            return True
        return bool(self.messages) and self.messages[0].seq == self.since + 1


def channel_message_from_row(channel: str, row: Message) -> ChannelMessage:
    return ChannelMessage(
        channel=channel,
        seq=row.seq,
        message_id=str(row.message_id),
        data_json=row.data,
        timestamp=row.created_at.timestamp(),
    )


def message_list_since(*, channel: str, since: int, limit: int) -> list[ChannelMessage]:
    """Stored messages of ``channel`` with ``seq > since``, oldest first: a recent-only
    channel's from its window in Redis."""
    if is_recent(channel):
        return recent_store.window_since_sync(channel, since, limit)
    rows = (
        Message.objects.filter(channel__name=channel, seq__gt=since)
        .order_by("seq")
        .only("seq", "message_id", "data", "created_at")[:limit]
    )
    return [channel_message_from_row(channel, row) for row in rows]


def _kept_rows(channel: str, latest: int) -> QuerySet[Message]:
    """The channel's rows that its retention policy keeps, trimmed yet or not."""
    policy = retention_policy(channel)
    rows = Message.objects.filter(channel__name=channel, seq__gte=policy.oldest_kept_seq(latest))
    cutoff = policy.oldest_kept_timestamp(time.time())
    if cutoff is not None:
        rows = rows.filter(created_at__gte=datetime.fromtimestamp(cutoff, tz=UTC))
    return rows


def history_page(*, channel: str, since: int, limit: int) -> HistoryPage:
    """A page of history for a resume, with the channel's latest seq read first, so
    every message up to it is either in the page or after the page's last seq. Only
    what retention keeps is read, so a trim shows up as a page not starting at
    ``since + 1`` whether or not the trim job has deleted the rows yet."""
    latest = channel_latest_seq(channel=channel)
    rows = (
        _kept_rows(channel, latest)
        .filter(seq__gt=since)
        .order_by("seq")
        .only("seq", "message_id", "data", "created_at")[:limit]
    )
    messages = [channel_message_from_row(channel, row) for row in rows]
    return HistoryPage(since=since, messages=messages, latest_seq=latest)


def history_recent(*, channel: str, count: int) -> HistoryPage:
    """The channel's latest seq and its last ``count`` kept messages, oldest first."""
    latest = channel_latest_seq(channel=channel)
    rows = (
        _kept_rows(channel, latest)
        .filter(seq__lte=latest)
        .order_by("-seq")
        .only("seq", "message_id", "data", "created_at")[:count]
    )
    messages = [channel_message_from_row(channel, row) for row in reversed(rows)]
    since = messages[0].seq - 1 if messages else latest
    return HistoryPage(since=since, messages=messages, latest_seq=latest)


def channel_latest_seq(*, channel: str) -> int:
    value = Channel.objects.filter(name=channel).values_list("last_seq", flat=True).first()
    return value or 0


def channel_latest_seqs(*, channels: Iterable[str]) -> dict[str, int]:
    names = list(channels)
    latest: dict[str, int] = {}
    # Chunked so a node serving tens of thousands of channels never builds one huge IN.
    for start in range(0, len(names), 1000):
        chunk = names[start : start + 1000]
        latest.update(Channel.objects.filter(name__in=chunk).values_list("name", "last_seq"))
    return latest


def channel_list() -> QuerySet[Channel]:
    return Channel.objects.order_by("name")
