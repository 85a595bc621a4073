"""The connection registry while PostgreSQL is unreachable: a bounded backlog, drops
counted, and the table right again once the database is back.

PostgreSQL sits behind the fault tests' TCP proxy; stopping the proxy is the outage
(the shared PostgreSQL itself is never touched)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection

from devtools.processes import OwnedProcess, free_port
from tests.faults.services import tcp_proxy
from tests.servers import Database, ServerNode
from tests.waiting import QUERY_INTERVAL_SECS, wait_until
from tests.wsclient import connect_ws

pytestmark = pytest.mark.e2e

BACKLOG = 10


@pytest.fixture
def proxied(
    e2e_env: dict[str, str], e2e_database: Database, tmp_path: Path
) -> Iterator[tuple[ServerNode, OwnedProcess]]:
    port = free_port()
    proxy = tcp_proxy(port, e2e_database.host, e2e_database.port, tmp_path).start()
    url = f"postgres://{e2e_database.user}@127.0.0.1:{port}/{e2e_database.name}"
    env = {
        **e2e_env,
        "DATABASE_URL": url,
        "PUSH_REGISTRY_MAX_BUFFERED": str(BACKLOG),
        "PUSH_REGISTRY_FLUSH_SECS": "0.2",
    }
    node = ServerNode(env, name="registry-outage").start()
    try:
        yield node, proxy
    finally:
        node.stop()
        proxy.stop()


async def _open(node: ServerNode) -> tuple[ClientConnection, str]:
    ws, hello = await connect_ws(node.ws_url)
    return ws, hello["connection_id"]


def _open_rows(database: Database, server_id: str) -> set[str]:
    rows = database.query(
        "SELECT connection_id::text FROM push_connection"
        " WHERE server_id = %s AND disconnected_at IS NULL",
        server_id,
    )
    return {row[0] for row in rows}


async def test_registry_backlog_is_bounded_while_postgresql_is_down_and_recovers(
    proxied: tuple[ServerNode, OwnedProcess], e2e_database: Database
) -> None:
    node, proxy = proxied
    first, first_id = await _open(node)
    await wait_until(
        lambda: _open_rows(e2e_database, node.name) == {first_id},
        "the first connection's row",
        timeout=15,
        interval=QUERY_INTERVAL_SECS,
    )

    proxy.stop()  # PostgreSQL unreachable from the node
    kept: list[tuple[ClientConnection, str]] = []
    for n in range(40):
        ws, connection_id = await _open(node)
        if n >= 37:
            kept.append((ws, connection_id))
        else:
            await ws.close()
    dropped = "push_registry_records_dropped_total"
    await wait_until(
        lambda: node.metric(dropped) >= 40 - BACKLOG - 1,
        "the records past the backlog to be dropped",
        timeout=15,
        interval=QUERY_INTERVAL_SECS,
    )
    await first.close()

    proxy.start()
    live = {connection_id for _, connection_id in kept}
    # The node rewrites its live rows once: the kept three are open, everyone who
    # left (the first client too, whose close was dropped or written) is closed.
    await wait_until(
        lambda: _open_rows(e2e_database, node.name) == live,
        f"the open rows to be the kept connections {live}",
        timeout=15,
        interval=QUERY_INTERVAL_SECS,
    )
    for ws, _ in kept:
        await ws.close()
