"""Pusher's HTTP endpoints (push.api.pusher): the HTTP API and the authorization
endpoints, at the paths Pusher's libraries use."""

from django.urls import path

from push.api import pusher

urlpatterns = [
    path("apps/<str:app_id>/events", pusher.events),
    path("apps/<str:app_id>/batch_events", pusher.batch_events),
    path("apps/<str:app_id>/channels", pusher.channels),
    path("apps/<str:app_id>/channels/<str:channel>", pusher.channel),
    path("apps/<str:app_id>/channels/<str:channel>/users", pusher.channel_users),
    path(
        "apps/<str:app_id>/users/<str:user_id>/terminate_connections",
        pusher.terminate_connections,
    ),
    # pusher-http-python 3.3 sends this one without /apps/<id>: the app is its auth_key's.
    path("users/<str:user_id>/terminate_connections", pusher.terminate_connections),
    path("pusher/auth", pusher.channel_authorization, name="pusher-auth"),
    path("pusher/user-auth", pusher.user_authentication, name="pusher-user-auth"),
]
