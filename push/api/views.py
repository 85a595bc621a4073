"""REST API: publish to a channel, read its history, list channels.

Views check the request's shape and call the services; who may do what is
``accounts.permissions.ChannelPermission``'s to say (the decider WebSocket and SSE ask),
from each view's ``channel_rights`` and ``request_channel()``. They hold no rules of
their own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import request_principal
from accounts.permissions import ChannelPermission, visible_channels
from push import metrics, selectors
from push.api.serializers import (
    HistoryQuerySerializer,
    PublishSerializer,
    channel_body,
    published_body,
)
from push.conf import push_settings
from push.errors import ErrorCode, PushError
from push.presence import presence_members_sync
from push.protocol import validate_channel_name
from push.services import message_publish, message_publish_idempotent, user_channel

MAX_IDEMPOTENCY_KEY_CHARS = 255


def _page_url(request: Request, **params: Any) -> str:
    query = request.query_params.copy()
    for key, value in params.items():
        query[key] = str(value)
    return request.build_absolute_uri(request.path) + "?" + urlencode(query)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters",
            field="Idempotency-Key",
        )
    return key


def _publish_response(request: Request, channel: str) -> Response:
    """Publish the request's ``data`` on ``channel`` for the REST caller (201, or 200
    with the first result for a retried ``Idempotency-Key``)."""
    principal = request_principal(request)
    if len(request.body) > push_settings.MAX_FRAME_BYTES:
        raise PushError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"body is larger than {push_settings.MAX_FRAME_BYTES} bytes",
        )
    serializer = PublishSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    data = serializer.validated_data["data"]
    key = _idempotency_key(request)
    replayed = False
    if key is None:
        message = message_publish(channel=channel, data=data, publisher_id=principal.user_id)
    else:
        message, replayed = message_publish_idempotent(
            channel=channel,
            data=data,
            publisher_id=principal.user_id,
            principal=principal.key,
            idempotency_key=key,
        )
    if replayed:
        return Response(published_body(message), status=status.HTTP_200_OK)
    metrics.MESSAGES_PUBLISHED.labels("rest").inc()
    return Response(published_body(message), status=status.HTTP_201_CREATED)


class ChannelView(APIView):
    """A view about the channel named in its URL."""

    permission_classes = [ChannelPermission]
    channel_rights: dict[str, str] = {}

    def request_channel(self) -> str:
        return validate_channel_name(self.kwargs["channel"])


class ChannelMessagesView(ChannelView):
    channel_rights = {"GET": "subscribe", "POST": "publish"}

    def post(self, request: Request, channel: str) -> Response:
        return _publish_response(request, channel)

    def get(self, request: Request, channel: str) -> Response:
        query = HistoryQuerySerializer(
            data=request.query_params,
            max_limit=push_settings.HISTORY_PAGE_MAX,
            default_limit=push_settings.HISTORY_PAGE_DEFAULT,
        )
        query.is_valid(raise_exception=True)
        since, limit = query.validated_data["since"], query.validated_data["limit"]
        messages, cut_short = selectors.message_list_since(
            channel=channel,
            since=since,
            limit=limit + 1,
            max_bytes=push_settings.HISTORY_PAGE_MAX_BYTES,
        )
        has_more = len(messages) > limit or cut_short
        messages = messages[:limit]
        next_url = _page_url(request, since=messages[-1].seq, limit=limit) if has_more else None
        return Response({"results": [m.envelope() for m in messages], "next": next_url})


class ChannelListView(APIView):
    # No channel right: the list holds only the channels the caller may see.
    permission_classes = [ChannelPermission]
    PAGE_SIZE = 100

    def get(self, request: Request) -> Response:
        after = request.query_params.get("after", "")
        channels = list(
            visible_channels(request_principal(request), selectors.channel_list(), after=after)[
                : self.PAGE_SIZE + 1
            ]
        )
        has_more = len(channels) > self.PAGE_SIZE
        channels = channels[: self.PAGE_SIZE]
        next_url = _page_url(request, after=channels[-1].name) if has_more else None
        return Response({"results": [channel_body(c) for c in channels], "next": next_url})


class UserMessagesView(ChannelView):
    """``POST /api/v1/users/<id>/messages``: to all of one user's connections."""

    channel_rights = {"POST": "publish"}

    def request_channel(self) -> str:
        return user_channel(self.kwargs["user_id"])

    def post(self, request: Request, user_id: int) -> Response:
        return _publish_response(request, user_channel(user_id))


class ChannelPresenceView(ChannelView):
    """``GET /api/v1/channels/<presence-channel>/presence``: who is there now."""

    channel_rights = {"GET": "presence"}

    def get(self, request: Request, channel: str) -> Response:
        return Response({"channel": channel, "members": presence_members_sync(channel)})
