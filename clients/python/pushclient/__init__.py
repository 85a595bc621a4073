"""An asyncio client for the push server (wire contract v1): subscribe, publish,
reconnect with backoff and resume with ``since``. ``python -m pushclient --help``."""

from pushclient.backoff import backoff_ceiling, backoff_delay
from pushclient.client import PushClient, Subscription
from pushclient.errors import (
    ConnectionClosed,
    ConnectionLost,
    NotConnected,
    PushError,
    RequestTimeout,
    TokenProviderFailed,
)
from pushclient.signing import subscription_token, webhook_verify
from pushclient.state import State, is_terminal_close
from pushclient.tokens import token_claims, token_refresh_delay_secs

__all__ = [
    "ConnectionClosed",
    "ConnectionLost",
    "NotConnected",
    "PushClient",
    "PushError",
    "RequestTimeout",
    "State",
    "Subscription",
    "TokenProviderFailed",
    "backoff_ceiling",
    "backoff_delay",
    "is_terminal_close",
    "subscription_token",
    "token_claims",
    "token_refresh_delay_secs",
    "webhook_verify",
]
