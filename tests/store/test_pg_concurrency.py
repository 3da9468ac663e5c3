"""Several instances on one PostgreSQL database: two stores (two engines, as two processes would
have) each run an ``OutboxWorker`` while commands keep being enqueued and re-enqueued.

Promises checked: no two applies for the same (agent, system) ever overlap in time; an older value
is never applied after a newer one; every row ends delivered with its last value; leadership is
held by one store at a time and moves on when its holder goes away.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import pairwise

import asyncpg
import pytest

from mapping.clock import utcnow
from mapping.model import Agent, OutboxStatus, SetPresence, System
from mapping.outbox import OutboxWorker
from mapping.retry import RetryPolicy
from service.store import SqlStore
from service.store.leader import lock_key

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

OpenSql = Callable[..., Awaitable[SqlStore]]
AGENTS = [
    Agent(f"00000000-0000-4000-8000-{i:012d}", f"10000000-0000-4000-8000-{i:012d}", f"Agent {i}") for i in range(16)
]
ROUNDS = 12


@dataclass(frozen=True)
class Apply:
    key: tuple[str, System]
    value: str
    start: float
    end: float
    owner: str


class TimedWriter:
    """Records when each apply starts and ends; takes a few milliseconds like a real upstream call."""

    def __init__(self, system: System, owner: str, log: list[Apply]) -> None:
        self.system = system
        self.owner = owner
        self.log = log

    async def apply(self, agent: Agent, value: str) -> None:
        start = time.monotonic()
        await asyncio.sleep(random.uniform(0.001, 0.006))
        self.log.append(Apply((agent.dynamics_user_id, self.system), value, start, time.monotonic(), self.owner))


def _round(value: str) -> int:
    return int(value.removeprefix("round-"))


async def test_two_instances_never_overlap_and_deliver_the_last_value(pg_url: str, open_sql: OpenSql) -> None:
    stores = [await open_sql(pg_url), await open_sql(pg_url)]
    await stores[0].upsert_agents(AGENTS)
    log: list[Apply] = []
    stop = asyncio.Event()
    workers = [
        OutboxWorker(
            store,
            {s: TimedWriter(s, f"instance-{i}", log) for s in System},
            owner=f"instance-{i}",
            lease_seconds=20,
            batch_size=4,
            poll_seconds=0.005,
            policy=RetryPolicy(jitter=False),
            limiters={},
        )
        for i, store in enumerate(stores)
    ]
    running = [asyncio.create_task(w.run(stop)) for w in workers]
    last: dict[tuple[str, System], str] = {}
    rng = random.Random(7)
    try:
        for n in range(ROUNDS):
            store = stores[n % 2]
            async with store.transaction() as tx:
                for agent in AGENTS:
                    for system in System:
                        if n == 0 or rng.random() < 0.5:
                            value = f"round-{n}"
                            await tx.enqueue(SetPresence(agent.dynamics_user_id, system, value), utcnow())
                            last[(agent.dynamics_user_id, system)] = value
            await asyncio.sleep(rng.uniform(0.005, 0.03))
        deadline = time.monotonic() + 60
        while True:
            counts = await stores[0].outbox_counts()
            if counts["pending"] == counts["in_flight"] == 0:
                break
            assert time.monotonic() < deadline, f"outbox did not drain: {counts}"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.gather(*running)

    by_key: dict[tuple[str, System], list[Apply]] = {}
    for a in log:
        by_key.setdefault(a.key, []).append(a)
    assert set(by_key) == set(last)
    for key, applies in by_key.items():
        applies.sort(key=lambda a: a.start)
        for before, after in pairwise(applies):
            assert after.start >= before.end, f"{key}: {before} overlaps {after}"
        rounds = [_round(a.value) for a in applies]
        assert rounds == sorted(rounds), f"{key}: applied out of order {rounds}"
        assert applies[-1].value == last[key]
    rows = await stores[1].list_outbox(limit=1000)
    assert len(rows) == len(last)
    for row in rows:
        assert (row.status, row.value) == (OutboxStatus.DELIVERED, last[(row.agent_id, row.system)])
    assert {a.owner for a in log} == {"instance-0", "instance-1"}, "one instance did all the work"


async def test_only_one_store_leads_and_the_next_takes_over(pg_url: str, open_sql: OpenSql) -> None:
    one, two = await open_sql(pg_url), await open_sql(pg_url)
    assert await one.try_lead("reconcile", "instance-1") is True
    assert await two.try_lead("reconcile", "instance-2") is False
    assert await one.try_lead("reconcile", "instance-1") is True
    assert await two.try_lead("subscriptions", "instance-2") is True
    assert await one.try_lead("subscriptions", "instance-1") is False
    await one.close()
    assert await two.try_lead("reconcile", "instance-2") is True


async def test_leadership_is_lost_with_the_session_and_taken_over(
    pg_server: str, pg_url: str, open_sql: OpenSql
) -> None:
    one, two = await open_sql(pg_url), await open_sql(pg_url)
    assert await one.try_lead("reconcile", "instance-1") is True
    key = lock_key(one.target.schema or "", "reconcile") & 0xFFFF_FFFF_FFFF_FFFF
    admin = await asyncpg.connect(pg_server.replace("postgresql+asyncpg://", "postgresql://"))
    try:  # the leader's connection drops (network cut, server restart, idle kill)
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
            key >> 32,
            key & 0xFFFF_FFFF,
        )
    finally:
        await admin.close()
    assert killed == 1
    await asyncio.sleep(0.1)
    assert await two.try_lead("reconcile", "instance-2") is True
    assert await one.try_lead("reconcile", "instance-1") is False  # it notices, reconnects, finds it taken
    await two.close()
    assert await one.try_lead("reconcile", "instance-1") is True


async def test_leadership_is_per_schema(make_pg_url: Callable[[], Awaitable[str]], open_sql: OpenSql) -> None:
    """Two deployments sharing a database in different schemas each have their own leader."""
    a = await open_sql(await make_pg_url())
    b = await open_sql(await make_pg_url())
    assert await a.try_lead("reconcile", "deployment-a") is True
    assert await b.try_lead("reconcile", "deployment-b") is True
