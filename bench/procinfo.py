"""Operating-system side of the benchmark: file limits, and RSS and CPU from /proc.

A server under test may be a launcher with a child doing the work (``manage.py
runnode`` may exec or fork), so figures are summed over the process tree.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

FD_LIMIT_WANTED = 20_000  # this machine's hard limit; one process may open no more
CLOCK_TICKS_PER_SEC = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Raise this process's soft file limit as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children.extend(int(text) for text in handle.read().split())
        except FileNotFoundError:
            continue
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    tree: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        if os.path.exists(f"/proc/{current}"):
            tree.append(current)
            pending.extend(_children(current))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except (FileNotFoundError, ProcessLookupError):
        return 0


def _cpu_secs(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the command name: field 14 (utime) and 15 (stime) are at 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SEC


@dataclass(frozen=True)
class Usage:
    """Resident memory and CPU time of a set of processes at one moment."""

    rss_bytes: int
    cpu_secs: float

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.rss_bytes - other.rss_bytes, self.cpu_secs - other.cpu_secs)


def usage_of(pids: list[int]) -> Usage:
    """Summed RSS and CPU of the given root processes and their descendants."""
    members = [member for pid in pids for member in process_tree(pid)]
    rss = sum(_rss_bytes(member) for member in members)
    cpu = sum(_cpu_secs(member) for member in members)
    return Usage(rss, cpu)
