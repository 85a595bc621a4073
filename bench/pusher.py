"""The load generator's side of the Pusher protocol (``/app/<key>``, issue 17): the app
the node is started with, the path and the few frames a subscriber sends.

A Pusher subscriber rides the bench's own WebSocket client (``wsclient.py``); only its
handshake path and its frames differ. A message of our protocol reaches it as
``{"event":"message","channel":C,"data":"<JSON text of the message's data>"}``: no
seq, no server timestamp (subscriber.py counts deliveries instead of checking seqs, and
takes the latency from the publisher's ``t`` inside the data text).
"""

from __future__ import annotations

import json
import secrets

APP_ID = "bench"
APP_KEY = "bench-pusher-key"
# What pusher-js 8 sends; the node accepts protocol versions 5 to 7.
PATH = f"/app/{APP_KEY}?protocol=7&client=js&version=8.4.0"

CONNECTION_ESTABLISHED = "pusher:connection_established"
SUBSCRIPTION_SUCCEEDED = "pusher_internal:subscription_succeeded"
PING = "pusher:ping"
ERRORS = ("pusher:error", "pusher:subscription_error")
MESSAGE_EVENT = "message"  # the event a message of our protocol becomes (no "event" in it)
# A Pusher client answers the server's pusher:ping, or is closed 4201 after the node's
# activity timeout (120 s) and 30 s more: a long sweep outlasts that.
PONG_FRAME = b'{"event":"pusher:pong","data":{}}'


def node_env() -> dict[str, str]:
    """What a node needs to serve ``/app/<APP_KEY>``: one app from the environment."""
    return {
        "PUSHER_APP_ID": APP_ID,
        "PUSHER_APP_KEY": APP_KEY,
        "PUSHER_APP_SECRET": secrets.token_hex(16),  # public channels only: never used
    }


def subscribe_frame(channel: str) -> bytes:
    return json.dumps({"event": "pusher:subscribe", "data": {"channel": channel}}).encode()
