"""Counters in the shared cache (Redis when configured) for the REST throttle and the
failed authentications per address: one round trip per count.

Through Django's cache API a count costs three (``add``, then ``incr``, which asks
whether the key exists before it increments); with Redis this sends ``SET NX EX`` and
``INCR`` in one pipeline, so the first count of a window starts it with its timeout
and every count is atomic across nodes.
"""

from __future__ import annotations

from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache


def count(key: str, timeout: int) -> int:
    """Add one to ``key`` (made with ``timeout`` seconds to live when it is new) and
    return the count. Raises the cache's error when it cannot answer."""
    cache = caches["default"]
    if isinstance(cache, RedisCache):
        name = cache.make_and_validate_key(key)
        # Django's own RedisCacheClient, for the key's server (replica-aware).
        client = cache._cache.get_client(name, write=True)  # type: ignore[attr-defined]  # Django's client, not in the stubs
        pipeline = client.pipeline(transaction=False)
        pipeline.set(name, 0, ex=timeout, nx=True)
        pipeline.incr(name)
        return int(pipeline.execute()[1])
    cache.add(key, 0, timeout=timeout)
    try:
        return int(cache.incr(key))
    except ValueError:  # expired between add and incr: a new window
        cache.add(key, 1, timeout=timeout)
        return 1
