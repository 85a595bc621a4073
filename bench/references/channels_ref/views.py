"""REST publish for the Channels reference: an async Django view calling group_send."""

from __future__ import annotations

import json

from channels.layers import get_channel_layer
from django.http import HttpRequest, JsonResponse

from bench.references.channels_ref.consumers import publish

REPLY_FIELDS = ("channel", "seq", "message_id", "timestamp")


async def publish_view(request: HttpRequest, channel: str) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"detail": "method not allowed"}, status=405)
    try:
        data = json.loads(request.body)["data"]
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"detail": 'body must be {"data": ...}'}, status=400)
    message = await publish(get_channel_layer(), channel, data)
    return JsonResponse({key: message[key] for key in REPLY_FIELDS}, status=201)


async def health_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})
