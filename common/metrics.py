"""Prometheus metrics of the push server, served by every node on ``/metrics``.

Counted once per batch on the fan-out path (one ``inc(n)`` per message, not per
delivery), so measuring costs nothing that shows in the benchmark.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

Child = TypeVar("Child")


class TallyChild:
    """A count in a plain int (``tally.value += 1``, ~30 ns) instead of a prometheus
    ``Counter.inc`` (~340 ns, it takes a lock); only the event loop's thread writes it.
    One label set's count of a ``TallyFamily``, and the value of a ``Tally``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Tally(TallyChild, Collector):
    """A counter without labels bumped once per delivery or message, which at thousands
    of subscribers per message would show in the fan-out with a lock. Exposed as a
    ``Counter`` is, less its ``_created``."""

    __slots__ = ("documentation", "name")

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__()
        self.name = name
        self.documentation = documentation
        REGISTRY.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class _LoopFamily(Collector, Generic[Child]):
    """A metric with labels written on the event loop's thread only: one child per
    label set, made on first use (``family.labels("publish")``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child


class TallyFamily(_LoopFamily[TallyChild]):
    """``Tally`` with labels, for counters bumped once per frame or publish on the
    event loop's thread only (``family.labels("publish").inc()``)."""

    def _new_child(self) -> TallyChild:
        return TallyChild()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogramChild:
    """One label set's buckets of a ``LoopHistogram``: not cumulative, as prometheus
    keeps them, so an observation bumps one."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: past every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bound at or above the value, as Histogram.observe picks it.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        total = 0.0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            buckets.append((str(floatToGoString(bound)), total))
        return buckets


class LoopHistogram(_LoopFamily[LoopHistogramChild]):
    """A histogram observed once per publish or message on the event loop's thread
    only: plain numbers and no lock (~0.2 µs an observation against ~0.8 µs for a
    prometheus ``Histogram``, which takes a lock and walks its buckets in Python).
    Exposed as a ``Histogram`` is (same buckets, ``le`` labels, ``_sum``, ``_count``),
    less its ``_created``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        super().__init__(name, documentation, labelnames, registry=registry)
        self._unlabelled = None if labelnames else self.labels()

    def _new_child(self) -> LoopHistogramChild:
        return LoopHistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        """For a histogram without labels."""
        assert self._unlabelled is not None, "a labelled histogram: observe a child"
        self._unlabelled.observe(value)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.cumulative(), child.sum)
        yield family


class _LoopAddend:
    """A prometheus child's value (a ``MutexValue``) plus what the event loop's thread
    added to it without the lock: /metrics reads their sum, so the series is the one
    it was, whichever thread counted."""

    __slots__ = ("added", "locked")

    def __init__(self, locked: Any) -> None:
        self.locked = locked
        self.added = 0.0

    def inc(self, amount: float) -> None:
        self.locked.inc(amount)

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.added = 0.0
        self.locked.set(value, timestamp)

    def get(self) -> float:
        return self.locked.get() + self.added

    def set_exemplar(self, exemplar: Any) -> None:
        self.locked.set_exemplar(exemplar)

    def get_exemplar(self) -> Any:
        return self.locked.get_exemplar()


def _with_loop_addend(value: Any) -> _LoopAddend:
    # Two writers of one child share its addend.
    return value if isinstance(value, _LoopAddend) else _LoopAddend(value)


class LoopCounterWriter:
    """Counts into a prometheus ``Counter`` child (one label set) from the event loop's
    thread without its lock (~40 ns against ~340 ns); other threads still count
    through the child. For counters of another library (django-prometheus') that a
    hot path bumps."""

    __slots__ = ("_value",)

    def __init__(self, child: Counter) -> None:
        # A thread counting meanwhile reaches the same MutexValue either way.
        self._value = child._value = _with_loop_addend(child._value)

    def inc(self, amount: float = 1) -> None:
        self._value.added += amount


class LoopHistogramWriter:
    """Observes into a prometheus ``Histogram`` child from the event loop's thread
    without its lock, and picks the bucket by bisection, not a walk in Python (~0.2 us
    against ~0.8 us for 30 buckets). Observed values are numbers, never NaN."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._bounds = tuple(child._upper_bounds)  # the last is +Inf
        # Replaced in the child's own list, which /metrics reads (in place: a thread
        # observing meanwhile reaches the same MutexValue either way).
        buckets = child._buckets
        buckets[:] = [_with_loop_addend(bucket) for bucket in buckets]
        self._buckets = list(buckets)
        self._sum = child._sum = _with_loop_addend(child._sum)

    def observe(self, value: float) -> None:
        # The first bound at or above the value, as Histogram.observe picks it.
        self._buckets[bisect.bisect_left(self._bounds, value)].added += 1
        self._sum.added += value


def loop_counter_writer(child: Counter) -> LoopCounterWriter | Counter:
    """A lock-free writer of ``child`` for the event loop's thread; the child itself in
    prometheus' multiprocess mode, whose values live in files."""
    return child if _multiprocess() else LoopCounterWriter(child)


def loop_histogram_writer(child: Histogram) -> LoopHistogramWriter | Histogram:
    """As ``loop_counter_writer``, for a histogram's child."""
    return child if _multiprocess() else LoopHistogramWriter(child)


def _multiprocess() -> bool:
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


CONNECTIONS_OPENED = Counter(
    "push_connections_opened_total", "WebSocket connections accepted", ["wire_format"]
)
CONNECTIONS_CLOSED = Counter(
    "push_connections_closed_total", "WebSocket connections closed", ["reason"]
)
CONNECTIONS_REFUSED = Counter(
    "push_connections_refused_total",
    "Connections refused at their start for a connection limit: the node's "
    "(PUSH_MAX_CONNECTIONS), a user's, an address's, an address's open HTTP connections "
    "(http_address), an address's unfinished request heads (unfinished_heads), or the "
    "server's sockets of every kind (open_files); and HTTP connections dropped for their "
    "address's unsent response bytes (response_bytes) or a request head not done in time "
    "(head_deadline)",
    ["limit"],
)


class _AddressHoldings(Collector):
    """What client addresses hold of the node's server-level bounds right now, each
    kind summed over every address: a count that never returns to zero once its
    clients are gone is one that an address was never given back (and that address
    would be refused or dropped for good)."""

    def __init__(self) -> None:
        self.counts: list[tuple[str, collections.Counter[str]]] = []
        REGISTRY.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "push_address_holdings",
            "What client addresses hold now, summed over them: open HTTP connections "
            "(http_connections), refused ones lingering (refused_connections), "
            "unfinished request heads (unfinished_heads), bytes of unfinished request "
            "bodies (unfinished_body_bytes) and of unsent responses "
            "(unsent_response_bytes)",
            labels=["kind"],
        )
        totals: dict[str, int] = {}
        for kind, counts in self.counts:
            totals[kind] = totals.get(kind, 0) + sum(counts.values())
        for kind, total in sorted(totals.items()):
            family.add_metric([kind], total)
        yield family


_ADDRESS_HOLDINGS = _AddressHoldings()


def address_holding(kind: str) -> collections.Counter[str]:
    """A per-address count of ``kind``, summed into ``push_address_holdings``."""
    counts: collections.Counter[str] = collections.Counter()
    _ADDRESS_HOLDINGS.counts.append((kind, counts))
    return counts


CONNECTIONS_ACTIVE = Gauge(
    "push_connections_active", "Open WebSocket connections on this node", ["wire_format"]
)
# Bumped on the event loop only, once per frame, message or publish: lock-free kinds.
FRAMES_RECEIVED = TallyFamily("push_frames_received", "Client requests received", ["type"])
ERRORS = Counter("push_errors_total", "Error replies sent to clients", ["code"])
MESSAGES_PUBLISHED = TallyFamily(
    "push_messages_published", "Messages stored and broadcast", ["transport"]
)
MESSAGES_FANNED_OUT = Tally("push_messages_fanned_out", "Messages fanned out by this node's hub")
DELIVERIES = Tally("push_deliveries", "Frames queued to subscribers")
SLOW_CONSUMER_DISCONNECTS = Counter(
    "push_slow_consumer_disconnects_total", "Connections closed 4002 for a full send queue"
)
DROPPED_FRAMES = Counter(
    "push_dropped_frames_total", "Oldest frames dropped on drop-oldest channels"
)
GAP_REPAIRS = Counter(
    "push_gap_repairs_total", "Times the hub read missing messages back from history"
)
RECENT_CACHE_READS = Counter(
    "push_recent_cache_reads_total",
    "Channel joins that read recent history from the Redis cache",
    ["result"],
)
RECENT_SEQ_BLOCKS = Counter(
    "push_recent_seq_blocks_total",
    "Seq blocks recent channels reserved in PostgreSQL: to renew a lease, or to start "
    "one (a new channel, or Redis lost it: subscribers see a jump in seq)",
    ["kind"],
)
HUB_CHANNELS = Gauge("push_hub_channels", "Channels with subscribers on this node")
SUBSCRIPTIONS = Gauge("push_subscriptions", "Subscriptions on this node")
PUBLISH_TO_DELIVERY = LoopHistogram(
    "push_publish_to_delivery_seconds",
    "Time from publish (message timestamp) to fan-out on this node",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DATABASE_CALL_SECONDS = Histogram(
    "push_database_call_seconds",
    "Database work per call, by function",
    ["call"],
    buckets=_CALL_BUCKETS,
)
# The event loop stops for every cyclic garbage collection: a long one delays every
# delivery of the node at once, which no per-request figure shows.
GC_PAUSE_SECONDS = Histogram(
    "push_gc_pause_seconds",
    "Cyclic garbage collections of the node process and how long each held it",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
LOOP_LAG_SECONDS = Histogram(
    "push_loop_lag_seconds",
    "How late the node's event loop ran a timer, probed every 25 ms (what every message "
    "waits on top of its own work)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
OVERLOAD_REFUSALS = Counter(
    "push_overload_refusals_total",
    "New anonymous streams, REST requests and new-channel subscriptions refused while "
    "the node was overloaded",
    ["kind"],
)
OVERLOAD_ADMISSIONS = Counter(
    "push_overload_admissions_total",
    "New anonymous work admitted while the node was overloaded (PUSH_OVERLOAD_ADMIT_PER_SEC)",
    ["kind"],
)
BROKER_CALL_SECONDS = Histogram(
    "push_broker_call_seconds",
    "The broker's Redis calls (join, leave, publish), by operation",
    ["operation"],
    buckets=_CALL_BUCKETS,
)
REQUEST_SECONDS = LoopHistogram(
    "push_request_seconds",
    "Time to handle one client request, by type",
    ["type"],
    buckets=_CALL_BUCKETS,
)
BROKER_ERRORS = Counter(
    "push_broker_errors_total",
    "The broker's failed Redis calls, and its reading connections that broke (receive)",
    ["operation"],
)
EVENTS_DROPPED = Counter(
    "push_events_dropped_total", "Lifecycle events dropped while Redis was unreachable"
)
EVENTS_PROCESSED = Counter(
    "push_events_processed_total",
    "Lifecycle events the event worker ran its handlers on, by outcome: handled, retry "
    "(failed, to be retried), dead (failed, dead-lettered), trimmed (dropped from the "
    "stream while waiting for a retry)",
    ["outcome"],
)
EVENT_HANDLE_SECONDS = Histogram(
    "push_event_handle_seconds",
    "Time the event worker took to run every handler (webhooks included) on one event",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
WEBHOOK_REQUESTS = Counter(
    "push_webhook_requests_total",
    "Webhook requests the event worker sent, by outcome: accepted (2xx), refused "
    "(another status) or error (no status: connection refused, timeout)",
    ["outcome"],
)
HISTORY_ROWS_READ = Counter(
    "push_history_rows_read_total", "Stored messages read from PostgreSQL (replays, REST)"
)
ADDRESS_BUDGET_REFUSALS = Counter(
    "push_address_budget_refusals_total",
    "Requests refused because their client address used up its budget on this node",
    ["budget"],
)
ADDRESS_BUDGET_ENTRIES = Gauge(
    "push_address_budget_entries", "Client addresses with a budget entry on this node"
)
ADDRESS_BUDGET_EVICTIONS = Counter(
    "push_address_budget_evictions_total",
    "Address budget entries dropped before they were idle, the table being full",
)
REPLAYS_ACTIVE = Gauge("push_replays_active", "Resumes reading history from PostgreSQL now")
REPLAYS_REFUSED = Counter(
    "push_replays_refused_total", "Resumes refused for lack of a replay slot", ["code"]
)
HUB_BUFFER_DROPS = Counter(
    "push_hub_buffer_drops_total",
    "Messages a bounded hub buffer let go of (read back from history instead)",
    ["buffer"],
)
REGISTRY_RECORDS_DROPPED = Counter(
    "push_registry_records_dropped_total",
    "Connection registry writes dropped while the database was unreachable",
)


DIRECT_WRITES = Tally(
    "push_direct_writes", "Frames written to sockets directly, past the server's send"
)
DIRECT_WRITE_FAILURES = Counter(
    "push_direct_write_failures_total",
    "Direct writes that raised: the frame went through the server's send (fallback) "
    "or the connection was closed 1011 (closed)",
    ["outcome"],
)
FAN_OUT_FAILURES = Counter(
    "push_fan_out_failures_total",
    "Subscribers whose delivery raised inside the fan-out loop (each is closed 1011)",
)
BROKER_OUTGOING_DROPPED = Counter(
    "push_broker_outgoing_dropped_total",
    "Committed messages not broadcast because the broker's outgoing queue was full "
    "(other nodes read them from history on their next sync)",
)
RECENT_CACHE_APPENDS_DROPPED = Counter(
    "push_recent_cache_appends_dropped_total",
    "Committed messages not appended to the recent-history cache (nor relayed by its "
    "append) because its queue was full while Redis was away (readers fall back to "
    "PostgreSQL; other nodes read them from history on their next sync)",
)
INBOUND_DIRECT_FRAMES = Tally(
    "push_inbound_direct_frames",
    "Data frames read off sockets directly, before the server's WebSocket parser",
)
INBOUND_PAUSES = Counter(
    "push_inbound_pauses_total",
    "Times a connection's socket stopped being read because its unhandled frames "
    "reached the inbound bound",
)
WRITE_BATCH_MESSAGES = Histogram(
    "push_write_batch_messages",
    "Messages per transaction of the write pipeline (group commit)",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
WRITE_BATCH_SECONDS = Histogram(
    "push_write_batch_seconds",
    "Time to write and commit one batch of the write pipeline",
    buckets=_CALL_BUCKETS,
)
WRITE_BATCHES_FAILED = Counter(
    "push_write_batches_failed_total",
    "Write pipeline batches that did not commit, by reason",
    ["reason"],
)
PUBLISHES_REFUSED = Counter(
    "push_publishes_refused_total",
    "Publishes refused before they were written, by reason",
    ["reason"],
)
REST_FAST_PUBLISHES = Tally(
    "push_rest_fast_publishes",
    "REST publish requests (single or batch) of a kept back-end token answered without "
    "Django's middleware and DRF",
)
