"""Admission on this node: open connections in all, per user and per IP, against their
limits."""

from __future__ import annotations

import logging
import resource
from collections import Counter

logger = logging.getLogger(__name__)

# What the derived node limit leaves of the open-file limit for everything that is not
# a client's long-lived connection: the database pool and the write pipeline, Redis
# (pub/sub, the channel layer, the recent store), REST keep-alive sockets, handshakes
# under way, log files. A tenth, and at least this many.
RESERVED_FILES_LEAST = 256


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as Go and nginx
    do), and return the soft limit now. Each client holds a socket: a soft limit left at
    a distribution's 1,024 would cap the node at a few hundred connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # a hard limit the kernel will not grant
            logger.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft


def open_connection_capacity(open_files: int) -> int:
    """The sockets of every kind (WebSockets, HTTP keep-alive, heads still coming) the
    server accepts under ``open_files``: past the node's own limit on its clients'
    connections (``connection_capacity``), half of what that keeps for the node."""
    reserve = max(open_files // 20, RESERVED_FILES_LEAST // 2)
    return max(open_files - reserve, 1)


def connection_capacity(open_files: int) -> int:
    """The connections a node accepts under ``open_files``: a client that took the last
    file would leave the node unable to open a database or Redis connection (to
    reconnect after a restart, or to grow its pool), failing everyone it serves."""
    reserve = max(open_files // 10, RESERVED_FILES_LEAST)
    return max(open_files - reserve, 1)


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
