"""The sweep in batches, decided in memory first (``mapping.reconcile``), against the sweep one agent
and one observation at a time through the engine: the same summaries, the same states, the same
outbox, sweep after sweep, over random agents whose systems drift between sweeps. Seeded."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from mapping.bridge import Bridge
from mapping.model import Agent, PresenceObserved, System
from mapping.reconcile import reconcile
from tests.support import AVAILABLE, AWAY, BUSY, DND, OFFLINE, TRAINING, FakeClock, make_bridge

DYNAMICS_VALUES = [AVAILABLE, BUSY, DND, AWAY, OFFLINE, TRAINING]
TEAMS_VALUES = [
    "Available/Available",
    "Busy/InACall",
    "Busy/InAMeeting",
    "DoNotDisturb/Presenting",
    "Away/Away",
    "Offline/OffWork",
]


@dataclass
class World:
    """What both systems show; readers return it as a sweep would read it."""

    clock: FakeClock
    dynamics: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # value, version, modified by
    teams: dict[str, str] = field(default_factory=dict)

    def reader(self, system: System) -> Reader:
        return Reader(self, system)


@dataclass
class Reader:
    world: World
    system: System
    calls: int = 0

    async def read(self, agents: Sequence[Agent]) -> list[PresenceObserved]:
        self.calls += 1
        now = self.world.clock()
        out = []
        for a in agents:
            if self.system is System.DYNAMICS:
                value, version, by = self.world.dynamics[a.dynamics_user_id]
                out.append(PresenceObserved(a.dynamics_user_id, System.DYNAMICS, value, now, version, by, "r", True))
            else:
                value = self.world.teams[a.dynamics_user_id]
                out.append(PresenceObserved(a.dynamics_user_id, System.TEAMS, value, now, None, None, "r", True))
        return out


def agents(n: int) -> list[Agent]:
    return [Agent(f"{i:08x}-0000-4000-8000-00000000d365", f"{i:08x}-0000-4000-8000-0000000e0a1d") for i in range(n)]


async def snapshot(bridge: Bridge, everyone: Sequence[Agent], *, teams_seen_at: bool = True) -> tuple[object, ...]:
    """States and outbox. ``teams_seen_at=False`` leaves out when Teams was last seen showing its
    value, which the in-memory path does not move for a read of the value already known."""
    states = await bridge.store.load_states([a.dynamics_user_id for a in everyone])
    if not teams_seen_at:
        states = {
            k: dataclasses.replace(v, teams_seen=dataclasses.replace(v.teams_seen, at=None)) for k, v in states.items()
        }
    rows = sorted(
        (r.agent_id, str(r.system), r.value, str(r.status), r.generation)
        for r in await bridge.store.list_outbox(None, 100_000)
    )
    return tuple(sorted(states.items())), tuple(rows)


async def test_batched_sweep_matches_one_by_one() -> None:
    rng = random.Random(1616)
    everyone = agents(40)
    worlds, bridges = [], []
    for _ in range(2):
        clock = FakeClock()
        bridge = make_bridge(clock=clock)
        await bridge.store.upsert_agents(everyone)
        worlds.append(World(clock))
        bridges.append(bridge)
    versions = {a.dynamics_user_id: 1 for a in everyone}
    settled = 0
    for sweep in range(6):
        # Drift: some agents change in either system between sweeps (the first sweep sees everyone anew).
        for a in everyone:
            key = a.dynamics_user_id
            if sweep == 0 or rng.random() < 0.3:
                versions[key] += 1
                dyn = (rng.choice(DYNAMICS_VALUES), versions[key], rng.choice(["AGENT", "SYSTEM"]))
                for w in worlds:
                    w.dynamics[key] = dyn
            if sweep == 0 or rng.random() < 0.3:
                teams = rng.choice(TEAMS_VALUES)
                for w in worlds:
                    w.teams[key] = teams
        for w in worlds:
            w.clock.advance(60)
        batched = await reconcile(bridges[0].engine, {s: worlds[0].reader(s) for s in System}, everyone, batch_size=7)
        single = await reconcile(
            bridges[1].engine, {s: worlds[1].reader(s) for s in System}, everyone, batch_size=1, presettle=False
        )
        assert batched.line() == single.line(), f"sweep {sweep}"
        assert await snapshot(bridges[0], everyone, teams_seen_at=False) == await snapshot(
            bridges[1], everyone, teams_seen_at=False
        ), f"sweep {sweep}"
        assert single.settled == 0
        settled += batched.settled
    # The in-memory path was taken (reads of agents that did not change), not only the engine's.
    assert settled > 0


async def test_a_sweep_of_nothing_new_makes_no_transaction() -> None:
    clock = FakeClock()
    bridge = make_bridge(clock=clock)
    everyone = agents(30)
    await bridge.store.upsert_agents(everyone)
    world = World(clock)
    for a in everyone:
        world.dynamics[a.dynamics_user_id] = (AVAILABLE, 5, "AGENT")
        world.teams[a.dynamics_user_id] = "Available/Available"
    readers = {s: world.reader(s) for s in System}
    first = await reconcile(bridge.engine, readers, everyone, batch_size=650)
    assert first.settled == 0 and readers[System.DYNAMICS].calls == 1 and readers[System.TEAMS].calls == 1
    before = await snapshot(bridge, everyone)
    clock.advance(60)  # a minute later: the same Dynamics versions, the same Teams values
    again = await reconcile(bridge.engine, readers, everyone, batch_size=650)
    assert again.line() == first.line()
    assert again.settled == 2 * len(everyone)  # every read settled in memory
    assert await snapshot(bridge, everyone) == before  # nothing written at all
    # A changed Teams value is not settled: it goes through the engine and is saved.
    world.teams[everyone[0].dynamics_user_id] = "Busy/InAMeeting"
    clock.advance(60)
    third = await reconcile(bridge.engine, readers, everyone, batch_size=650)
    assert third.settled == 2 * len(everyone) - 1
    state = (await bridge.store.load_states([everyone[0].dynamics_user_id]))[everyone[0].dynamics_user_id]
    assert state.teams_seen.value == "Busy/InAMeeting" and state.teams_seen.at == clock()


async def test_a_large_sweep_reads_the_dataverse_table_in_pages_with_the_same_result() -> None:
    from dataverse.client import MAX_PAGE, DataverseClient
    from emulators.dataverse import DataverseEmulator
    from tests.support import StaticTokens

    emu = DataverseEmulator(token="t")
    await emu.start()
    client = DataverseClient(emu.url, StaticTokens("t"), timeout=5.0)
    try:
        everyone = agents(1300)
        for i, a in enumerate(everyone):
            emu.add_agent(a.dynamics_user_id, a.entra_object_id, f"Agent {i}", DYNAMICS_VALUES[i % 5], logged_in=True)
        emu.add_agent("ffffffff-0000-4000-8000-00000000d365", "ffffffff-0000-4000-8000-0000000e0a1d", "Not ours", BUSY)
        paged = {o.agent_id: (o.value, o.version) for o in await client.read_all(everyone)}
        queries = len([c for c in emu.calls if "msdyn_agentstatuses" in c.path])
        assert queries == -(-1301 // MAX_PAGE)  # the whole table, one page here
        by_ids = {o.agent_id: (o.value, o.version) for o in await client.read(everyone)}
        assert paged == by_ids and len(paged) == 1300  # the agent outside the directory is left out

        bridge = make_bridge(clock=FakeClock())
        await bridge.store.upsert_agents(everyone)
        before = len(emu.calls)
        summary = await reconcile(bridge.engine, {System.DYNAMICS: client}, everyone)
        assert summary.checked == 1300 and summary.failed == 0 and not summary.errors
        assert len([c for c in list(emu.calls)[before:] if "msdyn_agentstatuses" in c.path]) == 1
        states = await bridge.store.load_states([a.dynamics_user_id for a in everyone])
        assert {k: st.dynamics_seen.value for k, st in states.items()} == {k: v for k, (v, _) in by_ids.items()}
    finally:
        await client.close()
        await emu.stop()
