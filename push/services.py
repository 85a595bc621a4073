"""Publishing: store a message with its seq, then broadcast it after commit.

One function serves every publisher: the WebSocket consumer, the REST API and
application code (``push.publish``). A message is broadcast only once its transaction
has committed, so subscribers never see a message that the database does not have.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction

from push import broadcast
from push.conf import push_settings
from push.errors import ErrorCode, PushError
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


def user_channel(user_id: int) -> str:
    return f"user:{user_id}"


def user_message_send(*, user_id: int, data: Any) -> ChannelMessage:
    """Deliver ``data`` to every connection of one user, on every node: it is published
    on the user's own channel, which only that user can subscribe to."""
    return message_publish(channel=user_channel(user_id), data=data)


def publish(channel: str, data: Any, *, publisher_id: int | None = None) -> ChannelMessage:
    """Publish from application code: ``push.services.publish("orders", {...})``.

    The message joins the caller's transaction and reaches subscribers after it commits.
    """
    return message_publish(channel=channel, data=data, publisher_id=publisher_id)


# interim: replaced by the write pipeline
# ----------------------------------------------------------------------------------------
# Awaitable publishing for the REST views, over the sync ORM code above on the database
# threads. A batch's idempotency key is kept as one IdempotencyKey row per message, under
# a pseudo-channel "*batch:<index>" that no real channel name can equal.

from collections.abc import Sequence  # noqa: E402

from push.db import db_call  # noqa: E402

_BATCH_KEY_PREFIX = "*batch:"


async def message_publish_async(
    *,
    channel: str,
    data: Any,
    publisher_id: int | None,
    principal: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[ChannelMessage, bool]:
    """Publish one message; with ``idempotency_key``, a retry gets the first result and
    True."""
    if idempotency_key is None:
        message = await db_call(message_publish)(
            channel=channel, data=data, publisher_id=publisher_id
        )
        return message, False  # type: ignore[return-value]
    return await db_call(message_publish_idempotent)(  # type: ignore[return-value]
        channel=channel,
        data=data,
        publisher_id=publisher_id,
        principal=principal or "anonymous",
        idempotency_key=idempotency_key,
    )


async def messages_publish_batch(
    *,
    items: Sequence[tuple[str, Any]],
    publisher_id: int | None,
    principal: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[list[ChannelMessage], bool]:
    """Publish ``(channel, data)`` items all or nothing, in one transaction; the
    messages in the items' order. A refused item raises ``PushError`` with its index."""
    encoded = []
    for index, (channel, data) in enumerate(items):
        try:
            encoded.append((validate_channel_name(channel), _encode_data(data)))
        except PushError as exc:
            exc.index = index
            raise
    return await db_call(_publish_batch_sync)(  # type: ignore[return-value]
        encoded, publisher_id, principal or "anonymous", idempotency_key
    )


def _publish_batch_sync(
    items: list[tuple[str, str]], publisher_id: int | None, principal: str, key: str | None
) -> tuple[list[ChannelMessage], bool]:
    for _attempt in range(3):
        try:
            with transaction.atomic():
                return _publish_batch_under_key(items, publisher_id, principal, key)
        except IntegrityError:
            continue  # a concurrent batch with this key committed first: read it
    raise PushError(ErrorCode.UNAVAILABLE, "idempotent publish kept conflicting; retry")


def _publish_batch_under_key(
    items: list[tuple[str, str]], publisher_id: int | None, principal: str, key: str | None
) -> tuple[list[ChannelMessage], bool]:
    now = _EPOCH + timedelta(microseconds=time.time_ns() // 1000)
    first = None
    if key is not None:
        scope = IdempotencyKey.objects.filter(
            principal=principal, key=key, channel__startswith=_BATCH_KEY_PREFIX
        )
        window = timedelta(seconds=push_settings.IDEMPOTENCY_WINDOW_SECS)
        scope.filter(created_at__lt=now - window).delete()
        stored = [r for r in scope.select_related("message__channel") if r.message is not None]
        if stored:
            stored.sort(key=lambda r: int(r.channel[len(_BATCH_KEY_PREFIX) :]))
            return [
                channel_message_from_row(r.message.channel.name, r.message) for r in stored
            ], True
        # Inserted before any message: a concurrent retry waits on this row's unique key.
        first = IdempotencyKey.objects.create(
            principal=principal, channel=f"{_BATCH_KEY_PREFIX}0", key=key, created_at=now
        )
    # Channels are locked in name order, so two batches never wait on each other's rows.
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    messages: list[ChannelMessage | None] = [None] * len(items)
    rows: list[Message | None] = [None] * len(items)
    for index in order:
        channel, data_json = items[index]
        messages[index], rows[index] = _store_message(channel, data_json, publisher_id)
    if first is not None:
        first.message = rows[0]
        first.save(update_fields=["message"])
        IdempotencyKey.objects.bulk_create(
            IdempotencyKey(
                principal=principal,
                channel=f"{_BATCH_KEY_PREFIX}{index}",
                key=key,
                message=rows[index],
                created_at=now,
            )
            for index in range(1, len(items))
        )
    published = [m for m in messages if m is not None]
    for message in published:
        transaction.on_commit(lambda m=message: broadcast.broadcast_from_sync(m))
    return published, False
