"""Per-connection limits that keep one client from hurting the others: the rate of
frames a client may send, and that rate bound to its address's budget.

The node's own bounds live with what they bound: connections per user and per IP in
``push.cluster.admission``, what one address may ask per second in
``push.cluster.address_budgets`` (where the token bucket lives), history replays in
``push.fanout.replay_slots``."""

from __future__ import annotations

from typing import Protocol

from push.cluster.address_budgets import NO_LIMIT, REFUSED_FRAMES, Bucket, NoLimit, TokenBucket

__all__ = ["NO_LIMIT", "AddressBoundRate", "NoLimit", "RateLimiter", "TokenBucket"]


class RateLimiter(Protocol):
    def take(self) -> bool:
        """Whether one more frame may pass now."""
        ...


class AddressBoundRate:
    """A connection's frame limiter once its address has a budget: a frame passes its
    own bucket first (a connection that floods spends only its own tokens), then the
    address's bucket, which all the address's connections share. The connection holds
    the address's bucket itself: no look-up per frame."""

    __slots__ = ("address", "own")

    def __init__(self, own: RateLimiter, address: Bucket) -> None:
        self.own = own
        self.address = address

    def take(self) -> bool:
        if not self.own.take():
            return False
        if self.address.take():
            return True
        REFUSED_FRAMES.inc()
        return False
