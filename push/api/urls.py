from django.urls import path

from push.api.views import ChannelListView, ChannelMessagesView

urlpatterns = [
    path("channels/", ChannelListView.as_view(), name="channel-list"),
    path("channels/<str:channel>/messages", ChannelMessagesView.as_view(), name="channel-messages"),
]
