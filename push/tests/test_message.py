"""Message ids: time-ordered version-7 UUIDs, in the canonical text ``str(uuid.UUID)``
writes."""

from __future__ import annotations

import time
import uuid

from push.fanout.message import new_message_ids


def test_new_message_ids_are_distinct_version_7_uuids_in_canonical_text() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_message_ids(2000)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
        assert before <= parsed.int >> 80 <= after  # the first 48 bits: the millisecond
    assert new_message_ids(0) == []


def test_later_ids_sort_after_earlier_ones() -> None:
    """What keeps the messages table's unique index appending at its end."""
    earlier = new_message_ids(100, now_ms=1_764_150_000_000)
    later = new_message_ids(100, now_ms=1_764_150_000_001)
    assert max(earlier) < min(later)
    assert {uuid.UUID(i).int >> 80 for i in earlier} == {1_764_150_000_000}


def test_the_random_part_differs_within_one_millisecond() -> None:
    ids = new_message_ids(5000, now_ms=1_764_150_000_000)
    assert len({i[15:] for i in ids}) == 5000  # after the version digit
