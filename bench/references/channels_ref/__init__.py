"""Reference "tutorial Channels": AsyncWebsocketConsumer + group_send over Redis.

What a Channels tutorial builds (group_add on subscribe, channel_layer.group_send on
publish, a handler that sends each event to the socket), speaking enough of the v1
JSON envelopes for the load generator. Its figures are the floor our server must beat.
"""
