"""Pusher apps and the signatures Pusher defines (docs/pusher.md).

An app is an id, a key and a secret: pusher-js connects to ``/app/<key>``; a back-end
holding the secret signs channel authorizations (``<key>:<hmac>``), user sign-ins and
HTTP API requests. One app may come from the environment (``PUSHER_APP_*``), more from
the admin (``push.models.PusherApp``). Apps are read from the database at most once
per ``APP_CACHE_SECS`` per process, so a connection flood costs no query per handshake
and a disabled app stops being served within seconds.

Every comparison of a signature is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from common.conf import push_settings
from common.db import db_call

logger = logging.getLogger(__name__)

APP_CACHE_SECS = 5.0
# A key or id not among the apps read is looked up again if that read is older than
# this: an app made a moment ago works at once, and unknown keys (a scan) cost at most
# one query per second.
MISS_REREAD_SECS = 1.0
# What Pusher's HTTP API accepts as auth_version.
AUTH_VERSION = "1.0"


@dataclass(frozen=True)
class PusherApp:
    app_id: str
    key: str
    secret: str
    name: str = ""
    client_events: bool = False
    enabled: bool = True
    webhook_urls: tuple[str, ...] = ()


def configured_app() -> PusherApp | None:
    """The app of ``PUSHER_APP_ID``/``KEY``/``SECRET``, when all three are set."""
    app_id = push_settings.PUSHER_APP_ID
    key = push_settings.PUSHER_APP_KEY
    secret = push_settings.PUSHER_APP_SECRET
    if not (app_id and key and secret):
        return None
    return PusherApp(
        app_id=str(app_id),
        key=key,
        secret=secret,
        name="environment",
        client_events=push_settings.PUSHER_APP_CLIENT_EVENTS,
        webhook_urls=tuple(push_settings.PUSHER_WEBHOOK_URLS),
    )


class _AppCache:
    """Every app, read from the database at most once per ``APP_CACHE_SECS``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._apps: list[PusherApp] = []
        self._read_at = -APP_CACHE_SECS

    def apps(self, *, max_age: float = APP_CACHE_SECS) -> list[PusherApp]:
        with self._lock:
            if time.monotonic() - self._read_at >= max_age:
                try:
                    self._apps = _read_apps()
                except Exception:
                    # The database is away: the apps read last keep serving (and the
                    # next read waits its turn, so a handshake flood is no query
                    # flood); never read, the caller learns it failed.
                    if self._read_at < 0:
                        raise
                    logger.warning("pusher apps not read again; serving the last read")
                self._read_at = time.monotonic()
            return self._apps

    def forget(self) -> None:
        """Read again on next use (tests, and the admin after a change)."""
        with self._lock:
            self._read_at = -APP_CACHE_SECS


def _read_apps() -> list[PusherApp]:
    from push.models import PusherApp as PusherAppRow

    apps = [
        PusherApp(
            app_id=row.app_id,
            key=row.key,
            secret=row.secret,
            name=row.name,
            client_events=row.client_events,
            enabled=row.enabled,
            webhook_urls=tuple(url.strip() for url in row.webhook_urls.split() if url.strip()),
        )
        for row in PusherAppRow.objects.all()
    ]
    configured = configured_app()
    if configured is not None:
        # The environment's app wins over a row with the same id or key.
        apps = [a for a in apps if a.app_id != configured.app_id and a.key != configured.key]
        apps.insert(0, configured)
    return apps


app_cache = _AppCache()


def all_apps() -> list[PusherApp]:
    return app_cache.apps()


def _find(field: str, value: str) -> PusherApp | None:
    """The enabled app whose ``field`` is ``value``; a miss reads the apps again when
    the last read is over ``MISS_REREAD_SECS`` old."""
    for apps in (all_apps(), app_cache.apps(max_age=MISS_REREAD_SECS)):
        found = next((a for a in apps if getattr(a, field) == value and a.enabled), None)
        if found is not None:
            return found
    return None


def app_by_key(key: str) -> PusherApp | None:
    """The enabled app with this key, or None."""
    return _find("key", key)


def app_by_id(app_id: str) -> PusherApp | None:
    """The enabled app with this id, or None."""
    return _find("app_id", app_id)


# From the event loop, on the database threads, which give their connection back to the
# pool after each call: on a thread of the loop's own executor a read kept its connection
# out of the pool for good, and once PostgreSQL had ended it (a restart) every read on
# that thread failed, the apps read before served however long that lasted.
app_by_key_async = db_call(app_by_key)
app_by_id_async = db_call(app_by_id)


def free_app_id() -> str:
    """A numeric app id not taken yet (Pusher's ids are numbers; some server libraries
    expect digits)."""
    from push.models import PusherApp as PusherAppRow

    while True:
        candidate = str(secrets.randbelow(9_000_000) + 1_000_000)
        if not PusherAppRow.objects.filter(app_id=candidate).exists():
            return candidate


def new_credentials() -> tuple[str, str]:
    """A fresh (key, secret) pair: 20 and 40 hex digits, as Pusher's look."""
    return secrets.token_hex(10), secrets.token_hex(20)


# ----- signatures ------------------------------------------------------------------------


def hmac_sha256(secret: str, text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hmac.new(secret.encode("utf-8"), data, hashlib.sha256).hexdigest()


def channel_auth(app: PusherApp, socket_id: str, channel: str, channel_data: str | None) -> str:
    """The ``auth`` value of a private or presence subscription: ``<key>:<hmac>`` of
    ``socket_id:channel`` (``:channel_data`` on presence channels)."""
    signed = (
        f"{socket_id}:{channel}"
        if channel_data is None
        else (f"{socket_id}:{channel}:{channel_data}")
    )
    return f"{app.key}:{hmac_sha256(app.secret, signed)}"


def channel_auth_valid(
    app: PusherApp, socket_id: str, channel: str, auth: object, channel_data: str | None
) -> bool:
    if not isinstance(auth, str):
        return False
    expected = channel_auth(app, socket_id, channel, channel_data)
    return hmac.compare_digest(expected.encode(), auth.encode("utf-8", "surrogatepass"))


def user_auth(app: PusherApp, socket_id: str, user_data: str) -> str:
    """The ``auth`` value of a user sign-in: ``<key>:<hmac>`` of ``socket_id::user::user_data``."""
    return f"{app.key}:{hmac_sha256(app.secret, f'{socket_id}::user::{user_data}')}"


def user_auth_valid(app: PusherApp, socket_id: str, user_data: str, auth: object) -> bool:
    if not isinstance(auth, str):
        return False
    expected = user_auth(app, socket_id, user_data)
    return hmac.compare_digest(expected.encode(), auth.encode("utf-8", "surrogatepass"))


def encryption_shared_secret(master_key_base64: str, channel: str) -> str:
    """The ``shared_secret`` of a ``private-encrypted-`` channel, as every Pusher server
    library derives it: base64 of SHA-256 of the channel name followed by the master key.
    The publisher encrypts with it and the subscriber decrypts; the server only relays."""
    master_key = base64.b64decode(master_key_base64)
    return base64.b64encode(hashlib.sha256(channel.encode("utf-8") + master_key).digest()).decode()


def http_string_to_sign(method: str, path: str, params: Mapping[str, str]) -> str:
    """What Pusher's HTTP API signs: method, path and the query parameters (without
    ``auth_signature``), keys lowercased and sorted, joined as ``k=v&...`` unescaped."""
    query = "&".join(
        f"{key}={value}"
        for key, value in sorted((k.lower(), v) for k, v in params.items() if k != "auth_signature")
    )
    return f"{method.upper()}\n{path}\n{query}"


def http_signature(secret: str, method: str, path: str, params: Mapping[str, str]) -> str:
    return hmac_sha256(secret, http_string_to_sign(method, path, params))


def body_md5(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def webhook_signature(app: PusherApp, body: bytes) -> str:
    """``X-Pusher-Signature``: the HMAC-SHA256 of the body with the app's secret."""
    return hmac_sha256(app.secret, body)


def compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
