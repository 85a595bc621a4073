"""History as read back (push/storage/selectors.py) is the message as published: the
same id, data and timestamp to the microsecond, though the rows are read as plain
tuples with the time computed by the database."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from push.models import Channel, Message
from push.services.publishing import message_publish
from push.storage.selectors import (
    channel_messages,
    history_page,
    history_recent,
    message_list_since,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_page_of_history_is_the_messages_as_published() -> None:
    published = [message_publish(channel="rows", data={"n": n, "é": "ü"}) for n in range(5)]
    read, truncated = message_list_since(channel="rows", since=1, limit=10, max_bytes=10_000)
    assert not truncated
    assert [(m.seq, m.message_id, m.data_json, m.timestamp) for m in read] == [
        (m.seq, m.message_id, m.data_json, m.timestamp) for m in published[1:]
    ]
    page = history_page(channel="rows", since=3, limit=10, max_bytes=10_000)
    assert [(m.seq, m.timestamp) for m in page.messages] == [
        (m.seq, m.timestamp) for m in published[3:]
    ]
    newest = history_recent(channel="rows", count=2, max_bytes=10_000)
    assert [m.message_id for m in newest.messages] == [m.message_id for m in published[-2:]]
    assert [m.timestamp for m in newest.messages] == [m.timestamp for m in published[-2:]]


def test_joining_a_channel_nothing_was_published_to_costs_one_query(
    django_assert_num_queries: Any,
) -> None:
    """A subscribe storm joins thousands of new channels: each reads its latest seq
    and nothing more."""
    with django_assert_num_queries(1):
        empty = history_recent(channel="never-used", count=256, max_bytes=10_000)
    assert (empty.since, empty.messages, empty.latest_seq) == (0, [], 0)
    message_publish(channel="used", data=1)
    used = history_recent(channel="used", count=256, max_bytes=10_000)
    assert ([m.seq for m in used.messages], used.since, used.latest_seq) == ([1], 0, 1)


def test_a_page_walks_the_channel_and_seq_index_and_stops_at_its_limit() -> None:
    """A page of a long channel reads the page's rows, not every row of the channel
    sorted: PostgreSQL's plan is an index scan in seq order that stops at the limit."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's plan")
    long = Channel.objects.create(name="long", last_seq=3000)
    other = Channel.objects.create(name="other", last_seq=500)
    now = timezone.now()
    Message.objects.bulk_create(
        Message(channel=c, seq=n, message_id=uuid.uuid4(), data="1", created_at=now)
        for c, count in ((long, 3000), (other, 500))
        for n in range(1, count + 1)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE push_message, push_channel")
    page = channel_messages("long").filter(seq__gt=1000).order_by("seq")[:50]
    plan = page.explain(analyze=True)
    assert "message_unique_channel_seq" in plan and "Sort" not in plan, plan
    # (The channel's own look-up may be an index scan too, or a bitmap one.)
    scan = next(line for line in plan.splitlines() if "message_unique_channel_seq" in line)
    assert "rows=50 loops=1" in scan, plan
    assert [m.seq for m in page] == list(range(1001, 1051))


def test_a_page_cut_after_a_message_past_the_age_limit_says_more_follow() -> None:
    """Seq 3 is past the age limit, seq 2 (stamped by a node whose clock ran ahead) is
    not: a page of 4 from seq 1 (2, 4, 5, 6) holds only the run after 3, and says more
    follow."""
    published = [message_publish(channel="chat:pages", data=n) for n in range(10)]
    past = timezone.now() - timedelta(hours=2)
    Message.objects.filter(channel__name="chat:pages", seq=3).update(created_at=past)
    with override_settings(PUSH={"RETENTION_RULES": [("chat:*", None, 3600)]}):
        page = history_page(channel="chat:pages", since=1, limit=4, max_bytes=10_000)
        newest = history_recent(channel="chat:pages", count=10, max_bytes=10_000)
    assert ([m.seq for m in page.messages], page.truncated) == ([4, 5, 6], True)
    assert not page.complete_from_since
    assert [m.seq for m in newest.messages] == [m.seq for m in published[3:]]
    assert newest.since == 3
