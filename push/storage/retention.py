"""History retention: how many messages and how old each channel keeps.

A default applies to every channel; rules by channel-name pattern override it (the
first match wins), e.g. ``ticker:*`` keeps 1,000 messages, ``chat:*`` 30 days.
Trimming runs from ``manage.py trim_history`` (once, or periodically with --every).
Clients that resume from before the oldest kept message get ``recovered: false``.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import connection
from django.db.models import QuerySet
from django.utils import timezone

from common.conf import push_settings
from push.fanout.message import ChannelMessage
from push.models import Channel, IdempotencyKey, Message
from push.storage.history_modes import is_recent
from push.storage.recent_store import entry_bytes_at_most

logger = logging.getLogger(__name__)

DELETE_BATCH = 5000
# Channels a trim pass reads per query, each with its oldest row (one index probe).
# Measured here (2 busy cores), a page of 1,000 channels took 2 ms in PostgreSQL and
# about 23 ms in all; a pass over 100,000 channels with nothing to trim 2.4 s and 102
# queries, where one query per channel and rule took 51,002 queries and 159 s.
CHANNEL_PAGE = 1000


@dataclass(frozen=True)
class RetentionPolicy:
    max_messages: int | None
    max_age_secs: int | None
    # A recent channel's window bytes, measured by its entries in Redis (None: none).
    max_bytes: int | None = None

    @property
    def exact(self) -> bool:
        """True when ``kept`` drops only what history no longer holds. A byte bound
        is measured on Redis' entries, which a node can only bound from above: what
        ``kept`` drops for bytes may still be there, and a resume that needs it reads."""
        return self.max_bytes is None

    def oldest_kept_seq(self, latest_seq: int) -> int:
        """The lowest seq the count limit keeps, whatever the trim job has deleted."""
        if self.max_messages is None:
            return 1
        return max(1, latest_seq - self.max_messages + 1)

    def oldest_kept_timestamp(self, now: float) -> float | None:
        """Unix time before which messages are past the age limit, if there is one."""
        return None if self.max_age_secs is None else now - self.max_age_secs

    def kept(self, messages: Iterable[ChannelMessage], latest_seq: int) -> list[ChannelMessage]:
        """``messages`` without those this policy no longer keeps.

        Every read that serves a resume (memory, the Redis cache, PostgreSQL) applies
        the policy itself, so a client gets the same answer from every node whether
        or not ``trim_history`` has run yet."""
        first_seq = self.oldest_kept_seq(latest_seq)
        cutoff = self.oldest_kept_timestamp(time.time())
        kept = list(messages)
        # What is kept is the run after the last message past a limit, never the ones
        # between: nodes' clocks differ, so a message may be older than the next one.
        for index in range(len(kept) - 1, -1, -1):
            message = kept[index]
            if message.seq < first_seq or (cutoff is not None and message.timestamp < cutoff):
                kept = kept[index + 1 :]
                break
        if self.max_bytes is None:
            return kept
        return _newest_within(kept, self.max_bytes)

    def describe(self) -> str:
        count = f"last {self.max_messages} messages" if self.max_messages else "all messages"
        age = f"at most {_human_duration(self.max_age_secs)} old" if self.max_age_secs else ""
        return f"{count}, {age}" if age else count


def _newest_within(messages: list[ChannelMessage], max_bytes: int) -> list[ChannelMessage]:
    """The newest of ``messages`` whose window entries certainly fit ``max_bytes``
    together; the newest one whatever its size, as the window keeps it."""
    total = 0
    for index in range(len(messages) - 1, -1, -1):
        total += entry_bytes_at_most(messages[index])
        if total > max_bytes and index < len(messages) - 1:
            return messages[index + 1 :]
    return messages


def _human_duration(secs: int) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if secs % size == 0:
            return f"{secs // size}{unit}"
    return f"{secs}s"


@push_settings.derived
def retention_policy(channel: str) -> RetentionPolicy:
    """What a resume of ``channel`` may replay. A recent channel's window is its rule:
    a node replays from memory no more than the window in Redis holds."""
    if is_recent(channel):
        return RetentionPolicy(
            push_settings.RECENT_WINDOW_MESSAGES,
            push_settings.RECENT_WINDOW_SECS,
            push_settings.RECENT_WINDOW_BYTES,
        )
    return durable_retention_policy(channel)


@push_settings.derived
def durable_retention_policy(channel: str) -> RetentionPolicy:
    """The rules for ``channel``'s rows in PostgreSQL."""
    for pattern, max_messages, max_age_secs in push_settings.RETENTION_RULES:
        if fnmatch.fnmatchcase(channel, pattern):
            return RetentionPolicy(max_messages, max_age_secs)
    return RetentionPolicy(
        push_settings.RETENTION_MAX_MESSAGES or None, push_settings.RETENTION_MAX_AGE_SECS or None
    )


def _delete_in_batches(channel: Channel, *, max_seq: int | None, before: datetime | None) -> int:
    """Delete the channel's messages up to the newest one past a limit (``max_seq``,
    older than ``before``), in batches: those between too, so that what is kept is
    one run of seqs. A message stamped by a node whose clock runs ahead may be newer
    than the next one: left, it was a gap inside history that a resume replayed as
    ``recovered: true``.

    The rows are walked from the channel's oldest by the (channel, seq) index, and the
    trim stops at the first row that is inside the age limit: the rows after it are
    younger (give or take the nodes' clocks, which the reads allow for:
    ``RetentionPolicy.kept``). Looking for old rows among all of them read every row
    of every channel on every pass, most of a big table every few minutes, to find
    none."""
    oldest = Message.objects.filter(channel=channel).order_by("seq")
    if max_seq is not None:
        oldest = oldest.filter(seq__lte=max_seq)
    deleted = 0
    while True:
        first = oldest.values_list("created_at", flat=True).first()
        if first is None or (before is not None and first >= before):
            return deleted  # (one row read for a channel with nothing to trim)
        batch = oldest.values_list("seq", "created_at")[:DELETE_BATCH]
        past = [seq for seq, created_at in batch if before is None or created_at < before]
        if not past:  # (another trim deleted them meanwhile)
            return deleted
        deleted += Message.objects.filter(channel=channel, seq__lte=past[-1]).delete()[0]


def channel_trim(channel: Channel, *, now: datetime | None = None) -> int:
    """Delete what ``channel``'s policy no longer keeps; returns how many messages.

    A recent channel stores no rows (its ``last_seq`` is a ceiling of reserved seqs, not
    a count): only rows left from a durable past are trimmed, by the durable rules."""
    policy = durable_retention_policy(channel.name)
    now = now or timezone.now()
    deleted = 0
    if policy.max_messages is not None and channel.last_seq > policy.max_messages:
        deleted += _delete_in_batches(
            channel, max_seq=channel.last_seq - policy.max_messages, before=None
        )
    if policy.max_age_secs is not None:
        deleted += _delete_in_batches(
            channel, max_seq=None, before=now - timedelta(seconds=policy.max_age_secs)
        )
    return deleted


def history_trim() -> dict[str, int]:
    """Trim every channel and forget expired idempotency keys; returns the messages
    deleted by channel name.

    A pass reads the channels a page at a time, each with its oldest row, and trims
    only those with a row past their limit: one query per page, and the deletes where
    there is something to delete. It used to read each channel's oldest row with a
    query of its own, rule by rule: a million round trips for a million channels (one
    per user or instrument), nearly all to find nothing, and longer than ``--every``.
    Each page is done when the next is read, so a pass that fails keeps what it did."""
    now = timezone.now()
    trimmed = {}
    after = 0
    while True:
        page = _channels_with_oldest_row(after=after)
        for row in page:
            if row.has_rows_past_limits(now):
                channel = Channel(pk=row.id, name=row.name, last_seq=row.last_seq)
                if deleted := channel_trim(channel, now=now):
                    trimmed[row.name] = deleted
        if len(page) < CHANNEL_PAGE:
            break
        after = page[-1].id
    window = timedelta(seconds=push_settings.IDEMPOTENCY_WINDOW_SECS)
    delete_bounded(IdempotencyKey.objects.filter(created_at__lt=now - window))
    return trimmed


class _ChannelOldestRow(NamedTuple):
    """A channel and its oldest stored row (None, None: it has none). A tuple: a model
    instance for each channel doubled a pass's time (4.5 s instead of 2.3 s for 100,000)."""

    id: int
    name: str
    last_seq: int
    oldest_seq: int | None
    oldest_at: datetime | None

    def has_rows_past_limits(self, now: datetime) -> bool:
        """Whether ``channel_trim`` would delete anything, judged by the oldest row: the
        rows are walked from it, and it is inside both limits when nothing is to delete."""
        if self.oldest_seq is None or self.oldest_at is None:
            return False
        policy = durable_retention_policy(self.name)
        if policy.max_age_secs is not None and self.oldest_at < now - timedelta(
            seconds=policy.max_age_secs
        ):
            return True
        return self.oldest_seq < policy.oldest_kept_seq(self.last_seq)


def _channels_with_oldest_row(*, after: int) -> list[_ChannelOldestRow]:
    """The next ``CHANNEL_PAGE`` channels by id past ``after``, each with its oldest
    row, found by the (channel, seq) index (one probe a channel)."""
    with connection.cursor() as cursor:
        cursor.execute(
            # (the tables' names are the models', not anyone's input)
            f"""
            SELECT c.id, c.name, c.last_seq, oldest.seq, oldest.created_at
            FROM {Channel._meta.db_table} c
            LEFT JOIN LATERAL (
                SELECT m.seq, m.created_at FROM {Message._meta.db_table} m
                WHERE m.channel_id = c.id ORDER BY m.seq LIMIT 1
            ) oldest ON true
            WHERE c.id > %s ORDER BY c.id LIMIT %s
            """,  # noqa: S608
            [after, CHANNEL_PAGE],
        )
        return [_ChannelOldestRow(*row) for row in cursor.fetchall()]


def delete_bounded(rows: QuerySet[Any]) -> int:
    """Delete ``rows`` ``DELETE_BATCH`` at a time; returns how many. After a long pause
    of the job (or its first run) one statement deleted them all at once: the locks and
    WAL of millions of rows in one transaction, and all lost when it failed."""
    deleted = 0
    while True:
        batch = rows.model.objects.filter(pk__in=rows.order_by().values("pk")[:DELETE_BATCH])
        count = batch.delete()[0]
        deleted += count
        if count < DELETE_BATCH:
            return deleted
