"""Counters in the shared cache (``accounts.counters``): the throttle's and the failed
authentications', one round trip each with Redis."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.test import override_settings

from accounts.counters import count


def test_a_count_starts_its_window_and_counts_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = caches["default"]
    if not isinstance(cache, RedisCache):
        pytest.skip("needs REDIS_URL")

    def three_round_trips(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("counted through add and incr")

    monkeypatch.setattr(cache, "add", three_round_trips)
    monkeypatch.setattr(cache, "incr", three_round_trips)
    key = f"counter-{uuid.uuid4().hex}"
    assert [count(key, 30) for _ in range(3)] == [1, 2, 3]
    assert cache.get(key) == 3
    name = cache.make_and_validate_key(key)
    assert 0 < cache._cache.get_client(name).ttl(name) <= 30


def test_a_counter_found_without_a_timeout_gets_one() -> None:
    # What INCR left when the key expired just before it (the count was SET NX, then
    # INCR): an address's failed authentications that never expired shut it out for
    # good. (Counted to 3 here, past the start of a window.)
    cache = caches["default"]
    if not isinstance(cache, RedisCache):
        pytest.skip("needs REDIS_URL")
    key = f"counter-{uuid.uuid4().hex}"
    name = cache.make_and_validate_key(key)
    client = cache._cache.get_client(name, write=True)
    client.set(name, 2)
    assert client.ttl(name) == -1
    assert count(key, 30) == 3
    assert 0 < client.ttl(name) <= 30


@override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
def test_a_count_in_another_cache() -> None:
    key = f"counter-{uuid.uuid4().hex}"
    assert [count(key, 30) for _ in range(3)] == [1, 2, 3]
    assert caches["default"].get(key) == 3
