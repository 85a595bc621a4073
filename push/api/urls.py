from django.urls import path

from push.api.views import (
    BatchMessagesView,
    ChannelInfoView,
    ChannelListView,
    ChannelMessagesView,
    ChannelPresenceView,
    SchemaView,
    UserMessagesView,
)

urlpatterns = [
    path("channels/", ChannelListView.as_view(), name="channel-list"),
    path("channels/<str:channel>", ChannelInfoView.as_view(), name="channel-info"),
    path("channels/<str:channel>/messages", ChannelMessagesView.as_view(), name="channel-messages"),
    path("channels/<str:channel>/presence", ChannelPresenceView.as_view(), name="presence"),
    path("messages", BatchMessagesView.as_view(), name="batch-messages"),
    path("users/<int:user_id>/messages", UserMessagesView.as_view(), name="user-messages"),
    # The OpenAPI schema of the paths above (push.api.schema): YAML, or JSON with
    # ?format=json; public, as the API it describes is.
    path("schema/", SchemaView.as_view(), name="schema"),
]
