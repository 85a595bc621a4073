"""The event worker's retry schedule: exponential backoff from ``PUSH_EVENT_RETRY_SECS``,
and how long it can last (which the webhooks' memory of accepted deliveries outlives)."""

from __future__ import annotations

# The longest a failed event waits for its next attempt: a receiver back after an outage
# gets the events it missed within this much.
MAX_RETRY_DELAY_SECS = 300.0


def retry_delay_secs(attempts: int, retry_secs: float) -> float:
    """The nominal wait after an event's ``attempts``-th failed attempt: ``retry_secs``,
    doubled for each attempt before, at most ``MAX_RETRY_DELAY_SECS``."""
    return min(retry_secs * 2 ** min(attempts - 1, 32), max(MAX_RETRY_DELAY_SECS, retry_secs))


def retry_span_secs(max_attempts: int, retry_secs: float, total_secs: float | None) -> float:
    """The longest from an event's first failure to its last attempt: its nominal
    delays, as many as ``max_attempts`` and ``total_secs`` allow."""
    span = 0.0
    for attempts in range(1, max_attempts):
        delay = retry_delay_secs(attempts, retry_secs)
        if total_secs is not None and span + delay > total_secs:
            break
        span += delay
    return span
