"""ASGI entry of the Channels reference: HTTP to Django, /ws/ to the tutorial consumer."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.references.channels_ref.settings")

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application
from django.urls import path

django_application = get_asgi_application()

from bench.references.channels_ref.consumers import PushConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": URLRouter(
            [path("ws/", PushConsumer.as_asgi()), path("ws", PushConsumer.as_asgi())]
        ),
    }
)
