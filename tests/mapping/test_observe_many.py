"""``SyncEngine.observe_many``: one transaction per chunk, and exactly the outcomes, state and outbox
that one ``observe`` per event gives, on every store (the Graph intake relies on both)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapping import engine as engine_module
from mapping.memory import MemoryStore
from mapping.model import Agent, PresenceObserved, System
from mapping.ports import Store
from mapping.rules import Result
from tests.support import ALICE, AVAILABLE, AWAY, BOB, BUSY, DND, T0, FakeClock, make_bridge

D, T = System.DYNAMICS, System.TEAMS
GHOST = Agent("99999999-0000-4000-8000-000000000099", "0a1b2c3d-0000-4000-8000-000000000099", "Not in directory")
TEAMS_VALUES = ["Available/Available", "Busy/InACall", "Busy/InAMeeting", "DoNotDisturb/Presenting", "Away/Away"]

event_specs = st.lists(
    st.tuples(
        st.sampled_from([ALICE, BOB, GHOST]),
        st.sampled_from([D, T]),
        st.integers(0, 4),  # value index
        st.integers(0, 30),  # seconds after T0 (any order: stale events included)
        st.sampled_from([None, "AGENT", "SYSTEM"]),
    ),
    max_size=30,
)


def events_of(specs: list[tuple[Agent, System, int, int, str | None]]) -> list[PresenceObserved]:
    out = []
    for agent, system, i, at, by in specs:
        value = [AVAILABLE, BUSY, DND, AWAY, AVAILABLE][i] if system is D else TEAMS_VALUES[i]
        version = at + 1 if system is D else None
        out.append(
            PresenceObserved(
                agent.dynamics_user_id,
                system,
                value,
                T0 + timedelta(seconds=at),
                version,
                by if system is D else None,
                "test",
            )
        )
    return out


def summary(outcomes: list[Any]) -> list[tuple[Result, tuple[tuple[System, str], ...]]]:
    return [(o.result, tuple((c.system, c.value) for c in o.commands)) for o in outcomes]


async def one_by_one_and_batched(store_a: Store, store_b: Store, events: list[PresenceObserved]) -> tuple[Any, Any]:
    results = []
    for store, batched in ((store_a, False), (store_b, True)):
        bridge = make_bridge(store=store, clock=FakeClock(T0 + timedelta(minutes=5)))
        await store.upsert_agents([ALICE, BOB])
        if batched:
            outcomes = await bridge.engine.observe_many(events)
        else:
            outcomes = [await bridge.engine.observe(e) for e in events]
        states = await store.load_states([ALICE.dynamics_user_id, BOB.dynamics_user_id])
        rows = sorted((r.agent_id, r.system, r.value, r.status) for r in await store.list_outbox())
        results.append((summary(outcomes), states, rows))
    return results[0], results[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_specs)
def test_a_batch_decides_exactly_as_one_observe_per_event(specs):
    events = events_of(specs)
    one, batch = asyncio.run(one_by_one_and_batched(MemoryStore(), MemoryStore(), events))
    assert batch == one


async def test_the_same_on_the_sql_stores(any_store, open_sql, sqlite_url):
    events = events_of(
        [
            (ALICE, D, 0, 1, "AGENT"),
            (BOB, T, 1, 2, None),
            (ALICE, T, 1, 3, None),
            (GHOST, D, 1, 4, None),
            (ALICE, D, 1, 0, "AGENT"),
            (BOB, D, 3, 5, "SYSTEM"),
            (ALICE, T, 0, 6, None),
            (BOB, T, 1, 2, None),
        ]
    )
    one, batch = await one_by_one_and_batched(MemoryStore(), any_store, events)
    assert batch == one
    assert batch[0][3][0] is Result.UNKNOWN_AGENT and batch[0][4][0] is Result.STALE


class CountingStore(MemoryStore):
    def __init__(self, fail_on: int | None = None) -> None:
        super().__init__()
        self.transactions = 0
        self.fail_on = fail_on

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        self.transactions += 1
        if self.transactions == self.fail_on:
            raise RuntimeError("store went away")
        async with super().transaction() as tx:
            yield tx


async def test_one_transaction_per_chunk(monkeypatch):
    monkeypatch.setattr(engine_module, "MANY", 10)
    store = CountingStore()
    bridge = make_bridge(store=store)
    await store.upsert_agents([ALICE, BOB])
    store.transactions = 0
    events = [
        PresenceObserved(
            (ALICE if i % 2 else BOB).dynamics_user_id,
            D,
            [AVAILABLE, BUSY][i % 4 // 2],
            T0 + timedelta(seconds=i),
            i + 1,
            "AGENT",
            "test",
        )
        for i in range(25)
    ]
    outcomes = await bridge.engine.observe_many(events)
    assert store.transactions == 3 and len(outcomes) == 25


async def test_a_failing_chunk_raises_and_leaves_the_chunks_before_it_committed(monkeypatch):
    monkeypatch.setattr(engine_module, "MANY", 2)
    store = CountingStore()
    bridge = make_bridge(store=store)
    await store.upsert_agents([ALICE, BOB])
    store.transactions, store.fail_on = 0, 2
    events = [
        PresenceObserved(ALICE.dynamics_user_id, D, v, T0 + timedelta(seconds=i), i + 1, "AGENT", "test")
        for i, v in enumerate([BUSY, AWAY, DND, AVAILABLE])
    ]
    with pytest.raises(RuntimeError):
        await bridge.engine.observe_many(events)
    state = (await store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert state.dynamics_seen.value == AWAY  # chunk 1 (BUSY, AWAY) kept; chunk 2 never written
