"""The node's bound on history replays running at once, which the hub applies."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from common import metrics
from common.addresses import address_block
from common.errors import ErrorCode, PushError


class ReplaySlots:
    """Replays read from the database at once, per node and per client address.

    A resume that the node's recent messages cannot serve reads history page by page;
    without a bound, a hundred anonymous clients resuming from 0 keep the database and
    the node busy for seconds each. Over a bound a replay waits up to ``wait_secs`` for
    a slot, checking ``gone`` as it waits, then is refused: RATE_LIMITED when its own
    address holds too many (that client should slow down), UNAVAILABLE when the node
    does (try again later, or elsewhere). 0 turns a bound off. An IPv6 address counts
    for its /64 (``common.addresses``), as for every other limit kept per address.
    """

    POLL_SECS = 0.02

    def __init__(self, *, per_node: int, per_ip: int, wait_secs: float) -> None:
        self.per_node = per_node
        self.per_ip = per_ip
        self.wait_secs = wait_secs
        self.in_use = 0
        self._per_ip: Counter[object] = Counter()

    def _free(self, ip: object) -> ErrorCode | None:
        """None when a slot is free for ``ip``, else the code of the bound it meets."""
        if self.per_ip and ip is not None and self._per_ip[ip] >= self.per_ip:
            return ErrorCode.RATE_LIMITED
        if self.per_node and self.in_use >= self.per_node:
            return ErrorCode.UNAVAILABLE
        return None

    async def acquire(
        self, ip: object, gone: Callable[[], bool], *, wait_secs: float | None = None
    ) -> bool:
        """Take a slot; False when the client left while waiting. Raises PushError
        when no slot freed within ``wait_secs`` (the bound's own by default)."""
        ip = _block(ip)
        deadline = time.monotonic() + (self.wait_secs if wait_secs is None else wait_secs)
        while (refusal := self._free(ip)) is not None:
            if gone():
                return False
            if time.monotonic() >= deadline:
                metrics.REPLAYS_REFUSED.labels(refusal.value).inc()
                raise PushError(refusal, "too many history replays at once; try again later")
            await asyncio.sleep(self.POLL_SECS)
        self.in_use += 1
        if ip is not None:
            self._per_ip[ip] += 1
        metrics.REPLAYS_ACTIVE.set(self.in_use)
        return True

    def release(self, ip: object) -> None:
        ip = _block(ip)
        self.in_use -= 1
        if ip is not None:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]
        metrics.REPLAYS_ACTIVE.set(self.in_use)


def _block(ip: object) -> object:
    return address_block(ip) if isinstance(ip, str) else ip
