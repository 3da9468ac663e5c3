"""``mapping.engine.OutboxView``: the engine answers the rules' questions about the outbox (what is
queued and unsent, what a withdrawn write was) from one read of a group's rows, changed by the
group's own writes. It must answer exactly what the store would have answered at that point, and
write what the store would have been told, in order. Checked against the reference store on random
histories: rows in every status, then a group's enqueues and cancellations."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from mapping.engine import OutboxView
from mapping.memory import MemoryStore
from mapping.model import SetPresence, System
from tests.support import T0

AGENTS = ["a", "b"]
KEYS = [(a, s) for a in AGENTS for s in System]

setup_step = st.tuples(st.sampled_from(KEYS), st.sampled_from(["enqueue", "claim", "ack", "fail", "die"]))
group_step = st.tuples(st.sampled_from(KEYS), st.sampled_from(["enqueue", "cancel", "ask"]), st.integers(0, 3))


async def _setup(store: MemoryStore, steps: list[tuple[tuple[str, System], str]]) -> None:
    """Rows left pending, in flight, delivered or dead by a history of writes and deliveries."""
    claimed = {}
    for n, ((agent, system), op) in enumerate(steps):
        now = T0 + timedelta(seconds=n)
        if op == "enqueue":
            async with store.transaction() as tx:
                await tx.enqueue(SetPresence(agent, system, f"v{n}"), now)
        elif op == "claim":
            for d in await store.claim([system], 10, 30, "w", now):
                claimed[(d.agent_id, d.system)] = d
        elif (agent, system) in claimed:
            d = claimed.pop((agent, system))
            if op == "ack":
                await store.ack(d, now)
            else:
                await store.fail(d, "boom", None if op == "die" else now, now)


@settings(max_examples=300, deadline=None)
@given(st.lists(setup_step, max_size=12), st.lists(group_step, min_size=1, max_size=10))
def test_the_view_answers_and_writes_as_the_store_would(setup, group):
    async def run() -> None:
        direct, viewed = MemoryStore(), MemoryStore()
        for store in (direct, viewed):
            await _setup(store, setup)
        now = T0 + timedelta(minutes=1)
        async with direct.transaction() as tx, viewed.transaction() as vtx:
            view = OutboxView(await vtx.outbox_rows(AGENTS))
            for (agent, system), op, n in group:
                if op == "enqueue":
                    command = SetPresence(agent, system, f"g{n}")
                    await tx.enqueue(command, now, 0.5, 5.0)
                    view.enqueue(command, 0.5, 5.0)
                elif op == "cancel":
                    write = SetPresence(agent, system, f"g{n}")
                    assert view.cancel(write) == await tx.cancel_pending(agent, system, now)
                for key in KEYS:
                    assert view.unsent(*key) == await tx.unsent_value(*key), (op, key)
            await view.write(vtx, now)
        assert await viewed.list_outbox(limit=100) == await direct.list_outbox(limit=100)

    asyncio.run(run())
