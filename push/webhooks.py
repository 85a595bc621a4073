"""Webhook delivery, one event handler: POST each event as JSON to every configured URL,
signed with HMAC-SHA256, retried with backoff.

Headers: ``X-Push-Event-Id`` (dedupe: delivery is at least once), ``X-Push-Signature:
sha256=<hex>`` over the exact body with ``PUSH_WEBHOOK_SECRET`` (default ``SECRET_KEY``).
A URL that still fails after the in-process retries fails the event, which the worker
retries later and finally dead-letters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
from django.conf import settings

from push.conf import push_settings

ATTEMPTS = 3
FIRST_BACKOFF_SECS = 0.2
TIMEOUT_SECS = 5.0


class WebhookFailed(Exception):
    """Raised when a webhook URL did not accept an event after every attempt."""


def signature(body: bytes, secret: str | None = None) -> str:
    key = (secret or push_settings.WEBHOOK_SECRET or settings.SECRET_KEY).encode()
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> None:
    delay = FIRST_BACKOFF_SECS
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = client.post(url, content=body, headers=headers)
            if response.status_code < 300:
                return
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if attempt < ATTEMPTS:
            time.sleep(delay)
            delay *= 2
    raise WebhookFailed(f"{url}: {problem}")


def deliver_webhooks(event: dict[str, Any]) -> None:
    body = json.dumps(event, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Push-Event-Id": str(event.get("id", "")),
        "X-Push-Signature": signature(body),
    }
    with httpx.Client(timeout=TIMEOUT_SECS) as client:
        for url in push_settings.WEBHOOK_URLS:
            _post(client, url, body, headers)
