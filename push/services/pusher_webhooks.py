"""Webhooks in Pusher's format (docs/pusher.md): an event handler of the event worker
that POSTs ``channel_occupied``, ``channel_vacated``, ``member_added``,
``member_removed``, ``client_event`` and ``cache_miss`` to every app's webhook URLs.

The body is ``{"time_ms": <ms>, "events": [{"name": ..., "channel": ..., ...}]}``,
signed as Pusher signs it: ``X-Pusher-Key`` is the app's key and
``X-Pusher-Signature`` the hex HMAC-SHA256 of the body with the app's secret, which a
Pusher server library checks (``Pusher.validate_webhook(key, signature, body)``).
``time_ms`` is when the attempt was sent, not when the event happened: those libraries
refuse a body more than five minutes old, and a retry can come later than that.

One event per request (Pusher may batch several; a list of one is the same format).
``X-Push-Event-Id`` names the event, the same on every attempt, for a receiver that
wants to drop the duplicates at-least-once delivery can bring, and
``X-Push-Event-Stream-Id`` is its place in the event stream, the order of a channel's
events (``time_ms`` is the attempt's, not the event's); Pusher's libraries ignore
both.

Channels are one namespace shared by every app (and by our own protocol): an app does
not own its channels, so every enabled app with webhook URLs receives the events of
every channel. Our own lifecycle events (connect, disconnect, subscribe, unsubscribe)
are not Pusher webhooks and are skipped.

Delivery is ``push.ops.webhooks.deliver_to_targets``: all of an event's URLs at once,
retried with backoff, and an event the worker retries goes again only to the URLs
(of each app) that have not accepted it.
"""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

from push.ops import events
from push.ops.event_worker import Handler
from push.ops.webhooks import WebhookTarget, deliver_to_targets, event_headers
from push.services.pusher_apps import PusherApp, all_apps, compact_json, webhook_signature

# Our event's fields that each Pusher webhook carries, besides its name and channel.
_FIELDS: dict[str, tuple[str, ...]] = {
    events.CHANNEL_OCCUPIED: (),
    events.CHANNEL_VACATED: (),
    events.MEMBER_ADDED: ("user_id",),
    events.MEMBER_REMOVED: ("user_id",),
    events.CLIENT_EVENT: ("event", "data", "socket_id", "user_id"),
    events.CACHE_MISS: (),
}


def pusher_webhook_event(event: dict[str, Any]) -> dict[str, Any] | None:
    """One of our lifecycle events as an entry of a Pusher webhook's ``events``, or None
    for those Pusher has no webhook for. A field the event lacks is left out
    (``user_id`` of a client event on a channel that is not a presence channel); a
    client event's ``data`` is text, as all Pusher event data is."""
    kind = event.get("type")
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return None
    entry = {"name": kind, "channel": event.get("channel")}
    entry.update((name, event[name]) for name in fields if event.get(name) is not None)
    if "data" in entry and not isinstance(entry["data"], str):
        # Pusher's event data is text: what a client sent as an object, as its JSON.
        entry["data"] = compact_json(entry["data"])
    return entry


def pusher_webhook_request(app: PusherApp, entry: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt to deliver ``entry`` to ``app``'s URLs."""
    body = json.dumps(
        {"time_ms": int(time.time() * 1000), "events": [entry]}, separators=(",", ":")
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Pusher-Key": app.key,
        "X-Pusher-Signature": webhook_signature(app, body),
    }
    return body, headers


def _hooked_apps() -> list[PusherApp]:
    return [app for app in all_apps() if app.enabled and app.webhook_urls]


def deliver_pusher_webhooks(event: dict[str, Any]) -> None:
    """The event handler: POST ``event`` in Pusher's format to every URL of every
    enabled app that has not accepted it yet; raises ``WebhookFailed`` (the worker
    retries the event) naming each URL that did not accept it now."""
    entry = pusher_webhook_event(event)
    if entry is None:
        return
    event_id = str(event.get("id", ""))
    ours = event_headers(event)
    targets = [
        WebhookTarget(url, partial(_request_with, app, entry, ours), scope=app.key)
        for app in _hooked_apps()
        for url in app.webhook_urls
    ]
    deliver_to_targets(event_id, targets)


def _request_with(
    app: PusherApp, entry: dict[str, Any], ours: dict[str, str]
) -> tuple[bytes, dict[str, str]]:
    """One attempt's request, with our headers (``event_headers``) besides Pusher's."""
    body, headers = pusher_webhook_request(app, entry)
    return body, {**headers, **ours}


def pusher_webhook_handlers() -> list[Handler]:
    """The handlers the event worker adds (``push.ops.event_worker.configured_handlers``):
    Pusher webhooks, always. The handler reads the apps (cached for a few seconds)
    only for the events Pusher has webhooks for, so an app given webhook URLs in the
    admin is served without a restart, and a worker starts without the database."""
    return [deliver_pusher_webhooks]
