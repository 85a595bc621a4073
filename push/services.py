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

from django.db import connection, transaction

from push import broadcast
from push.errors import ErrorCode, PushError
from push.message import ChannelMessage, dump_data
from push.models import Channel, Message
from push.protocol import validate_channel_name, validate_data

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


def message_publish(*, channel: str, data: Any, publisher_id: int | None = None) -> ChannelMessage:
    """Store a message and broadcast it once the surrounding transaction commits.

    Call it inside your own ``transaction.atomic()`` to tie the message to your
    changes: rolled back, nothing is published; committed, every subscriber gets it.
    """
    validate_channel_name(channel)
    data_json = _encode_data(data)
    # Whole microseconds, so the live timestamp and the one read back from the
    # database later (resume, REST history) are the same float.
    micros = time.time_ns() // 1000
    timestamp = micros / 1_000_000
    created_at = _EPOCH + timedelta(microseconds=micros)
    with transaction.atomic():
        channel_id, seq = _allocate_seq(channel, created_at)
        message_id = uuid.uuid4()
        Message.objects.create(
            channel_id=channel_id,
            seq=seq,
            message_id=message_id,
            data=data_json,
            publisher_id=publisher_id,
            created_at=created_at,
        )
        message = ChannelMessage(
            channel=channel,
            seq=seq,
            message_id=str(message_id),
            data_json=data_json,
            timestamp=timestamp,
        )
        transaction.on_commit(lambda: broadcast.broadcast_from_sync(message))
    return message
