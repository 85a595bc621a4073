"""Webhook delivery, one event handler: POST each event as JSON to every configured URL,
signed with HMAC-SHA256 over a timestamp and the body, retried with backoff. Only the
answer's status is read, never its body.

Headers: ``X-Push-Event-Id`` (dedupe: delivery is at least once), ``X-Push-Timestamp``
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

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings
from django.core.cache import cache

from common.conf import push_settings
from common.keys import WEBHOOK_KEY_SALT, purpose_key
from push.ops.logs import redact

ATTEMPTS = 3
FIRST_BACKOFF_SECS = 0.2
TIMEOUT_SECS = 5.0
# How long a URL that accepted an event is remembered: past every retry the event can
# get (PUSH_EVENT_MAX_ATTEMPTS x PUSH_EVENT_RETRY_SECS, times a margin for busy workers),
# and no longer: every delivered event leaves one key per URL in Redis for that long
# (a day of them, at hundreds of events a second, was gigabytes). Forgotten early, a
# retry sends the event to that URL again, which at-least-once delivery allows.
ACCEPTED_MEMORY_MARGIN = 6
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


def _headers(event_id: str, body: bytes) -> dict[str, str]:
    """Each attempt's own: a retry minutes later carries a fresh timestamp, which a
    receiver with a tolerance of a few minutes accepts."""
    timestamp = int(time.time())
    return {
        "Content-Type": "application/json",
        "X-Push-Event-Id": event_id,
        "X-Push-Timestamp": str(timestamp),
        "X-Push-Signature": signature(body, timestamp),
    }


@dataclass(frozen=True)
class WebhookTarget:
    """One receiver of an event: its URL and how to make the request it gets, built
    afresh for each attempt (so a retry carries a fresh timestamp). ``scope`` tells
    apart two receivers at one URL (two Pusher apps pointing at the same back-end):
    each accepts on its own."""

    url: str
    request: Callable[[], tuple[bytes, dict[str, str]]]
    scope: str = ""


def _post(client: httpx.Client, target: WebhookTarget) -> None:
    delay = FIRST_BACKOFF_SECS
    for attempt in range(1, ATTEMPTS + 1):
        body, headers = target.request()
        try:
            # Only the status is read: the body, which could be endless or trickled a
            # byte at a time (each within the read timeout), is left unread, and the
            # connection closed with it.
            with client.stream("POST", target.url, content=body, headers=headers) as response:
                status = response.status_code
            if status < 300:
                return
            problem = f"HTTP {status}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if attempt < ATTEMPTS:
            time.sleep(delay)
            delay *= 2
    # Shown in the log and the admin's dead letters: without the URL's credentials.
    raise WebhookFailed(f"{redact(target.url)}: {problem}")


def _accepted_memory_secs() -> float:
    retries = push_settings.EVENT_MAX_ATTEMPTS * push_settings.EVENT_RETRY_SECS
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
    with httpx.Client(timeout=TIMEOUT_SECS) as client:
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
        return body, _headers(event_id, body)

    targets = [WebhookTarget(url, request) for url in push_settings.WEBHOOK_URLS]
    deliver_to_targets(event_id, targets)
