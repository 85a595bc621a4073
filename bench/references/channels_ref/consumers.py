"""The tutorial consumer: group_add on subscribe, group_send on publish."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

from bench.references.channels_ref.sequence import current_seq, next_seq

SERVER_ID = f"channels-ref-{os.getpid()}"
HEARTBEAT_INTERVAL_SECS = 25


def group_name(channel: str) -> str:
    """Channels' group names allow only ``A-Za-z0-9._-``; map the rest."""
    return "ch." + "".join(c if c.isalnum() or c in "._-" else "_" for c in channel)


def new_message(channel: str, seq: int, data: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "channel": channel,
        "seq": seq,
        "message_id": str(uuid.uuid4()),
        "data": data,
        "timestamp": time.time(),
    }


_publish_locks: dict[str, asyncio.Lock] = {}


async def publish(channel_layer: Any, channel: str, data: Any) -> dict[str, Any]:
    """Number the message and hand it to the group (shared by consumer and view)."""
    # Not in the tutorial: without the lock two publishers interleave INCR and
    # group_send and subscribers see seq 6 before 5. One lock per channel per process
    # is enough here, since the benchmark publishes to a channel from one node.
    lock = _publish_locks.setdefault(channel, asyncio.Lock())
    async with lock:
        message = new_message(channel, await next_seq(channel), data)
        await channel_layer.group_send(group_name(channel), {**message, "type": "push.message"})
    return message


class PushConsumer(AsyncWebsocketConsumer):
    """One client socket, as in the Channels chat tutorial."""

    async def connect(self) -> None:
        self.channels_joined: set[str] = set()
        await self.accept()
        await self._send_json(
            {
                "type": "connection_established",
                "connection_id": str(uuid.uuid4()),
                "server_id": SERVER_ID,
                "heartbeat_interval": HEARTBEAT_INTERVAL_SECS,
                "timestamp": time.time(),
            }
        )

    async def disconnect(self, code: int) -> None:
        for channel in self.channels_joined:
            await self.channel_layer.group_discard(group_name(channel), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            request = json.loads(text_data or "")
            kind = request["type"]
        except (ValueError, KeyError, TypeError):
            await self._send_error("INVALID_JSON", "not a JSON envelope")
            return
        if kind == "subscribe":
            await self._subscribe(request["channel"])
        elif kind == "publish":
            message = await publish(self.channel_layer, request["channel"], request.get("data"))
            reply = {key: message[key] for key in ("channel", "seq", "message_id")}
            await self._send_json({"type": "published", **reply})
        elif kind == "heartbeat":
            await self._send_json({"type": "heartbeat_ack", "timestamp": time.time()})
        else:
            await self._send_error("UNKNOWN_MESSAGE_TYPE", f"unknown type {kind!r}")

    async def _subscribe(self, channel: str) -> None:
        await self.channel_layer.group_add(group_name(channel), self.channel_name)
        self.channels_joined.add(channel)
        seq = await current_seq(channel)
        await self._send_json({"type": "subscribed", "channel": channel, "seq": seq})

    async def push_message(self, event: dict[str, Any]) -> None:
        await self._send_json({**event, "type": "message"})

    async def _send_json(self, message: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(message))

    async def _send_error(self, code: str, text: str) -> None:
        await self._send_json({"type": "error", "code": code, "message": text})
