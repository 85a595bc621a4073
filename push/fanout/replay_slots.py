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

    The two are held differently. An address's slot is held for the whole replay: it
    bounds what one client address makes the node hold (each replay's page and send
    queue). The node's is held only while the replay reads (``pause``, ``resume``):
    it bounds the reads running at once, and a reader that stopped reading, its queue
    full and its connection kept open by pings, would otherwise hold it for hours and
    a few such readers would have every other client's resume refused.
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

    async def acquire(self, ip: object, gone: Callable[[], bool]) -> bool:
        """Take a slot of the node's and of ``ip``'s; False when the client left while
        waiting. Raises PushError when none freed within ``wait_secs``."""
        ip = _block(ip)
        deadline = time.monotonic() + self.wait_secs
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

    def release(self, ip: object, *, reading: bool = True) -> None:
        """Give back the replay's slots (``reading``: the node's too, unless paused)."""
        ip = _block(ip)
        if reading:
            self.pause()
        if ip is not None:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]

    def pause(self) -> None:
        """Give back the node's slot of a replay that stops reading for a while (its
        address's stays held)."""
        self.in_use -= 1
        metrics.REPLAYS_ACTIVE.set(self.in_use)

    async def resume(self, gone: Callable[[], bool]) -> bool:
        """Take the node's slot again, for the next read of a paused replay, waiting
        for it as long as the client stays (its subscription stands, and refusing now
        would drop it behind its back); False when it left. The wait looks ever less
        often, up to 10 times a second, so stalled waiters cost little."""
        delay = self.POLL_SECS
        while self.per_node and self.in_use >= self.per_node:
            if gone():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        if gone():
            return False
        self.in_use += 1
        metrics.REPLAYS_ACTIVE.set(self.in_use)
        return True


def _block(ip: object) -> object:
    return address_block(ip) if isinstance(ip, str) else ip
