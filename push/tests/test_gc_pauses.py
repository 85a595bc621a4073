"""Every cyclic garbage collection of a node process is timed (``push_gc_pause_seconds``):
the event loop stops for each one, which no per-request figure shows."""

from __future__ import annotations

import gc
import inspect
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from push.cluster.node import _time_collection, tune_garbage_collector


@pytest.fixture
def gc_settings() -> Iterator[None]:
    thresholds, callbacks = gc.get_threshold(), list(gc.callbacks)
    yield
    gc.set_threshold(*thresholds)
    gc.callbacks[:] = callbacks


def _pauses(generation: str) -> tuple[float, float]:
    labels = {"generation": generation}
    count = REGISTRY.get_sample_value("push_gc_pause_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("push_gc_pause_seconds_sum", labels) or 0.0
    return count, total


@pytest.mark.usefixtures("gc_settings")
def test_each_collection_is_timed_by_generation_once() -> None:
    tune_garbage_collector(gen0_threshold=gc.get_threshold()[0], freeze=False)
    tune_garbage_collector(gen0_threshold=gc.get_threshold()[0], freeze=False)  # idempotent
    before = _pauses("2")
    garbage = [[] for _ in range(10_000)]
    for items in garbage:
        items.append(items)  # cycles only the collector frees
    del garbage
    gc.collect()
    count, total = _pauses("2")
    assert count >= before[0] + 1
    assert total > before[1]


def test_a_collection_with_no_stack_left_is_not_an_error() -> None:
    """A collection can start anywhere, a deep recursion included (the abuse suite's
    bodies nested 100,000 deep): the hook then has almost no stack, and must not raise
    (Python prints what a gc callback raises as "Exception ignored", a traceback in the
    node's log)."""
    limit = sys.getrecursionlimit()
    try:
        _leave_a_stack_of(8)
        _time_collection("start", {"generation": 0})
        _time_collection("stop", {"generation": 0})
    finally:
        sys.setrecursionlimit(limit)


def _leave_a_stack_of(frames: int) -> None:
    """Set the recursion limit ``frames`` above the current depth. The depth Python
    counts can exceed the frames ``inspect.stack()`` sees (C calls count too, as under
    pytest-xdist's worker), so a limit the interpreter refuses is raised until it takes."""
    depth = len(inspect.stack())
    while True:
        try:
            sys.setrecursionlimit(depth + frames)
            return
        except RecursionError:
            depth += 1
