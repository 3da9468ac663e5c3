"""``SyncEngine.observe``'s group commit: concurrent observations share one transaction, every
caller is answered only after that transaction committed, and a group that fails is written again
one by one, so one bad observation fails only its own caller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from mapping.memory import MemoryStore
from mapping.model import Agent, AgentSyncState, PresenceObserved, System
from mapping.rules import Result
from tests.support import ALICE, BOB, BUSY, T0, make_bridge

D = System.DYNAMICS
AGENTS = [
    Agent(f"{i:08x}-4e38-4f11-a315-000d3a5a54dc", f"{i:08x}-0000-4000-8000-00000000e000", f"Agent {i}")
    for i in range(8)
]
BOUND = 5.0  # seconds any wait below may take before the test fails (never a timing assertion)


def change(agent: Agent, value: str, version: int) -> PresenceObserved:
    return PresenceObserved(agent.dynamics_user_id, D, value, T0 + timedelta(seconds=version), version, "AGENT", "test")


class GatedStore(MemoryStore):
    """Counts transactions; while ``gate`` is clear, a transaction's commit waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.transactions = 0
        self.committed = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.poison: str | None = None  # saving this agent's state raises

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        self.transactions += 1
        self.entered.set()
        async with super().transaction() as tx:
            yield _Tx(tx, self.poison)
            await self.gate.wait()  # before the commit: nothing is durable yet
        self.committed += 1


class _Tx:
    def __init__(self, inner: Any, poison: str | None) -> None:
        self.inner, self.poison = inner, poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def save_state(self, state: AgentSyncState) -> None:
        if state.agent_id == self.poison:
            raise ValueError(f"the store cannot hold agent {state.agent_id}'s state")
        await self.inner.save_state(state)

    async def save_states(self, states: Any, *, handed_over: bool = False) -> None:
        for state in states:
            await self.save_state(state)


async def test_concurrent_observations_share_one_transaction():
    store = GatedStore()
    bridge = make_bridge(store=store)
    await store.upsert_agents(AGENTS)
    store.transactions = 0
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(bridge.engine.observe(change(a, BUSY, 10)) for a in AGENTS)), BOUND
    )
    # One observe per transaction (the code before group commit) makes this 8.
    assert store.transactions == 1
    assert [o.result for o in outcomes] == [Result.APPLIED] * len(AGENTS)
    states = await store.load_states([a.dynamics_user_id for a in AGENTS])
    assert {s.dynamics_seen.value for s in states.values() if s.dynamics_seen} == {BUSY}
    assert len(states) == len(AGENTS)


async def test_arrivals_during_a_commit_wait_for_it_and_then_share_the_next():
    store = GatedStore()
    bridge = make_bridge(store=store)
    await store.upsert_agents(AGENTS)
    store.transactions, store.committed = 0, 0
    store.gate.clear()
    first = asyncio.ensure_future(bridge.engine.observe(change(AGENTS[0], BUSY, 10)))
    await asyncio.wait_for(store.entered.wait(), BOUND)
    later = [asyncio.ensure_future(bridge.engine.observe(change(a, BUSY, 10))) for a in AGENTS[1:]]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # Nobody is answered before its transaction committed.
    assert not first.done() and not any(t.done() for t in later) and store.committed == 0
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), BOUND)
    assert store.transactions == 2 and store.committed == 2
    assert all(t.result().result is Result.APPLIED for t in [first, *later])


async def test_a_failing_observation_fails_only_its_own_caller():
    store = GatedStore()
    bridge = make_bridge(store=store)
    await store.upsert_agents([ALICE, BOB, *AGENTS])
    store.poison = BOB.dynamics_user_id
    calls = [bridge.engine.observe(change(a, BUSY, 10)) for a in (ALICE, BOB, *AGENTS)]
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), BOUND)
    assert isinstance(results[1], ValueError) and BOB.dynamics_user_id in str(results[1])
    good = [r for i, r in enumerate(results) if i != 1]
    assert all(not isinstance(r, BaseException) and r.result is Result.APPLIED for r in good)
    states = await store.load_states([a.dynamics_user_id for a in (ALICE, BOB, *AGENTS)])
    assert BOB.dynamics_user_id not in states and len(states) == len(AGENTS) + 1


async def test_a_caller_that_stopped_waiting_is_not_written():
    store = GatedStore()
    bridge = make_bridge(store=store)
    await store.upsert_agents(AGENTS)
    store.gate.clear()
    first = asyncio.ensure_future(bridge.engine.observe(change(AGENTS[0], BUSY, 10)))
    await asyncio.wait_for(store.entered.wait(), BOUND)
    gone = asyncio.ensure_future(bridge.engine.observe(change(AGENTS[1], BUSY, 10)))
    await asyncio.sleep(0)
    gone.cancel()
    store.gate.set()
    await asyncio.wait_for(first, BOUND)
    with pytest.raises(asyncio.CancelledError):
        await gone
    states = await store.load_states([AGENTS[0].dynamics_user_id, AGENTS[1].dynamics_user_id])
    assert list(states) == [AGENTS[0].dynamics_user_id]


async def test_single_item_batches_share_the_group_too():
    """A Graph request of one item (``observe_many`` of one event) joins the group commit."""
    store = GatedStore()
    bridge = make_bridge(store=store)
    await store.upsert_agents(AGENTS)
    store.transactions = 0
    calls = [bridge.engine.observe_many([change(a, BUSY, 10)]) for a in AGENTS]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls), BOUND)
    assert store.transactions == 1
    assert [o.result for (o,) in outcomes] == [Result.APPLIED] * len(AGENTS)
