"""Polling of the agents no subscription covers, on a fake clock: every uncovered agent is read within
each period, the reads are spread (never more than the period's share in any window), the schedule
stays inside Graph's budget at 50,000 agents, and only what changed since the last read is observed."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

from graph_sync.coverage import GRAPH_BUDGET_SHARE, PollSchedule
from graph_sync.teams import MAX_IDS
from mapping.ratelimit import GRAPH_PRESENCE
from tests.graph.conftest import SUBSCRIBER_TOKENS, Rig, agents


class Seconds:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_uncovered_agent_is_read_within_each_period_and_within_the_budget() -> None:
    clock = Seconds()
    period = 30.0
    schedule = PollSchedule(period, clock)
    ids = [f"{i:08x}-0000-4000-8000-0000000e0a1d" for i in range(50_000 - MAX_IDS)]  # one account's 650 covered
    schedule.set_ids(ids)
    assert schedule.chunks == math.ceil(len(ids) / MAX_IDS) == 76
    reads: dict[str, list[float]] = defaultdict(list)
    calls: list[float] = []
    start = clock.now
    while clock.now < start + 5 * period:
        for chunk in schedule.due():
            calls.append(clock.now)
            for i in chunk:
                reads[i].append(clock.now)
        wait = schedule.next_in()
        assert wait is not None
        clock.now += max(wait, 0.25)  # a loop that wakes late sometimes
    assert set(reads) == set(ids)
    for i, times in reads.items():
        assert times[0] - start <= period, i
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) <= period + 0.25 and min(gaps) >= period - 0.25, i  # once a period, not more
    window = GRAPH_PRESENCE.period_seconds
    busiest = max(sum(1 for t in calls if s <= t < s + window) for s in calls)
    assert busiest <= schedule.chunks + 1  # spread: one period's reads in any 30 s, not a burst
    assert busiest <= GRAPH_PRESENCE.requests * GRAPH_BUDGET_SHARE
    assert schedule.fits(GRAPH_PRESENCE.requests, window)


def test_a_changed_list_keeps_every_id_read_within_the_period() -> None:
    clock = Seconds()
    schedule = PollSchedule(60.0, clock)
    schedule.set_ids([f"a{i:05d}" for i in range(2000)])
    for _ in range(10):
        schedule.due()
        clock.now += 7
    schedule.set_ids([f"a{i:05d}" for i in range(1000, 3500)])  # some covered now, some new
    seen: dict[str, float] = {}
    t0 = clock.now
    while clock.now <= t0 + 60:
        for chunk in schedule.due():
            for i in chunk:
                seen.setdefault(i, clock.now)
        clock.now += 0.5
    assert set(seen) == {f"a{i:05d}" for i in range(1000, 3500)}
    assert max(seen.values()) - t0 <= 60
    schedule.set_ids([])
    assert schedule.next_in() is None and schedule.due() == []


async def seed(rig: Rig, count: int) -> None:
    directory = agents(count)
    await rig.bridge.store.upsert_agents(directory)
    rig.emu.add_users(a.entra_object_id for a in directory)


async def test_the_poller_observes_what_changed_and_reads_each_chunk_once_a_period(rig: Rig) -> None:
    rig.accounts.static_tokens = SUBSCRIBER_TOKENS[:1]
    await seed(rig, 650 + 1300)  # 1,300 uncovered: two chunks
    clock = Seconds()
    rig.manager.schedule = PollSchedule(30.0, clock)
    report = await rig.manager.sync()
    assert len(report.uncovered) == 1300
    reads = lambda: len(rig.emu.calls("POST", "getPresencesByUserId"))  # noqa: E731
    before = reads()
    # The chunks are staggered over the period: the first is due now, the second in 15 s.
    assert await rig.manager.poll_due() == 650 and reads() == before + 1
    assert await rig.manager.poll_due() == 0 and reads() == before + 1
    clock.now += 15
    assert await rig.manager.poll_due() == 650 and reads() == before + 2
    # A period later both chunks are read again; only the agent whose Teams state changed is observed.
    changed = sorted(report.uncovered)[700]
    rig.emu.set_user_state(changed, "Busy", "InAMeeting")
    clock.now += 30
    assert await rig.manager.poll_due() == 1 and reads() == before + 4
    agent = await rig.bridge.store.get_agent_by_entra(changed)
    assert agent is not None
    state = await rig.bridge.last_known(agent.dynamics_user_id)
    assert state is not None and state.teams_seen.value == "Busy/InAMeeting"
