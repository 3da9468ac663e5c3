"""``AgentStatusLookup`` against the Dataverse emulator: a hit costs no read, the store carries what was
learnt across a restart (a new instance on the same store), a miss costs exactly one read, a failed or
slow read answers ``None`` in bounded time, a row that does not exist is not remembered, and the
client's reads of ``msdyn_agentstatuses`` fill the cache."""

from __future__ import annotations

import asyncio

from dataverse.agent_lookup import KIND, AgentStatusLookup
from dataverse.client import DataverseClient
from emulators.dataverse import AVAILABLE, DataverseEmulator
from mapping.bridge import Bridge
from mapping.retry import RetryPolicy
from tests.support import ALICE, BOB

MISSING = "0badbeef-0000-4000-8000-000000000000"
FAST = RetryPolicy(base_seconds=0.01, max_delay_seconds=0.05, jitter=False)


def row_reads(emu: DataverseEmulator, status_id: str | None = None) -> list[str]:
    """GETs of one msdyn_agentstatus row (the lookup's read), optionally of one id."""
    return [
        c.path
        for c in emu.calls
        if c.method == "GET"
        and c.path.startswith("msdyn_agentstatuses(")
        and (status_id is None or status_id in c.path)
    ]


def lookup_on(bridge: Bridge, client: DataverseClient | None, **kw: float) -> AgentStatusLookup:
    return AgentStatusLookup(bridge.records, client, retry=FAST, **kw)  # type: ignore[arg-type]


async def test_a_miss_costs_one_read_and_then_hits(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    status = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    lookup = lookup_on(bridge, client)
    assert await lookup.agent_of(status.upper()) == ALICE.dynamics_user_id
    for _ in range(3):
        assert await lookup.agent_of(status) == ALICE.dynamics_user_id
    assert len(row_reads(emu, status)) == 1
    assert await bridge.records.get_doc(KIND, status) == {"agent_id": ALICE.dynamics_user_id}


async def test_what_a_context_taught_is_a_hit_without_a_read(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    lookup = lookup_on(bridge, client)
    await lookup.remember("3D1FEEF9-604D-EF11-BFE3-6045BD03D9D8", ALICE.dynamics_user_id.upper())
    assert await lookup.agent_of("3d1feef9-604d-ef11-bfe3-6045bd03d9d8") == ALICE.dynamics_user_id
    assert row_reads(emu) == []


async def test_the_store_carries_the_mapping_across_a_restart(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    status = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    assert await lookup_on(bridge, client).agent_of(status) == ALICE.dynamics_user_id
    restarted = lookup_on(bridge, client)  # a new process (or another instance) on the same store
    assert await restarted.agent_of(status) == ALICE.dynamics_user_id
    assert len(row_reads(emu, status)) == 1
    offline = lookup_on(bridge, None)  # even without Dataverse
    assert await offline.agent_of(status) == ALICE.dynamics_user_id


async def test_a_failing_read_answers_none_and_is_tried_again_later(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    status = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    lookup = lookup_on(bridge, client)
    emu.fail_next(2, 503, path="msdyn_agentstatuses(")
    assert await lookup.agent_of(status) is None
    assert len(row_reads(emu, status)) == 2  # the one retry policy, bounded to two tries
    assert await bridge.records.get_doc(KIND, status) is None
    assert await lookup.agent_of(status) == ALICE.dynamics_user_id  # not cached as "no agent"


async def test_a_slow_read_answers_none_within_its_deadline(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    status = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    lookup = lookup_on(bridge, client, timeout=0.2)
    emu.latency(1.5)
    async with asyncio.timeout(1.0):  # bounded by the lookup's own deadline, not by the emulator
        assert await lookup.agent_of(status) is None
    emu.latency(0)
    assert await lookup.agent_of(status) == ALICE.dynamics_user_id


async def test_a_row_that_does_not_exist_is_not_remembered(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    lookup = lookup_on(bridge, client)
    assert await lookup.agent_of(MISSING) is None
    assert await lookup.agent_of(MISSING) is None
    assert len(row_reads(emu, MISSING)) == 2  # asked again: a 404 is not an answer to keep
    assert await bridge.records.list_docs(KIND) == {}


async def test_concurrent_misses_share_one_read(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    status = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    lookup = lookup_on(bridge, client)
    emu.latency(0.1)
    got = await asyncio.gather(*(lookup.agent_of(status) for _ in range(5)))
    assert got == [ALICE.dynamics_user_id] * 5
    assert len(row_reads(emu, status)) == 1


async def test_without_dataverse_a_miss_is_none(bridge: Bridge) -> None:
    assert await lookup_on(bridge, None).agent_of(MISSING) is None


async def test_the_clients_reads_of_agent_statuses_fill_the_cache(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    alice = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    bob = emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent", AVAILABLE)
    lookup = lookup_on(bridge, client)
    client.agent_status_sink = lookup.remember_many
    await client.read([ALICE])  # the reconciliation sweep
    await lookup.wait_persisted()
    assert await bridge.records.list_docs(KIND) == {alice: {"agent_id": ALICE.dynamics_user_id}}
    await client.agent_ids()  # discovery
    assert await lookup.agent_of(bob) == BOB.dynamics_user_id
    assert await lookup.agent_of(alice) == ALICE.dynamics_user_id
    assert row_reads(emu) == []


async def test_a_failing_sink_does_not_fail_the_read(
    emu: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)

    async def broken(pairs: dict[str, str]) -> None:
        raise RuntimeError("store down")

    client.agent_status_sink = broken
    (seen,) = await client.read([ALICE])
    assert seen.agent_id == ALICE.dynamics_user_id


async def test_an_unexpected_failure_of_the_read_is_none_too(bridge: Bridge) -> None:
    class Broken:
        async def agent_of_status(self, agent_status_id: str) -> str | None:
            raise ValueError("not JSON")

    assert await AgentStatusLookup(bridge.records, Broken(), retry=FAST).agent_of(MISSING) is None
