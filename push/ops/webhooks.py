"""Webhook delivery, one event handler: POST each event as JSON to every configured URL,
signed with HMAC-SHA256 over a timestamp and the body, retried with backoff. Only the
answer's status is read, never its body.

Headers: ``X-Push-Event-Id`` (dedupe: delivery is at least once),
``X-Push-Event-Stream-Id`` (the event's place in the event stream, ``<ms>-<n>``: the
order of a connection's or channel's events), ``X-Push-Timestamp``
(unix seconds when this attempt was sent) and ``X-Push-Signature: sha256=<hex>``, the
HMAC of ``<timestamp>.<body>`` with ``PUSH_WEBHOOK_SECRET`` (by default a key derived
from ``SECRET_KEY`` for webhooks alone: ``manage.py push_secret webhook`` prints it). A
receiver recomputes the HMAC and refuses a timestamp older than its tolerance, so a
captured request cannot be replayed later (``pushclient.signing.webhook_verify``).

The URLs of one event are sent to at once, at most ``PUSH_WEBHOOK_CONCURRENCY``
requests in flight per worker. A URL that accepted an event is remembered (in the
cache, for as long as the event can be retried, at least ten minutes), so when another
URL fails the event and the worker retries it, only the URLs that failed receive it
again. That delivery (``deliver_to_targets``) serves
Pusher's webhook format too (``push.services.pusher_webhooks``), which only builds
other requests.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
from django.conf import settings
from django.core.cache import cache

from common import metrics
from common.conf import push_settings
from common.keys import WEBHOOK_KEY_SALT, purpose_key
from push.ops.logs import redact
from push.ops.retries import retry_span_secs

ATTEMPTS = 3
FIRST_BACKOFF_SECS = 0.2
# Each connect, read and write: a receiver that stops answering.
TIMEOUT_SECS = 5.0
# A whole attempt, connecting to the answer's status: a receiver that sends its status
# line and headers a byte at a time, each within TIMEOUT_SECS, would otherwise hold a
# worker's thread for as long as it likes.
REQUEST_DEADLINE_SECS = 10.0
# How long a URL that accepted an event is remembered: past every retry the event can
# get (their span, ``retry_span_secs``, and a retry delay, times a margin for busy
# workers), and no longer: every delivered event leaves one key per URL in Redis for that
# long (a day of them, at hundreds of events a second, was gigabytes). Forgotten early,
# a retry sends the event to that URL again, which at-least-once delivery allows.
ACCEPTED_MEMORY_MARGIN = 2
ACCEPTED_MEMORY_MIN_SECS = 600

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class WebhookFailed(Exception):
    """Raised when a webhook URL did not accept an event after every attempt."""


def webhook_secret() -> str:
    return purpose_key(
        WEBHOOK_KEY_SALT, explicit=push_settings.WEBHOOK_SECRET, secret_key=settings.SECRET_KEY
    )


def signature(body: bytes, timestamp: int, secret: str | None = None) -> str:
    key = (secret or webhook_secret()).encode()
    signed = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(key, signed, hashlib.sha256).hexdigest()


def _headers(event: dict[str, Any], body: bytes) -> dict[str, str]:
    """Each attempt's own: a retry minutes later carries a fresh timestamp, which a
    receiver with a tolerance of a few minutes accepts."""
    timestamp = int(time.time())
    return {
        "Content-Type": "application/json",
        **event_headers(event),
        "X-Push-Timestamp": str(timestamp),
        "X-Push-Signature": signature(body, timestamp),
    }


def event_headers(event: dict[str, Any]) -> dict[str, str]:
    """What every webhook of ``event`` carries, in either format: its id, the same on
    every attempt (a receiver drops duplicates by it), and its place in the stream (a
    receiver orders a connection's or channel's events by it)."""
    headers = {}
    if event.get("id"):
        headers["X-Push-Event-Id"] = str(event["id"])
    if event.get("stream_id"):
        headers["X-Push-Event-Stream-Id"] = str(event["stream_id"])
    return headers


@dataclass(frozen=True)
class WebhookTarget:
    """One receiver of an event: its URL and how to make the request it gets, built
    afresh for each attempt (so a retry carries a fresh timestamp). ``scope`` tells
    apart two receivers at one URL (two Pusher apps pointing at the same back-end):
    each accepts on its own."""

    url: str
    request: Callable[[], tuple[bytes, dict[str, str]]]
    scope: str = ""


# When the request this thread sends must be over (``time.monotonic()``), or None.
_deadline = threading.local()


def _within_deadline(timeout: float | None, late: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of this thread's request deadline; ``late`` is
    raised once nothing is."""
    at: float | None = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise late(f"no answer within {REQUEST_DEADLINE_SECS:g} s")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the request's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _within_deadline(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _within_deadline(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            super().connect_tcp(host, port, timeout, local_address, socket_options)
        )


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport, on connections that keep the request deadline (httpx lets
    no network backend be given, so its pool is made again with ours)."""

    def __init__(self) -> None:
        context = _ssl_context()
        super().__init__(verify=context)
        self._pool = httpcore.ConnectionPool(
            ssl_context=context, network_backend=_DeadlineBackend()
        )


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's default, made once: loading the CA certificates costs ~50 ms, which each
    event's delivery paid."""
    return httpx.create_ssl_context()


def _post(client: httpx.Client, target: WebhookTarget) -> None:
    delay = FIRST_BACKOFF_SECS
    for attempt in range(1, ATTEMPTS + 1):
        body, headers = target.request()
        _deadline.at = time.monotonic() + REQUEST_DEADLINE_SECS
        try:
            # Only the status is read: the body, which could be endless or trickled a
            # byte at a time (each within the read timeout), is left unread, and the
            # connection closed with it.
            with client.stream("POST", target.url, content=body, headers=headers) as response:
                status = response.status_code
            if status < 300:
                metrics.WEBHOOK_REQUESTS.labels("accepted").inc()
                return
            metrics.WEBHOOK_REQUESTS.labels("refused").inc()
            problem = f"HTTP {status}"
        except httpx.HTTPError as exc:
            metrics.WEBHOOK_REQUESTS.labels("error").inc()
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            _deadline.at = None
        if attempt < ATTEMPTS:
            time.sleep(delay)
            delay *= 2
    # Shown in the log and the admin's dead letters: without the URL's credentials.
    raise WebhookFailed(f"{redact(target.url)}: {problem}")


def _accepted_memory_secs() -> float:
    conf = push_settings
    span = retry_span_secs(
        conf.EVENT_MAX_ATTEMPTS, conf.EVENT_RETRY_SECS, conf.EVENT_RETRY_TOTAL_SECS
    )
    retries = span + conf.EVENT_RETRY_SECS
    return max(retries * ACCEPTED_MEMORY_MARGIN, ACCEPTED_MEMORY_MIN_SECS)


def _accepted_key(event_id: str, target: WebhookTarget) -> str:
    about = f"{target.scope}\n{target.url}" if target.scope else target.url
    return f"webhook-accepted:{event_id}:{hashlib.sha256(about.encode()).hexdigest()[:32]}"


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=push_settings.WEBHOOK_CONCURRENCY, thread_name_prefix="push-webhook"
            )
        return _pool


def _send_and_remember(client: httpx.Client, target: WebhookTarget, event_id: str) -> None:
    _post(client, target)
    if event_id:
        cache.set(_accepted_key(event_id, target), 1, _accepted_memory_secs())


def deliver_to_targets(event_id: str, targets: list[WebhookTarget]) -> None:
    """POST an event to every target that has not accepted it yet, all at once; raises
    ``WebhookFailed`` naming each URL that did not accept it now (the worker retries the
    event later, and only those receive it again). Every webhook format goes through
    here: ours (``deliver_webhooks``) and Pusher's (``push.services.pusher_webhooks``)."""
    if event_id:
        accepted = cache.get_many([_accepted_key(event_id, target) for target in targets])
        targets = [t for t in targets if _accepted_key(event_id, t) not in accepted]
    if not targets:
        return
    with httpx.Client(timeout=TIMEOUT_SECS, transport=_DeadlineTransport()) as client:
        futures = [
            _executor().submit(_send_and_remember, client, target, event_id) for target in targets
        ]
        problems = [str(exc) for f in futures if (exc := f.exception()) is not None]
    if problems:
        raise WebhookFailed("; ".join(problems))


def deliver_webhooks(event: dict[str, Any]) -> None:
    """POST ``event`` in our format to every ``PUSH_WEBHOOK_URLS`` that has not accepted
    it yet; raises ``WebhookFailed`` naming each URL that did not accept it now."""
    body = json.dumps(event, separators=(",", ":")).encode()
    event_id = str(event.get("id", ""))

    def request() -> tuple[bytes, dict[str, str]]:
        return body, _headers(event, body)

    targets = [WebhookTarget(url, request) for url in push_settings.WEBHOOK_URLS]
    deliver_to_targets(event_id, targets)
