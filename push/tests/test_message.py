"""Message ids: random version-4 UUIDs, written as ``str(uuid.uuid4())`` writes them."""

from __future__ import annotations

import uuid

from push.fanout.message import new_message_ids


def test_new_message_ids_are_distinct_version_4_uuids_in_canonical_text() -> None:
    ids = new_message_ids(2000)
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    assert new_message_ids(0) == []
