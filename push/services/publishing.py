"""Publishing: store a message with its seq, then broadcast it after commit.

The same functions serve every publisher: the WebSocket consumer and the REST API
(``message_publish_submitted``, ``message_publish_queued``, ``messages_publish_batch``,
through the node's group-commit write pipeline) and application code (``push.publish``,
in the caller's transaction). Every path runs the same batch SQL
(``push.storage.write_batch``). A message is broadcast only once its transaction has
committed, so subscribers never see a message that the
database does not have. A recent-only channel's message is committed in Redis instead
(``push.storage.recent_store``; ``_recent_channel`` is where that is decided).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from django.db import DataError, IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError

from common import metrics
from common.conf import push_settings
from common.db import db_call
from common.errors import ErrorCode, PushError
from push.cluster import broadcast
from push.cluster.node import Node, running_node
from push.fanout.message import ChannelMessage, dump_data
from push.storage import recent_store
from push.storage.history_modes import is_recent
from push.storage.write_batch import Outcome, Published, PublishUnit, run_plan_sync
from push.wire.protocol import validate_channel_name, validate_channel_name_once, validate_data


def _encode_data(data: Any, *, checked: bool = False) -> str:
    """The data's canonical JSON text; ``checked``: ``validate_data`` passed it already
    (the wire's parser and the batch serializer check what they read: ``checked`` of
    the callers below)."""
    data_json = dump_data(data if checked else validate_data(data))
    if len(data_json) > push_settings.MAX_FRAME_BYTES:
        # The frame limit bounds a message as it is stored, kept and sent, not only as
        # it came: a MessagePack frame of `false` values is six times longer as JSON
        # text, a JSON `1E15` about four times.
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"'data' is {len(data_json)} characters as JSON text, more than the "
            f"{push_settings.MAX_FRAME_BYTES} a message may hold",
            field="data",
        )
    if data_json.isascii():  # nothing to encode (CPython knows it without a scan)
        return data_json
    try:
        data_json.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "'data' holds a lone UTF-16 surrogate", field="data"
        ) from exc
    return data_json


def _single_unit(
    channel: str,
    data: Any,
    publisher_id: int | None,
    principal: str | None,
    idempotency_key: str | None,
    exclude: str | None = None,
    *,
    checked: bool = False,
) -> PublishUnit:
    if not checked:
        validate_channel_name(channel)
    return PublishUnit(
        items=[(channel, _encode_data(data, checked=checked))],
        publisher_id=publisher_id,
        principal=principal,
        idempotency_key=idempotency_key,
        key_channel=channel,
        exclude=exclude,
    )


def _batch_unit(
    items: Sequence[tuple[str, Any]],
    publisher_id: int | None,
    principal: str | None,
    idempotency_key: str | None,
    exclude: str | None = None,
    *,
    checked: bool = False,
) -> PublishUnit:
    if not items:
        raise PushError(ErrorCode.INVALID_MESSAGE, "a batch holds at least one message")
    encoded = []
    valid_names: set[str] = set()
    for index, (channel, data) in enumerate(items):
        try:
            if not checked:
                validate_channel_name_once(channel, valid_names)
            encoded.append((channel, _encode_data(data, checked=checked)))
        except PushError as exc:
            raise PushError(exc.code, exc.message, field=exc.field, index=index) from exc
    # The batch's key is scoped to (principal, the batch): the empty channel.
    return PublishUnit(
        items=encoded,
        publisher_id=publisher_id,
        principal=principal,
        idempotency_key=idempotency_key,
        exclude=exclude,
    )


# ----- where a publish is written ----------------------------------------------------------


def _running_node_here() -> Node | None:
    """The node running on this event loop, if there is one."""
    node = running_node()
    if node is None or not node.serves_here():
        return None
    return node


def _recent_channel(unit: PublishUnit) -> str | None:
    """The recent-only channel ``unit`` is for, or None when every channel of it is
    durable (PostgreSQL). One unit is one commit, so it must be one store's: a batch
    that mixes durable and recent channels, or spans several recent ones, is refused
    (Redis commits one channel's messages at once), and so is an ``Idempotency-Key``
    on a recent channel (there is no row to remember it in)."""
    items = unit.items
    if len(items) == 1 and unit.idempotency_key is None:
        # A lone publish, nearly every one on a busy node: its one channel decides.
        only = items[0][0]
        return only if is_recent(only) else None
    recent = [index for index, (channel, _) in enumerate(items) if is_recent(channel)]
    if not recent:
        return None
    channel = unit.items[recent[0]][0]
    index = recent[0] if len(unit.items) > 1 else None
    if unit.idempotency_key is not None:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"{channel!r} is a recent-only channel: Idempotency-Key is not supported there",
            field="Idempotency-Key",
            index=index,
        )
    for position, (other, _) in enumerate(unit.items):
        if other != channel:
            raise PushError(
                ErrorCode.INVALID_MESSAGE,
                "a batch with a recent-only channel must hold only that channel's messages",
                index=position if position in recent or index is None else index,
            )
    return channel


def _queue(unit: PublishUnit) -> asyncio.Future[Outcome] | None:
    """Pick the store for the unit's channels: the one place that does.

    On a node's loop a unit is queued now, so a caller that queues several keeps their
    order without a task each, and the future answers once it committed (a refusal as
    its result): a durable unit in the node's write pipeline, which batches it with the
    node's other publishes; a recent-only channel's in the node's Redis store, which
    numbers and stores it with one script call and broadcasts it from that call's
    callback. None without a node on this loop (a management command, a test client's
    throwaway loop): ``_written`` stores the unit when awaited, a durable one's batch
    SQL through Django's connection on the database threads."""
    node = _running_node_here()
    if node is None:
        return None
    recent = _recent_channel(unit)
    if recent is not None:
        return recent_store.publish_submitted(
            recent,
            [data_json for _, data_json in unit.items],
            broadcast=node.broadcast,
            exclude=unit.exclude,
        )
    if node.write_pipeline is not None:
        return node.write_pipeline.submit(unit)
    return None


async def _written(unit: PublishUnit, queued: asyncio.Future[Outcome] | None) -> Published:
    """``unit`` stored and broadcast after commit (``queued`` is what ``_queue`` gave)."""
    if queued is not None:
        # A publisher that goes away (its task cancelled) cancels only its own future:
        # the batch it is in is written all the same, and nobody is answered.
        outcome = await queued
        if isinstance(outcome, PushError):
            raise outcome
        return outcome
    recent = _recent_channel(unit)
    if recent is not None:
        data = [data_json for _, data_json in unit.items]
        return Published(
            await recent_store.publish_batch(
                recent,
                data,
                unit.publisher_id,
                broadcast=broadcast.broadcast_async,
                exclude=unit.exclude,
            ),
            False,
        )
    return await _write_on_database_thread(unit)


def _write_sync(unit: PublishUnit) -> Published:
    """Store ``unit`` in the caller's transaction (or one of its own); broadcast after
    the outermost transaction commits. A recent-only channel cannot join a database
    transaction: inside one it is refused; outside, it is published at once."""
    recent = _recent_channel(unit)
    if recent is not None:
        if connection.in_atomic_block:
            raise TransactionManagementError(
                f"{recent!r} is a recent-only channel and cannot publish inside a "
                "transaction; use push.publish(), which publishes it after the commit"
            )
        return Published(
            [
                recent_store.publish_sync(
                    recent,
                    unit.items[0][1],
                    unit.publisher_id,
                    broadcast=broadcast.broadcast_async,
                )
            ],
            False,
        )
    try:
        batch = run_plan_sync([unit], window_secs=push_settings.IDEMPOTENCY_WINDOW_SECS)
    except (IntegrityError, DataError) as exc:
        raise PushError(
            ErrorCode.INVALID_MESSAGE, f"the database refused this: {type(exc).__name__}"
        ) from exc
    outcome = batch.outcomes[0]
    if isinstance(outcome, PushError):
        raise outcome
    stored = batch.stored
    if stored:
        transaction.on_commit(lambda: _broadcast_all(stored))
    return outcome


def _broadcast_all(messages: list[ChannelMessage]) -> None:
    for message in messages:
        broadcast.broadcast_from_sync(message)


_write_on_database_thread = db_call(_write_sync)


# ----- the services -------------------------------------------------------------------------


def message_publish_queued(
    *,
    channel: str,
    data: Any,
    publisher_id: int | None,
    principal: str | None = None,
    idempotency_key: str | None = None,
    exclude: str | None = None,
    checked: bool = False,
) -> Coroutine[Any, Any, tuple[ChannelMessage, bool]]:
    """Publish one message, in two steps: it is checked and queued for the node's write
    pipeline now (raising at once what refuses it), and the awaitable returned answers
    once it committed (``await message_publish_queued(...)`` does both).

    ``exclude`` names a Pusher socket id that does not receive the message live (the
    ``socket_id`` of a Pusher trigger: the sender already showed it). ``checked``: the
    caller validated the channel's name and the data already.

    Answers the message and whether it is an earlier publish's, answered again for a
    retried ``idempotency_key`` (scoped to ``principal`` and the channel); a replayed
    message carries the first publish's channel, seq, id and timestamp, not its data.
    """
    unit = _single_unit(
        channel, data, publisher_id, principal, idempotency_key, exclude, checked=checked
    )
    return _first_message(unit, _queue(unit))


def message_publish_submitted(
    *, channel: str, data: Any, publisher_id: int | None, checked: bool = False
) -> asyncio.Future[Outcome]:
    """``message_publish_queued`` for a caller that answers from a callback, not a task
    (the WebSocket consumer, which has many publishes in flight): checked and queued
    now, raising at once what refuses it; the future gives the outcome once committed,
    a refusal (``PushError``) as its result, not raised. ``checked``: the caller's
    parser validated the channel's name and the data already (``push.wire.protocol``).

    On a node's loop this is the store's own future (``_queue``): no task per publish.
    Without a node on this loop, a task writes it."""
    unit = _single_unit(channel, data, publisher_id, None, None, checked=checked)
    queued = _queue(unit)
    if queued is not None:
        return queued
    return asyncio.get_running_loop().create_task(_outcome(unit))


async def _outcome(unit: PublishUnit) -> Outcome:
    try:
        return await _written(unit, None)
    except PushError as exc:
        return exc


async def _first_message(
    unit: PublishUnit, queued: asyncio.Future[Outcome] | None
) -> tuple[ChannelMessage, bool]:
    published = await _written(unit, queued)
    return published.messages[0], published.replayed


async def messages_publish_batch(
    *,
    items: Sequence[tuple[str, Any]],
    publisher_id: int | None,
    principal: str | None = None,
    idempotency_key: str | None = None,
    exclude: str | None = None,
    checked: bool = False,
) -> tuple[list[ChannelMessage], bool]:
    """Publish ``items`` ((channel, data) pairs) all together or not at all, in one
    transaction; the messages come back in request order.

    An invalid item raises ``INVALID_MESSAGE`` naming its ``index`` before anything is
    written. ``idempotency_key`` covers the whole batch (scoped to ``principal``).
    ``checked``: every item's channel name and data were validated already (as
    ``push.api.serializers.batch_items`` checks them).
    """
    unit = _batch_unit(items, publisher_id, principal, idempotency_key, exclude, checked=checked)
    published = await _written(unit, _queue(unit))
    return published.messages, published.replayed


async def messages_publish_batches(
    *, batches: Sequence[tuple[Sequence[tuple[str, Any]], str | None]]
) -> list[tuple[list[ChannelMessage], bool]]:
    """Publish several batches (each its items and the socket id it excludes), each
    one as ``messages_publish_batch`` does, answered in order; for a request whose
    messages cannot share one commit (a Pusher trigger naming recent-only channels
    among others, or excluding several socket ids).

    Every batch is checked, and refused, before anything is written: a refusal that
    came after a first batch was published would have the client retry the whole
    request and publish that batch twice. The durable batches commit first, so the
    database failing publishes nothing; only Redis failing after them (the recent-only
    channels, each its own commit) leaves the request half published. A channel is
    in one store, so its messages keep their order."""
    units = [_batch_unit(items, None, None, None, exclude) for items, exclude in batches]
    recent = {id(unit) for unit in units if _recent_channel(unit) is not None}
    published: dict[int, Published] = {}
    for unit in sorted(units, key=lambda unit: id(unit) in recent):
        published[id(unit)] = await _written(unit, _queue(unit))
    return [(published[id(u)].messages, published[id(u)].replayed) for u in units]


def message_publish(*, channel: str, data: Any, publisher_id: int | None = None) -> ChannelMessage:
    """Store a message and broadcast it once the surrounding transaction commits.

    Call it inside your own ``transaction.atomic()`` to tie the message to your
    changes: rolled back, nothing is published; committed, every subscriber gets it.
    """
    unit = _single_unit(channel, data, publisher_id, None, None)
    message = _write_sync(unit).messages[0]
    # Counted here, not in _write_sync: the REST API also writes through it and counts
    # its own. After the commit, as the broadcast is: a rollback published nothing.
    transaction.on_commit(_count_application_publish)
    return message


_PUBLISHED_BY_APPLICATION = metrics.MESSAGES_PUBLISHED.labels("django")
# A tally is written without a lock by the event loop's thread alone; application code
# publishes from any thread, so its own label's count takes this lock.
_PUBLISHED_BY_APPLICATION_LOCK = threading.Lock()


def _count_application_publish() -> None:
    with _PUBLISHED_BY_APPLICATION_LOCK:
        _PUBLISHED_BY_APPLICATION.inc()


def user_channel(user_id: int) -> str:
    return f"user:{user_id}"


def user_message_send(*, user_id: int, data: Any) -> ChannelMessage:
    """Deliver ``data`` to every connection of one user, on every node: it is published
    on the user's own channel, which only that user can subscribe to."""
    return message_publish(channel=user_channel(user_id), data=data)


def publish(channel: str, data: Any, *, publisher_id: int | None = None) -> ChannelMessage | None:
    """Publish from application code: ``push.services.publishing.publish("orders", {...})``.

    The message joins the caller's transaction and reaches subscribers after it commits.
    A recent-only channel's message cannot join it: inside a transaction it is
    published once the transaction commits (nothing if it rolls back), and None is
    returned, since its seq is not known yet.
    """
    if is_recent(channel) and connection.in_atomic_block:
        validate_channel_name(channel)
        data_json = _encode_data(data)

        def publish_committed() -> None:
            recent_store.publish_sync(
                channel, data_json, publisher_id, broadcast=broadcast.broadcast_async
            )
            _count_application_publish()

        transaction.on_commit(publish_committed, robust=True)
        return None
    return message_publish(channel=channel, data=data, publisher_id=publisher_id)
