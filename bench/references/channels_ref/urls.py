"""HTTP routes of the Channels reference."""

from django.urls import path

from bench.references.channels_ref.views import health_view, publish_view

urlpatterns = [
    path("api/v1/channels/<str:channel>/messages", publish_view),
    path("health", health_view),
]
