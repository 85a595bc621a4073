"""Overload: whether this node's event loop is behind, so that new anonymous work waits.

One task sleeps ``PROBE_SECS`` at a time and measures how late it wakes: the loop's lag,
which every frame and every delivery on this node waits on top of its own work. A lag
past the limit marks the node overloaded for ``hold_secs``. Meanwhile new anonymous
streams and REST requests are refused before any work is done for them
(``push.services.admission``): a WebSocket closed 1013 ("try again later: node
overloaded"), SSE and REST answered 503 with ``Retry-After``; and an anonymous
connection's subscription to a channel it does not hold yet is answered
``RATE_LIMITED`` (``push.services.subscriptions``), its connection open. Everything
else the open connections do, and everything signed-in users and service tokens do,
goes on as before.

Why: anonymous clients are what anyone on the internet can make more of. Under the abuse
suite's attack each new anonymous connection or request cost the node 1 to 6 ms of CPU
(a handshake, a subscription, a REST read), and the node at a full core delayed honest
deliveries by a whole loop turn of other clients' work at every step; refused here,
one costs a fraction of a millisecond.
"""

from __future__ import annotations

import asyncio
import time

from common import metrics

PROBE_SECS = 0.025


class LoopLag:
    def __init__(self, *, limit_secs: float, hold_secs: float) -> None:
        self.limit_secs = limit_secs
        self.hold_secs = hold_secs
        self._overloaded_until = 0.0

    def overloaded(self) -> bool:
        return time.monotonic() < self._overloaded_until

    def shed(self, kind: str) -> bool:
        """Whether to refuse a new piece of anonymous work of ``kind`` (counted)."""
        if not self.overloaded():
            return False
        metrics.OVERLOAD_REFUSALS.labels(kind).inc()
        return True

    async def run(self) -> None:
        """Probe the loop until cancelled (a limit of 0 turns the probe off)."""
        if self.limit_secs <= 0:
            return
        while True:
            started = time.monotonic()
            await asyncio.sleep(PROBE_SECS)
            self.observe(time.monotonic() - started - PROBE_SECS)

    def observe(self, lag_secs: float) -> None:
        metrics.LOOP_LAG_SECONDS.observe(max(lag_secs, 0.0))
        if lag_secs > self.limit_secs:
            self._overloaded_until = time.monotonic() + self.hold_secs
