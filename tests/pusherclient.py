"""A raw Pusher protocol client for the end-to-end tests: frames as Pusher defines them,
over the ``websockets`` library, and the signatures a Pusher back-end would make. The
tests with the real Pusher libraries (pusher-js, Laravel Echo, the ``pusher`` server
library) check the same server from the outside; this one lets a test see every frame."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

TIMEOUT_SECS = 10.0
APP_ID = "4242"
APP_KEY = "e2e-pusher-key"
APP_SECRET = "e2e-pusher-secret"


def pusher_env(env: dict[str, str], *, client_events: bool = True) -> dict[str, str]:
    return {
        **env,
        "PUSHER_APP_ID": APP_ID,
        "PUSHER_APP_KEY": APP_KEY,
        "PUSHER_APP_SECRET": APP_SECRET,
        "PUSHER_APP_CLIENT_EVENTS": "1" if client_events else "0",
    }


# The shared Pusher nodes' PUSHER_APP_ENCRYPTION_MASTER_KEY (base64 of 32 bytes):
# /pusher/auth derives each private-encrypted- channel's shared secret from it.
ENCRYPTION_MASTER_KEY = base64.b64encode(b"tests-encryption-master-key-0032").decode()
# Channels the shared Pusher nodes keep recent-only (tests/test_pusher_http_api.py).
RECENT_ONLY_CHANNELS = "ph-recent-*"
# Channels whose messages are kept one second: a cache channel's last one expires.
EXPIRING_CHANNELS = "cache-expiring-*"


def shared_pusher_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of the Pusher nodes the Pusher tests share (``pusher_nodes`` in
    tests/conftest.py): the app above with client events and an encryption master key,
    and the channels tests need recent-only or kept one second."""
    return {
        **pusher_env(env, client_events=True),
        "PUSHER_APP_ENCRYPTION_MASTER_KEY": ENCRYPTION_MASTER_KEY,
        "PUSH_HISTORY_MODES": f"{RECENT_ONLY_CHANNELS}=recent",
        "PUSH_RETENTION_RULES": f"{EXPIRING_CHANNELS}=-/1s",
    }


def sign(text: str, secret: str = APP_SECRET) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def channel_auth(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    signed = f"{socket_id}:{channel}" + (f":{channel_data}" if channel_data is not None else "")
    return f"{APP_KEY}:{sign(signed)}"


async def signed_post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """A POST signed as Pusher's libraries sign it, for bodies the library would not send."""
    content = json.dumps(body).encode()
    params = {
        "auth_key": APP_KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(content, usedforsecurity=False).hexdigest(),
    }
    query = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    params["auth_signature"] = sign("\n".join(["POST", path, query]))
    return await http.post(
        path, params=params, content=content, headers={"Content-Type": "application/json"}
    )


class PusherClient:
    def __init__(self, ws: ClientConnection, established: dict[str, Any]) -> None:
        self.ws = ws
        self.socket_id: str = established["socket_id"]
        self.activity_timeout: int = established["activity_timeout"]

    @classmethod
    async def connect(cls, ws_base: str, key: str = APP_KEY, **options: Any) -> PusherClient:
        ws = await connect(
            f"{ws_base}/app/{key}?protocol=7&client=js&version=8.4.0",
            open_timeout=TIMEOUT_SECS,
            **options,
        )
        frame = await receive(ws)
        assert frame["event"] == "pusher:connection_established", frame
        return cls(ws, json.loads(frame["data"]))

    async def send(self, event: str, data: Any, channel: str | None = None) -> None:
        frame: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            frame["channel"] = channel
        await self.ws.send(json.dumps(frame))

    async def receive(self, timeout: float = TIMEOUT_SECS) -> dict[str, Any]:
        return await receive(self.ws, timeout)

    async def receive_event(self, event: str, timeout: float = TIMEOUT_SECS) -> dict[str, Any]:
        """The next frame named ``event``, skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.receive(timeout)
                if frame["event"] == event:
                    return frame

    async def subscribe(
        self, channel: str, *, auth: str | None = None, channel_data: str | None = None
    ) -> dict[str, Any]:
        """Subscribe (signing private and presence channels with the app's secret unless
        ``auth`` is given) and return the answer: succeeded or the error."""
        data: dict[str, Any] = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            data["auth"] = auth or channel_auth(self.socket_id, channel, channel_data)
        if channel_data is not None:
            data["channel_data"] = channel_data
        await self.send("pusher:subscribe", data)
        while True:
            frame = await self.receive()
            if frame["event"] in (
                "pusher_internal:subscription_succeeded",
                "pusher:subscription_error",
                "pusher:error",
            ):
                return frame

    async def nothing_for(self, secs: float) -> None:
        """Assert that no frame arrives for ``secs``."""
        try:
            frame = await asyncio.wait_for(self.ws.recv(), secs)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def close(self) -> None:
        await self.ws.close()


async def receive(ws: ClientConnection, timeout: float = TIMEOUT_SECS) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def presence_data(user_id: str, info: dict[str, Any] | None = None) -> str:
    return json.dumps({"user_id": user_id, "user_info": info or {}})
