"""Admission on this node: open connections per user and per IP, against their limits."""

from __future__ import annotations

from collections import Counter


class ConnectionCounter:
    """Open connections per key (user, IP) on this node, against a limit (0: none)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: Counter[object] = Counter()

    def try_add(self, key: object) -> bool:
        if key is None:
            return True
        if self.limit and self._counts[key] >= self.limit:
            return False
        self._counts[key] += 1
        return True

    def remove(self, key: object) -> None:
        if key is None:
            return
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]
