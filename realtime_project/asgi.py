"""ASGI entry point: HTTP to Django, WebSocket to the push consumer.

WebSockets pass the origin check (browsers only; a client without ``Origin`` is not a
browser and is allowed) and token or session authentication before the consumer.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from accounts.middleware import TokenAuthMiddleware  # noqa: E402
from push.conf import push_settings  # noqa: E402
from push.node import tune_garbage_collector  # noqa: E402
from push.routing import websocket_urlpatterns  # noqa: E402
from push.security import BrowserOriginValidator  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": BrowserOriginValidator(
            TokenAuthMiddleware(URLRouter(websocket_urlpatterns)),
            settings.ALLOWED_ORIGINS,
        ),
    }
)

tune_garbage_collector(
    gen0_threshold=push_settings.GC_GEN0_THRESHOLD, freeze=push_settings.GC_FREEZE
)
