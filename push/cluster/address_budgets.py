"""Per-address budgets on this node: what one client address may ask of it per second,
shared by every connection and request from that address (docs/security.md, "Per
address").

The per-connection rate bounds one connection; an attacker opens more. Measured on
one node (tests/abuse/costs.py), what costs the node most per request is a handshake
(~2 ms of CPU, more with a subscribe and its replay), a subscription to a new channel
(~4 ms), a REST request (4-7 ms, ~4 ms even when the throttle answers 429) and frames
the decoders must work through; so each of these has a token bucket per address:
WebSocket and SSE handshakes, frames across all of the address's connections (on top
of each connection's own bucket), subscriptions started, and REST requests. Counts do
not bound what a history page costs, up to its byte budget (4 MiB by default): the
bytes of history an address reads, in REST pages and in the pages of resumes (those
from the node's memory cost no read and are not counted), have a bucket of their own. Service
tokens are back-ends and are never held to them.

The table is bounded: an entry idle for longer than the slowest bucket takes to fill
again is dropped (it would start full anyway, so nothing is lost), and past
``max_entries`` the least recently used entry without an open connection is dropped
as well (its address starts afresh: under a flood of made-up addresses the budgets
fail open, never the node's memory). An entry an open connection holds stays, so the
table holds at most ``max_entries`` plus the addresses with open connections.
IPv6 addresses are budgeted per /64, the block one host (or one customer) gets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from common import metrics
from common.addresses import address_block

# How many entries held by open connections one look-up moves out of the way when it
# sweeps the table's oldest end; bounded so that a look-up stays O(1).
SWEEP_SKIPS = 2


class TokenBucket:
    """``burst`` tokens at once, refilled at ``rate_per_sec``; the contract's per-
    connection default is a burst of 100 and 50 per second sustained."""

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
        if self.allowed():
            self.tokens -= 1.0
            return True
        return False

    def allowed(self) -> bool:
        """Whether a token is there (not in debt), without taking it."""
        self.charge(0)
        return self.tokens >= 1.0

    def charge(self, amount: int) -> None:
        """Take ``amount`` tokens, whether or not they are there."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_sec)
        self.updated = now
        self.tokens -= amount

    def wait_secs(self) -> float:
        """How long until a token is there again (0 when one is)."""
        missing = 1.0 - self.tokens - (self.clock() - self.updated) * self.rate_per_sec
        return max(0.0, missing / self.rate_per_sec)


class ByteBucket(TokenBucket):
    """A budget of bytes read. A page's size is known only once it is read, so what is
    read is charged after: the bucket may go below zero, and nothing more is allowed
    until it has refilled past it.

    A REST read also reserves its most when it starts (``reserve``) and gives the
    reservation back when it settles what it read (``settle``): the reads in flight at
    once are bounded by what the budget holds, not by how many the address sends.
    ``tokens`` is what is left after what was read; what is reserved is apart."""

    __slots__ = ("reserved",)

    def __init__(
        self, burst: int, rate_per_sec: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(burst, rate_per_sec, clock)
        self.reserved = 0

    def can_reserve(self) -> bool:
        """Room for another read beside the reservations of those in flight."""
        self.charge(0)
        return self.tokens - self.reserved >= 1.0

    def reserve(self, nbytes: int) -> None:
        self.reserved += nbytes

    def settle(self, reserved: int, nbytes: int) -> None:
        """A read that reserved ``reserved`` read ``nbytes``."""
        self.reserved = max(0, self.reserved - reserved)
        self.charge(nbytes)


class NoLimit:
    """The bucket of a budget that is off (rate 0), or of a service token."""

    __slots__ = ()

    def take(self) -> bool:
        return True

    def allowed(self) -> bool:
        return True

    def can_reserve(self) -> bool:
        return True

    def charge(self, nbytes: int) -> None:
        pass

    def reserve(self, nbytes: int) -> None:
        pass

    def settle(self, reserved: int, nbytes: int) -> None:
        pass

    def wait_secs(self) -> float:
        return 0.0


NO_LIMIT = NoLimit()
Bucket = TokenBucket | NoLimit
Bytes = ByteBucket | NoLimit


# Labelled once: a flood is refused on these paths.
REFUSED_HANDSHAKES = metrics.ADDRESS_BUDGET_REFUSALS.labels("handshakes")
REFUSED_FRAMES = metrics.ADDRESS_BUDGET_REFUSALS.labels("frames")
REFUSED_SUBSCRIBES = metrics.ADDRESS_BUDGET_REFUSALS.labels("subscribes")
REFUSED_REST = metrics.ADDRESS_BUDGET_REFUSALS.labels("rest")
REFUSED_HISTORY = metrics.ADDRESS_BUDGET_REFUSALS.labels("history_bytes")
REFUSED_FRAME_BYTES = metrics.ADDRESS_BUDGET_REFUSALS.labels("frame_bytes")
# Frames up to this size are bounded by the frame count budgets alone (what decoding
# one costs is small); larger ones are charged their size too (``large_frame_allowed``).
UNCHARGED_FRAME_BYTES = 8192


class Budget:
    """One kind of budget: ``burst`` at once and ``per_sec`` after; 0 per second is
    none."""

    __slots__ = ("burst", "per_sec")

    def __init__(self, burst: int, per_sec: float) -> None:
        self.burst = burst
        self.per_sec = per_sec

    def bucket(self, clock: Callable[[], float]) -> Bucket:
        return TokenBucket(self.burst, self.per_sec, clock) if self.per_sec > 0 else NO_LIMIT

    def byte_bucket(self, clock: Callable[[], float]) -> Bytes:
        return ByteBucket(self.burst, self.per_sec, clock) if self.per_sec > 0 else NO_LIMIT

    @property
    def refill_secs(self) -> float:
        return self.burst / self.per_sec if self.per_sec > 0 else 0.0


class AddressBudget:
    """The buckets of one client address (or IPv6 /64) on this node. A connection holds
    its address's entry, so a frame takes from it without a look-up."""

    __slots__ = (
        "connections",
        "frame_bytes",
        "frames",
        "handshakes",
        "history_bytes",
        "history_settle",
        "key",
        "last_used",
        "rest",
        "subscribes",
    )

    def __init__(self, key: str, budgets: AddressBudgets) -> None:
        clock = budgets.clock
        self.key = key
        self.handshakes = budgets.handshakes.bucket(clock)
        self.frames = budgets.frames.bucket(clock)
        self.subscribes = budgets.subscribes.bucket(clock)
        self.rest = budgets.rest.bucket(clock)
        self.history_bytes = budgets.history_bytes.byte_bucket(clock)
        self.frame_bytes = budgets.frame_bytes.byte_bucket(clock)
        # Set when a REST read settles: the reads waiting for room look again.
        self.history_settle: asyncio.Event | None = None
        # Open connections holding this entry: it is not dropped while they last.
        self.connections = 0
        self.last_used = clock()

    def next_settle(self) -> asyncio.Event:
        if self.history_settle is None:
            self.history_settle = asyncio.Event()
        return self.history_settle

    def settled(self) -> None:
        if self.history_settle is not None:
            self.history_settle.set()
            self.history_settle = None


def large_frame_allowed(entry: AddressBudget | None, nbytes: int) -> bool:
    """Charge a frame of ``nbytes`` (over ``UNCHARGED_FRAME_BYTES``) to the budget a
    connection holds, before it is decoded: refused while the address is in debt. A
    frame's cost is mostly its decoding, which grows with its size (a MessagePack
    frame of 1 MiB of one-byte empty maps took ~90 ms), and the frame counts alone let
    one connection send 50 such frames a second."""
    if entry is None:
        return True
    budget = entry.frame_bytes
    if not budget.allowed():
        REFUSED_FRAME_BYTES.inc()
        return False
    budget.charge(nbytes)
    return True


def subscription_allowed(entry: AddressBudget | None) -> bool:
    """Take a subscription from the budget a connection holds (None: it holds none)."""
    if entry is None or entry.subscribes.take():
        return True
    REFUSED_SUBSCRIBES.inc()
    return False


class AddressBudgets:
    """This node's table of per-address budgets (``PUSH_ADDRESS_*``)."""

    def __init__(
        self,
        *,
        handshakes: Budget,
        frames: Budget,
        subscribes: Budget,
        rest: Budget,
        history_bytes: Budget,
        frame_bytes: Budget,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handshakes = handshakes
        self.frames = frames
        self.subscribes = subscribes
        self.rest = rest
        self.history_bytes = history_bytes
        self.frame_bytes = frame_bytes
        self.max_entries = max_entries
        self.clock = clock
        # Past this long unused, every bucket of an entry is full again. (A byte bucket
        # left below zero by its last page is a page short of full then: dropping it
        # forgives at most that, once the address was quiet for the burst's time.)
        self.idle_secs = max(
            b.refill_secs
            for b in (handshakes, frames, subscribes, rest, history_bytes, frame_bytes)
        )
        # Oldest use first: a look-up moves its entry to the end.
        self._entries: dict[str, AddressBudget] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, address: str | None) -> AddressBudget | None:
        """The budget of ``address`` (None when there is no address to budget)."""
        if not address:
            return None
        key = address_block(address)
        entry = self._entries.pop(key, None)
        now = self.clock()
        if entry is None:
            entry = AddressBudget(key, self)
        entry.last_used = now
        self._entries[key] = entry
        self._sweep(now, entry)
        metrics.ADDRESS_BUDGET_ENTRIES.set(len(self._entries))
        return entry

    def handshake_allowed(self, address: str | None) -> bool:
        """Take a handshake (WebSocket or SSE) from ``address``'s budget."""
        entry = self.get(address)
        if entry is None or entry.handshakes.take():
            return True
        REFUSED_HANDSHAKES.inc()
        return False

    def rest_refused(self, address: str | None, *, take: bool = True) -> float | None:
        """Take a REST request from ``address``'s budget (with ``take`` false, only look
        whether one is left): None when it may go on, else the seconds until it may
        (``Retry-After``)."""
        entry = self.get(address)
        if entry is None or (entry.rest.take() if take else entry.rest.allowed()):
            return None
        REFUSED_REST.inc()
        return entry.rest.wait_secs()

    def rest_failed(self, address: str | None) -> None:
        """Charge a request that is budgeted only when it fails (``rest_refused`` with
        ``take`` false let it in) to ``address``'s REST budget."""
        entry = self.get(address)
        if entry is not None:
            entry.rest.charge(1)

    async def history_admitted(
        self, address: str | None, reserve: int, patience: float
    ) -> float | None:
        """Let a REST read of history in: None when it may go on (``reserve`` bytes, the
        most it may read, are held for it until ``history_read`` settles), else the
        seconds until it may (``Retry-After``).

        An address in debt from what it read is refused. One whose budget only the reads
        it has in flight hold waits, up to ``patience`` seconds, for one of them to
        finish: a burst of small reads is served a few at a time instead of refused,
        and what reads in flight together may take stays bounded."""
        entry = self.get(address)
        if entry is None:
            return None
        bytes_read = entry.history_bytes
        try:
            async with asyncio.timeout(patience):
                while bytes_read.allowed() and not bytes_read.can_reserve():
                    await entry.next_settle().wait()
        except TimeoutError:
            pass
        if bytes_read.allowed() and bytes_read.can_reserve():
            bytes_read.reserve(reserve)
            return None
        REFUSED_HISTORY.inc()
        return bytes_read.wait_secs() or patience

    def history_read(self, address: str | None, nbytes: int, reserved: int = 0) -> None:
        """Charge ``nbytes`` read by a read that reserved ``reserved`` (giving that back),
        and wake the reads waiting for room."""
        entry = self.get(address)
        if entry is not None:
            entry.history_bytes.settle(reserved, nbytes)
            entry.settled()

    def acquire(self, address: str | None) -> AddressBudget | None:
        """The budget of ``address``, held by a connection until ``release``."""
        entry = self.get(address)
        if entry is not None:
            entry.connections += 1
        return entry

    def release(self, entry: AddressBudget) -> None:
        entry.connections -= 1
        entry.last_used = self.clock()
        if entry.connections <= 0 and self._entries.get(entry.key) is entry:
            # Its idle time counts from now: to the end, where recent entries are.
            del self._entries[entry.key]
            self._entries[entry.key] = entry

    def _sweep(self, now: float, current: AddressBudget) -> None:
        """Drop entries from the oldest end while they are idle, or while the table is
        over its size; an entry held by a connection is moved to the end instead. The
        ``current`` one, just looked up, stays."""
        entries = self._entries
        skips = SWEEP_SKIPS
        while entries:
            key = next(iter(entries))
            oldest = entries[key]
            if oldest is current:
                return
            over = len(entries) > self.max_entries
            if not over and now - oldest.last_used < self.idle_secs:
                return
            if oldest.connections > 0:
                if skips == 0:
                    return
                skips -= 1
                del entries[key]
                entries[key] = oldest
                continue
            del entries[key]
            if over:
                metrics.ADDRESS_BUDGET_EVICTIONS.inc()
