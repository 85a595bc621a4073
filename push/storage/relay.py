"""Committed messages sent to the other nodes by the Redis script that stores them.

Both of storage's scripts that run after a message is numbered (the recent-only
store's publish script, ``push.storage.recent_store``, and the recent-history cache's
append, ``push.storage.recent_cache``) already hold every message of their call, in
seq order per channel. Where their Redis is the one the channel layer's groups live
on, they also PUBLISH each channel's messages to its group there and then, instead of
the node's broker serializing them again and sending them in a call of its own
(measured: the broker was a tenth of a node publishing over WebSocket, and its own
messages coming back another 2%). The node gives storage a ``Relay`` (from its broker,
``push.cluster.broker.Broker.storage_relay``): the group of a channel, and a mark that
names the node so it knows its own payloads when Redis sends them back. A message sent
so is ``relayed`` (``ChannelMessage.relayed``), and the broker skips it.

A payload is ``RELAY_MARK``, the sender's tag, ``:``, one byte for the kind of its
entries (``RECENT_ENTRIES``: a recent channel's window entries, JSON;
``CACHED_ENTRIES``: the cache's stream entries), then a MessagePack array: the
channel's name and its entries in seq order. 0xC1 is the one byte MessagePack never
uses, so no payload of the channel layer (a MessagePack map) starts like this.
"""

from __future__ import annotations

from typing import Protocol

RELAY_MARK = b"\xc1push-relay:"
RECENT_ENTRIES = b"r"
CACHED_ENTRIES = b"d"
# At most this many messages of a channel in one payload, and past this many
# characters the next one starts another, as in the broker's own payloads
# (``push.cluster.broker``: Redis buffers what a reader has not read yet against its
# pub/sub output limit, payload by payload).
PAYLOAD_MESSAGES = 100
PAYLOAD_CHARS = 256 * 1024

# The scripts' Lua for it: ``relayed(group, channel, entries, first, last)`` PUBLISHes
# ``entries[first..last]`` of ``channel`` to ``group``, in payloads within the bounds
# above, each behind ``relay_prefix`` (the mark, the tag, ":" and the kind), a local
# the script sets before this text.
RELAY_LUA = """
local function relayed(group, channel, entries, first, last)
  local payload, chars = {channel}, 0
  for i = first, last do
    local size = #entries[i]
    if #payload > 1 and (#payload > PER_PAYLOAD or chars + size > PAYLOAD_CHARS) then
      redis.call('PUBLISH', group, relay_prefix .. cmsgpack.pack(payload))
      payload, chars = {channel}, 0
    end
    payload[#payload + 1] = entries[i]
    chars = chars + size
  end
  redis.call('PUBLISH', group, relay_prefix .. cmsgpack.pack(payload))
end
""".replace("PER_PAYLOAD", str(PAYLOAD_MESSAGES)).replace("PAYLOAD_CHARS", str(PAYLOAD_CHARS))


class Relay(Protocol):
    """What storage's scripts need to send the other nodes a channel's messages."""

    # RELAY_MARK, the node's tag and ":".
    mark: bytes

    def group_of(self, channel: str) -> bytes:
        """The Redis pub/sub channel that the nodes serving ``channel`` read."""
        ...


def payload_parts(payload: bytes) -> tuple[bytes, bytes]:
    """A relayed payload's kind of entries, and the MessagePack after it."""
    kind = payload.index(b":", len(RELAY_MARK)) + 1
    return payload[kind : kind + 1], payload[kind + 1 :]


_relay: Relay | None = None


def relay_with(relay: Relay | None) -> None:
    """Relay this process's stored messages through ``relay`` (a node started), or not
    (None: it stopped; its broker sends them, as any process's)."""
    global _relay
    _relay = relay


def current() -> Relay | None:
    return _relay
