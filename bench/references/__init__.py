"""Reference servers the benchmark measures next to ours, under the same ASGI server.

- ``bare_hub``: a bare ASGI app, no Django, with the node-local hub design (the ceiling).
- ``channels_ref``: a tutorial-style Channels consumer with ``group_send`` (the floor).
"""
