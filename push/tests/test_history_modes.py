"""What is derived per channel from ``PUSH_HISTORY_MODES`` and the retention settings
(``is_recent``, ``history_mode``, ``retention_policy``) is remembered, bounded, and
forgotten when the settings change."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from common.conf import DERIVED_CACHE_SIZE
from push.storage.history_modes import history_mode, is_recent
from push.storage.retention import RetentionPolicy, durable_retention_policy, retention_policy

RECENT = {"HISTORY_MODES": [("ticker:*", "recent")], "RECENT_WINDOW_MESSAGES": 5}


def test_is_recent_follows_a_change_of_the_settings() -> None:
    assert not is_recent("ticker:ACME")
    with override_settings(PUSH=RECENT):
        assert is_recent("ticker:ACME")
        assert not is_recent("news")
        assert retention_policy("ticker:ACME").max_messages == 5
    assert not is_recent("ticker:ACME")


def test_retention_rules_follow_a_change_of_the_settings() -> None:
    rules = {
        "RETENTION_RULES": [("chat:*", None, 3600)],
        "RETENTION_MAX_MESSAGES": 7,
        "RETENTION_MAX_AGE_SECS": 0,
    }
    before = durable_retention_policy("chat:lobby")
    with override_settings(PUSH=rules):
        assert durable_retention_policy("chat:lobby") == RetentionPolicy(None, 3600)
        assert retention_policy("news") == RetentionPolicy(7, None)
    assert durable_retention_policy("chat:lobby") == before


def test_a_settings_fixture_change_is_seen(settings: Any) -> None:
    assert not is_recent("ticker:ACME")
    settings.PUSH = {**settings.PUSH, **RECENT}
    assert is_recent("ticker:ACME")


@pytest.mark.parametrize("derived", [is_recent, history_mode, retention_policy])
def test_what_is_remembered_per_channel_is_bounded(derived: Any) -> None:
    """Channel names come from clients: however many are asked about, each function
    keeps at most ``DERIVED_CACHE_SIZE`` answers."""
    with override_settings(PUSH=RECENT):
        for n in range(DERIVED_CACHE_SIZE + 100):
            derived(f"ticker:{n}")
        assert derived.cache_info().currsize == DERIVED_CACHE_SIZE
        assert is_recent("ticker:0") and not is_recent("news:0")
