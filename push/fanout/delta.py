"""Delta compression of a channel's messages, for subscriptions that asked for it
(``"delta": "fossil"`` on ``subscribe``, docs/protocol.md).

The delta of a message is the fossil delta (the format of the Fossil SCM, as
Centrifugo sends it) of its data's JSON text against the data of the message before
it on the channel, base64 in ``data_delta``. It is computed once per message on a
node, and only on channels with a delta subscriber here; its frame is built once per
wire format, like every frame. A subscriber gets it only if it was sent the message
before (the hub keeps such subscribers apart: ``ChannelDeltas``); every other one
gets the full ``data``, as does everyone when the delta would not be smaller or the
data is past ``DELTA_MAX_BYTES``.

The fossil encoder is python-fossil-delta (the Fossil SCM's own C code under cffi).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import fossil_delta

from push.fanout.message import ChannelMessage
from push.fanout.outbox import OutFrame

if TYPE_CHECKING:
    from push.wire.codecs import Codec

# The one algorithm the server agrees to.
FOSSIL = "fossil"
# Data (the message's or its base's JSON text, in UTF-8 bytes) past which a message goes
# to delta subscribers in full, without a delta computed: the encoder tries up to 250
# earlier positions for each byte of data that repeats little (random digits or
# base64), on the event loop. Measured: 33 ms for 32 KiB of such data, 2 to 8 s for
# 1 MiB, where a state that changes a little per message costs about 12 us per 5 KB.
DELTA_MAX_BYTES = 32 * 1024


def fossil_delta_text(base_json: str, data_json: str) -> str | None:
    """The base64 fossil delta that turns ``base_json`` into ``data_json`` (both as
    UTF-8), or None when it would not be smaller than the data's JSON text itself."""
    try:
        base = base_json.encode("utf-8")
        target = data_json.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate has no UTF-8 form, so the client could not apply a delta of
        # any encoding of it: such a message goes out in full.
        return None
    text = base64.b64encode(fossil_delta.create_delta(base, target)).decode("ascii")
    return text if len(text) < len(target) else None


def delta_envelope(message: ChannelMessage, data_delta: str) -> dict[str, Any]:
    return {
        "type": "message",
        "channel": message.channel,
        "seq": message.seq,
        "message_id": message.message_id,
        "delta": True,
        "data_delta": data_delta,
        "timestamp": message.timestamp,
    }


def encode_delta_frame(codec: Codec, message: ChannelMessage, data_delta: str) -> OutFrame:
    """The message's frame with ``data_delta`` instead of ``data``: built once per wire
    format and shared by that format's delta subscribers. Never droppable: delta is
    not agreed on drop-oldest channels, whose dropped frames would break the chain."""
    payload = codec.encode(delta_envelope(message, data_delta))
    return OutFrame(
        codec.send_event(payload), len(payload), channel=message.channel, seq=message.seq
    )


Push = Callable[[OutFrame], bool]


class ChannelDeltas:
    """A channel's delta subscribers on this node, per wire format (as ``HubChannel.live``
    holds the others): ``in_step`` were sent the channel's last message (``base``) and
    can take a delta of the next; ``fresh`` were not (they just subscribed without a
    replay, or their replay ended before it) and get the next message in full, which
    puts them in step. A live subscriber receives every message after that, so it stays
    in step until it leaves; ``sent_seq`` tells the hub which side a newcomer joins."""

    __slots__ = ("base", "fresh", "in_step")

    def __init__(self, base: ChannelMessage | None) -> None:
        # The last message fanned out on the channel: what in-step subscribers hold.
        self.base = base
        self.in_step: dict[str, dict[Push, Any]] = {}
        self.fresh: dict[str, dict[Push, Any]] = {}

    def add(self, codec_name: str, push: Push, subscription: Any, *, in_step: bool) -> None:
        side = self.in_step if in_step else self.fresh
        side.setdefault(codec_name, {})[push] = subscription

    def remove(self, codec_name: str, push: Push) -> None:
        for side in (self.in_step, self.fresh):
            by_codec = side.get(codec_name)
            if by_codec is not None:
                by_codec.pop(push, None)
                if not by_codec:
                    del side[codec_name]

    def settle_fresh(self) -> None:
        """The fresh subscribers were just sent a message in full: now in step."""
        for codec_name, by_codec in self.fresh.items():
            self.in_step.setdefault(codec_name, {}).update(by_codec)
        self.fresh.clear()

    def __len__(self) -> int:
        return sum(len(subs) for subs in self.in_step.values()) + sum(
            len(subs) for subs in self.fresh.values()
        )
