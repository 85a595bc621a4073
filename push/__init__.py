"""Channels, history and fan-out. Application code publishes with ``push.publish``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from push.fanout.message import ChannelMessage


def publish(channel: str, data: Any, *, publisher_id: int | None = None) -> ChannelMessage | None:
    """Publish ``data`` to ``channel`` from Django code, inside the caller's transaction:
    stored with it, delivered to subscribers only after it commits, never if it rolls
    back. Returns the stored message (``seq``, ``message_id``, ``timestamp``).

    A recent-only channel (``PUSH_HISTORY_MODES``) keeps its messages in Redis, which
    cannot join the transaction: inside one, the message is published after the commit
    and None is returned (docs/semantics.md, "History modes")."""
    # Imported here: this package is imported while Django loads its apps, before the
    # models that publishing needs can be.
    from push.services.publishing import publish as publish_in_transaction

    return publish_in_transaction(channel, data, publisher_id=publisher_id)
