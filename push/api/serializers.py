"""REST request and response shapes; the rules themselves live in services."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from common.errors import ErrorCode, PushError
from push.fanout.message import ChannelMessage
from push.wire.protocol import validate_channel_name_once, validate_data


def validated(serializer_class: type[serializers.Serializer], data: Any, **kwargs: Any) -> Any:
    """``serializer_class(data=data, **kwargs)``'s validated data; DRF's
    ``ValidationError`` when it is not valid, as ``is_valid(raise_exception=True)``.

    A DRF serializer's fields refer to it and it to them, a reference cycle only the
    cyclic garbage collector frees (whose collections stop the event loop); dropping
    its fields once it is done lets it go at once."""
    serializer = serializer_class(data=data, **kwargs)
    try:
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data
    finally:
        vars(serializer).pop("fields", None)


# The contract's bound on one batch publish (POST /api/v1/messages).
MAX_BATCH_MESSAGES = 1000


class PublishSerializer(serializers.Serializer):
    # allow_null: JSON null is a value like any other and may be published.
    # The stubs declare ``Serializer.data`` (the output) on the class; DRF takes this
    # declared field from the class body all the same.
    data = serializers.JSONField(allow_null=True, help_text="Any JSON value.")  # type: ignore[assignment]  # see above

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            # Not DRF's "Expected a dictionary": say which field the body must carry.
            raise serializers.ValidationError(
                {"data": ['The body must be a JSON object with the field "data".']}
            )
        if "data" not in data:
            raise serializers.ValidationError({"data": ["This field is required."]})
        return super().to_internal_value(data)


def batch_items(body: Any, *, max_messages: int) -> list[tuple[str, Any]]:
    """The ``(channel, data)`` items of a batch publish body, each checked as a single
    publish is; a refusal names the item's index."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            'The body must be a JSON object with "messages": a non-empty list',
            field="messages",
        )
    if len(messages) > max_messages:
        raise PushError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"a batch holds at most {max_messages} messages, not {len(messages)}",
            field="messages",
        )
    valid_names: set[str] = set()  # a batch names a few channels, many times each
    return [_batch_item(item, index, valid_names) for index, item in enumerate(messages)]


def first_index_of_each_channel(items: list[tuple[str, Any]]) -> dict[int, str]:
    """Each channel the items name, by the index of its first item, in item order: a
    batch of 1,000 messages names a few channels, and each is authorized once (the
    first refused one still names the first item that refusal stops)."""
    firsts: dict[str, int] = {}
    for index, (channel, _data) in enumerate(items):
        firsts.setdefault(channel, index)
    return {index: channel for channel, index in firsts.items()}


def _batch_item(item: Any, index: int, valid_names: set[str]) -> tuple[str, Any]:
    if not isinstance(item, dict):
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            'each message must be an object with "channel" and "data"',
            field="messages",
            index=index,
        )
    try:
        channel = validate_channel_name_once(item.get("channel"), valid_names)
        if "data" not in item:
            raise PushError(ErrorCode.INVALID_MESSAGE, "'data' is required", field="data")
        return channel, validate_data(item["data"])
    except PushError as exc:
        exc.index = index
        raise


class HistoryQuerySerializer(serializers.Serializer):
    since = serializers.IntegerField(min_value=0, required=False, default=0)
    limit = serializers.IntegerField(min_value=1, required=False)

    def __init__(self, *args: Any, max_limit: int, default_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["limit"].default = default_limit
        self._max_limit = max_limit

    def validate_limit(self, value: int) -> int:
        if value > self._max_limit:
            raise serializers.ValidationError(f"Ensure this value is at most {self._max_limit}.")
        return value


class ChannelListQuerySerializer(HistoryQuerySerializer):
    """The channel list's query: ``prefix``, ``occupied``, and ``after`` (the last name
    of the previous page) with ``limit`` as history pages."""

    since = None  # type: ignore[assignment]  # the list pages by name, not seq
    prefix = serializers.CharField(required=False, default="", allow_blank=True, max_length=100)
    occupied = serializers.BooleanField(required=False, default=False)
    after = serializers.CharField(required=False, default="", allow_blank=True, max_length=100)


def published_body(message: ChannelMessage) -> dict[str, Any]:
    return {
        "channel": message.channel,
        "seq": message.seq,
        "message_id": message.message_id,
        "timestamp": message.timestamp,
    }
