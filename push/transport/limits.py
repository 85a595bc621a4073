"""Per-connection limits that keep one client from hurting the others: the rate of
frames a client may send.

The node's own bounds live with what they bound: connections per user and per IP in
``push.cluster.admission``, history replays in ``push.fanout.replay_slots``."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``burst`` frames at once, refilled at ``rate_per_sec``; the contract's default is
    a burst of 100 and 50 per second sustained."""

    __slots__ = ("burst", "clock", "rate_per_sec", "tokens", "updated")

    def __init__(
        self, burst: int, rate_per_sec: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.rate_per_sec = rate_per_sec
        self.tokens = float(burst)
        self.clock = clock
        self.updated = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_sec)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class NoLimit:
    """The rate limiter of a connection that has none (a back-end's service token)."""

    __slots__ = ()

    def take(self) -> bool:
        return True


NO_LIMIT = NoLimit()
