"""The push server's options: ``settings.PUSH`` behind one accessor with defaults
(DRF's ``api_settings`` habit), so nothing else indexes the settings dict.

``PushSettings`` is the one home of every option's default, its environment variable,
how that variable is read and what the option means. ``realtime_project.settings``
passes only the options whose variable is set, and docs/configuration.md is printed
from here (``python -m realtime_project.configuration``)."""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from django.conf import settings

# A node's liveness key lasts three announcements (push.cluster.directory); a node that missed
# fewer than that may only be slow.
ANNOUNCES_BEFORE_DEAD = 3
# Pusher's encrypted channels use NaCl secretbox keys: 32 bytes.
ENCRYPTION_MASTER_KEY_BYTES = 32


class ImproperlyConfiguredEnv(ValueError):
    """Raised when an environment variable is present but cannot be read as its type, or
    its value does not fit with another's."""


class EnvType(enum.Enum):
    """How an option's environment variable is read (realtime_project.env); the value is
    how the configuration reference names the type."""

    INT = "integer > 0"
    COUNT = "integer >= 0"
    NUMBER = "number > 0"
    BOOL = "boolean"
    LIST = "comma-separated list"
    # Channel-name patterns (``ticker:*``), each of characters some channel name holds.
    PATTERNS = "comma-separated channel patterns"
    URLS = "comma-separated http(s) URLs"
    # 0 for none.
    PORT = "port or 0"
    DURATION = "duration"
    # A limit that may be turned off: ``-`` (or ``0``) reads as 0, no limit.
    DURATION_OR_NONE = "duration or `-`"
    TEXT = "text"
    # A throttle rate as DRF reads it: ``600/min``.
    RATE = "rate"
    RETENTION_RULES = "retention rules"
    HISTORY_MODES = "history modes"


def option(default: Any, env_type: EnvType, meaning: str, *, variable: str = "") -> Any:
    """One option of ``PushSettings``: its default, how its environment variable
    (``PUSH_<name>`` unless ``variable`` names another) is read, and its meaning in one
    line of the configuration reference."""
    metadata = {"env_type": env_type, "meaning": meaning, "variable": variable}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PushSettings:
    # Frames and send queues.
    MAX_FRAME_BYTES: int = option(
        1_048_576,
        EnvType.INT,
        "largest accepted frame (and REST body); a frame of exactly this size is accepted",
    )
    HEARTBEAT_INTERVAL_SECS: int = option(
        25, EnvType.INT, "heartbeat interval announced to clients"
    )
    SEND_QUEUE_MAX_FRAMES: int = option(
        1000, EnvType.INT, "frames queued per connection before it counts as a slow consumer"
    )
    SEND_QUEUE_MAX_BYTES: int = option(
        8 * 1_048_576,
        EnvType.INT,
        "bytes queued per connection before it counts as a slow consumer",
    )
    DROP_OLDEST_CHANNELS: list[str] = option(
        [],
        EnvType.PATTERNS,
        "channel-name patterns (`ticker:*`) whose slow readers lose the oldest queued "
        "message instead of the connection",
    )
    # History reads.
    HISTORY_PAGE_DEFAULT: int = option(
        100, EnvType.INT, "REST history page size when `limit` is not given"
    )
    HISTORY_PAGE_MAX: int = option(1000, EnvType.INT, "largest `limit` REST history accepts")
    HISTORY_PAGE_MAX_BYTES: int = option(
        4 * 1_048_576,
        EnvType.INT,
        "a REST history page also stops at this much message data (always at least one "
        "message; `next` then points on)",
    )
    REPLAY_BATCH_MAX_BYTES: int = option(
        4 * 1_048_576,
        EnvType.INT,
        "a resume's (or gap repair's) history read stops at this much message data (and at "
        "500 messages, and at half the client's send queue)",
    )
    MAX_REPLAYS_PER_NODE: int = option(
        64,
        EnvType.COUNT,
        "resumes reading history from PostgreSQL at once on this node (0: no bound); a "
        "resume the node's recent messages serve needs no slot",
    )
    MAX_REPLAYS_PER_IP: int = option(
        4,
        EnvType.COUNT,
        "resumes reading history from PostgreSQL at once per client address (IPv6: per /64; "
        "0: no bound)",
    )
    REPLAY_SLOT_WAIT_SECS: float = option(
        5.0,
        EnvType.NUMBER,
        "how long a resume over those bounds waits for a slot before it is refused: "
        "`RATE_LIMITED` when its address holds its share, `UNAVAILABLE` when the node is full",
    )
    PENDING_MAX_BYTES: int = option(
        4 * 1_048_576,
        EnvType.INT,
        "message data held per channel for reordering (with 1000 messages), and per resume "
        "for the live messages that arrive while it reads; past it they are read back from "
        "history",
    )
    DELTA_MAX_BYTES: int = option(
        32 * 1024,
        EnvType.INT,
        "delta subscribers get a message in full, without a delta computed, when its data "
        "or the previous message's is larger than this as JSON text (bytes): a fossil delta "
        "of data that repeats little costs about 1 ms of the node's CPU per KiB",
    )
    GAP_WAIT_SECS: float = option(
        0.2,
        EnvType.NUMBER,
        "how long a node waits for an out-of-order message before reading it from history",
    )
    SYNC_INTERVAL_SECS: float = option(
        1.0,
        EnvType.NUMBER,
        "how often a node compares its channels with the database to catch lost broadcasts",
    )
    # The connection registry.
    REGISTRY_FLUSH_SECS: float = option(
        1.0,
        EnvType.NUMBER,
        "how often connection opens, closes and subscription changes are written to the database",
    )
    REGISTRY_HEARTBEAT_SECS: float = option(
        10.0,
        EnvType.NUMBER,
        "how often the connections that sent anything since the last time get their "
        "registry row's `last_heartbeat` stamped (one UPDATE)",
    )
    REGISTRY_CLOSED_RETENTION_SECS: int = option(
        7 * 86_400,
        EnvType.DURATION,
        "closed connections' registry rows are deleted this long after the close, by "
        "`trim_history`",
        variable="PUSH_REGISTRY_CLOSED_RETENTION",
    )
    REGISTRY_MAX_BUFFERED: int = option(
        200_000,
        EnvType.INT,
        "registry records a node holds while the database is unreachable; past it they are "
        "dropped (`push_registry_records_dropped_total`) and the live rows rewritten once "
        "it is back",
    )
    GC_GEN0_THRESHOLD: int = option(
        20_000, EnvType.INT, "Python's gen-0 garbage collection threshold (700 by default)"
    )
    STORAGE_RELAY: bool = option(
        True,
        EnvType.BOOL,
        "send committed messages to the other nodes from the Redis scripts that store "
        "them (a recent-only channel's numbering, the recent-history cache's append); "
        "off: through the broker, as during a rolling upgrade from a version that "
        "cannot read them",
    )
    REST_FAST_PUBLISH: bool = option(
        True,
        EnvType.BOOL,
        "answer a kept service token's plain REST publishes (single and batch) without "
        "Django's middleware and DRF (the same answer, a fraction of the CPU)",
    )
    GC_FREEZE: bool = option(
        True, EnvType.BOOL, "move start-up objects out of the garbage collector's reach"
    )
    IDEMPOTENCY_WINDOW_SECS: int = option(
        86_400,
        EnvType.DURATION,
        "how long a REST `Idempotency-Key` is remembered",
        variable="PUSH_IDEMPOTENCY_WINDOW",
    )
    # The write pipeline (group commit, push.storage.write_pipeline).
    WRITE_BATCH_MAX_MESSAGES: int = option(
        1000,
        EnvType.INT,
        "the most messages one transaction of the write pipeline holds; a larger batch "
        "request is written alone",
    )
    WRITE_BATCH_MAX_BYTES: int = option(
        4 * 1_048_576,
        EnvType.INT,
        "the most bytes of message data one transaction of the write pipeline holds",
    )
    WRITE_PREPARED: bool = option(
        True,
        EnvType.BOOL,
        "prepare the write pipeline's statements once per connection (PostgreSQL then "
        "parses and plans them once, not once per batch); turn off behind a "
        "transaction-pooling proxy that does not keep prepared statements (PgBouncer "
        "before 1.21, or without `max_prepared_statements`)",
    )
    WRITE_QUEUE_MAX_MESSAGES: int = option(
        20_000,
        EnvType.INT,
        "publishes a node holds waiting to be written (to PostgreSQL, or to Redis for "
        "recent-only channels, each bounded apart); past it, publishes are answered "
        "`UNAVAILABLE` (overloaded)",
    )
    WRITE_QUEUE_MAX_BYTES: int = option(
        64 * 1_048_576,
        EnvType.INT,
        "bytes of publishes a node holds waiting to be written; past it, publishes are "
        "answered `UNAVAILABLE`",
    )
    WRITE_CONNECT_TIMEOUT_SECS: float = option(
        3.0,
        EnvType.NUMBER,
        "how long the write pipeline may take to connect to PostgreSQL before its "
        "publishers are answered `UNAVAILABLE`",
    )
    WRITE_TIMEOUT_SECS: float = option(
        10.0,
        EnvType.NUMBER,
        "how long a batch may take to commit before its publishers are answered `UNAVAILABLE`",
    )
    # Recent messages: in each node's memory, and the Redis cache nodes start from.
    RECENT_PER_CHANNEL: int = option(
        256,
        EnvType.INT,
        "recent messages each node keeps per channel, so resumes within them read no database",
    )
    RECENT_MAX_BYTES: int = option(
        1_048_576,
        EnvType.INT,
        "message data of those recent messages per channel; the oldest go first past it",
    )
    RECENT_CACHE_SIZE: int = option(
        100,
        EnvType.COUNT,
        "recent messages per channel in the Redis cache a node reads when it starts serving "
        "a channel (0: off)",
    )
    RECENT_CACHE_MAX_BYTES: int = option(
        1_048_576,
        EnvType.INT,
        "about this much message data per channel in the Redis cache, and at most this much "
        "read from it",
    )
    RECENT_CACHE_TTL_SECS: int = option(
        3600,
        EnvType.DURATION,
        "how long a channel's cached messages outlive its last publish (up to a 64th "
        "more: a node renews a stream's expiry at most that often)",
        variable="PUSH_RECENT_CACHE_TTL",
    )
    # Retention and history modes.
    RETENTION_MAX_MESSAGES: int = option(
        10_000, EnvType.COUNT, "messages kept per channel by default (0: no count limit)"
    )
    RETENTION_MAX_AGE_SECS: int = option(
        7 * 86_400,
        EnvType.DURATION_OR_NONE,
        "age after which messages are trimmed by default (`-`: no age limit)",
        variable="PUSH_RETENTION_MAX_AGE",
    )
    # (channel-name pattern, max messages or None, max age in seconds or None)
    RETENTION_RULES: list[tuple[str, int | None, int | None]] = option(
        [],
        EnvType.RETENTION_RULES,
        "per channel-name pattern, max messages and max age (`-` for no limit), the first "
        "match wins: `ticker:*=1000/-;chat:*=-/30d`",
    )
    # (channel-name pattern, "durable" or "recent")
    HISTORY_MODES: list[tuple[str, str]] = option(
        [],
        EnvType.HISTORY_MODES,
        "where a channel's history lives, the first match wins (`durable` otherwise): "
        "`ticker:*=recent;ticker:audit=durable`; recent channels need `REDIS_URL`",
    )
    RECENT_WINDOW_MESSAGES: int = option(
        100,
        EnvType.INT,
        "messages a recent channel's window holds in Redis (what resume and REST history "
        "can serve)",
    )
    RECENT_WINDOW_SECS: int = option(
        60,
        EnvType.DURATION,
        "age after which a recent channel's messages are no longer served; the window "
        "expires this long (up to a sixteenth more) after the channel's last publish",
    )
    RECENT_WINDOW_BYTES: int = option(
        1_048_576,
        EnvType.INT,
        "bytes of messages a recent channel's window holds (the newest message is kept "
        "whatever its size)",
    )
    RECENT_SEQ_BLOCK: int = option(
        1000,
        EnvType.INT,
        "seqs a recent channel reserves in PostgreSQL at a time (one write per block); a "
        "Redis restart makes the seq jump by up to this",
    )
    # Who may do what.
    ANONYMOUS_SUBSCRIBE: bool = option(
        True,
        EnvType.BOOL,
        "anonymous clients may subscribe to public channels (they never publish)",
    )
    USERS_PUBLISH: bool = option(
        True,
        EnvType.BOOL,
        "signed-in users may publish to public channels without a grant (off: only grants, "
        "staff and scoped service tokens publish)",
    )
    SUBSCRIPTION_TOKEN_SECRET: str | None = option(
        None,
        EnvType.TEXT,
        "HMAC secret of signed subscription tokens, shared with your back-end; unset, a key "
        "derived from `SECRET_KEY` (`manage.py push_secret subscription-token` prints it)",
    )
    SUBSCRIPTION_TOKEN_MAX_TTL_SECS: int = option(
        3600,
        EnvType.INT,
        "the longest a signed subscription token may live (`exp - iat`, and `exp - now`); "
        "a longer one is `FORBIDDEN`",
    )
    # Client addresses and limits.
    TRUSTED_PROXIES: int = option(
        0,
        EnvType.COUNT,
        "proxies in front of the nodes whose `X-Forwarded-For` entries are believed: 0 takes "
        "the socket peer as the client (`runnode --proxy-headers` means at least 1)",
    )
    AUTH_FAILURES_PER_MIN: int = option(
        30,
        EnvType.COUNT,
        "failed authentications per client address and minute (0: no limit); past it that "
        "address's credentials go unchecked for the rest of the minute (REST 429, WebSocket "
        "1013)",
    )
    RATE_BURST: int = option(
        100,
        EnvType.INT,
        "per-connection token bucket size for the frames of users and anonymous clients",
    )
    RATE_PER_SEC: float = option(
        50.0, EnvType.NUMBER, "that bucket's refill, frames per second (`RATE_LIMITED` past it)"
    )
    RATE_LIMIT_CLOSE_AFTER: int = option(
        200, EnvType.INT, "rate-limited frames after which the connection is closed 1008"
    )
    # A service token is a back-end publishing for many users, not held to the client
    # frame rate above.
    SERVICE_RATE_BURST: int = option(
        1000, EnvType.INT, "a service token's WebSocket frame bucket size"
    )
    SERVICE_RATE_PER_SEC: int = option(
        0, EnvType.COUNT, "a service token's frames per second on a WebSocket (0: unbounded)"
    )
    # What one client address may ask of a node per second, whatever it spreads it over
    # (push.cluster.address_budgets); service tokens are not held to them. Measured per
    # request on one node (tests/abuse/costs.py): a handshake ~2 ms of CPU, a
    # subscription to a new channel ~4 ms, a REST request 4-7 ms, a small frame
    # 0.1-0.5 ms. The defaults leave room for a few hundred busy users behind one NAT
    # address (docs/security.md, "Per address"), and hold one address to about half a
    # core even so.
    ADDRESS_HANDSHAKE_BURST: int = option(
        100,
        EnvType.INT,
        "WebSocket and SSE handshakes one client address may make at once on a node (a "
        "wave of reconnects after a restart); past its budget a WebSocket is closed 1013 "
        "and SSE answered 429",
    )
    ADDRESS_HANDSHAKE_PER_SEC: int = option(
        20,
        EnvType.COUNT,
        "that budget's refill, handshakes per second (0: no budget): 600 users behind one "
        "address opening a page a minute use half",
    )
    ADDRESS_FRAME_BURST: int = option(
        2000,
        EnvType.INT,
        "frames one client address may send at once across all its connections to a node, "
        "on top of each connection's own bucket (20 connections' bursts)",
    )
    ADDRESS_FRAME_PER_SEC: int = option(
        200,
        EnvType.COUNT,
        "that budget's refill, frames per second (0: no budget; `RATE_LIMITED` past it, as "
        "for a connection): 600 users' heartbeats are 24 a second",
    )
    ADDRESS_SUBSCRIBE_BURST: int = option(
        1000,
        EnvType.INT,
        "subscriptions one client address may start at once on a node, over WebSocket, "
        "Pusher and SSE (one connection's whole subscription limit)",
    )
    ADDRESS_SUBSCRIBE_PER_SEC: int = option(
        50,
        EnvType.COUNT,
        "that budget's refill, subscriptions per second (0: no budget; `RATE_LIMITED` past "
        "it): 600 users opening a page of 5 channels a minute",
    )
    ADDRESS_REST_BURST: int = option(
        100,
        EnvType.INT,
        "REST requests one client address may make at once to a node, signed in or not "
        "(besides each credential's own throttle)",
    )
    ADDRESS_REST_PER_SEC: int = option(
        20,
        EnvType.COUNT,
        "that budget's refill, requests per second (0: no budget; 429 `RATE_LIMITED` with "
        "`Retry-After` past it, answered before the request reaches Django)",
    )
    ADDRESS_HISTORY_BURST_BYTES: int = option(
        16 * 1_048_576,
        EnvType.INT,
        "bytes of message data one client address may read from a node's history at "
        "once, signed in or not: REST pages and the pages of resumes (four full REST "
        "pages)",
    )
    ADDRESS_HISTORY_BYTES_PER_SEC: int = option(
        1_048_576,
        EnvType.COUNT,
        "that budget's refill, bytes per second (0: no budget; a REST read reserves one "
        "message at its largest when let in and a page is charged once read; past the "
        "budget, REST history reads are answered 429 `RATE_LIMITED` with `Retry-After` "
        "and resumes wait before their next page)",
    )
    ADDRESS_FRAME_BURST_BYTES: int = option(
        8 * 1_048_576,
        EnvType.INT,
        "bytes of WebSocket frames over 8 KiB one client address may send to a node at "
        "once, across all its connections, signed in or not (eight frames of the largest "
        "size): frames are charged by size before they are decoded, since decoding a "
        "large frame of many tiny values costs 100 times a small frame",
    )
    ADDRESS_FRAME_BYTES_PER_SEC: int = option(
        1_048_576,
        EnvType.COUNT,
        "that budget's refill, bytes per second (0: no budget; `RATE_LIMITED` past it, "
        "without the frame's `id`, as for a connection over its frame rate)",
    )
    # 25 ms: under the abuse suite's attack the loop's lag stays under 10 ms between
    # bursts and goes past 30 ms in them (docs/operations.md).
    OVERLOAD_LAG_MS: int = option(
        25,
        EnvType.COUNT,
        "event-loop lag, in ms, past which the node counts as overloaded: for "
        "`PUSH_OVERLOAD_HOLD_SECS` after it, new anonymous WebSocket handshakes, SSE "
        "handshakes and REST requests and anonymous subscriptions to channels the node "
        "does not carry yet are admitted at `PUSH_OVERLOAD_ADMIT_PER_SEC` and the rest "
        "refused (1013, 503 `UNAVAILABLE` with `Retry-After`, `RATE_LIMITED`), so open "
        "connections keep their latency (0: off)",
    )
    OVERLOAD_HOLD_SECS: float = option(
        1.0,
        EnvType.NUMBER,
        "how long the node keeps refusing new anonymous work after its event loop lagged "
        "past `PUSH_OVERLOAD_LAG_MS`",
    )
    OVERLOAD_ADMIT_PER_SEC: int = option(
        10,
        EnvType.COUNT,
        "new anonymous streams, REST requests and new-channel subscriptions a node still "
        "admits per second, all clients together, while overloaded (0: none): a crowd "
        "of honest newcomers gets in at this rate however long the overload lasts",
    )
    ADDRESS_BUDGETS_MAX: int = option(
        100_000,
        EnvType.INT,
        "client addresses a node keeps budgets for; past it the least recently seen one "
        "without an open connection starts afresh (about 1 KB each)",
    )
    MAX_SUBSCRIPTIONS_PER_CONNECTION: int = option(
        1000, EnvType.INT, "subscriptions one connection may hold (`FORBIDDEN` past it)"
    )
    MAX_CONNECTIONS: int = option(
        0,
        EnvType.COUNT,
        "connections (WebSocket, SSE, Pusher) one node holds at once (close 1013, an SSE "
        "stream an error, past it); 0: derived from the open-file limit (raised to its "
        "hard limit at start), keeping a tenth of it, at least 256, for the node's own "
        "database, Redis and HTTP sockets",
    )
    MAX_CONNECTIONS_PER_USER: int = option(
        100,
        EnvType.COUNT,
        "connections per user or service token on one node (close 1013 past it; 0: no limit)",
    )
    MAX_CONNECTIONS_PER_IP: int = option(
        0,
        EnvType.COUNT,
        "connections per client address on one node (0: no limit); behind a proxy, set "
        "`PUSH_TRUSTED_PROXIES`",
    )
    MAX_ANONYMOUS_CONNECTIONS_PER_IP: int = option(
        1000,
        EnvType.COUNT,
        "anonymous connections per client address (an IPv6 /64) on one node (close 1013 past "
        "it; 0: no limit): they cost a client nothing to open, where a user's or a service "
        "token's count against `PUSH_MAX_CONNECTIONS_PER_USER`; behind a proxy, set "
        "`PUSH_TRUSTED_PROXIES`",
    )
    MAX_HTTP_CONNECTIONS_PER_IP: int = option(
        1000,
        EnvType.COUNT,
        "open HTTP connections (keep-alive, idle or not, and SSE streams) per client "
        "address (an IPv6 /64) on one uvicorn or daphne node, counted from the accept to "
        "the close or a WebSocket upgrade: past it a new connection is answered 429 "
        "`RATE_LIMITED` with `Connection: close` at once and closed 2 s later (0: no "
        "limit); off behind a trusted proxy (`PUSH_TRUSTED_PROXIES`), whose address every "
        "connection has",
    )
    REVOCATION_CHECK_SECS: float = option(
        5.0,
        EnvType.NUMBER,
        "how often live connections' credentials and grants are checked again: a revoked "
        "credential closes 1008, a removed grant ends that subscription",
    )
    # Timeouts of a connection and of a node.
    HEARTBEAT_TIMEOUT_SECS: float = option(
        75.0,
        EnvType.NUMBER,
        "a client that sends nothing for this long is closed with 4001 (three missed heartbeats)",
    )
    # A head is one packet for any real client, but one on a lossy mobile link may wait
    # for retransmits (four losses in a row from a 1 s timeout: 15 s), and a browser's
    # preconnected socket sends its request up to ~10 s after the accept. Neither
    # server had a deadline of its own under daphne: a head trickled a byte every 5 s
    # was still open after 100 s (Twisted's 60 s idle timeout starts again with each).
    REQUEST_HEAD_DEADLINE_SECS: float = option(
        30.0,
        EnvType.NUMBER,
        "how long an HTTP request's line and headers may take to arrive, under uvicorn and "
        "daphne alike: from the connection's accept for its first request, from its first "
        "byte for a later one on a kept-alive connection; then the connection is closed "
        "without an answer. An idle kept-alive connection (between requests) and a "
        "request's body are not timed by it",
    )
    CLOSE_TIMEOUT_SECS: float = option(
        10.0,
        EnvType.NUMBER,
        "after the server closes a connection (4002 for a slow reader), how long its socket "
        "may wait for the client to read what was queued; then it is dropped",
    )
    DRAIN_DEADLINE_SECS: float = option(
        20.0,
        EnvType.NUMBER,
        "on SIGTERM, how long a node waits for its clients to leave before it stops",
    )
    DIRECT_WRITES: bool = option(
        True,
        EnvType.BOOL,
        "write fan-out frames to sockets directly under daphne and uvicorn "
        "(push.transport.server_adapters); off sends every frame through ASGI",
    )
    DIRECT_READS: bool = option(
        True,
        EnvType.BOOL,
        "read clients' plain WebSocket data frames off the socket under uvicorn "
        "(push.transport.frame_reader); off leaves every frame to uvicorn's parser",
    )
    # The cluster.
    CLUSTER_ANNOUNCE_SECS: float = option(
        5.0,
        EnvType.NUMBER,
        "how often a node writes its liveness key (three of these long) and stats to Redis",
    )
    # Three announcements: a dead node's members leave within seconds, and a live node
    # is never reaped while its liveness key (three announcements long) still stands.
    NODE_DEAD_AFTER_SECS: float = option(
        15.0,
        EnvType.NUMBER,
        "when a silent node's connections are marked closed and its presence members leave; "
        "at least 3 x `PUSH_CLUSTER_ANNOUNCE_SECS`",
    )
    # Lifecycle events and webhooks (push.ops).
    EVENTS: bool = option(
        True,
        EnvType.BOOL,
        "append lifecycle events to the Redis Stream (needs `REDIS_URL`)",
    )
    EVENT_STREAM_MAXLEN: int = option(
        1_000_000, EnvType.INT, "events kept in the stream (approximate)"
    )
    EVENT_STREAM_MAX_BYTES: int = option(
        512 * 1_048_576,
        EnvType.INT,
        "Redis memory the event stream may take (checked every 5 s; the oldest events "
        "are trimmed past it)",
    )
    EVENT_HANDLERS: list[str] = option(
        [], EnvType.LIST, "dotted paths of `handler(event)` functions the event worker calls"
    )
    EVENT_MAX_ATTEMPTS: int = option(
        10,
        EnvType.INT,
        "handler attempts before an event is dead-lettered (also bounded by "
        "`PUSH_EVENT_RETRY_TOTAL_SECS`)",
    )
    EVENT_RETRY_SECS: float = option(
        10.0,
        EnvType.NUMBER,
        "how long an event whose handling failed (or whose worker died) waits before a "
        "worker runs it again; each later retry waits twice as long as the one before "
        "(at most 5 minutes), with jitter",
    )
    EVENT_RETRY_TOTAL_SECS: float = option(
        900.0,
        EnvType.NUMBER,
        "how long after its first failure an event is still retried: one whose next "
        "retry would come later is dead-lettered",
    )
    EVENT_WORKER_METRICS_PORT: int = option(
        0,
        EnvType.PORT,
        "port of the event worker's Prometheus `/metrics` (0: none; give each worker on "
        "one host its own)",
    )
    EVENT_WORKER_METRICS_HOST: str = option(
        "127.0.0.1",
        EnvType.TEXT,
        "address the event worker's `/metrics` listens on (`0.0.0.0` in a container, "
        "for Prometheus to reach it)",
    )
    WEBHOOK_URLS: list[str] = option([], EnvType.URLS, "where the event worker POSTs events")
    WEBHOOK_SECRET: str | None = option(
        None,
        EnvType.TEXT,
        "HMAC key of the webhooks' signature; unset, a key derived from `SECRET_KEY` "
        "(`manage.py push_secret webhook` prints it)",
    )
    WEBHOOK_CONCURRENCY: int = option(
        16, EnvType.INT, "webhook requests in flight at once, per worker process"
    )
    EVENT_CONCURRENCY: int = option(
        8,
        EnvType.INT,
        "events one worker handles at once (handlers run on that many threads, so must be "
        "thread-safe)",
    )

    # The Pusher protocol (second endpoint, docs/pusher.md).
    PUSHER_APP_ID: str | None = option(
        None,
        EnvType.TEXT,
        "id of the Pusher app configured by environment (more apps: the admin); with "
        "the key and secret unset there is none",
        variable="PUSHER_APP_ID",
    )
    PUSHER_APP_KEY: str | None = option(
        None,
        EnvType.TEXT,
        "key of that app (the `/app/<key>` of pusher-js)",
        variable="PUSHER_APP_KEY",
    )
    PUSHER_APP_SECRET: str | None = option(
        None,
        EnvType.TEXT,
        "secret of that app (signs channel authorization and the HTTP API)",
        variable="PUSHER_APP_SECRET",
    )
    PUSHER_APP_CLIENT_EVENTS: bool = option(
        False,
        EnvType.BOOL,
        "whether that app's clients may send `client-*` events on private and presence channels",
        variable="PUSHER_APP_CLIENT_EVENTS",
    )
    PUSHER_WEBHOOK_URLS: list[str] = option(
        [],
        EnvType.URLS,
        "where the event worker POSTs that app's webhooks, in Pusher's format",
        variable="PUSHER_WEBHOOK_URLS",
    )
    PUSHER_ACTIVITY_TIMEOUT_SECS: int = option(
        120,
        EnvType.INT,
        "`activity_timeout` told to Pusher clients: they ping after this much silence",
        variable="PUSHER_ACTIVITY_TIMEOUT",
    )
    PUSHER_PONG_TIMEOUT_SECS: int = option(
        30,
        EnvType.INT,
        "how long a Pusher client pinged by the server has to answer before it is closed with 4201",
        variable="PUSHER_PONG_TIMEOUT",
    )
    PUSHER_CLIENT_EVENT_RATE: int = option(
        10,
        EnvType.INT,
        "client events one Pusher connection may send per second (more: `pusher:error` 4301)",
        variable="PUSHER_CLIENT_EVENT_RATE",
    )
    PUSHER_TIMESTAMP_TOLERANCE_SECS: int = option(
        600,
        EnvType.INT,
        "how far an HTTP API request's `auth_timestamp` may be from the server's clock",
        variable="PUSHER_TIMESTAMP_TOLERANCE",
    )
    PUSHER_APP_ENCRYPTION_MASTER_KEY: str | None = option(
        None,
        EnvType.TEXT,
        "base64 of 32 random bytes: `POST /pusher/auth` derives each `private-encrypted-` "
        "channel's `shared_secret` from it (the server libraries' `encryption_master_key_base64`); "
        "unset, those channels are refused there",
        variable="PUSHER_APP_ENCRYPTION_MASTER_KEY",
    )

    def __post_init__(self) -> None:
        key = self.PUSHER_APP_ENCRYPTION_MASTER_KEY
        if key is not None and not _is_base64_of(key, ENCRYPTION_MASTER_KEY_BYTES):
            raise ImproperlyConfiguredEnv(
                f"PUSHER_APP_ENCRYPTION_MASTER_KEY must be the base64 of "
                f"{ENCRYPTION_MASTER_KEY_BYTES} bytes"
            )
        if self.NODE_DEAD_AFTER_SECS < ANNOUNCES_BEFORE_DEAD * self.CLUSTER_ANNOUNCE_SECS:
            raise ImproperlyConfiguredEnv(
                f"PUSH_NODE_DEAD_AFTER_SECS ({self.NODE_DEAD_AFTER_SECS}) must be at least "
                f"{ANNOUNCES_BEFORE_DEAD} x PUSH_CLUSTER_ANNOUNCE_SECS "
                f"({self.CLUSTER_ANNOUNCE_SECS}), or live nodes are taken for dead"
            )


def _is_base64_of(text: str, size: int) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) == size
    except ValueError:  # binascii.Error is a ValueError
        return False


def is_http_url(text: str) -> bool:
    """An http:// or https:// URL with a host (and a port, if any, that is a number): what
    a webhook can be POSTed to. Anything else failed every delivery, each retried until
    dead-lettered, found only when events came."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def webhook_url_problem(url: str) -> str | None:
    """Why a webhook cannot be POSTed to ``url``, or None when it can: the one check
    (and wording) of the environment, ``manage.py pusher_app`` and the admin."""
    if is_http_url(url):
        return None
    return f"{url!r} is not an http:// or https:// URL"


@dataclass(frozen=True)
class Option:
    """One option as the environment and the configuration reference see it."""

    name: str
    variable: str
    env_type: EnvType
    default: Any
    meaning: str


def push_options() -> list[Option]:
    """Every option of ``PushSettings``, in declaration order."""
    found = []
    for spec in dataclasses.fields(PushSettings):
        default = (
            spec.default_factory()
            if spec.default_factory is not dataclasses.MISSING
            else spec.default
        )
        found.append(
            Option(
                name=spec.name,
                variable=spec.metadata["variable"] or f"PUSH_{spec.name}",
                env_type=spec.metadata["env_type"],
                default=default,
                meaning=spec.metadata["meaning"],
            )
        )
    return found


def _load(overrides: dict[str, Any]) -> PushSettings:
    unknown = set(overrides) - set(PushSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown PUSH settings: {sorted(unknown)}")
    return PushSettings(**overrides)


P = ParamSpec("P")
R = TypeVar("R")

# Results a ``derived_from_settings`` function keeps, at most: its arguments are
# channel names, which clients choose, so the cache is bounded (least recently used
# first out).
DERIVED_CACHE_SIZE = 4096


class _Accessor:
    """Reads ``settings.PUSH`` on first use and again after ``reload()`` (tests).

    Once read, every option is also an attribute of this object, so reading one is a
    plain attribute look-up: through ``__getattr__`` it cost 0.5 µs, and a publish
    reads several on its way."""

    _cached: PushSettings | None = None
    _derived: list[Callable[[], None]] = []

    def __getattr__(self, name: str) -> Any:
        # Reached only for a name not copied here: before the first read, after a
        # reload, or a name that is no option (AttributeError below).
        if self._cached is None:
            loaded = self._cached = _load(getattr(settings, "PUSH", {}))
            for option in dataclasses.fields(loaded):
                self.__dict__[option.name] = getattr(loaded, option.name)
        return getattr(self._cached, name)

    def reload(self) -> None:
        self._cached = None
        for option in dataclasses.fields(PushSettings):
            self.__dict__.pop(option.name, None)
        for clear in self._derived:
            clear()

    def derived(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorator: remember what ``func`` answers from the settings and its
        arguments (say, which pattern of ``PUSH_HISTORY_MODES`` a channel matches, asked
        for every message) until the settings are reloaded."""
        cached = functools.lru_cache(maxsize=DERIVED_CACHE_SIZE)(func)
        self._derived.append(cached.cache_clear)
        return cached  # type: ignore[return-value]  # lru_cache keeps the signature


push_settings = _Accessor()
