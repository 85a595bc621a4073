"""WebSocket URLs: ``/ws/`` and ``/ws`` both reach the push consumer."""

from django.urls import re_path

from push.consumers import PushConsumer

websocket_urlpatterns = [
    re_path(r"^ws/?$", PushConsumer.as_asgi()),
]
