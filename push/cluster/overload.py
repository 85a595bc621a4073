"""Overload: whether this node's event loop is behind, so that new anonymous work waits.

One task sleeps ``PROBE_SECS`` at a time and measures how late it wakes: the loop's lag,
which every frame and every delivery on this node waits on top of its own work. A lag
past the limit marks the node overloaded for ``hold_secs``. Meanwhile new anonymous
work is admitted at ``admit_per_sec`` across the node. New streams and REST requests
past that are refused before any work is done for them (``push.services.admission``):
a WebSocket closed 1013 ("try again later: node overloaded"), SSE and REST answered 503
with ``Retry-After``; clients retry those with backoff. An anonymous connection's
subscription to a channel this node does not carry yet waits for its turn instead
(``push.services.subscriptions``), since a refused subscription is one a client may
never send again; it is answered ``RATE_LIMITED`` only after waiting too long.
Everything else the open connections do, and everything signed-in users and service
tokens do, goes on as before.

Why: anonymous clients are what anyone on the internet can make more of. Under the abuse
suite's attack each new anonymous connection or request cost the node 1 to 6 ms of CPU
(a handshake, a subscription, a REST read), and the node at a full core delayed honest
deliveries by a whole loop turn of other clients' work at every step; refused here,
one costs a fraction of a millisecond. Some are still admitted so that a crowd of
honest newcomers (a sibling node's clients reconnecting here) gets in at a known rate
however long the lag lasts, instead of waiting for it to end.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from common import metrics
from push.cluster.address_budgets import TokenBucket

PROBE_SECS = 0.025
# Waiting work let in per probe once the overload is over (2,000 a second): all of a
# long queue at once would be one loop turn of that many subscriptions, the lag that
# started it all over again.
RELEASED_PER_PROBE = 50


class LoopLag:
    def __init__(self, *, limit_secs: float, hold_secs: float, admit_per_sec: float = 0) -> None:
        self.limit_secs = limit_secs
        self.hold_secs = hold_secs
        self._overloaded_until = 0.0
        # A second's worth at once: an overload's first newcomers get in together.
        self._admission = (
            TokenBucket(max(1, round(admit_per_sec)), admit_per_sec) if admit_per_sec > 0 else None
        )
        # Work waiting for its turn (``admitted``), oldest first: at most one per open
        # connection, since a connection's requests are handled one at a time.
        self._waiting: deque[asyncio.Future[None]] = deque()

    def overloaded(self) -> bool:
        return time.monotonic() < self._overloaded_until

    def shed(self, kind: str) -> bool:
        """Whether to refuse a new piece of anonymous work of ``kind`` (counted), or
        admit it: always while the loop keeps up, at the admission rate while not."""
        if self._let_in_now(kind):
            return False
        metrics.OVERLOAD_REFUSALS.labels(kind).inc()
        return True

    async def admitted(self, kind: str, max_wait_secs: float) -> bool:
        """Wait for this piece of anonymous work's turn instead of refusing it: at once
        while the loop keeps up; while it does not, when the admission rate lets it in
        (after the work that waited longer) or the overload ends. False, counted as a
        refusal, when that takes longer than ``max_wait_secs``."""
        if not self.overloaded() or (not self._waiting and self._let_in_now(kind)):
            return True
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            async with asyncio.timeout(max_wait_secs):
                await turn
        except TimeoutError:
            metrics.OVERLOAD_REFUSALS.labels(kind).inc()
            return False
        metrics.OVERLOAD_ADMISSIONS.labels(kind).inc()
        return True

    def _let_in_now(self, kind: str) -> bool:
        """Whether work may start now: the loop keeps up, or an admission is left (counted)."""
        if not self.overloaded():
            return True
        if self._take_admission():
            metrics.OVERLOAD_ADMISSIONS.labels(kind).inc()
            return True
        return False

    def _take_admission(self) -> bool:
        return self._admission is not None and self._admission.take()

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
        self._let_waiting_in()

    def _let_waiting_in(self) -> None:
        """Waiting work, oldest first: once the overload is over, ``RELEASED_PER_PROBE``
        at a time; while it lasts, as many as the admission rate gives."""
        released = 0
        while self._waiting and released < RELEASED_PER_PROBE:
            if self._waiting[0].done():  # its wait timed out
                self._waiting.popleft()
                continue
            if self.overloaded() and not self._take_admission():
                return
            self._waiting.popleft().set_result(None)
            released += 1
