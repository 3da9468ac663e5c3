"""A pending-read round's observations and deletions: observations go a slice at a time through the
engine's group commit and deletions a slice at a time through the store's, yet one failing
observation is poisoned alone, every one failing keeps every note (the store is down), and a note
whose deletion failed is read again, never lost."""

from __future__ import annotations

from typing import Any

import pytest

from graph_sync.notifications import PENDING_KIND
from mapping.model import PresenceObserved, System
from tests.graph.conftest import Rig, agents
from tests.graph.test_notifications import Poisoned, dynamics_value, known_agents
from tests.support import BUSY, DND


async def test_a_failing_observation_in_a_round_of_several_slices_is_poisoned_alone(
    rich_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rich_rig
    await rig.intake.stop()
    poisoned = Poisoned()
    rig.intake.on_poison = poisoned
    crowd = agents(40, start=300)  # more than one slice of the engine's group commit
    await known_agents(rig, crowd)
    rig.emu.add_users([a.entra_object_id for a in crowd], own=("Busy", "InACall"))
    bad = crowd[29]
    real_observe = rig.bridge.engine.observe

    async def observe(event: PresenceObserved, **kw: Any) -> Any:
        if event.agent_id == bad.dynamics_user_id and event.system is System.TEAMS:
            raise ValueError("this observation cannot be applied")
        return await real_observe(event, **kw)

    monkeypatch.setattr(rig.bridge.engine, "observe", observe)
    await rig.intake._queue_reads([a.entra_object_id for a in crowd], "notification")
    assert await rig.intake.read_pending() == 39
    assert [await dynamics_value(rig, a) for a in crowd if a is not bad] == [BUSY] * 39
    ((route, reason, _, detail),) = poisoned
    assert (route, reason) == ("graph_pending_reads", "observe_failed") and "cannot be applied" in detail
    assert await rig.bridge.store.list_docs(PENDING_KIND) == {}

    async def down(event: PresenceObserved, **kw: Any) -> Any:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(rig.bridge.engine, "observe", down)  # every one fails: the store, all notes kept
    await rig.intake._queue_reads([a.entra_object_id for a in crowd], "notification")
    with pytest.raises(RuntimeError, match="locked"):
        await rig.intake.read_pending()
    assert len(await rig.bridge.store.list_docs(PENDING_KIND)) == 1


async def test_a_note_whose_deletion_failed_is_read_again_and_the_others_are_gone(
    rich_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rich_rig
    await rig.intake.stop()
    crowd = agents(3, start=400)
    await known_agents(rig, crowd)
    rig.emu.add_users([a.entra_object_id for a in crowd], own=("Busy", "InACall"))
    for agent in crowd:  # three requests, three notes
        await rig.intake._queue_reads([agent.entra_object_id], "notification")
    notes = await rig.bridge.store.list_docs(PENDING_KIND)
    stuck = next(k for k, n in notes.items() if n["ids"] == [crowd[1].entra_object_id])
    records = rig.bridge.records
    real_delete = records.delete_doc

    async def delete_doc(kind: str, key: str) -> None:
        if key == stuck:
            raise RuntimeError("disk I/O error")
        await real_delete(kind, key)

    monkeypatch.setattr(records, "delete_doc", delete_doc)
    with pytest.raises(RuntimeError, match="disk"):
        await rig.intake.read_pending()
    assert [await dynamics_value(rig, a) for a in crowd] == [BUSY] * 3
    assert list(await rig.bridge.store.list_docs(PENDING_KIND)) == [stuck]  # the others were deleted
    monkeypatch.setattr(records, "delete_doc", real_delete)
    rig.emu.set_user_state(crowd[1].entra_object_id, "DoNotDisturb", "Presenting")
    assert await rig.intake.read_pending() == 1  # read again next round
    assert await dynamics_value(rig, crowd[1]) == DND
    assert await rig.bridge.store.list_docs(PENDING_KIND) == {}
