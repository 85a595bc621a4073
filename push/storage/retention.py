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
from collections import Counter
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


def _delete_past_age(aging: dict[int, datetime]) -> Counter[int]:
    """Delete each channel's messages (``aging``: channel id -> ``before``) up to the
    newest one older than ``before`` among its oldest ``DELETE_BATCH``, and again while
    its oldest left is older; returns how many by channel id. Those between go too, so
    that what is kept is one run of seqs: a message stamped by a node whose clock runs
    ahead may be newer than the next one, and left, it was a gap inside history that a
    resume replayed as ``recovered: true``.

    The rows are walked from each channel's oldest by the (channel, seq) index, and the
    trim stops at a channel's first row that is inside the age limit: the rows after it
    are younger (give or take the nodes' clocks, which the reads allow for:
    ``RetentionPolicy.kept``). Looking for old rows among all of them read every row
    of every channel on every pass, most of a big table every few minutes, to find none.

    A round reads the windows of all the channels in one query and deletes with the
    count limit's statements, many channels each. Walked channel by channel, it cost
    four queries a channel: measured here (2 busy cores), 20,000 channels with three
    messages past the limit took 80,022 queries and 65 s a pass; now 62 and 0.5 s (0.8
    s with 50 younger messages each, which the windows read)."""
    deleted: Counter[int] = Counter()
    while aging:
        windows = _oldest_windows(aging)
        deleted.update(_delete_past_count(window.past_age for window in windows))
        aging = {window.channel_id: aging[window.channel_id] for window in windows if window.more}
    return deleted


class _OldestWindow(NamedTuple):
    """A channel's oldest ``DELETE_BATCH`` rows whose oldest is past its age limit."""

    channel_id: int
    first_seq: int
    newest_old_seq: int  # the newest of them past the limit
    last_seq: int
    rows: int

    @property
    def past_age(self) -> _PastCount:
        """The rows to delete: all up to the newest past the limit."""
        at_most = self.newest_old_seq - self.first_seq + 1
        return _PastCount(self.channel_id, self.newest_old_seq, at_most=at_most)

    @property
    def more(self) -> bool:
        """Whether the rows after the window may be past the limit too: a whole window,
        and its last row past it. (A younger row after the newest old one is the first
        row left, where the walk stops.)"""
        return self.rows == DELETE_BATCH and self.newest_old_seq == self.last_seq


def _oldest_windows(aging: dict[int, datetime]) -> list[_OldestWindow]:
    """The oldest-rows windows of the ``aging`` channels (id -> ``before``) whose oldest
    row is older than ``before``, in one query: a channel whose oldest is younger is
    read no further than that row."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT c.id, oldest.seq, window_rows.newest_old_seq, window_rows.last_seq,
                window_rows.rows
            FROM unnest(%s::bigint[], %s::timestamptz[]) AS c(id, before) {_OLDEST_ROW}
            CROSS JOIN LATERAL (
                SELECT max(w.seq) FILTER (WHERE w.created_at < c.before) AS newest_old_seq,
                    max(w.seq) AS last_seq, count(*) AS rows
                FROM (
                    SELECT m.seq, m.created_at FROM {Message._meta.db_table} m
                    WHERE m.channel_id = c.id ORDER BY m.seq LIMIT %s
                ) w
            ) window_rows
            WHERE oldest.created_at < c.before
            """,  # noqa: S608
            [list(aging), list(aging.values()), DELETE_BATCH],
        )
        return [_OldestWindow(*row) for row in cursor.fetchall()]


class _PastCount(NamedTuple):
    """A channel's rows past its count limit: those with seq <= ``max_seq``. There are
    ``at_most`` of them at most: one a seq, from its oldest row's to ``max_seq``."""

    channel_id: int
    max_seq: int
    at_most: int


def _delete_past_count(due: Iterable[_PastCount]) -> Counter[int]:
    """Delete the rows of many channels past their count limits, oldest first, with
    statements of at most ``DELETE_BATCH`` rows each, each its own transaction; returns
    how many by channel id. Deleting channel by channel cost four or five queries per
    channel every pass: 450,000 a pass for 100,000 busy instruments over their limit.

    A channel gets the rest of a statement's rows, at most; one left with more rows
    than it got goes again. Deleting all rows up to ``max_seq`` keeps one run of seqs."""
    pending = list(due)
    deleted: Counter[int] = Counter()
    while pending:
        statement: list[tuple[_PastCount, int]] = []
        rows = DELETE_BATCH
        while pending and rows:
            channel = pending.pop()
            statement.append((channel, min(channel.at_most, rows)))
            rows -= statement[-1][1]
        done = _delete_oldest_rows(statement)
        for channel, limit in statement:
            deleted[channel.channel_id] += done[channel.channel_id]
            if done[channel.channel_id] == limit < channel.at_most:
                pending.append(channel._replace(at_most=channel.at_most - limit))
    return deleted


def _delete_oldest_rows(statement: list[tuple[_PastCount, int]]) -> Counter[int]:
    """Delete up to a number of each channel's oldest rows up to its ``max_seq``, in one
    statement; returns how many by channel id. The rows are found by the (channel, seq)
    index and deleted by their ctid (a TID scan whatever the planner estimates)."""
    with connection.cursor() as cursor:
        cursor.execute(
            # (the table's name is the model's, not anyone's input)
            f"""
            DELETE FROM {Message._meta.db_table} WHERE ctid = ANY(ARRAY(
                SELECT oldest.ctid
                FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[])
                    AS due(channel_id, max_seq, rows)
                CROSS JOIN LATERAL (
                    SELECT m.ctid FROM {Message._meta.db_table} m
                    WHERE m.channel_id = due.channel_id AND m.seq <= due.max_seq
                    ORDER BY m.seq LIMIT due.rows
                ) oldest
            ))
            RETURNING channel_id
            """,  # noqa: S608
            [
                [channel.channel_id for channel, _ in statement],
                [channel.max_seq for channel, _ in statement],
                [limit for _, limit in statement],
            ],
        )
        return Counter(channel_id for (channel_id,) in cursor.fetchall())


def channel_trim(channel: Channel, *, now: datetime | None = None) -> int:
    """Delete what ``channel``'s policy no longer keeps; returns how many messages."""
    oldest_seq, oldest_at = _oldest_rows([channel.pk]).get(channel.pk, (None, None))
    row = _ChannelOldestRow(channel.pk, channel.name, channel.last_seq, oldest_seq, oldest_at)
    return sum(_channels_trim([row], now=now or timezone.now()).values())


def _channels_trim(channels: list[_ChannelOldestRow], *, now: datetime) -> dict[str, int]:
    """Delete what the channels' policies no longer keep; returns how many messages by
    channel name. The rows past a count limit go first, then those past an age limit
    from each channel's oldest row left: many channels a query either way.

    A recent channel stores no rows (its ``last_seq`` is a ceiling of reserved seqs, not
    a count): only rows left from a durable past are trimmed, by the durable rules."""
    past_count = [channel.past_count() for channel in channels]
    deleted = _delete_past_count(due for due in past_count if due is not None)
    counted = {due.channel_id for due in past_count if due is not None}
    # A channel the count trimmed has a new oldest row, which the age's walk reads.
    aging = {
        channel.id: before
        for channel in channels
        if (before := channel.cutoff(now))
        and (channel.id in counted or (channel.oldest_at and channel.oldest_at < before))
    }
    deleted.update(_delete_past_age(aging))
    return {channel.name: deleted[channel.id] for channel in channels if deleted[channel.id]}


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
        to_trim = [row for row in page if row.has_rows_past_limits(now)]
        trimmed.update(_channels_trim(to_trim, now=now))
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
        """Whether ``_channels_trim`` would delete anything, judged by the oldest row:
        the rows are walked from it, and it is inside both limits when nothing is to
        delete."""
        if self.oldest_at is None:
            return False
        cutoff = self.cutoff(now)
        return self.past_count() is not None or (cutoff is not None and self.oldest_at < cutoff)

    def past_count(self) -> _PastCount | None:
        """The rows past the count limit, if the oldest row is."""
        max_messages = durable_retention_policy(self.name).max_messages
        if max_messages is None or self.oldest_seq is None:
            return None
        max_seq = self.last_seq - max_messages
        if self.oldest_seq > max_seq:
            return None
        return _PastCount(self.id, max_seq, at_most=max_seq - self.oldest_seq + 1)

    def cutoff(self, now: datetime) -> datetime | None:
        """The time before which rows are past the age limit, if there is one."""
        policy = durable_retention_policy(self.name)
        return None if policy.max_age_secs is None else now - timedelta(seconds=policy.max_age_secs)


# Each channel's oldest stored row, found by the (channel, seq) index (one probe a
# channel): the tables' names are the models', not anyone's input.
_OLDEST_ROW = f"""
    LEFT JOIN LATERAL (
        SELECT m.seq, m.created_at FROM {Message._meta.db_table} m
        WHERE m.channel_id = c.id ORDER BY m.seq LIMIT 1
    ) oldest ON true
"""  # noqa: S608


def _channels_with_oldest_row(*, after: int) -> list[_ChannelOldestRow]:
    """The next ``CHANNEL_PAGE`` channels by id past ``after``, each with its oldest row."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT c.id, c.name, c.last_seq, oldest.seq, oldest.created_at
            FROM {Channel._meta.db_table} c {_OLDEST_ROW}
            WHERE c.id > %s ORDER BY c.id LIMIT %s
            """,  # noqa: S608
            [after, CHANNEL_PAGE],
        )
        return [_ChannelOldestRow(*row) for row in cursor.fetchall()]


def _oldest_rows(channel_ids: list[int]) -> dict[int, tuple[int, datetime]]:
    """The oldest stored row (seq, created_at) of each of the channels that has one."""
    if not channel_ids:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT c.id, oldest.seq, oldest.created_at
            FROM unnest(%s::bigint[]) AS c(id) {_OLDEST_ROW}
            WHERE oldest.seq IS NOT NULL
            """,  # noqa: S608
            [channel_ids],
        )
        return {channel_id: (seq, at) for channel_id, seq, at in cursor.fetchall()}


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
