"""The configuration: each default lives once (PushSettings, settings.py's env_* calls),
the environment overrides only what it sets, and docs/configuration.md is what
``python -m realtime_project.configuration`` prints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from common.conf import EnvType, PushSettings, push_options
from push.cluster.directory import redis_prefix
from push.storage.history_modes import HistoryMode, history_mode
from push.storage.retention import retention_policy
from realtime_project.configuration import project_variables, reference, shown_default
from realtime_project.env import ImproperlyConfiguredEnv, env_overrides

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_doc_is_what_the_generator_prints() -> None:
    assert DOC.read_text() == reference(), (
        "docs/configuration.md is out of date: "
        "python -m realtime_project.configuration > docs/configuration.md"
    )


def test_every_option_has_a_meaning_and_a_variable_of_its_own() -> None:
    options = push_options()
    assert [o.name for o in options] == [f.name for f in dataclasses.fields(PushSettings)]
    # PUSH_<name>, or PUSHER_* for the Pusher protocol (the names its users know).
    assert all(o.meaning and o.variable.startswith(("PUSH_", "PUSHER_")) for o in options)
    variables = [o.variable for o in options]
    project = {v.variable for v in project_variables()}
    assert len(set(variables)) == len(variables)
    assert not set(variables) & project


def test_unset_variables_are_not_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    for option in push_options():
        monkeypatch.delenv(option.variable, raising=False)
    assert env_overrides(push_options()) == {}
    assert PushSettings(**env_overrides(push_options())) == PushSettings()


@pytest.mark.parametrize(
    ("variable", "raw", "option", "value"),
    [
        ("PUSH_MAX_FRAME_BYTES", "2048", "MAX_FRAME_BYTES", 2048),
        ("PUSH_TRUSTED_PROXIES", "0", "TRUSTED_PROXIES", 0),
        ("PUSH_GAP_WAIT_SECS", "0.5", "GAP_WAIT_SECS", 0.5),
        ("PUSH_GC_FREEZE", "off", "GC_FREEZE", False),
        ("PUSH_GC_FREEZE", "", "GC_FREEZE", False),
        ("PUSH_WEBHOOK_URLS", "http://a, http://b", "WEBHOOK_URLS", ["http://a", "http://b"]),
        ("PUSH_IDEMPOTENCY_WINDOW", "12h", "IDEMPOTENCY_WINDOW_SECS", 43_200),
        ("PUSH_RECENT_WINDOW_SECS", "90", "RECENT_WINDOW_SECS", 90),
        ("PUSH_WEBHOOK_SECRET", " s3cret ", "WEBHOOK_SECRET", "s3cret"),
        ("PUSH_RETENTION_RULES", "a:*=5/-", "RETENTION_RULES", [("a:*", 5, None)]),
        ("PUSH_RETENTION_MAX_AGE", "30d", "RETENTION_MAX_AGE_SECS", 30 * 86_400),
        # Keeping history for ever: refused as "expected a positive duration" before.
        ("PUSH_RETENTION_MAX_AGE", "-", "RETENTION_MAX_AGE_SECS", 0),
        ("PUSH_RETENTION_MAX_AGE", "0", "RETENTION_MAX_AGE_SECS", 0),
        ("PUSH_HISTORY_MODES", "t:*=recent", "HISTORY_MODES", [("t:*", "recent")]),
        (
            "PUSH_DROP_OLDEST_CHANNELS",
            "ticker:*, presence-[ab]?",
            "DROP_OLDEST_CHANNELS",
            ["ticker:*", "presence-[ab]?"],
        ),
        (
            "PUSH_WEBHOOK_URLS",
            "http://event-sink:8080/hook",
            "WEBHOOK_URLS",
            ["http://event-sink:8080/hook"],
        ),
        ("PUSH_EVENT_WORKER_METRICS_PORT", "9100", "EVENT_WORKER_METRICS_PORT", 9100),
    ],
)
def test_a_set_variable_is_read_as_its_type(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, option: str, value: object
) -> None:
    monkeypatch.setenv(variable, raw)
    assert env_overrides(push_options())[option] == value


def test_empty_text_is_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSH_SUBSCRIPTION_TOKEN_SECRET", "  ")
    assert "SUBSCRIPTION_TOKEN_SECRET" not in env_overrides(push_options())


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("PUSH_RATE_BURST", "0"),
        ("PUSH_TRUSTED_PROXIES", "-1"),
        ("PUSH_EVENTS", "maybe"),
        # No wait that never ends: the event worker's retry delay overflowed.
        ("PUSH_GAP_WAIT_SECS", "inf"),
        ("PUSH_EVENT_RETRY_SECS", "1e999"),
        # Patterns that can match no channel name: two without their comma, quotes an
        # env file kept.
        ("PUSH_DROP_OLDEST_CHANNELS", "ticker:* chat:*"),
        ("PUSH_DROP_OLDEST_CHANNELS", '"ticker:*"'),
        ("PUSH_HISTORY_MODES", "ticker:* chat:*=recent"),
        ("PUSH_RETENTION_RULES", "ticker/*=100/-"),
        ("PUSH_WEBHOOK_URLS", "hooks.example.com/push"),
        ("PUSHER_WEBHOOK_URLS", "http://hooks.example.com:port/pusher"),
        # A port past 65535: the metrics server failed with an OverflowError when it bound.
        ("PUSH_EVENT_WORKER_METRICS_PORT", "99999"),
    ],
)
def test_a_malformed_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ImproperlyConfiguredEnv, match=variable):
        env_overrides(push_options())


def test_the_upload_limit_and_the_redis_prefix_are_read_once() -> None:
    frame_bytes = settings.PUSH.get("MAX_FRAME_BYTES", PushSettings.MAX_FRAME_BYTES)
    assert frame_bytes * 2 + 65_536 == settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert redis_prefix() == settings.REDIS_PREFIX
    if settings.REDIS_URL:
        assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] == settings.REDIS_PREFIX
        assert settings.CACHES["default"]["KEY_PREFIX"] == settings.REDIS_PREFIX


@pytest.mark.parametrize(
    ("value", "env_type", "shown"),
    [
        (7 * 86_400, EnvType.DURATION, "`7d`"),
        (90, EnvType.DURATION, "`90s`"),
        (86_400, EnvType.DURATION_OR_NONE, "`1d`"),
        (0, EnvType.DURATION_OR_NONE, "`-`"),
        (0.2, EnvType.NUMBER, "`0.2`"),
        (5.0, EnvType.NUMBER, "`5`"),
        (True, EnvType.BOOL, "`true`"),
        ([], EnvType.LIST, "empty"),
        (None, EnvType.TEXT, "unset"),
    ],
)
def test_defaults_are_shown_as_one_would_write_them(
    value: object, env_type: EnvType, shown: str
) -> None:
    assert shown_default(value, env_type) == shown


def test_a_project_variable_without_a_meaning_is_refused() -> None:
    with pytest.raises(ValueError, match="NEW_VARIABLE has no meaning"):
        project_variables('X = env_int("NEW_VARIABLE", 3)\n')


def test_what_is_derived_from_the_settings_follows_a_change_of_them() -> None:
    """``history_mode`` and ``retention_policy`` remember their answer per channel,
    and forget it when the settings change."""
    durable = retention_policy("tick:1")
    assert history_mode("tick:1") is HistoryMode.DURABLE
    with override_settings(
        PUSH={"HISTORY_MODES": [("tick:*", "recent")], "RECENT_WINDOW_MESSAGES": 5}
    ):
        assert history_mode("tick:1") is HistoryMode.RECENT
        assert retention_policy("tick:1").max_messages == 5
    assert history_mode("tick:1") is HistoryMode.DURABLE
    assert retention_policy("tick:1") == durable
