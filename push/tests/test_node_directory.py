"""The node directory on a real Redis: which nodes count as alive, and when one is dead."""

from __future__ import annotations

import asyncio
import logging
import time
import types
import uuid
from collections.abc import AsyncIterator

import pytest
from django.conf import settings
from django.test import override_settings

from push.cluster import directory
from push.cluster.directory import NodeDirectory, nodes_key
from push.cluster.node import Node
from push.services.runtime import get_node
from tests.waiting import wait_until

ANNOUNCE_SECS = 5.0
DEAD_AFTER_SECS = 15.0


@pytest.fixture
async def two_directories() -> AsyncIterator[tuple[NodeDirectory, NodeDirectory]]:
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    pair = tuple(
        NodeDirectory(
            settings.REDIS_URL,
            f"dir-{name}-{uuid.uuid4().hex[:8]}",
            announce_secs=ANNOUNCE_SECS,
            dead_after_secs=DEAD_AFTER_SECS,
        )
        for name in ("a", "b")
    )
    yield pair  # type: ignore[misc]  # two of them
    for node in pair:
        await node.withdraw()
        await node.close()


@pytest.mark.parametrize("skew_secs", [-60.0, 60.0])
async def test_a_node_whose_clock_is_off_takes_no_live_node_for_dead(
    two_directories: tuple[NodeDirectory, NodeDirectory],
    monkeypatch: pytest.MonkeyPatch,
    skew_secs: float,
) -> None:
    """Announcements were stamped and judged by each node's own clock: a host whose
    clock ran ahead of the others by more than the dead age took every node for dead at
    each turn (their connections marked closed, their presence members made to leave,
    their channels announced vacated), and one behind was taken for dead by all."""
    announcing, judging = two_directories  # judging runs on the host whose clock is off
    await announcing.announce({"server_id": announcing.server_id})
    skewed = types.SimpleNamespace(time=lambda: time.time() + skew_secs)
    # Whatever clock the directory might read of its host's (it reads none of them).
    monkeypatch.setattr(directory, "time", skewed, raising=False)
    await judging.announce({"server_id": judging.server_id})
    ours = {announcing.server_id, judging.server_id}
    # (Other tests' nodes may be left in the directory: only these two are asked about.)
    assert ours.isdisjoint(await judging.dead_nodes())
    monkeypatch.setattr(directory, "time", time, raising=False)  # the other host's clock
    assert ours.isdisjoint(await announcing.dead_nodes())


async def test_two_live_processes_under_one_node_id_are_told_apart_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two processes given the same NODE_ID share its presence index, occupancy sets,
    counts and registry rows, and undo each other's (presence members leave and join
    again every few seconds): nothing said so. A process started again under its name
    after a crash is no such case: its first announcement finds the previous run's."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    name = f"dir-twin-{uuid.uuid4().hex[:8]}"
    first, second = (
        NodeDirectory(
            settings.REDIS_URL,
            name,
            announce_secs=ANNOUNCE_SECS,
            dead_after_secs=DEAD_AFTER_SECS,
        )
        for _ in range(2)
    )
    try:
        caplog.set_level(logging.ERROR, logger="push.cluster.directory")
        await first.announce({"server_id": name})
        await second.announce({"server_id": name})  # as a run started again would
        assert not caplog.records
        await first.announce({"server_id": name})
        assert [r.levelno for r in caplog.records] == [logging.ERROR]
        assert name in caplog.records[0].getMessage()
        assert "NODE_ID" in caplog.records[0].getMessage()
    finally:
        await first.withdraw()
        for directory_ in (first, second):
            await directory_.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_node")
@override_settings(PUSH={"CLUSTER_ANNOUNCE_SECS": 0.2, "NODE_DEAD_AFTER_SECS": 1.0})
async def test_a_node_reaping_a_dead_one_goes_on_announcing_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reaping a dead node (its rows, each of its presence members leaving, announced,
    its channels) ran in the loop that announces this node: a dead node with tens of
    thousands of members held this node's announcements past the dead age, and the
    others took the reaper for dead as well."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    reaping, released = asyncio.Event(), asyncio.Event()

    async def slow_presence_reap(self: Node, server_id: str) -> None:
        reaping.set()
        await released.wait()  # as a dead node's many members take their time

    monkeypatch.setattr(Node, "_reap_presence", slow_presence_reap)
    dead = f"dir-dead-{uuid.uuid4().hex[:8]}"
    judge = NodeDirectory(settings.REDIS_URL, "dir-judge", announce_secs=0.2, dead_after_secs=1.0)
    node = await get_node()
    try:
        await judge.redis.zadd(nodes_key(), {dead: 0})  # announced long ago
        await wait_until(reaping.is_set, "the dead node's reaping to begin")
        # The point is time passing: longer than the dead age while the reap goes on.
        await asyncio.sleep(1.5)
        assert node.server_id not in await judge.dead_nodes()
    finally:
        released.set()
        await judge.redis.zrem(nodes_key(), dead)
        await judge.close()
