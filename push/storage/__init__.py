"""Where messages are kept: the group-committed write pipeline (``write_pipeline``,
``write_batch``), history reads (``history``, ``selectors``), the node's recent messages
and the Redis recent cache (``recent_cache``, ``recent_store``), and retention."""
