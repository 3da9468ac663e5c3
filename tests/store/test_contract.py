"""The ``mapping.ports.Store`` contract, run on the in-memory reference and on both SQL dialects.

Each test states one promise the core relies on; the same assertions hold on all three stores.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime, timedelta, timezone

import pytest

from mapping.model import (
    Agent,
    AgentSyncState,
    BasePresence,
    DynamicsEvent,
    OutboxStatus,
    Presence,
    Seen,
    SetPresence,
    System,
    Write,
)
from mapping.ports import Store
from tests.support import ALICE, AVAILABLE, BOB, BUSY, PRESENCES, T0

CAROL = Agent("c0c0c0c0-0000-4000-8000-00000000000c", "0a1b2c3d-0000-4000-8000-00000000000c", "Carol Agent")
TEAMS, DYN = System.TEAMS, System.DYNAMICS


def cmd(agent: Agent, value: str, system: System = TEAMS, reason: str = "") -> SetPresence:
    return SetPresence(agent.dynamics_user_id, system, value, reason)


async def enqueue(store: Store, *commands: SetPresence, at: datetime = T0) -> list[int]:
    async with store.transaction() as tx:
        return [await tx.enqueue(c, at) for c in commands]


# Directory ---------------------------------------------------------------------------------------


async def test_upsert_reports_added_updated_unchanged(any_store: Store) -> None:
    assert await any_store.upsert_agents([ALICE, BOB]) == {
        ALICE.dynamics_user_id: "added",
        BOB.dynamics_user_id: "added",
    }
    renamed = Agent(BOB.dynamics_user_id, BOB.entra_object_id, "Robert Agent")
    assert await any_store.upsert_agents([ALICE, renamed]) == {
        ALICE.dynamics_user_id: "unchanged",
        BOB.dynamics_user_id: "updated",
    }
    assert await any_store.get_agent(BOB.dynamics_user_id) == renamed
    async with any_store.transaction() as tx:
        assert await tx.upsert_agent(renamed) == "unchanged"
        assert await tx.get_agent(BOB.dynamics_user_id) == renamed


async def test_agents_are_counted_as_listed(any_store: Store) -> None:
    assert await any_store.count_agents() == 0
    await any_store.upsert_agents([ALICE, BOB, CAROL])
    await any_store.set_agent_enabled(BOB.dynamics_user_id, False)
    assert await any_store.count_agents() == len(await any_store.list_agents()) == 3
    assert await any_store.count_agents(enabled_only=True) == len(await any_store.list_agents(enabled_only=True)) == 2


async def test_ids_are_lower_cased_and_found_either_way(any_store: Store) -> None:
    shouting = Agent(" " + ALICE.dynamics_user_id.upper(), ALICE.entra_object_id.upper() + " ", "Alice")
    assert await any_store.upsert_agents([shouting]) == {ALICE.dynamics_user_id: "added"}
    stored = Agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice")
    assert await any_store.get_agent(ALICE.dynamics_user_id.upper()) == stored
    assert await any_store.get_agent_by_entra(ALICE.entra_object_id.upper()) == stored
    assert await any_store.get_agent_by_entra(ALICE.dynamics_user_id) is None
    assert await any_store.get_agent("nobody") is None


async def test_entra_id_of_another_agent_is_refused_and_nothing_is_written(any_store: Store) -> None:
    await any_store.upsert_agents([ALICE])
    thief = Agent(BOB.dynamics_user_id, ALICE.entra_object_id.upper(), "Bob")
    with pytest.raises(ValueError) as caught:
        await any_store.upsert_agents([CAROL, thief])
    assert ALICE.entra_object_id in str(caught.value) and ALICE.dynamics_user_id in str(caught.value)
    assert await any_store.get_agent(CAROL.dynamics_user_id) is None  # all or nothing
    assert await any_store.list_agents() == [ALICE]


def _with(agent: Agent, entra: str) -> Agent:
    return Agent(agent.dynamics_user_id, entra, agent.display_name)


async def test_batch_is_judged_agent_by_agent_in_order(any_store: Store) -> None:
    """An Entra id released earlier in the batch may be taken later in it, not the other way round."""
    e1, e2, e3 = ALICE.entra_object_id, BOB.entra_object_id, "0a1b2c3d-0000-4000-8000-0000000000e3"
    await any_store.upsert_agents([ALICE, BOB])
    with pytest.raises(ValueError):
        await any_store.upsert_agents([_with(BOB, e1), _with(ALICE, e3)])  # B takes e1 while A holds it
    assert await any_store.list_agents() == [ALICE, BOB]
    result = await any_store.upsert_agents([_with(ALICE, e3), _with(BOB, e1), _with(CAROL, e2), CAROL])
    assert result == {
        ALICE.dynamics_user_id: "updated",
        BOB.dynamics_user_id: "updated",
        CAROL.dynamics_user_id: "updated",
    }  # Carol added, then changed in the same batch
    assert await any_store.list_agents() == [_with(ALICE, e3), _with(BOB, e1), CAROL]
    assert await any_store.get_agent_by_entra(e2) is None


async def test_a_large_first_import(any_store: Store) -> None:
    many = [
        Agent(f"{i:08x}-0000-4000-8000-000000000000", f"{i:08x}-0000-4000-8000-0000000000ee", f"A{i:05d}")
        for i in range(1234)
    ]
    result = await any_store.upsert_agents(many)
    assert len(result) == 1234 and set(result.values()) == {"added"}
    assert await any_store.list_agents() == many
    again = await any_store.upsert_agents([*many[:3], Agent("new-one", "new-entra")])
    assert list(again.values()) == ["unchanged"] * 3 + ["added"]


async def test_list_agents_sorted_by_name_and_enabled_flag(any_store: Store) -> None:
    zed = Agent("ffff0000-0000-4000-8000-000000000001", "eeee0000-0000-4000-8000-000000000001", "zed")
    await any_store.upsert_agents([zed, BOB, ALICE])
    assert await any_store.list_agents() == [ALICE, BOB, zed]
    assert await any_store.set_agent_enabled(BOB.dynamics_user_id.upper(), False) is True
    assert await any_store.set_agent_enabled("nobody", False) is False
    assert await any_store.list_agents(enabled_only=True) == [ALICE, zed]
    bob = await any_store.get_agent(BOB.dynamics_user_id)
    assert bob is not None and bob.enabled is False
    assert len(await any_store.list_agents()) == 3


async def test_unknown_ids_are_counted(any_store: Store) -> None:
    async with any_store.transaction() as tx:
        await tx.record_unknown(TEAMS, "x-1", T0)
        await tx.record_unknown(DYN, "d-1", T0 + timedelta(seconds=1))
    async with any_store.transaction() as tx:
        await tx.record_unknown(TEAMS, "x-1", T0 + timedelta(seconds=5))
    unknown = await any_store.list_unknown()
    assert [(u["system"], u["id"], u["count"]) for u in unknown] == [("teams", "x-1", 2), ("dynamics", "d-1", 1)]
    assert unknown[0]["first_seen"] == T0 and unknown[0]["last_seen"] == T0 + timedelta(seconds=5)


# Catalogue ---------------------------------------------------------------------------------------


async def test_presence_catalogue_is_replaced_whole(any_store: Store) -> None:
    await any_store.replace_presences(PRESENCES)
    assert await any_store.list_presences() == PRESENCES
    renamed = Presence(BUSY.upper(), "Busy (renamed)", BasePresence.BUSY, can_user_set=False)
    await any_store.replace_presences([PRESENCES[0], PRESENCES[1], renamed])
    assert await any_store.list_presences() == [PRESENCES[0], renamed]  # same id twice: last one wins
    await any_store.replace_presences([])
    assert await any_store.list_presences() == []


# Sync state --------------------------------------------------------------------------------------


def full_state(agent_id: str) -> AgentSyncState:
    """Every field set to something other than its default, datetimes in a non-UTC zone."""
    cet = timezone(timedelta(hours=1))
    return AgentSyncState(
        agent_id,
        own_dynamics=BUSY,
        own_dynamics_by="SYSTEM",
        own_dynamics_at=T0.astimezone(cet),
        own_dynamics_version=2**40 + 5,
        chose_at=T0 + timedelta(milliseconds=1234),
        undo_command=(AVAILABLE, "AGENT", T0.astimezone(cet)),
        own_teams="Busy/InAMeeting",
        own_teams_since=T0 + timedelta(seconds=3),
        dynamics_seen=Seen(BUSY, 2**40 + 7, T0.astimezone(cet), T0 - timedelta(seconds=1)),
        dynamics_written=AVAILABLE,
        dynamics_recent=[DynamicsEvent(2**40 + 7, BUSY, "AGENT", T0.astimezone(cet), True)],
        dynamics_delivered=BUSY,
        dynamics_delivered_at=T0 + timedelta(seconds=5),
        dynamics_unconfirmed=[
            Write(AVAILABLE, T0, True, 9, 3),
            Write(BUSY, T0.astimezone(cet) + timedelta(microseconds=1)),
        ],
        teams_seen=Seen("Busy/InACall", None, T0, T0 - timedelta(minutes=1)),
        session_written="DoNotDisturb/Presenting",
        session_written_at=T0 + timedelta(seconds=1),
        session_delivered="clear",
        session_landed_at=T0 + timedelta(seconds=2),
        session_unacked=["DoNotDisturb/Presenting"],
        session_replaced=["Busy/InACall"],
        read_after_landing=True,
    )


def test_full_state_sets_every_field() -> None:
    """Guards the round trip below: when the model gains a field, this fails until ``full_state`` sets
    it, and then the round trip fails on SQL until the store's codec keeps it."""
    state = full_state("x")
    blank = AgentSyncState("x")
    for f in fields(AgentSyncState):
        if f.name != "agent_id":
            assert getattr(state, f.name) != getattr(blank, f.name), f.name
    for f in fields(Seen):
        assert getattr(state.dynamics_seen, f.name) != getattr(blank.dynamics_seen, f.name), f.name


async def test_state_round_trips_exactly(any_store: Store) -> None:
    state = full_state(ALICE.dynamics_user_id)
    async with any_store.transaction() as tx:
        assert await tx.load_state(ALICE.dynamics_user_id) == AgentSyncState(ALICE.dynamics_user_id)
        await tx.save_state(state)
    async with any_store.transaction() as tx:
        loaded = await tx.load_state(ALICE.dynamics_user_id)
    assert loaded == state
    assert (await any_store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id] == state
    times = [
        loaded.own_dynamics_at,
        loaded.chose_at,
        loaded.own_teams_since,
        loaded.dynamics_seen.at,
        loaded.teams_seen.since,
        *(w.at for w in loaded.dynamics_unconfirmed),
    ]
    for value in times:
        assert value is None or value.utcoffset() is not None  # aware (UTC on SQL: test_sql.py)


async def test_state_is_overwritten_and_loaded_in_bulk(any_store: Store) -> None:
    first = full_state(ALICE.dynamics_user_id)
    async with any_store.transaction() as tx:
        await tx.save_state(first)
        await tx.save_state(AgentSyncState(BOB.dynamics_user_id, own_dynamics=BUSY))
    cleared = AgentSyncState(ALICE.dynamics_user_id)
    async with any_store.transaction() as tx:
        await tx.save_state(cleared)
        await tx.load_state(CAROL.dynamics_user_id)  # loaded, never saved: not a state
    states = await any_store.load_states([BOB.dynamics_user_id, CAROL.dynamics_user_id, ALICE.dynamics_user_id])
    assert states == {
        BOB.dynamics_user_id: AgentSyncState(BOB.dynamics_user_id, own_dynamics=BUSY),
        ALICE.dynamics_user_id: cleared,
    }
    assert list(states) == [BOB.dynamics_user_id, ALICE.dynamics_user_id]
    assert await any_store.load_states([]) == {}


async def test_a_groups_states_and_agents_load_and_save_together(any_store: Store) -> None:
    """The engine's group statements give what the one-by-one ones give: blank states for agents
    never saved (placeholders included), the directory's entries by lower-case id."""
    first = full_state(ALICE.dynamics_user_id)
    await any_store.upsert_agents([ALICE, BOB])
    async with any_store.transaction() as tx:
        await tx.save_states([first, AgentSyncState(BOB.dynamics_user_id, own_dynamics=BUSY)])
        await tx.save_states([])
        await tx.load_state(CAROL.dynamics_user_id)  # a placeholder on PostgreSQL, never saved
    ids = sorted([ALICE.dynamics_user_id, BOB.dynamics_user_id, CAROL.dynamics_user_id])
    async with any_store.transaction() as tx:
        loaded = await tx.load_states(ids)
        found = await tx.get_agents([ALICE.dynamics_user_id.upper(), CAROL.dynamics_user_id, BOB.dynamics_user_id])
        assert await tx.load_states([]) == {} and await tx.get_agents([]) == {}
    assert loaded == {
        ALICE.dynamics_user_id: first,
        BOB.dynamics_user_id: AgentSyncState(BOB.dynamics_user_id, own_dynamics=BUSY),
        CAROL.dynamics_user_id: AgentSyncState(CAROL.dynamics_user_id),
    }
    assert set(found) == {ALICE.dynamics_user_id, BOB.dynamics_user_id}
    assert found[BOB.dynamics_user_id] == await any_store.get_agent(BOB.dynamics_user_id)


async def test_agents_with_states_is_get_agents_and_the_enabled_ones_states(any_store: Store) -> None:
    """The engine's first read (one round trip on PostgreSQL): what ``get_agents`` and ``load_states``
    of the enabled agents give, a blank state for an enabled agent never saved, no state for a
    disabled agent or an id not in the directory."""
    dave = Agent("d4d4d4d4-0000-4000-8000-00000000000d", "0a1b2c3d-0000-4000-8000-00000000000d", "Dave Agent")
    await any_store.upsert_agents([ALICE, BOB, dave])
    await any_store.set_agent_enabled(BOB.dynamics_user_id, False)
    saved = full_state(ALICE.dynamics_user_id)
    async with any_store.transaction() as tx:
        await tx.save_states([saved, AgentSyncState(BOB.dynamics_user_id, own_dynamics=BUSY)])
    asked = [dave.dynamics_user_id, ALICE.dynamics_user_id.upper(), BOB.dynamics_user_id, CAROL.dynamics_user_id]
    async with any_store.transaction() as tx:
        agents, states = await tx.agents_with_states(asked)
        assert await tx.agents_with_states([]) == ({}, {})
    assert set(agents) == {ALICE.dynamics_user_id, BOB.dynamics_user_id, dave.dynamics_user_id}
    assert agents[BOB.dynamics_user_id] == await any_store.get_agent(BOB.dynamics_user_id)
    assert not agents[BOB.dynamics_user_id].enabled
    assert states == {ALICE.dynamics_user_id: saved, dave.dynamics_user_id: AgentSyncState(dave.dynamics_user_id)}


async def test_seen_values_are_the_saved_states_values(any_store: Store) -> None:
    async with any_store.transaction() as tx:
        await tx.save_state(full_state(ALICE.dynamics_user_id))
        await tx.save_state(AgentSyncState(BOB.dynamics_user_id))
        await tx.load_state(CAROL.dynamics_user_id)
    ids = [ALICE.dynamics_user_id, BOB.dynamics_user_id, CAROL.dynamics_user_id]
    states = await any_store.load_states(ids)
    for system in (DYN, TEAMS):
        seen = "dynamics_seen" if system is DYN else "teams_seen"
        assert await any_store.seen_values(ids, system) == {a: getattr(st, seen).value for a, st in states.items()}
    assert (await any_store.seen_values(ids, TEAMS))[BOB.dynamics_user_id] is None
    assert (await any_store.seen_values(ids, TEAMS))[ALICE.dynamics_user_id] is not None


async def test_a_failed_transaction_writes_nothing(any_store: Store) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with any_store.transaction() as tx:
            await tx.save_state(full_state(ALICE.dynamics_user_id))
            await tx.enqueue(cmd(ALICE, "Busy/InACall"), T0)
            await tx.upsert_agent(CAROL)
            await tx.record_unknown(TEAMS, "ghost", T0)
            raise Boom
    assert await any_store.load_states([ALICE.dynamics_user_id]) == {}
    assert await any_store.list_outbox() == []
    assert await any_store.get_agent(CAROL.dynamics_user_id) is None
    assert await any_store.list_unknown() == []


# Outbox ------------------------------------------------------------------------------------------


async def test_ten_enqueues_coalesce_into_one_row(any_store: Store) -> None:
    ids = await enqueue(any_store, *(cmd(ALICE, f"value-{i}", reason=f"r{i}") for i in range(10)))
    assert len(set(ids)) == 1
    [row] = await any_store.list_outbox()
    assert (row.id, row.value, row.reason, row.generation, row.status) == (
        ids[0],
        "value-9",
        "r9",
        10,
        OutboxStatus.PENDING,
    )
    assert row.updated_at == T0 and row.next_attempt_at == T0
    await enqueue(any_store, cmd(ALICE, "other system", DYN))
    assert len(await any_store.list_outbox()) == 2
    assert await any_store.outbox_counts() == {"pending": 2, "in_flight": 0, "delivered": 0, "dead": 0}


async def test_a_batch_of_enqueues_is_the_same_enqueues_one_by_one(any_store: Store) -> None:
    """``enqueue_many`` (the engine's group of commands) lands exactly as ``enqueue`` of each in
    order: the same rows, values, generations, holds and due times."""
    items = [
        (cmd(ALICE, "a1"), 0.0, 0.0),
        (cmd(BOB, "b1", DYN), 0.5, 5.0),
        (cmd(ALICE, "a2", reason="again"), 0.5, 5.0),  # the same row twice in one batch
        (cmd(ALICE, "d1", DYN), 0.0, 0.0),
    ]
    async with any_store.transaction() as tx:
        await tx.enqueue_many(items, T0)
    batched = sorted(await any_store.list_outbox(), key=lambda r: (r.agent_id, r.system))
    assert [(r.agent_id, r.system, r.value, r.reason, r.generation, r.next_attempt_at) for r in batched] == [
        (ALICE.dynamics_user_id, DYN, "d1", "", 1, T0),
        (ALICE.dynamics_user_id, TEAMS, "a2", "again", 2, T0 + timedelta(seconds=0.5)),
        (BOB.dynamics_user_id, DYN, "b1", "", 1, T0 + timedelta(seconds=0.5)),
    ]


async def test_outbox_rows_are_each_rows_value_and_status(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "a"), cmd(ALICE, "b", DYN), cmd(BOB, "c"), cmd(CAROL, "z"))
    [claimed] = await any_store.claim([DYN], 10, 30, "w", T0)
    async with any_store.transaction() as tx:
        rows = await tx.outbox_rows([ALICE.dynamics_user_id, BOB.dynamics_user_id, "nobody"])
        assert rows == {
            (ALICE.dynamics_user_id, TEAMS): ("a", OutboxStatus.PENDING),
            (ALICE.dynamics_user_id, DYN): ("b", OutboxStatus.IN_FLIGHT),
            (BOB.dynamics_user_id, TEAMS): ("c", OutboxStatus.PENDING),
        }
        assert await tx.outbox_rows([]) == {}
    assert await any_store.ack(claimed, T0)
    async with any_store.transaction() as tx:
        assert (await tx.outbox_rows([ALICE.dynamics_user_id]))[(ALICE.dynamics_user_id, DYN)] == (
            "b",
            OutboxStatus.DELIVERED,
        )


async def test_a_hold_folds_a_burst_into_one_delivery_and_a_stream_is_capped(any_store: Store) -> None:
    """Rule 6 with a hold: due ``hold`` after the newest change of a run, never later than
    ``max_hold`` after its first change (a steady stream cannot postpone delivery forever)."""

    async def put(value: str, at: float) -> None:
        async with any_store.transaction() as tx:
            await tx.enqueue(cmd(ALICE, value), T0 + timedelta(seconds=at), 0.5, 2.0)

    await put("value-0", 0)
    assert await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=0.4)) == []
    for i in range(1, 10):
        await put(f"value-{i}", 0.1 * i)
    [row] = await any_store.list_outbox()
    assert (row.value, row.next_attempt_at, row.generation) == ("value-9", T0 + timedelta(seconds=1.4), 10)
    assert await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=1.3)) == []
    # The stream goes on: from 1.5 s, the next due time would pass the 2 s cap and is kept instead.
    await put("value-13", 1.3)
    await put("value-17", 1.7)
    [row] = await any_store.list_outbox()
    assert (row.value, row.next_attempt_at) == ("value-17", T0 + timedelta(seconds=1.8))
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=2))
    assert d.value == "value-17"
    await any_store.ack(d, T0 + timedelta(seconds=2))
    # After delivery a new change starts a new run.
    await put("later", 5)
    [row] = await any_store.list_outbox()
    assert (row.status, row.next_attempt_at) == (OutboxStatus.PENDING, T0 + timedelta(seconds=5.5))


async def test_a_new_value_during_a_retry_backoff_is_due_after_its_hold_and_keeps_the_failing_run(
    any_store: Store,
) -> None:
    """Due after its hold (the breaker, not the store, holds back a down upstream), but the tries and
    the dead-letter clock of the failing run stay: a stream of new values cannot reset them."""
    await enqueue(any_store, cmd(ALICE, "a"))
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0)
    assert d.failing_since is None
    await any_store.fail(d, "503", T0 + timedelta(minutes=5), T0)
    async with any_store.transaction() as tx:
        await tx.enqueue(cmd(ALICE, "b"), T0 + timedelta(seconds=1), 0.5, 5.0)
    [row] = await any_store.list_outbox()
    assert (row.value, row.attempts, row.next_attempt_at, row.last_error) == (
        "b",
        1,
        T0 + timedelta(seconds=1.5),
        "503",
    )
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=2))
    assert (d.value, d.attempts, d.failing_since) == ("b", 1, T0)
    await any_store.fail(d, "503", T0 + timedelta(seconds=10), T0 + timedelta(seconds=3))
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=10))
    assert (d.attempts, d.failing_since) == (2, T0)  # the clock runs from the run's first failure
    assert await any_store.ack(d, T0 + timedelta(seconds=11)) is True
    async with any_store.transaction() as tx:
        await tx.enqueue(cmd(ALICE, "c"), T0 + timedelta(seconds=12))
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=12))
    assert (d.attempts, d.failing_since) == (0, None)  # delivered: the next value is a new run


async def test_redrive_makes_every_row_waiting_out_a_backoff_due_now(any_store: Store) -> None:
    """The breaker closed: rows of that system in a retry backoff go at once; rows held for
    coalescing, rows of the other system and rows already due are left as they are."""
    await enqueue(any_store, cmd(ALICE, "a"), cmd(BOB, "b"), cmd(ALICE, BUSY, DYN))
    for d in await any_store.claim([TEAMS, DYN], 10, 30, "w", T0):
        await any_store.fail(d, "503", T0 + timedelta(minutes=5), T0)
    async with any_store.transaction() as tx:
        await tx.enqueue(cmd(CAROL, "c"), T0, 30.0, 300.0)  # held, never attempted
    now = T0 + timedelta(seconds=1)
    assert await any_store.claim([TEAMS, DYN], 10, 30, "w", now) == []
    assert await any_store.redrive(TEAMS, now) == 2
    assert await any_store.redrive(TEAMS, now) == 0  # already due
    claimed = await any_store.claim([TEAMS, DYN], 10, 30, "w", now)
    assert sorted((d.agent_id, d.system) for d in claimed) == sorted(
        [(ALICE.dynamics_user_id, TEAMS), (BOB.dynamics_user_id, TEAMS)]
    )


async def test_claim_then_ack_delivers(any_store: Store) -> None:
    [row_id] = await enqueue(any_store, cmd(ALICE, "Busy/InACall", reason="call"))
    [d] = await any_store.claim([TEAMS], 10, 30, "w1", T0)
    assert (d.id, d.agent_id, d.system, d.value, d.generation, d.attempts, d.reason) == (
        row_id,
        ALICE.dynamics_user_id,
        TEAMS,
        "Busy/InACall",
        1,
        0,
        "call",
    )
    assert len(d.lease_token) >= 16
    assert await any_store.claim([TEAMS], 10, 30, "w2", T0 + timedelta(seconds=29)) == []
    assert await any_store.ack(d, T0 + timedelta(seconds=1)) is True
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and row.status is OutboxStatus.DELIVERED and row.last_error is None
    assert row.updated_at == T0 + timedelta(seconds=1)
    assert await any_store.ack(d, T0 + timedelta(seconds=2)) is False  # twice: the lease is gone
    assert await any_store.claim([TEAMS], 10, 30, "w1", T0 + timedelta(hours=1)) == []


async def test_claim_honours_systems_limit_order_and_due_time(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "a"), cmd(BOB, "b"), cmd(CAROL, "c"), cmd(ALICE, BUSY, DYN))
    assert await any_store.claim([], 10, 30, "w", T0) == []
    assert await any_store.claim([TEAMS], 0, 30, "w", T0) == []
    assert await any_store.claim([TEAMS], 10, 30, "w", T0 - timedelta(seconds=1)) == []  # not due yet
    first = await any_store.claim([TEAMS], 2, 30, "w", T0)
    assert [d.value for d in first] == ["a", "b"]
    rest = await any_store.claim([TEAMS, DYN], 10, 30, "w", T0)
    assert [d.value for d in rest] == ["c", BUSY]
    assert len({d.lease_token for d in first + rest}) == 4


async def test_failed_attempt_waits_then_retries(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "a"))
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0)
    later = T0 + timedelta(seconds=20)
    assert await any_store.fail(d, "503 from Graph", later, T0 + timedelta(seconds=1)) is OutboxStatus.PENDING
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None
    assert (row.status, row.attempts, row.next_attempt_at, row.last_error) == (
        OutboxStatus.PENDING,
        1,
        later,
        "503 from Graph",
    )
    assert await any_store.claim([TEAMS], 10, 30, "w", later - timedelta(seconds=1)) == []
    [again] = await any_store.claim([TEAMS], 10, 30, "w", later)
    assert (again.attempts, again.generation) == (1, 1)


async def test_dead_letter_and_retry_dead(any_store: Store) -> None:
    ids = await enqueue(any_store, cmd(ALICE, "a"), cmd(BOB, "b"))
    for d in await any_store.claim([TEAMS], 10, 30, "w", T0):
        assert await any_store.fail(d, "403 forbidden", None, T0) is OutboxStatus.DEAD
    dead = await any_store.list_outbox(OutboxStatus.DEAD)
    assert [(r.id, r.attempts, r.next_attempt_at, r.last_error) for r in dead] == [
        (ids[0], 1, None, "403 forbidden"),
        (ids[1], 1, None, "403 forbidden"),
    ]
    assert await any_store.list_outbox(OutboxStatus.DEAD, limit=1) == dead[:1]
    assert await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(days=1)) == []
    assert await any_store.retry_dead(ids[1], T0 + timedelta(seconds=5)) == 1
    assert await any_store.retry_dead(999_999, T0) == 0
    row = await any_store.outbox_row(BOB.dynamics_user_id, TEAMS)
    assert row is not None and (row.status, row.attempts, row.next_attempt_at) == (
        OutboxStatus.PENDING,
        0,
        T0 + timedelta(seconds=5),
    )
    assert await any_store.retry_dead(None, T0) == 1
    assert await any_store.outbox_counts() == {"pending": 2, "in_flight": 0, "delivered": 0, "dead": 0}


async def test_expired_lease_is_reclaimed_and_the_old_holder_is_refused(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "a"))
    [old] = await any_store.claim([TEAMS], 10, 30, "w1", T0)
    assert await any_store.claim([TEAMS], 10, 30, "w2", T0 + timedelta(seconds=29.9)) == []
    [new] = await any_store.claim([TEAMS], 10, 30, "w2", T0 + timedelta(seconds=30))
    assert new.id == old.id and new.lease_token != old.lease_token
    assert await any_store.ack(old, T0 + timedelta(seconds=31)) is False
    assert await any_store.fail(old, "late", None, T0 + timedelta(seconds=31)) is OutboxStatus.IN_FLIGHT
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and row.status is OutboxStatus.IN_FLIGHT and row.last_error is None
    assert await any_store.ack(new, T0 + timedelta(seconds=32)) is True


async def test_newer_value_during_flight_is_delivered_after_the_ack(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "old"))
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0)
    await enqueue(any_store, cmd(ALICE, "new"), at=T0 + timedelta(seconds=1))
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and (row.status, row.value, row.generation) == (OutboxStatus.IN_FLIGHT, "new", 2)
    assert await any_store.claim([TEAMS], 10, 30, "w2", T0 + timedelta(seconds=2)) == []  # lease kept
    assert await any_store.ack(d, T0 + timedelta(seconds=3)) is True
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and (row.status, row.attempts, row.next_attempt_at) == (
        OutboxStatus.PENDING,
        0,
        T0 + timedelta(seconds=3),
    )
    [again] = await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=3))
    assert (again.value, again.generation) == ("new", 2)
    assert await any_store.ack(again, T0 + timedelta(seconds=4)) is True
    assert (await any_store.outbox_counts())["delivered"] == 1


async def test_newer_value_during_a_failing_attempt_is_retried_not_killed(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "old"))
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0)
    await any_store.fail(d, "boom", T0 + timedelta(seconds=10), T0)  # attempts 1
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(seconds=10))
    await enqueue(any_store, cmd(ALICE, "new"), at=T0 + timedelta(seconds=11))
    status = await any_store.fail(d, "403", None, T0 + timedelta(seconds=12))
    assert status is OutboxStatus.PENDING
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and (row.status, row.attempts, row.value, row.next_attempt_at, row.last_error) == (
        OutboxStatus.PENDING,
        0,
        "new",
        T0 + timedelta(seconds=12),
        "403",
    )


async def test_enqueue_revives_delivered_and_dead_rows(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "a"), cmd(BOB, "b"))
    da, db = await any_store.claim([TEAMS], 10, 30, "w", T0)
    await any_store.ack(da, T0)
    await any_store.fail(db, "gone", None, T0)
    await enqueue(any_store, cmd(ALICE, "a2"), cmd(BOB, "b2"), at=T0 + timedelta(seconds=1))
    rows = await any_store.list_outbox()
    assert [(r.value, r.status, r.generation, r.attempts, r.last_error) for r in rows] == [
        ("a2", OutboxStatus.PENDING, 2, 0, None),
        ("b2", OutboxStatus.PENDING, 2, 0, None),
    ]


async def test_cancel_pending_withdraws_and_voids_the_lease(any_store: Store) -> None:
    await enqueue(any_store, cmd(ALICE, "a"), cmd(BOB, "b"))
    async with any_store.transaction() as tx:
        assert await tx.cancel_pending(ALICE.dynamics_user_id, TEAMS, T0) is OutboxStatus.PENDING
        assert await tx.cancel_pending(ALICE.dynamics_user_id, TEAMS, T0) is None  # already withdrawn
        assert await tx.cancel_pending(CAROL.dynamics_user_id, TEAMS, T0) is None
    row = await any_store.outbox_row(ALICE.dynamics_user_id, TEAMS)
    assert row is not None and (row.status, row.last_error) == (OutboxStatus.DELIVERED, "cancelled (already shown)")
    [d] = await any_store.claim([TEAMS], 10, 30, "w", T0)
    assert d.agent_id == BOB.dynamics_user_id
    async with any_store.transaction() as tx:  # in flight: the attempt cannot be recalled, its ack is refused
        assert await tx.cancel_pending(BOB.dynamics_user_id, TEAMS, T0) is OutboxStatus.IN_FLIGHT
    assert await any_store.ack(d, T0) is False
    assert await any_store.claim([TEAMS], 10, 30, "w", T0 + timedelta(hours=1)) == []
    assert await any_store.outbox_counts() == {"pending": 0, "in_flight": 0, "delivered": 2, "dead": 0}


# Adapter state -----------------------------------------------------------------------------------


async def test_documents(any_store: Store) -> None:
    doc = {"id": "sub-1", "expires": "2026-11-25T10:00:00Z", "users": ["a", "b"], "n": 3, "ok": True}
    await any_store.put_doc("graph.subscription", "sub-1", doc)
    await any_store.put_doc("graph.subscription", "sub-2", {"id": "sub-2"})
    await any_store.put_doc("bot.followup", "sub-1", {"other": "kind"})
    got = await any_store.get_doc("graph.subscription", "sub-1")
    assert got == doc
    assert got is not None
    got["users"].append("mutated")  # a copy: changing it changes nothing stored
    assert await any_store.get_doc("graph.subscription", "sub-1") == doc
    assert await any_store.list_docs("graph.subscription") == {"sub-1": doc, "sub-2": {"id": "sub-2"}}
    await any_store.put_doc("graph.subscription", "sub-2", {"id": "sub-2", "v": 2})
    await any_store.delete_doc("graph.subscription", "sub-1")
    await any_store.delete_doc("graph.subscription", "never-there")
    assert await any_store.list_docs("graph.subscription") == {"sub-2": {"id": "sub-2", "v": 2}}
    assert await any_store.get_doc("graph.subscription", "sub-1") is None
    assert await any_store.list_docs("nothing") == {}


async def test_documents_put_in_bulk(any_store: Store) -> None:
    await any_store.put_doc("dataverse.agent_status", "s1", {"agent_id": "old"})
    await any_store.put_docs("dataverse.agent_status", {"s1": {"agent_id": "a1"}, "s2": {"agent_id": "a2"}})
    await any_store.put_docs("dataverse.agent_status", {})
    assert await any_store.list_docs("dataverse.agent_status") == {"s1": {"agent_id": "a1"}, "s2": {"agent_id": "a2"}}
    assert await any_store.list_docs("graph.subscription") == {}


async def test_secrets_round_trip(any_store: Store) -> None:
    assert await any_store.get_secret("graph.token_cache") is None
    await any_store.put_secret("graph.token_cache", b'{"refresh": "r-1"}')
    await any_store.put_secret("graph.token_cache", b'{"refresh": "r-2"}\x00\xff')
    assert await any_store.get_secret("graph.token_cache") == b'{"refresh": "r-2"}\x00\xff'


async def test_leadership_keeps_its_first_owner(any_store: Store) -> None:
    assert await any_store.try_lead("reconcile", "instance-a") is True
    assert await any_store.try_lead("reconcile", "instance-a") is True
    assert await any_store.try_lead("reconcile", "instance-b") is False
    assert await any_store.try_lead("subscriptions", "instance-b") is True


async def test_ping(any_store: Store) -> None:
    await any_store.ping()
