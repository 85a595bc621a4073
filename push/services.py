"""Publishing: store a message with its seq, then broadcast it after commit.

One function serves every publisher: the WebSocket consumer, the REST API and
application code (``push.publish``). A message is broadcast only once its transaction
has committed, so subscribers never see a message that the database does not have.
A recent-only channel's message is committed in Redis instead (``push.recent_store``).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError

from push import broadcast, recent_store
from push.conf import push_settings
from push.errors import ErrorCode, PushError
from push.history_modes import is_recent
from push.message import ChannelMessage, dump_data
from push.models import Channel, IdempotencyKey, Message
from push.protocol import validate_channel_name, validate_data
from push.selectors import channel_message_from_row

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _allocate_seq(channel: str, now: datetime) -> tuple[int, int]:
    """Atomically take the channel's next seq: (channel id, seq).

    One upsert: it creates the channel on its first message and otherwise increments
    ``last_seq`` under the row lock, which is held until the transaction commits, so
    publishers to one channel commit in seq order on every node.
    """
    table = connection.ops.quote_name(Channel._meta.db_table)
    # The table name comes from our own model; every value is a parameter.
    sql = (
        f"INSERT INTO {table} (name, last_seq, created_at) VALUES (%s, 1, %s) "  # noqa: S608
        f"ON CONFLICT (name) DO UPDATE SET last_seq = {table}.last_seq + 1 "
        "RETURNING id, last_seq"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [channel, now])
        channel_id, seq = cursor.fetchone()
    return channel_id, seq


def _encode_data(data: Any) -> str:
    data_json = dump_data(validate_data(data))
    try:
        data_json.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "'data' holds a lone UTF-16 surrogate", field="data"
        ) from exc
    return data_json


# Public for the awaitable publish path (``push.services_async``).
encode_data = _encode_data


def _store_message(
    channel: str, data_json: str, publisher_id: int | None
) -> tuple[ChannelMessage, Message]:
    # Whole microseconds, so the live timestamp and the one read back from the
    # database later (resume, REST history) are the same float.
    micros = time.time_ns() // 1000
    created_at = _EPOCH + timedelta(microseconds=micros)
    channel_id, seq = _allocate_seq(channel, created_at)
    row = Message.objects.create(
        channel_id=channel_id,
        seq=seq,
        message_id=uuid.uuid4(),
        data=data_json,
        publisher_id=publisher_id,
        created_at=created_at,
    )
    message = ChannelMessage(
        channel=channel,
        seq=seq,
        message_id=str(row.message_id),
        data_json=data_json,
        timestamp=micros / 1_000_000,
    )
    return message, row


def message_publish(*, channel: str, data: Any, publisher_id: int | None = None) -> ChannelMessage:
    """Store a message and broadcast it once the surrounding transaction commits.

    Call it inside your own ``transaction.atomic()`` to tie the message to your
    changes: rolled back, nothing is published; committed, every subscriber gets it.
    """
    validate_channel_name(channel)
    data_json = _encode_data(data)
    if is_recent(channel):
        return _publish_recent(channel, data_json, publisher_id)
    with transaction.atomic():
        message, _ = _store_message(channel, data_json, publisher_id)
        transaction.on_commit(lambda: broadcast.broadcast_from_sync(message))
    return message


def message_publish_idempotent(
    *,
    channel: str,
    data: Any,
    publisher_id: int | None,
    principal: str,
    idempotency_key: str,
) -> tuple[ChannelMessage, bool]:
    """Publish once per (principal, channel, key) within the idempotency window.

    Returns the message and whether it is the first publish's (a retry). The key row
    is inserted before the message: a concurrent retry with the same key, on any node,
    waits on that insert, fails on the unique constraint once the first commits, and
    then returns the first publish's message; its own transaction published nothing.
    """
    validate_channel_name(channel)
    if is_recent(channel):
        # Its messages have no row for a key to point to; a key in Redis would be lost
        # with the window it protects. Tick data is published again, not retried.
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"{channel!r} is a recent-only channel: Idempotency-Key is not supported there",
            field="Idempotency-Key",
        )
    data_json = _encode_data(data)
    for _attempt in range(3):
        try:
            with transaction.atomic():
                return _publish_under_key(
                    channel, data_json, publisher_id, principal, idempotency_key
                )
        except IntegrityError:
            continue  # a concurrent publish with this key committed first: read it
    raise PushError(ErrorCode.UNAVAILABLE, "idempotent publish kept conflicting; retry")


def _publish_under_key(
    channel: str, data_json: str, publisher_id: int | None, principal: str, key: str
) -> tuple[ChannelMessage, bool]:
    now = _EPOCH + timedelta(microseconds=time.time_ns() // 1000)
    window = timedelta(seconds=push_settings.IDEMPOTENCY_WINDOW_SECS)
    scope = IdempotencyKey.objects.filter(principal=principal, channel=channel, key=key)
    scope.filter(created_at__lt=now - window).delete()
    existing = scope.select_related("message").first()
    if existing is not None and existing.message is not None:
        return channel_message_from_row(channel, existing.message), True
    record = IdempotencyKey.objects.create(
        principal=principal, channel=channel, key=key, created_at=now
    )
    message, row = _store_message(channel, data_json, publisher_id)
    record.message = row
    record.save(update_fields=["message"])
    transaction.on_commit(lambda: broadcast.broadcast_from_sync(message))
    return message, False


def _publish_recent(channel: str, data_json: str, publisher_id: int | None) -> ChannelMessage:
    """A recent channel's message is committed in Redis, which cannot join a database
    transaction: refuse to pretend it does (``publish`` defers it to the commit)."""
    if connection.in_atomic_block:
        raise TransactionManagementError(
            f"{channel!r} is a recent-only channel and cannot publish inside a transaction; "
            "use push.publish(), which publishes it after the commit"
        )
    return recent_store.publish_sync(channel, data_json, publisher_id)


def user_channel(user_id: int) -> str:
    return f"user:{user_id}"


def user_message_send(*, user_id: int, data: Any) -> ChannelMessage:
    """Deliver ``data`` to every connection of one user, on every node: it is published
    on the user's own channel, which only that user can subscribe to."""
    return message_publish(channel=user_channel(user_id), data=data)


def publish(channel: str, data: Any, *, publisher_id: int | None = None) -> ChannelMessage | None:
    """Publish from application code: ``push.services.publish("orders", {...})``.

    The message joins the caller's transaction and reaches subscribers after it commits.
    A recent-only channel's message cannot join it: inside a transaction it is published
    once the transaction commits (never if it rolls back) and None is returned, as its
    seq is not known yet; a failure then is logged, not raised.
    """
    if is_recent(channel) and connection.in_atomic_block:
        validate_channel_name(channel)
        data_json = _encode_data(data)
        transaction.on_commit(
            lambda: recent_store.publish_sync(channel, data_json, publisher_id), robust=True
        )
        return None
    return message_publish(channel=channel, data=data, publisher_id=publisher_id)
