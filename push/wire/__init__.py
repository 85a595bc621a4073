"""The wire contract: what a frame may say (``protocol``), how it is encoded and decoded
in each format (``codecs``, ``proto``), and the WebSocket data frame built once for
every receiver (``frames``). Imports nothing else of ``push``."""
