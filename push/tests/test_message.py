"""Message ids: time-ordered version-7 UUIDs, in the canonical text ``str(uuid.UUID)``
writes."""

from __future__ import annotations

import os
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


def test_ids_taken_one_at_a_time_never_repeat_across_draws() -> None:
    """A recent-only publish takes one id at a time from the drawn pool."""
    ids = [new_message_ids(1)[0] for _ in range(1000)] + new_message_ids(600)
    assert len(set(ids)) == 1600
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)


def test_a_forked_child_does_not_hand_out_its_parents_drawn_ids() -> None:
    new_message_ids(1)  # the parent now holds drawn random parts
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's exit status reports
        os.close(reading)
        os.write(writing, "\n".join(new_message_ids(1)[0] for _ in range(50)).encode())
        os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        childs = set(pipe.read().split("\n"))
    os.waitpid(child, 0)
    parents = {new_message_ids(1)[0] for _ in range(50)}
    assert len(childs) == 50 and not {i[15:] for i in childs} & {i[15:] for i in parents}
