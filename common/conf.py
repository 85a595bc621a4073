"""The push server's options: ``settings.PUSH`` behind one accessor with defaults
(DRF's ``api_settings`` habit), so nothing else indexes the settings dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

# A node's liveness key lasts three announcements (push.cluster.directory); a node that missed
# fewer than that may only be slow.
ANNOUNCES_BEFORE_DEAD = 3


@dataclass(frozen=True)
class PushSettings:
    MAX_FRAME_BYTES: int = 1_048_576
    HEARTBEAT_INTERVAL_SECS: int = 25
    SEND_QUEUE_MAX_FRAMES: int = 1000
    SEND_QUEUE_MAX_BYTES: int = 8 * 1_048_576
    DROP_OLDEST_CHANNELS: list[str] = field(default_factory=list)
    HISTORY_PAGE_DEFAULT: int = 100
    HISTORY_PAGE_MAX: int = 1000
    # A REST history page also stops at this much message data (at least one message).
    HISTORY_PAGE_MAX_BYTES: int = 4 * 1_048_576
    # A replay's (or gap repair's) history read stops at this much message data.
    REPLAY_BATCH_MAX_BYTES: int = 4 * 1_048_576
    # Replays reading history at once on this node, and per client address (0: none);
    # a replay over a bound waits this long for a slot, then is refused.
    MAX_REPLAYS_PER_NODE: int = 64
    MAX_REPLAYS_PER_IP: int = 4
    REPLAY_SLOT_WAIT_SECS: float = 5.0
    # Message data held per channel for reordering, and per replay for the live
    # messages that arrive while it reads.
    PENDING_MAX_BYTES: int = 4 * 1_048_576
    GAP_WAIT_SECS: float = 0.2
    SYNC_INTERVAL_SECS: float = 1.0
    REGISTRY_FLUSH_SECS: float = 1.0
    # How often connections that sent anything get ``last_heartbeat`` stamped.
    REGISTRY_HEARTBEAT_SECS: float = 10.0
    # Closed connections' rows are deleted this long after the close (trim_history).
    REGISTRY_CLOSED_RETENTION_SECS: int = 7 * 86_400
    # Registry records held while the database is down; past it they are dropped and
    # the live rows rewritten once it is back.
    REGISTRY_MAX_BUFFERED: int = 200_000
    GC_GEN0_THRESHOLD: int = 50_000
    GC_FREEZE: bool = True
    IDEMPOTENCY_WINDOW_SECS: int = 86_400
    # Group commit (push.storage.write_pipeline): one transaction holds at most this many
    # messages and bytes of data; the node queues at most this many publishes (and
    # bytes) waiting to be written, and refuses more with UNAVAILABLE.
    WRITE_BATCH_MAX_MESSAGES: int = 1000
    WRITE_BATCH_MAX_BYTES: int = 4 * 1_048_576
    WRITE_QUEUE_MAX_MESSAGES: int = 20_000
    WRITE_QUEUE_MAX_BYTES: int = 64 * 1_048_576
    # How long the write connection may take to connect, and a batch to commit,
    # before its publishers are answered UNAVAILABLE.
    WRITE_CONNECT_TIMEOUT_SECS: float = 3.0
    WRITE_TIMEOUT_SECS: float = 10.0
    RECENT_PER_CHANNEL: int = 256
    RECENT_MAX_BYTES: int = 1_048_576
    RECENT_CACHE_SIZE: int = 100
    RECENT_CACHE_MAX_BYTES: int = 1_048_576
    RECENT_CACHE_TTL_SECS: int = 3600
    RETENTION_MAX_MESSAGES: int = 10_000
    RETENTION_MAX_AGE_SECS: int = 7 * 86_400
    # (channel-name pattern, max messages or None, max age in seconds or None)
    RETENTION_RULES: list[tuple[str, int | None, int | None]] = field(default_factory=list)
    # (channel-name pattern, "durable" or "recent"): where a channel's history lives.
    HISTORY_MODES: list[tuple[str, str]] = field(default_factory=list)
    # A recent channel's window in Redis: its last messages, at most this many, this
    # old and this many bytes (the newest message is kept whatever its size).
    RECENT_WINDOW_MESSAGES: int = 100
    RECENT_WINDOW_SECS: int = 60
    RECENT_WINDOW_BYTES: int = 1_048_576
    # Seqs a recent channel reserves in PostgreSQL at a time: one write per block.
    RECENT_SEQ_BLOCK: int = 1000
    ANONYMOUS_SUBSCRIBE: bool = True
    USERS_PUBLISH: bool = True
    SUBSCRIPTION_TOKEN_SECRET: str | None = None
    # The longest a signed subscription token may live (exp - iat, and exp - now).
    SUBSCRIPTION_TOKEN_MAX_TTL_SECS: int = 3600
    # Proxies in front of the nodes whose X-Forwarded-For entries are believed (0: the
    # socket peer is the client).
    TRUSTED_PROXIES: int = 0
    # Failed authentications (bad token, unknown session) one client address may make
    # per minute before its authentications are answered 429 / 1013 unchecked.
    AUTH_FAILURES_PER_MIN: int = 30
    RATE_BURST: int = 100
    RATE_PER_SEC: float = 50.0
    RATE_LIMIT_CLOSE_AFTER: int = 200
    # A service token's frame rate on a WebSocket (a back-end publishing for many
    # users); 0 frames per second is unbounded.
    SERVICE_RATE_BURST: int = 1000
    SERVICE_RATE_PER_SEC: int = 0
    MAX_SUBSCRIPTIONS_PER_CONNECTION: int = 1000
    MAX_CONNECTIONS_PER_USER: int = 100
    MAX_CONNECTIONS_PER_IP: int = 0
    REVOCATION_CHECK_SECS: float = 5.0
    # A client that sends nothing (no heartbeat, no request) for this long is closed
    # with 4001; three missed heartbeat intervals by default.
    HEARTBEAT_TIMEOUT_SECS: float = 75.0
    # How long a closed connection's socket may wait for the client to read what was
    # queued before the close (a slow reader's 4002); then it is dropped.
    CLOSE_TIMEOUT_SECS: float = 10.0
    DRAIN_DEADLINE_SECS: float = 20.0
    # Write fan-out frames to sockets directly under daphne and uvicorn's sans-I/O
    # WebSocket (push.transport.server_adapters); off sends every frame through ASGI.
    DIRECT_WRITES: bool = True
    CLUSTER_ANNOUNCE_SECS: float = 5.0
    # Three announcements: a dead node's members leave within seconds, and a live node
    # is never reaped while its liveness key (three announcements long) still stands.
    NODE_DEAD_AFTER_SECS: float = 15.0
    EVENTS: bool = True
    EVENT_STREAM_MAXLEN: int = 1_000_000
    EVENT_HANDLERS: list[str] = field(default_factory=list)
    EVENT_MAX_ATTEMPTS: int = 5
    EVENT_RETRY_SECS: float = 10.0
    WEBHOOK_URLS: list[str] = field(default_factory=list)
    WEBHOOK_SECRET: str | None = None
    # Webhook requests in flight at once, per worker process.
    WEBHOOK_CONCURRENCY: int = 16
    # Events one worker handles at once (handlers must be thread-safe).
    EVENT_CONCURRENCY: int = 8

    def __post_init__(self) -> None:
        if self.NODE_DEAD_AFTER_SECS < ANNOUNCES_BEFORE_DEAD * self.CLUSTER_ANNOUNCE_SECS:
            raise ValueError(
                f"PUSH_NODE_DEAD_AFTER_SECS ({self.NODE_DEAD_AFTER_SECS}) must be at least "
                f"{ANNOUNCES_BEFORE_DEAD} x PUSH_CLUSTER_ANNOUNCE_SECS "
                f"({self.CLUSTER_ANNOUNCE_SECS}), or live nodes are taken for dead"
            )


def _load(overrides: dict[str, Any]) -> PushSettings:
    unknown = set(overrides) - set(PushSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown PUSH settings: {sorted(unknown)}")
    return PushSettings(**overrides)


class _Accessor:
    """Reads ``settings.PUSH`` on first use and again after ``reload()`` (tests)."""

    _cached: PushSettings | None = None

    def __getattr__(self, name: str) -> Any:
        if self._cached is None:
            self._cached = _load(getattr(settings, "PUSH", {}))
        return getattr(self._cached, name)

    def reload(self) -> None:
        self._cached = None


push_settings = _Accessor()
