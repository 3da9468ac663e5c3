"""The core's application API (``mapping.api.CoreApi``, implemented by ``mapping.bridge.Bridge``): the
use case of an agent changing presence, tested here once rather than through each adapter."""

from __future__ import annotations

import asyncio

from mapping.api import CoreApi
from mapping.errors import PermanentError
from mapping.model import OutboxStatus, System
from mapping.rules import Result
from tests.support import ALICE, AVAILABLE, BOB, DND, RecordingWriter, ev, make_bridge

D, T = System.DYNAMICS, System.TEAMS


async def _change(core: CoreApi, drain, presence_id: str):
    """Runs the use case while the outbox delivers, as the running service would."""
    task = asyncio.create_task(core.change_presence(ALICE, presence_id, source="bot", settle_seconds=5))
    for _ in range(50):
        await asyncio.sleep(0.01)
        await drain()
        if task.done():
            break
    return await task


async def test_a_change_writes_both_systems_and_reports_each_delivery():
    b = make_bridge()
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    change = await _change(b, b.outbox.drain, DND)
    assert change.result is Result.APPLIED
    assert change.expected == {D: DND, T: "DoNotDisturb/Presenting"}
    assert {s: (r.status, r.value) for s, r in change.rows.items() if r} == {
        D: (OutboxStatus.DELIVERED, DND),
        T: (OutboxStatus.DELIVERED, "DoNotDisturb/Presenting"),
    }
    assert b.outbox.writers[D].calls == [(ALICE.dynamics_user_id, DND)]


async def test_a_change_to_what_both_systems_show_writes_nothing():
    b = make_bridge()
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    change = await _change(b, b.outbox.drain, AVAILABLE)
    assert change.rows == {}
    assert b.outbox.writers[D].calls == []


async def test_an_unknown_presence_is_refused_with_the_reason():
    b = make_bridge()
    await b.store.upsert_agents([ALICE])
    change = await b.change_presence(ALICE, "not-a-presence-id", source="bot", settle_seconds=0.1)
    assert change.result is Result.UNKNOWN_PRESENCE
    assert "not-a-presence-id" in change.detail and change.rows == {}


async def test_a_refused_write_is_reported_dead_with_the_upstreams_reason():
    teams = RecordingWriter(T, [PermanentError("403 Forbidden: Presence.ReadWrite.All missing")])
    b = make_bridge(writers={D: RecordingWriter(D), T: teams})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    change = await _change(b, b.outbox.drain, DND)
    row = change.rows[T]
    assert row is not None and row.status is OutboxStatus.DEAD
    assert row.last_error == "403 Forbidden: Presence.ReadWrite.All missing"


async def test_last_known_and_delivery_expose_no_more_than_they_name():
    b = make_bridge()
    await b.store.upsert_agents([ALICE])
    assert await b.last_known(ALICE.dynamics_user_id) is None  # nothing observed yet
    await b.engine.observe(ev(ALICE, D, DND, b.clock(), 1))
    state = await b.last_known(ALICE.dynamics_user_id)
    assert state is not None and state.dynamics_seen.value == DND
    await b.outbox.drain()
    row = await b.delivery(ALICE.dynamics_user_id, T)
    assert row is not None and (row.status, row.value) == (OutboxStatus.DELIVERED, "DoNotDisturb/Presenting")


async def test_a_new_agent_is_added_once_and_an_existing_one_kept_as_it_is():
    from dataclasses import replace

    b = make_bridge()
    added = await b.add_agent(ALICE)
    assert (added.agent, added.outcome, added.problem) == (ALICE, "added", None)
    renamed = replace(ALICE, display_name="Alice from a later Create")
    kept = await b.add_agent(renamed)
    assert (kept.agent, kept.outcome) == (ALICE, "kept")  # discovery or a CSV had it: left as it is


async def test_an_agent_whose_entra_id_belongs_to_another_is_refused_with_who_has_it():
    from dataclasses import replace

    b = make_bridge()
    await b.add_agent(ALICE)
    clash = replace(BOB, entra_object_id=ALICE.entra_object_id)
    refused = await b.add_agent(clash)
    assert refused.agent is None and refused.outcome == "refused"
    assert refused.problem == f"its Entra object id {ALICE.entra_object_id} already belongs to agent {ALICE.label}"
    assert await b.store.get_agent(BOB.dynamics_user_id) is None
