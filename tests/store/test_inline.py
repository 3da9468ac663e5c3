"""SQLite's inline write transactions (``service.store.inline``): statements on the loop thread,
COMMIT (and a BEGIN that must wait) on a thread of their own. What must hold: another process's write lock makes the
transaction wait (on the thread, the event loop keeps running), a caller cancelled while it waits
leaves no transaction open behind it, and what a transaction wrote is committed or rolled back as
a whole."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from mapping.model import AgentSyncState, SetPresence, System
from tests.support import ALICE, BOB, T0

BOUND = 10.0  # seconds a wait may take before the test fails (never a timing assertion)


def _db_file(url: str) -> str:
    return url.split("///", 1)[1]


async def test_waits_for_another_writer_without_blocking_the_loop(open_sql, sqlite_url):
    store = await open_sql(sqlite_url)
    await store.upsert_agents([ALICE])
    other = sqlite3.connect(_db_file(sqlite_url), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:

        async def write() -> None:
            async with store.transaction() as tx:
                await tx.save_state(AgentSyncState(ALICE.dynamics_user_id))

        task = asyncio.ensure_future(write())
        ticks = 0
        for _ in range(5):  # the loop keeps turning while the transaction waits for the lock
            await asyncio.sleep(0.02)
            ticks += 1
        assert ticks == 5 and not task.done()
        other.execute("ROLLBACK")
        await asyncio.wait_for(task, BOUND)
    finally:
        other.close()
    assert ALICE.dynamics_user_id in await store.load_states([ALICE.dynamics_user_id])


async def test_a_caller_cancelled_while_waiting_leaves_no_transaction_open(open_sql, sqlite_url):
    store = await open_sql(sqlite_url)
    await store.upsert_agents([ALICE, BOB])
    other = sqlite3.connect(_db_file(sqlite_url), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:

        async def write(agent_id: str) -> None:
            async with store.transaction() as tx:
                await tx.save_state(AgentSyncState(agent_id))

        gone = asyncio.ensure_future(write(ALICE.dynamics_user_id))
        await asyncio.sleep(0.05)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
    finally:
        other.execute("ROLLBACK")
        other.close()
    # The cancelled caller's BEGIN went on and got the lock: it must have been rolled back, or this
    # write (and any other connection's) would wait for it for good.
    await asyncio.wait_for(write(BOB.dynamics_user_id), BOUND)
    probe = sqlite3.connect(_db_file(sqlite_url), isolation_level=None, timeout=BOUND)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    finally:
        probe.close()
    states = await store.load_states([ALICE.dynamics_user_id, BOB.dynamics_user_id])
    assert list(states) == [BOB.dynamics_user_id]


async def test_a_failing_transaction_keeps_nothing(open_sql, sqlite_url):
    store = await open_sql(sqlite_url)
    await store.upsert_agents([ALICE])
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.save_state(AgentSyncState(ALICE.dynamics_user_id))
            await tx.enqueue(SetPresence(ALICE.dynamics_user_id, System.TEAMS, "Busy/Busy", "test"), T0)
            raise RuntimeError("the engine failed half-way")
    assert await store.load_states([ALICE.dynamics_user_id]) == {}
    assert await store.list_outbox() == []
    async with store.transaction() as tx:  # and the store takes the next one
        await tx.save_state(AgentSyncState(ALICE.dynamics_user_id))
    assert ALICE.dynamics_user_id in await store.load_states([ALICE.dynamics_user_id])


# ------------------------------------------------------------------------------------ group commit


def _commits(store) -> list[bool]:
    """Records each COMMIT (True) or rollback (False) the store's inline engine ends a chain with."""
    ends: list[bool] = []
    inner = store._inline._end

    def end(commit):
        ends.append(commit)
        return inner(commit)

    store._inline._end = end
    return ends


async def test_writers_queueing_for_the_lock_share_one_commit(open_sql, sqlite_url):
    store = await open_sql(sqlite_url)
    agents = [ALICE, BOB]
    await store.upsert_agents(agents)
    ends = _commits(store)

    async def write(agent_id: str, value: str) -> None:
        async with store.transaction() as tx:
            await tx.save_state(AgentSyncState(agent_id, own_dynamics=value))

    await asyncio.wait_for(
        asyncio.gather(
            *(write(a.dynamics_user_id, v) for a in agents for v in ("x", "y")), store.put_doc("k", "1", {})
        ),
        BOUND,
    )
    # Five writers, each answered after its COMMIT: they joined one chain instead of five.
    assert ends == [True]
    states = await store.load_states([a.dynamics_user_id for a in agents])
    assert {s.own_dynamics for s in states.values()} == {"y"}
    assert await store.get_doc("k", "1") == {}


@pytest.mark.parametrize("failing_first", [False, True])
async def test_a_writer_that_fails_is_rolled_back_alone_and_the_others_commit(open_sql, sqlite_url, failing_first):
    store = await open_sql(sqlite_url)
    await store.upsert_agents([ALICE, BOB])
    ends = _commits(store)

    async def write(agent_id: str, fail: bool) -> None:
        async with store.transaction() as tx:
            await tx.save_state(AgentSyncState(agent_id, own_dynamics="x"))
            await tx.enqueue(SetPresence(agent_id, System.TEAMS, "Busy/Busy", "test"), T0)
            if fail:
                raise RuntimeError(f"engine failed for {agent_id}")

    writers = [write(ALICE.dynamics_user_id, False), write(BOB.dynamics_user_id, True)]
    if failing_first:  # the first writer of a chain has no SAVEPOINT: its failure ends the chain
        writers.reverse()
    results = await asyncio.wait_for(asyncio.gather(*writers, return_exceptions=True), BOUND)
    if failing_first:
        results.reverse()
    assert results[0] is None and isinstance(results[1], RuntimeError)
    assert ends == ([False, True] if failing_first else [True])
    assert list(await store.load_states([ALICE.dynamics_user_id, BOB.dynamics_user_id])) == [ALICE.dynamics_user_id]
    assert [r.agent_id for r in await store.list_outbox()] == [ALICE.dynamics_user_id]


async def test_a_failed_commit_reaches_every_writer_of_its_chain(open_sql, sqlite_url):
    store = await open_sql(sqlite_url)
    await store.upsert_agents([ALICE, BOB])
    inner = store._inline._end

    def end(commit):
        if commit:
            inner(False)
            raise sqlite3.OperationalError("disk I/O error")
        return inner(commit)

    store._inline._end = end

    async def write(agent_id: str) -> None:
        async with store.transaction() as tx:
            await tx.save_state(AgentSyncState(agent_id))

    results = await asyncio.wait_for(
        asyncio.gather(write(ALICE.dynamics_user_id), write(BOB.dynamics_user_id), return_exceptions=True), BOUND
    )
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    store._inline._end = inner
    assert await store.load_states([ALICE.dynamics_user_id, BOB.dynamics_user_id]) == {}
    await asyncio.wait_for(write(ALICE.dynamics_user_id), BOUND)  # and the next chain commits
    assert list(await store.load_states([ALICE.dynamics_user_id])) == [ALICE.dynamics_user_id]
