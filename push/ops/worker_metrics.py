"""The event worker's Prometheus endpoint (``PUSH_EVENT_WORKER_METRICS_PORT``): what it
handled (``push_events_processed_total``, ``push_event_handle_seconds``,
``push_webhook_requests_total``, counted as they happen) and how far the stream is ahead
of the workers, read from Redis at each scrape (``EventStreamCollector``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EventStreamCollector(Collector):
    """The stream as the workers' group sees it, asked of Redis when scraped (the same
    from every worker): a few commands a scrape, nothing on the events' path."""

    def __init__(self, redis: Any, *, stream: str, group: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self._read()
        except Exception as exc:  # Redis away: the scrape shows the counters only
            logger.warning("could not read the event stream for metrics: %s", exc)
            return
        for name, documentation, value in values:
            yield GaugeMetricFamily(name, documentation, value=value)

    def _read(self) -> list[tuple[str, str, float]]:
        group = self._group()
        last_read = _text(group.get("last-delivered-id", "0-0")) if group else "0-0"
        oldest_unread = self.redis.xrange(self.stream, min=f"({last_read}", count=1)
        lag_secs = 0.0
        if oldest_unread:
            added_ms = int(_text(oldest_unread[0][0]).split("-", 1)[0])
            lag_secs = max(time.time() - added_ms / 1000, 0.0)
        values = [
            (
                "push_event_stream_entries",
                "Events kept in the stream",
                self.redis.xlen(self.stream),
            ),
            (
                "push_event_lag_seconds",
                "Age of the oldest event no worker has read yet (0: the workers keep up)",
                lag_secs,
            ),
            (
                "push_event_pending",
                "Events read by a worker and not yet acknowledged: in hand, or waiting for a retry",
                group.get("pending", 0) if group else 0,
            ),
            (
                "push_event_dead_letters",
                "Events in the dead-letter stream (retries spent)",
                self.redis.xlen(f"{self.stream}:dead"),
            ),
        ]
        if group and group.get("lag") is not None:  # Redis 7 counts it; 6.2 does not
            values.append(("push_event_unread", "Events no worker has read yet", group["lag"]))
        return values

    def _group(self) -> dict[str, Any] | None:
        if not self.redis.exists(self.stream):
            return None
        for group in self.redis.xinfo_groups(self.stream):
            if _text(group.get("name")) == self.group:
                return dict(group)
        return None


def serve_worker_metrics(redis: Any, *, stream: str, group: str, host: str, port: int) -> None:
    """Serve ``/metrics`` on ``host:port`` from a thread of the worker's process."""
    REGISTRY.register(EventStreamCollector(redis, stream=stream, group=group))
    start_http_server(port, addr=host)
    logger.info("event worker metrics on %s:%d", host, port)
