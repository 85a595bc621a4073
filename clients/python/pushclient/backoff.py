"""Reconnect delays: capped exponential backoff with full jitter.

Full jitter (a uniform draw between zero and the capped exponential) spreads a crowd
of clients that lost the same node over the whole window, so they do not all knock
on the next node at the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable

DEFAULT_BASE_DELAY_SECS = 0.5
DEFAULT_MAX_DELAY_SECS = 30.0
# 2**30 times any sane base is far beyond any cap; stopping there keeps the float finite.
_MAX_EXPONENT = 30


def backoff_ceiling(
    attempt: int,
    *,
    base_secs: float = DEFAULT_BASE_DELAY_SECS,
    max_secs: float = DEFAULT_MAX_DELAY_SECS,
) -> float:
    """The largest delay before retry number ``attempt`` (0 for the first retry)."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    return min(max_secs, base_secs * 2 ** min(attempt, _MAX_EXPONENT))


def backoff_delay(
    attempt: int,
    *,
    base_secs: float = DEFAULT_BASE_DELAY_SECS,
    max_secs: float = DEFAULT_MAX_DELAY_SECS,
    rand: Callable[[], float] = random.random,
) -> float:
    """A delay drawn uniformly from ``[0, backoff_ceiling(attempt)]``."""
    return rand() * backoff_ceiling(attempt, base_secs=base_secs, max_secs=max_secs)
