"""Crash safety of the outbox (rule 7) through the real ``OutboxWorker``: a worker that dies leaves a
lease that runs out, the command is delivered by another worker, and an older value is never applied
after a newer one for the same agent and system."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from mapping.model import Agent, OutboxStatus, SetPresence, System
from mapping.outbox import OutboxWorker
from mapping.ports import Store
from mapping.retry import RetryPolicy
from service.store import SqlStore
from tests.support import ALICE, FakeClock, RecordingWriter

pytestmark = pytest.mark.slow

TEAMS = System.TEAMS
LEASE = 30.0


async def enqueue(store: Store, value: str, clock: FakeClock) -> None:
    async with store.transaction() as tx:
        await tx.enqueue(SetPresence(ALICE.dynamics_user_id, TEAMS, value), clock())


def worker(store: Store, writer: object, clock: FakeClock, owner: str) -> OutboxWorker:
    return OutboxWorker(
        store,
        {TEAMS: writer},
        clock=clock,
        lease_seconds=LEASE,
        owner=owner,  # type: ignore[dict-item]
        policy=RetryPolicy(jitter=False),
        limiters={},
    )


class GatedWriter:
    """Applies into a shared log, but only when the test opens the gate: an attempt in flight."""

    def __init__(self, log: list[str]) -> None:
        self.system = TEAMS
        self.log = log
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def apply(self, agent: Agent, value: str) -> None:
        self.started.set()
        await self.gate.wait()
        self.log.append(value)


async def test_dead_workers_claim_is_delivered_after_its_lease(any_store: Store) -> None:
    clock = FakeClock()
    await any_store.upsert_agents([ALICE])
    await enqueue(any_store, "Busy/InACall", clock)
    [orphan] = await any_store.claim([TEAMS], 10, LEASE, "worker-that-died", clock())  # ...and never acks
    writer = RecordingWriter(TEAMS)
    survivor = worker(any_store, writer, clock, "survivor")
    assert await survivor.run_once() == 0
    clock.advance(LEASE - 1)
    assert await survivor.run_once() == 0 and writer.calls == []
    clock.advance(1)
    assert await survivor.run_once() == 1
    assert writer.calls == [(ALICE.dynamics_user_id, "Busy/InACall")]
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and row.status is OutboxStatus.DELIVERED
    assert await any_store.ack(orphan, clock()) is False  # the dead worker's late ack changes nothing
    assert await survivor.run_once() == 0


async def test_a_restarted_instance_takes_back_its_own_rows_at_once(any_store: Store) -> None:
    """kill -9 during delivery, then a restart under the same owner (``serve``: host and port): the
    rows in flight are claimed again at once, not after their lease; another owner's are left alone."""
    clock = FakeClock()
    await any_store.upsert_agents([ALICE])
    await enqueue(any_store, "Busy/InACall", clock)
    [orphan] = await any_store.claim([TEAMS], 10, LEASE, "host-a:3978", clock())  # ...then killed
    assert await any_store.release_leases("host-b:3978", clock()) == 0
    writer = RecordingWriter(TEAMS)
    restarted = worker(any_store, writer, clock, "host-a:3978")
    assert await restarted.run_once() == 0  # its lease still holds: nothing is claimed twice
    assert await any_store.release_leases("host-a:3978", clock()) == 1
    assert await restarted.run_once() == 1
    assert writer.calls == [(ALICE.dynamics_user_id, "Busy/InACall")]
    assert await any_store.ack(orphan, clock()) is False  # the killed attempt's late ack changes nothing


async def test_only_the_newest_value_is_delivered_after_a_crash(any_store: Store) -> None:
    clock = FakeClock()
    await any_store.upsert_agents([ALICE])
    await enqueue(any_store, "Busy/InACall", clock)
    await any_store.claim([TEAMS], 10, LEASE, "worker-that-died", clock())
    await enqueue(any_store, "Available/Available", clock)
    clock.advance(LEASE)
    writer = RecordingWriter(TEAMS)
    assert await worker(any_store, writer, clock, "survivor").run_once() == 1
    assert writer.calls == [(ALICE.dynamics_user_id, "Available/Available")]
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and (row.status, row.generation) == (OutboxStatus.DELIVERED, 2)


async def test_a_newer_value_waits_for_the_attempt_in_flight(any_store: Store) -> None:
    clock = FakeClock()
    await any_store.upsert_agents([ALICE])
    applied: list[str] = []
    slow = GatedWriter(applied)
    fast = RecordingWriter(TEAMS)
    await enqueue(any_store, "Busy/InACall", clock)
    in_flight = asyncio.create_task(worker(any_store, slow, clock, "slow").run_once())
    await asyncio.wait_for(slow.started.wait(), 5)
    await enqueue(any_store, "Available/Available", clock)
    other = worker(any_store, fast, clock, "other")
    assert await other.run_once() == 0  # never a second lease on the row, so never out of order
    slow.gate.set()
    assert await in_flight == 1
    assert await other.run_once() == 1
    assert applied + [v for _, v in fast.calls] == ["Busy/InACall", "Available/Available"]
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and (row.status, row.value, row.generation) == (
        OutboxStatus.DELIVERED,
        "Available/Available",
        2,
    )


async def test_death_between_apply_and_ack_redelivers_rather_than_loses(any_store: Store) -> None:
    """At least once: the upstream may see the same value twice (writes are idempotent), never zero times."""
    clock = FakeClock()
    await any_store.upsert_agents([ALICE])
    applied: list[str] = []
    dying = GatedWriter(applied)
    await enqueue(any_store, "Busy/InACall", clock)
    attempt = asyncio.create_task(worker(any_store, dying, clock, "dying").run_once())
    await asyncio.wait_for(dying.started.wait(), 5)
    applied.append("Busy/InACall")  # the upstream took it...
    attempt.cancel()  # ...and the process died before the ack
    await asyncio.gather(attempt, return_exceptions=True)
    clock.advance(LEASE)
    writer = RecordingWriter(TEAMS)
    assert await worker(any_store, writer, clock, "next").run_once() == 1
    assert applied + [v for _, v in writer.calls] == ["Busy/InACall", "Busy/InACall"]


async def test_in_flight_command_survives_a_restart(sql_url: str, open_sql: Callable[..., Awaitable[SqlStore]]) -> None:
    """The process holding the lease goes away with its store; a new process finds the command."""
    clock = FakeClock()
    before = await open_sql(sql_url)
    await before.upsert_agents([ALICE])
    await enqueue(before, "DoNotDisturb/Presenting", clock)
    await before.claim([TEAMS], 10, LEASE, "old-process", clock())
    await before.close()
    after = await open_sql(sql_url)
    clock.advance(LEASE)
    writer = RecordingWriter(TEAMS)
    await worker(after, writer, clock, "new-process").drain(timeout=5)
    assert writer.calls == [(ALICE.dynamics_user_id, "DoNotDisturb/Presenting")]
    assert (await after.outbox_counts())["delivered"] == 1
