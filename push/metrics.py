"""Prometheus metrics of the push server, served by every node on ``/metrics``.

Counted once per batch on the fan-out path (one ``inc(n)`` per message, not per
delivery), so measuring costs nothing that shows in the benchmark.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS_OPENED = Counter(
    "push_connections_opened_total", "WebSocket connections accepted", ["wire_format"]
)
CONNECTIONS_CLOSED = Counter(
    "push_connections_closed_total", "WebSocket connections closed", ["reason"]
)
CONNECTIONS_ACTIVE = Gauge(
    "push_connections_active", "Open WebSocket connections on this node", ["wire_format"]
)
FRAMES_RECEIVED = Counter("push_frames_received_total", "Client requests received", ["type"])
ERRORS = Counter("push_errors_total", "Error replies sent to clients", ["code"])
MESSAGES_PUBLISHED = Counter(
    "push_messages_published_total", "Messages stored and broadcast", ["transport"]
)
MESSAGES_FANNED_OUT = Counter(
    "push_messages_fanned_out_total", "Messages fanned out by this node's hub"
)
DELIVERIES = Counter("push_deliveries_total", "Frames queued to subscribers")
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
PUBLISH_TO_DELIVERY = Histogram(
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
BROKER_CALL_SECONDS = Histogram(
    "push_broker_call_seconds",
    "Redis channel-layer calls, by operation",
    ["operation"],
    buckets=_CALL_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "push_request_seconds",
    "Time to handle one client request, by type",
    ["type"],
    buckets=_CALL_BUCKETS,
)
BROKER_ERRORS = Counter("push_broker_errors_total", "Failed channel-layer calls", ["operation"])
EVENTS_DROPPED = Counter(
    "push_events_dropped_total", "Lifecycle events dropped while Redis was unreachable"
)
EVENTS_PROCESSED = Counter(
    "push_events_processed_total", "Lifecycle events handled by workers", ["outcome"]
)
