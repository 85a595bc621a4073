"""A published channel message as it travels through the fan-out path, and a page of
them read back from history (``HistoryPage``).

``data_json`` is the canonical JSON text of the published value: it is what the
database stores and what crosses the broker, so the value is parsed only when a
binary format needs it, and encoded once per wire format per node (``frames``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from push.wire import json_text


class ChannelMessage:
    __slots__ = (
        "_data",
        "channel",
        "data_json",
        "exclude",
        "frames",
        "message_id",
        "relayed",
        "seq",
        "timestamp",
    )

    def __init__(
        self,
        *,
        channel: str,
        seq: int,
        message_id: str,
        data_json: str,
        timestamp: float,
        exclude: str | None = None,
        relayed: bool = False,
    ) -> None:
        self.channel = channel
        self.seq = seq
        self.message_id = message_id
        self.data_json = data_json
        self.timestamp = timestamp
        self._data: Any = _UNPARSED
        # The Pusher socket id of the connection that must not receive this message
        # (a Pusher trigger's socket_id): it travels with the broadcast, and is stored
        # with the message, so a node that reads it back (a gap repair) skips it too.
        self.exclude = exclude
        # Sent to the other nodes by a storage script (a recent channel's numbering,
        # or the recent-history cache's append: ``push.storage.relay``): not for the
        # broker.
        self.relayed = relayed
        # Encoded frames by codec name, shared by every subscriber of that format.
        self.frames: dict[str, Any] = {}

    @property
    def data(self) -> Any:
        if self._data is _UNPARSED:
            self._data = json_text.loads(self.data_json)
        return self._data

    @property
    def data_bytes(self) -> int:
        """The size of ``data_json`` in UTF-8, as the database counts it (without
        encoding it when it is ASCII, as it mostly is)."""
        text = self.data_json
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

    def envelope(self) -> dict[str, Any]:
        return {
            "type": "message",
            "channel": self.channel,
            "seq": self.seq,
            "message_id": self.message_id,
            "data": self.data,
            "timestamp": self.timestamp,
        }

    def to_broker(self) -> dict[str, Any]:
        payload = {
            "type": "push.message",
            "channel": self.channel,
            "seq": self.seq,
            "message_id": self.message_id,
            "data_json": self.data_json,
            "timestamp": self.timestamp,
        }
        if self.exclude is not None:
            payload["exclude"] = self.exclude
        return payload

    @classmethod
    def from_broker(cls, payload: dict[str, Any]) -> ChannelMessage:
        return cls(
            channel=payload["channel"],
            seq=payload["seq"],
            message_id=payload["message_id"],
            data_json=payload["data_json"],
            timestamp=payload["timestamp"],
            exclude=payload.get("exclude"),
        )

    def __repr__(self) -> str:
        return f"ChannelMessage({self.channel!r}, seq={self.seq})"


_UNPARSED: Any = object()


@dataclass(frozen=True)
class HistoryPage:
    since: int
    messages: list[ChannelMessage]
    # The channel's highest seq when the page was read.
    latest_seq: int
    # True when the page stopped at its byte budget before its count: more follow.
    truncated: bool = False
    # True when history lost the channel and cannot tell its latest seq (a recent-only
    # channel whose seq lease Redis lost after it handed some out): ``latest_seq`` is 0,
    # and messages up to an unknown seq are gone.
    lost: bool = False

    @property
    def complete_from_since(self) -> bool:
        """True when nothing after ``since`` was trimmed away by retention."""
        if self.latest_seq <= self.since:
            return True
        return bool(self.messages) and self.messages[0].seq == self.since + 1


def dump_data(data: Any) -> str:
    """Canonical JSON text of a validated value, as stored and broadcast."""
    return json_text.dumps(data)


def data_bytes(message: ChannelMessage) -> int:
    """What a message weighs against the byte budgets of buffers and caches: its data's
    length in characters (its bytes for ASCII text; CPython holds at most 4 bytes a
    character, so memory stays within 4x the budget whatever the text)."""
    return len(message.data_json)


def new_message_ids(count: int, *, now_ms: int | None = None) -> list[str]:
    """``count`` time-ordered (version 7, RFC 9562) UUIDs as text, in the canonical form
    ``str(uuid.UUID(...))`` writes: the current millisecond, then random bits drawn
    ahead of time for a few (``_pooled_tails``), for a batch at once.

    Version 7 rather than 4: the id is a unique index of the messages table, and random
    ids land on random pages of it, while ids that begin with the time land on its last
    pages. Measured against a copy of the benchmark database, that saved PostgreSQL
    about 4 us of CPU per stored message, and more as the table outgrows memory. Each
    id keeps 74 random bits after its millisecond, so ids stay unique across nodes.
    (``uuid4`` one at a time cost a write batch 2.5 us per message; 0.5 us this way.)"""
    millis = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    stamp = (millis & 0xFFFF_FFFF_FFFF).to_bytes(6, "big").hex()
    head = f"{stamp[:8]}-{stamp[8:]}-7"  # the version is the next digit
    if count > _POOLED_AT_MOST:
        return _drawn_ids(count, head)
    return [head + tail for tail in _pooled_tails(count)]


# Random parts of ids drawn at once: a recent-only publish asks for one id at a time,
# and a read of the system's randomness per id cost it about 2 us of the node's CPU. A
# write batch's ids (more than 16) are drawn for it alone, as before.
_TAILS_PER_DRAW = 256
_POOLED_AT_MOST = 16
_tails: list[str] = []
# The event loop and the database threads (``run_plan_sync``) both take ids.
_tails_lock = threading.Lock()


def _pooled_tails(count: int) -> list[str]:
    """``count`` ids' random parts (after the version digit), never handed out twice:
    taken from the pool under its lock, and the pool emptied in a forked child, whose
    parent holds the same bytes."""
    if count <= 0:
        return []
    with _tails_lock:
        if len(_tails) < count:
            _tails.extend(_drawn_ids(_TAILS_PER_DRAW))
        taken = _tails[-count:]
        del _tails[-count:]
    return taken


def _drawn_ids(count: int, head: str = "") -> list[str]:
    """``count`` ids after ``head`` (their millisecond and version digit), from one
    read of the system's randomness."""
    raw = bytearray(os.urandom(10 * count))
    raw[2::10] = bytes(b & 0x3F | 0x80 for b in raw[2::10])  # the RFC variant
    text = raw.hex()
    # Per id: 3 digits after the version, 4 from the variant byte on, then 12.
    return [
        f"{head}{text[i + 1 : i + 4]}-{text[i + 4 : i + 8]}-{text[i + 8 : i + 20]}"
        for i in range(0, 20 * count, 20)
    ]


def _forget_drawn_tails() -> None:
    global _tails_lock
    _tails.clear()
    _tails_lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_drawn_tails)
