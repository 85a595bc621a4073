"""What each attack of the abuse suite costs a node, measured one attack at a time:
``python -m tests.abuse.costs [--secs 20] [--only NAME ...]``.

One node with the default settings and server and the suite's seeded channels (as
``make test-abuse`` has them), the honest clients publishing and subscribing
throughout; first a baseline with the honest clients alone, then each attack by itself
for ``--secs``. Per attack: the abusive requests it sent, the node's CPU beyond the
baseline (per second of attack and per request), and the honest clients' p99 and
largest publish-to-delivery latency while it ran. The database and Redis come from
``DATABASE_URL`` and ``REDIS_URL``, as for the suite. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.abuse.attacks import ATTACKS
from tests.abuse.conftest import (
    HONEST_CHANNELS,
    AbuseNode,
    forget_redis_keys,
    node_env,
    run_attackers,
    seeded_node,
)
from tests.abuse.honest import HonestPublisher, HonestSubscriber, judge
from tests.servers import Database, manage

PUBLISH_PER_SEC = 50
SUBSCRIBERS = 10
WARMUP_SECS = 10.0
# Between attacks: what one started (replays, closes) is over before the next.
SETTLE_SECS = 4.0


@dataclass
class Cost:
    attack: str
    clients: int
    requests: int
    secs: float
    cpu_secs: float
    p99_ms: float
    max_ms: float

    @property
    def per_sec(self) -> float:
        return self.requests / self.secs

    @property
    def cpu_share(self) -> float:
        return self.cpu_secs / self.secs

    @property
    def ms_per_request(self) -> float:
        return 1000 * self.cpu_secs / max(self.requests, 1)


def cpu_secs(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class Honest:
    """The suite's honest clients, with latency judged over a window at a time."""

    def __init__(self, abuse: AbuseNode) -> None:
        url = abuse.node.ws_url
        self.subscribers = [HonestSubscriber(url, HONEST_CHANNELS) for _ in range(SUBSCRIBERS)]
        self.publisher = HonestPublisher(
            f"{url}?token={abuse.publisher_token}", HONEST_CHANNELS, PUBLISH_PER_SEC
        )

    async def start(self) -> None:
        for subscriber in self.subscribers:
            await subscriber.start()
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()
        for subscriber in self.subscribers:
            await subscriber.stop()

    def latency(self, window: tuple[float, float]) -> tuple[float, float]:
        verdict = judge(self.subscribers, self.publisher, window)
        return verdict.p99_ms, verdict.max_ms


async def measure(abuse: AbuseNode, names: list[str], secs: float, work: Path) -> list[Cost]:
    assert abuse.node.process is not None
    node = psutil.Process(abuse.node.process.pid)
    honest = Honest(abuse)
    await honest.start()
    await asyncio.sleep(WARMUP_SECS)
    started, cpu_before = time.time(), cpu_secs(node)
    await asyncio.sleep(secs)
    baseline_per_sec = (cpu_secs(node) - cpu_before) / secs
    costs = [
        Cost("(honest clients alone)", 0, 0, secs, baseline_per_sec * secs, 0.0, 0.0),
    ]
    costs[0].p99_ms, costs[0].max_ms = honest.latency((started, time.time()))
    for name in names:
        report_path = work / "report.json"
        started, cpu_before = time.time(), cpu_secs(node)
        attacker = await run_attackers(
            abuse,
            secret=f"leak{secrets.token_hex(8)}",
            duration_secs=secs,
            report_path=report_path,
            log_path=work / "attackers.log",
            only=[name],
        )
        await attacker.wait()
        ended = time.time()
        used = cpu_secs(node) - cpu_before - baseline_per_sec * (ended - started)
        report = json.loads(report_path.read_text())
        # The report has a row for every attack; the others did nothing.
        stats = next(row for row in report["attacks"] if row["name"] == name)
        p99, worst = honest.latency((started, ended))
        costs.append(
            Cost(name, stats["clients"], stats["requests"], ended - started, used, p99, worst)
        )
        print_cost(costs[-1], flush=True)
        await asyncio.sleep(SETTLE_SECS)
    await honest.stop()
    return costs


def print_cost(cost: Cost, *, flush: bool = False) -> None:
    print(
        f"  {cost.attack:<32} {cost.clients:>7} {cost.per_sec:>9.1f} {cost.cpu_share:>8.3f}"
        f" {cost.ms_per_request:>9.2f} {cost.p99_ms:>8.1f} {cost.max_ms:>8.1f}",
        flush=flush,
    )


def print_header() -> None:
    print(
        f"  {'attack':<32} {'clients':>7} {'req/s':>9} {'CPU/s':>8} {'ms/req':>9}"
        f" {'p99 ms':>8} {'max ms':>8}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--secs", type=float, default=20.0, help="each attack runs this long")
    parser.add_argument("--only", action="append", choices=[a.name for a in ATTACKS])
    args = parser.parse_args()
    names = args.only or [attack.name for attack in ATTACKS]
    database = Database(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
        name=f"push_abuse_costs_{os.getpid()}",
    )
    database.create()
    env = node_env(database)
    try:
        manage(env, "migrate", "--no-input")
        with seeded_node(env, database) as abuse, tempfile.TemporaryDirectory() as work:
            print(f"load before: {os.getloadavg()}")
            print_header()
            costs = asyncio.run(measure(abuse, names, args.secs, Path(work)))
            print(f"load after: {os.getloadavg()}\n")
            print_header()
            for cost in costs:
                print_cost(cost)
    finally:
        forget_redis_keys(env)
        database.drop()


if __name__ == "__main__":
    main()
