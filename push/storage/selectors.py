"""Reads of stored history and channel state (no writes; services hold those)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from django.db.models import FloatField, Func, IntegerField, QuerySet, Subquery

from common import metrics
from push.fanout.message import ChannelMessage, HistoryPage
from push.models import Channel, Message
from push.storage import recent_store
from push.storage.history_modes import is_recent
from push.storage.recent_cache import contiguous_tail
from push.storage.retention import retention_policy


class EpochSeconds(Func):
    """A timestamp column as Unix seconds (a float), computed by the database: Django's
    psycopg loader parses every timestamptz in Python (~5 us a row), and a message's
    time is only ever wanted as seconds."""

    template = "EXTRACT(EPOCH FROM %(expressions)s)::float8"
    output_field = FloatField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(
            compiler,
            connection,
            # Stored as text, "YYYY-MM-DD HH:MM:SS.ffffff": whole seconds, then the
            # fraction as written (julianday() would lose tens of microseconds).
            template=(
                "(CAST(strftime('%%%%s', %(expressions)s) AS INTEGER)"
                " + CAST(substr(%(expressions)s, 20) AS REAL))"
            ),
            **extra,
        )


# A stored message as read: (seq, message_id, data, created_at as Unix seconds, the
# Pusher socket it excludes or None). Tuples
# of plain values, not model instances: a replay or a history page reads hundreds of
# rows on a database thread, holding the GIL the event loop needs, and a model instance
# with a parsed datetime and UUID per row cost about twice as much.
MessageRow = tuple[int, Any, str, float, str | None]


def channel_message_from_row(channel: str, row: MessageRow) -> ChannelMessage:
    seq, message_id, data, timestamp, excluded = row
    return ChannelMessage(
        channel=channel,
        seq=seq,
        message_id=str(message_id),
        data_json=data,
        timestamp=timestamp,
        exclude=excluded,
    )


class OctetLength(Func):
    """A text column's size in bytes; PostgreSQL reads it from the stored value's
    header, without loading (or decompressing) the value itself."""

    function = "octet_length"
    output_field = IntegerField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # SQLite (the embedded default of `make run`) has no octet_length.
        return self.as_sql(
            compiler, connection, template="length(CAST(%(expressions)s AS BLOB))", **extra
        )


def channel_messages(channel: str) -> QuerySet[Message]:
    """The messages of ``channel``, chosen by its id (a subquery), not by joining its name.

    Joined by name, PostgreSQL cannot walk the (channel, seq) index in seq order (a
    nested loop keeps only its outer side's order), so for every page it read all the
    channel's messages and sorted them (a page of 500 from a channel of a million
    messages: 130-146 ms, against 0.21 ms by id). By id, the index gives the page in
    order and the read stops at its limit."""
    return Message.objects.filter(
        channel_id=Subquery(Channel.objects.filter(name=channel).values("id")[:1])
    )


def rows_within(
    rows: QuerySet[Message], *, limit: int, max_bytes: int, newest_first: bool = False
) -> tuple[list[MessageRow], bool]:
    """The first ``limit`` of ``rows`` (ordered by seq, oldest or newest first) that fit
    in ``max_bytes`` of message data, always at least one; and whether the page was cut
    short (more rows follow it). The sizes are read first, so a page of large messages
    is never loaded only to be cut: the data read is at most the budget plus one
    message."""
    while True:
        sizes = list(rows.annotate(size=OctetLength("data")).values_list("seq", "size")[:limit])
        taken = _count_within([size for _, size in sizes], max_bytes)
        if not taken:
            return [], False
        edge = sizes[taken - 1][0]
        bounded = rows.filter(seq__gte=edge) if newest_first else rows.filter(seq__lte=edge)
        read: list[MessageRow] = list(
            bounded.annotate(epoch=EpochSeconds("created_at")).values_list(
                "seq", "message_id", "data", "epoch", "excluded_socket"
            )[:taken]
        )
        metrics.HISTORY_ROWS_READ.inc(len(read))
        if read:
            # Fewer than the sizes promised: rows were deleted between the two reads (a
            # trim), and the page, short of its limit, would read as the channel's end.
            return read, taken < len(sizes) or len(read) < taken
        # Every row the sizes named was deleted meanwhile: the page is what follows.


def _count_within(sizes: list[int], max_bytes: int) -> int:
    """How many of ``sizes`` fit ``max_bytes`` together; at least one, if any."""
    taken = total = 0
    for size in sizes:
        if taken and total + size > max_bytes:
            break
        total += size
        taken += 1
    return taken


def message_list_since(
    *, channel: str, since: int, limit: int, max_bytes: int
) -> tuple[list[ChannelMessage], bool]:
    """Stored messages of ``channel`` with ``seq > since`` that retention keeps, as a
    resume replays them (``history_page``), oldest first, at most ``limit`` of them
    and ``max_bytes`` of data (at least one); and whether the page stopped early
    (more messages follow it). A recent-only channel's come from its window in
    Redis, cut to the same budget there."""
    if is_recent(channel):
        return recent_store.window_since_sync(channel, since, limit, max_bytes)
    page = history_page(channel=channel, since=since, limit=limit, max_bytes=max_bytes)
    return page.messages, page.truncated


def _kept_rows(channel: str, latest: int) -> QuerySet[Message]:
    """The channel's rows that its retention policy keeps, trimmed yet or not."""
    policy = retention_policy(channel)
    rows = channel_messages(channel).filter(seq__gte=policy.oldest_kept_seq(latest))
    cutoff = policy.oldest_kept_timestamp(time.time())
    if cutoff is not None:
        rows = rows.filter(created_at__gte=datetime.fromtimestamp(cutoff, tz=UTC))
    return rows


def history_page(*, channel: str, since: int, limit: int, max_bytes: int) -> HistoryPage:
    """A page of history for a resume, with the channel's latest seq read first, so
    every message up to it is either in the page or after the page's last seq. Only
    what retention keeps is read, so a trim shows up as a page not starting at
    ``since + 1`` whether or not the trim job has deleted the rows yet. The page holds
    at most ``limit`` messages and ``max_bytes`` of data (at least one message)."""
    latest = channel_latest_seq(channel=channel)
    rows = _kept_rows(channel, latest)
    return _page_of(channel, rows, since, latest, limit, max_bytes, kept_only=True)


def stored_history_page(*, channel: str, since: int, limit: int, max_bytes: int) -> HistoryPage:
    """``history_page`` without the retention rules: every row still stored after
    ``since``. A gap repair reads this: retention bounds what a resume or REST may
    replay, never what a live subscriber receives, so only rows ``trim_history`` has
    deleted show up as a page not starting at ``since + 1``."""
    latest = channel_latest_seq(channel=channel)
    return _page_of(channel, channel_messages(channel), since, latest, limit, max_bytes)


def _page_of(
    channel: str,
    rows: QuerySet[Message],
    since: int,
    latest: int,
    limit: int,
    max_bytes: int,
    *,
    kept_only: bool = False,
) -> HistoryPage:
    """``kept_only``: ``rows`` are what retention keeps, and the page is the run after
    its last gap: a seq missing among them is one past the age limit between younger
    ones (nodes' clocks differ), and what is kept is only the run after it
    (``RetentionPolicy.kept``), so a replay never has a gap it would not announce."""
    ordered = rows.filter(seq__gt=since).order_by("seq")
    read, truncated = rows_within(ordered, limit=limit, max_bytes=max_bytes)
    messages = [channel_message_from_row(channel, row) for row in read]
    if kept_only:
        run = contiguous_tail(messages)
        # A page at its limit that lost its head has more after it all the same.
        truncated = truncated or (len(run) < len(messages) and len(read) >= limit)
        messages = run
    return HistoryPage(since=since, messages=messages, latest_seq=latest, truncated=truncated)


def history_recent(*, channel: str, count: int, max_bytes: int) -> HistoryPage:
    """The channel's latest seq and its last kept messages, oldest first: at most
    ``count`` of them and ``max_bytes`` of data (at least one when there is any)."""
    latest = channel_latest_seq(channel=channel)
    if not latest:
        # Nothing was ever published there, so no row has a seq up to it: joining a new
        # channel (a subscribe storm's, a chat room's first visitor) costs one query.
        return HistoryPage(since=0, messages=[], latest_seq=0)
    rows = _kept_rows(channel, latest).filter(seq__lte=latest).order_by("-seq")
    read, _ = rows_within(rows, limit=count, max_bytes=max_bytes, newest_first=True)
    messages = contiguous_tail([channel_message_from_row(channel, row) for row in reversed(read)])
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
