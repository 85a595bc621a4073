from django.urls import path

from push.api.views import ChannelListView, ChannelMessagesView, UserMessagesView

urlpatterns = [
    path("channels/", ChannelListView.as_view(), name="channel-list"),
    path("channels/<str:channel>/messages", ChannelMessagesView.as_view(), name="channel-messages"),
    path("users/<int:user_id>/messages", UserMessagesView.as_view(), name="user-messages"),
]
