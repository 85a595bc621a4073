"""Database calls from the event loop: history pages run on threads of their own, so
anonymous clients asking for large pages never hold up a handshake's token check or a
subscription's query."""

from __future__ import annotations

import asyncio
import threading
import time

from common.db import DATABASE_THREADS, db_call


def _wait_for(release: threading.Event) -> str:
    release.wait(timeout=10)
    return threading.current_thread().name


def _quick() -> str:
    return threading.current_thread().name


_history_read = db_call(_wait_for, history=True)
_quick_call = db_call(_quick)


async def test_quick_calls_do_not_wait_behind_history_reads() -> None:
    release = threading.Event()
    # More history reads than there are database threads in all: in one shared pool
    # they would take every thread.
    reads = [asyncio.ensure_future(_history_read(release)) for _ in range(DATABASE_THREADS + 2)]
    try:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        name = await asyncio.wait_for(_quick_call(), timeout=2)
        assert time.monotonic() - started < 1
        assert name.startswith("push-db_")
    finally:
        release.set()
    names = await asyncio.gather(*reads)
    assert all(n.startswith("push-db-history") for n in names)
