"""What a Pusher connection's services decide without a node (push.services.pusher_sessions):
which cache misses become a ``cache_miss`` webhook."""

from __future__ import annotations

import pytest

from push.services import pusher_sessions
from push.services.pusher_sessions import CACHE_MISS_WEBHOOK_INTERVAL_SECS, CacheMissWebhooks


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def webhooks(clock: Clock) -> CacheMissWebhooks:
    gate = CacheMissWebhooks()
    gate.clock = clock
    return gate


def test_a_channels_first_miss_then_one_per_interval(
    webhooks: CacheMissWebhooks, clock: Clock
) -> None:
    assert webhooks.due("cache-a")
    assert not webhooks.due("cache-a")
    assert webhooks.due("cache-b"), "each channel has its own"
    clock.now += CACHE_MISS_WEBHOOK_INTERVAL_SECS - 0.1
    assert not webhooks.due("cache-a")
    clock.now += 0.1
    assert webhooks.due("cache-a")
    assert not webhooks.due("cache-a")


def test_the_channels_remembered_are_bounded(
    webhooks: CacheMissWebhooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pusher_sessions, "MAX_CACHE_MISS_CHANNELS", 2)
    assert all(webhooks.due(c) for c in ("cache-a", "cache-b", "cache-c"))
    assert webhooks.due("cache-a"), "the oldest was forgotten"
    assert not webhooks.due("cache-c")
