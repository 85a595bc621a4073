"""One signing key per purpose, derived from ``SECRET_KEY`` unless configured: a
webhook receiver knows the webhook key, and must not be able to mint subscription
tokens with it."""

from __future__ import annotations

from django.utils.crypto import salted_hmac

SUBSCRIPTION_TOKEN_KEY_SALT = "push.subscription-token"  # noqa: S105 - a salt, not a secret
WEBHOOK_KEY_SALT = "push.webhook"


def purpose_key(salt: str, *, explicit: str | None, secret_key: str) -> str:
    """The HMAC key of one signing purpose: ``explicit`` when configured, else derived
    from ``secret_key`` with the purpose's salt (Django's ``salted_hmac``), as hex text
    so it can be handed to a back-end or a webhook receiver like any secret."""
    if explicit:
        return explicit
    return salted_hmac(salt, "", secret=secret_key, algorithm="sha256").hexdigest()
