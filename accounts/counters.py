"""Counters in the shared cache (Redis when configured) for the REST throttle and the
failed authentications per address: one round trip per count.

Through Django's cache API a count costs three (``add``, then ``incr``, which asks
whether the key exists before it increments); with Redis it is one script, so the first
count of a window starts it with its timeout and every count is atomic across nodes.

A script, not ``SET NX EX`` and ``INCR`` sent one after the other: a key that expired
between the two was made again by ``INCR`` with no timeout, and a failed-authentication
count without a window in its name then never ended, shutting its address out for good.
The script also gives a timeout to a key found without one, so such a key heals.
"""

from __future__ import annotations

from typing import Any

from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache

# KEYS[1] the counter, ARGV[1] its window's seconds. Redis runs a script on one frozen
# clock, so the key cannot expire between its two calls.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return n
"""
# The script as redis-py keeps it (its SHA1, sent with EVALSHA), made once.
_script: Any = None


def count(key: str, timeout: int) -> int:
    """Add one to ``key`` (made with ``timeout`` seconds to live when it is new) and
    return the count. Raises the cache's error when it cannot answer."""
    cache = caches["default"]
    if isinstance(cache, RedisCache):
        name = cache.make_and_validate_key(key)
        # Django's own RedisCacheClient, for the key's server (replica-aware).
        client = cache._cache.get_client(name, write=True)  # type: ignore[attr-defined]  # Django's client, not in the stubs
        global _script
        if _script is None:
            _script = client.register_script(_COUNT)
        return int(_script(keys=[name], args=[timeout], client=client))
    cache.add(key, 0, timeout=timeout)
    try:
        return int(cache.incr(key))
    except ValueError:  # expired between add and incr: a new window
        cache.add(key, 1, timeout=timeout)
        return 1
