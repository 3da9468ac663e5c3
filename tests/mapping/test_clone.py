"""``mapping.model.clone``: the rules' copy of a state must share nothing mutable with the original,
as ``copy.deepcopy`` did, or a decision that is thrown away (stale, rolled back) would still change
the state it was made from."""

from __future__ import annotations

import copy
import dataclasses
from datetime import timedelta

from mapping.model import AgentSyncState, DynamicsEvent, Seen, Write, clone
from tests.support import BUSY, T0

IMMUTABLE = (str, int, bool, type(None), type(T0), tuple)


def full_state() -> AgentSyncState:
    return AgentSyncState(
        "a1",
        own_dynamics=BUSY,
        own_dynamics_by="AGENT",
        own_dynamics_at=T0,
        own_dynamics_version=3,
        chose_at=T0,
        undo_command=(BUSY, "AGENT", T0),
        own_teams="Busy/InACall",
        own_teams_since=T0,
        dynamics_seen=Seen(BUSY, 3, T0, T0),
        dynamics_written=BUSY,
        dynamics_unconfirmed=[Write(BUSY, T0, landed=True, below=2, above=1)],
        dynamics_recent=[DynamicsEvent(3, BUSY, "AGENT", T0, echo=False)],
        dynamics_delivered=BUSY,
        dynamics_delivered_at=T0,
        teams_seen=Seen("Busy/InACall", None, T0, T0),
        session_written="Busy/InACall",
        session_written_at=T0,
        session_delivered="Busy/InACall",
        session_landed_at=T0,
        session_unacked=["Busy/InACall"],
        session_replaced=["Available/Available"],
        read_after_landing=True,
    )


def test_clone_equals_a_deep_copy():
    state = full_state()
    assert clone(state) == copy.deepcopy(state) == state


def test_every_field_of_the_clone_is_immutable_or_its_own_copy():
    state = full_state()
    twin = clone(state)
    for f in dataclasses.fields(AgentSyncState):
        mine, theirs = getattr(twin, f.name), getattr(state, f.name)
        if isinstance(theirs, IMMUTABLE):
            continue
        # A new mutable field not copied by clone() lands here and fails.
        assert mine is not theirs, f"clone() shares {f.name}"
        if isinstance(theirs, list):
            assert all(a is not b for a, b in zip(mine, theirs, strict=True) if not isinstance(b, IMMUTABLE))


def test_changing_the_clone_leaves_the_original_alone():
    state = full_state()
    before = copy.deepcopy(state)
    twin = clone(state)
    twin.dynamics_seen.value = "x"
    twin.teams_seen.at = T0 + timedelta(seconds=1)
    twin.dynamics_unconfirmed[0].landed = False
    twin.dynamics_recent[0].echo = True
    twin.session_unacked.append("y")
    twin.session_replaced.clear()
    assert state == before
