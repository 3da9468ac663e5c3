"""Property test (hypothesis) of rule 4: whatever the order and duplication of one agent's Dynamics
events, the newest one decides. The whole of rules 2-4 against a reference model, with echoes late,
out of order and twice, is ``tests/mapping/test_stateful.py`` (it replaced v1's no-bounce property
here, whose invariant was written for the edge-triggered rules)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from mapping.model import CLEAR, PresenceObserved, System
from mapping.rules import Result
from tests.support import ALICE, AVAILABLE, AWAY, BUSY, DND, OFFLINE, PRESENCES, FakeClock, make_bridge

D, T = System.DYNAMICS, System.TEAMS
DYN_VALUES = [AVAILABLE, BUSY, DND, AWAY, OFFLINE]
TEAMS_OWN = [
    "Available/Available",
    "Busy/InACall",
    "Busy/InAMeeting",
    "DoNotDisturb/Presenting",
    "Away/Away",
    "BeRightBack/BeRightBack",
    "Offline/Offline",
]
RANK = {"DoNotDisturb": 4, "Busy": 3, "Available": 2, "Away": 1, "BeRightBack": 1, "Offline": 0}
BASE = {p.presence_id: p.base for p in PRESENCES}


def run(coro):
    return asyncio.run(coro)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(DYN_VALUES), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
    st.lists(st.integers(0, 30), max_size=10),
)
def test_newest_dynamics_event_wins_whatever_the_order(values, rnd, dups):
    """Any interleaving and duplication of one agent's Dynamics events: the Teams state the bridge
    ends up delivering is the translation of the newest event (highest RowVersion)."""

    async def go():
        clock = FakeClock()
        b = make_bridge(clock=clock)
        await b.store.upsert_agents([ALICE])
        events = [
            PresenceObserved(ALICE.dynamics_user_id, D, v, clock(), i, "AGENT", "sim")
            for i, v in enumerate(values, start=1)
        ]
        events += [events[i % len(events)] for i in dups]
        rnd.shuffle(events)
        delivered: list[str] = []

        async def deliver():
            for d in await b.store.claim([T], 10, 30, "w", clock()):
                delivered.append(d.value)
                await b.store.ack(d, clock())
                await b.engine.on_outcome(d, "delivered", None)

        for e in events:
            out = await b.engine.observe(e)
            assert out.result is not Result.ECHO
            if rnd.random() < 0.5:
                await deliver()
        await deliver()
        expected = b.rules.teams_for(BASE[values[-1]])
        last = delivered[-1] if delivered else CLEAR
        assert last == expected

    run(go())
