"""An Update whose Target carries only the columns the writer sent (no ``msdyn_agentid``), end to end
against the emulators: with the post-image ``register-webhook`` registers the agent comes with the
change; without it the agent is looked up by the row's id once and then known; when it cannot be
known the answer is still 2xx (quarantined as ``no_agent``, counted as ``agent_unresolved``). The
last test runs the whole service (``LocalStack``: Dataverse and Graph emulators, the real aiohttp
app) and looks at Teams."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from dataverse.agent_lookup import KIND, AgentStatusLookup
from dataverse.client import DataverseClient
from dataverse.registration import POST_IMAGE_ALIAS, register_webhook
from emulators.dataverse import AVAILABLE, BUSY, DND, DataverseEmulator, Emission
from mapping.bridge import Bridge
from mapping.model import Agent, System
from mapping.retry import RetryPolicy
from service.stack import LocalStack, StackAgent, agent_ids
from tests.dataverse.conftest import KEY, Served, serve_intake
from tests.support import ALICE, RecordingTelemetry

INTAKE = "dataverse_webhook"
FAST = RetryPolicy(base_seconds=0.01, max_delay_seconds=0.05, jitter=False)


def row_reads(emu: DataverseEmulator) -> int:
    """GETs of one msdyn_agentstatus row: the lookup's reads."""
    return sum(1 for c in emu.calls if c.method == "GET" and c.path.startswith("msdyn_agentstatuses("))


def attributes(entity: dict[str, object]) -> dict[str, object]:
    pairs = entity["Attributes"]
    assert isinstance(pairs, list)
    return {p["key"]: p["value"] for p in pairs}


def target_of(sent: Emission) -> dict[str, object]:
    value: dict[str, object] = sent.body["InputParameters"][0]["value"]
    return value


async def drop_post_image(emu: DataverseEmulator, client: DataverseClient, update_step: str) -> None:
    """As a step registered by hand (without an image) would be."""
    for image in emu.images_of(update_step):
        await client.delete("sdkmessageprocessingstepimages", image["sdkmessageprocessingstepimageid"], what="test")
    assert emu.images_of(update_step) == []


@pytest.fixture
async def looked_up(bridge: Bridge, client: DataverseClient) -> AsyncIterator[Served]:
    """The intake with a cold lookup on the emulator (as the runtime wires it)."""
    lookup = AgentStatusLookup(bridge.records, client, retry=FAST)
    s = await serve_intake(bridge, client=client, poll_interval=0.2, lookup=lookup)
    yield s
    await s.close()


async def teams_value(bridge: Bridge) -> str | None:
    row = await bridge.store.outbox_row(ALICE.dynamics_user_id, System.TEAMS)
    return None if row is None else row.value


async def test_with_the_post_image_the_agent_comes_with_the_change(
    emu: DataverseEmulator, client: DataverseClient, looked_up: Served, bridge: Bridge
) -> None:
    await bridge.store.upsert_agents([ALICE])
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    await register_webhook(client, url=looked_up.url, key=KEY, dry_run=False, progress=lambda _: None)
    emu.set_presence(ALICE.dynamics_user_id, BUSY)
    (sent,) = await emu.wait_emissions()
    assert (sent.status, sent.error) == (200, None), sent.response
    assert "msdyn_agentid" not in attributes(target_of(sent))  # only the columns the write sent
    images = {p["key"]: p["value"] for p in sent.body["PostEntityImages"]}
    assert set(images) == {POST_IMAGE_ALIAS}
    image = attributes(images[POST_IMAGE_ALIAS])
    assert set(image) == {
        "msdyn_agentid",
        "msdyn_currentpresenceid",
        "msdyn_presencemodifiedby",
        "msdyn_presencemodifiedon",
    }
    assert image["msdyn_agentid"]["Id"] == ALICE.dynamics_user_id  # type: ignore[index]
    assert await teams_value(bridge) == "Busy/InACall"
    assert row_reads(emu) == 0


async def test_without_the_image_the_agent_is_read_once_and_then_known(
    emu: DataverseEmulator,
    client: DataverseClient,
    looked_up: Served,
    bridge: Bridge,
    telemetry: RecordingTelemetry,
) -> None:
    await bridge.store.upsert_agents([ALICE])
    status_id = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    reg = await register_webhook(client, url=looked_up.url, key=KEY, dry_run=False, progress=lambda _: None)
    await drop_post_image(emu, client, reg.step_ids["Update"])
    for presence in (BUSY, DND, BUSY):
        emu.set_presence(ALICE.dynamics_user_id, presence)
        sent = (await emu.wait_emissions())[-1]
        assert (sent.status, sent.error) == (200, None), sent.response
        assert sent.body["PostEntityImages"] == []
        assert "msdyn_agentid" not in attributes(target_of(sent))
    state = (await bridge.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert state.dynamics_seen.value == BUSY
    assert await teams_value(bridge) == "Busy/InACall"
    assert row_reads(emu) == 1  # three changes, one read
    assert await bridge.records.get_doc(KIND, status_id) == {"agent_id": ALICE.dynamics_user_id}
    assert telemetry.events[(INTAKE, "agent_unresolved")] == 0


async def test_an_agent_that_cannot_be_resolved_is_answered_2xx_and_counted(
    emu: DataverseEmulator,
    client: DataverseClient,
    looked_up: Served,
    bridge: Bridge,
    telemetry: RecordingTelemetry,
) -> None:
    await bridge.store.upsert_agents([ALICE])
    status_id = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    reg = await register_webhook(client, url=looked_up.url, key=KEY, dry_run=False, progress=lambda _: None)
    await drop_post_image(emu, client, reg.step_ids["Update"])
    emu.fail_next(10, 503, path="msdyn_agentstatuses(")  # Dataverse cannot answer the lookup
    emu.set_presence(ALICE.dynamics_user_id, BUSY)
    (sent,) = await emu.wait_emissions()
    assert sent.status == 202, sent.response  # never a non-2xx: it would fail the agent's own change
    assert '"status": "quarantined"' in sent.response and status_id in sent.response
    assert "register-webhook" in sent.response
    assert telemetry.events[(INTAKE, "agent_unresolved")] == 1
    assert await bridge.store.load_states([ALICE.dynamics_user_id]) == {}
    (item,) = await bridge.quarantine.list_quarantined()
    assert item.reason == "no_agent" and status_id in item.detail


async def test_without_a_lookup_an_agentless_update_is_unresolved_not_an_error(
    emu: DataverseEmulator, client: DataverseClient, served: Served, bridge: Bridge, telemetry: RecordingTelemetry
) -> None:
    await bridge.store.upsert_agents([ALICE])
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    reg = await register_webhook(client, url=served.url, key=KEY, dry_run=False, progress=lambda _: None)
    await drop_post_image(emu, client, reg.step_ids["Update"])
    emu.set_presence(ALICE.dynamics_user_id, BUSY)
    (sent,) = await emu.wait_emissions()
    assert sent.status == 202 and '"no_agent"' in sent.response
    assert telemetry.events[(INTAKE, "agent_unresolved")] == 1


async def test_a_create_teaches_the_lookup(
    emu: DataverseEmulator, client: DataverseClient, looked_up: Served, bridge: Bridge
) -> None:
    await bridge.store.upsert_agents([ALICE])
    reg = await register_webhook(client, url=looked_up.url, key=KEY, dry_run=False, progress=lambda _: None)
    await drop_post_image(emu, client, reg.step_ids["Update"])
    status_id = emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    emu.set_presence(ALICE.dynamics_user_id, BUSY)
    created, updated = await emu.wait_emissions()
    assert (created.message, created.status, updated.status) == ("Create", 200, 200), updated.response
    assert row_reads(emu) == 0  # the Create carried both ids
    assert await bridge.records.get_doc(KIND, status_id) == {"agent_id": ALICE.dynamics_user_id}
    assert await teams_value(bridge) == "Busy/InACall"


# ---------------------------------------------------------------------------------------------- the whole service


async def until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Waits for ``check`` (bounded: a timeout fails the test)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def session(stack: LocalStack, agent: StackAgent) -> str | None:
    for s in stack.graph.sessions_of(agent.entra_id).values():
        return f"{s.availability}/{s.activity}"
    return None


async def test_partial_target_updates_reach_teams_with_and_without_the_image(tmp_path: Path) -> None:
    alice = StackAgent("Alice Agent", *agent_ids(1), AVAILABLE)
    stack = LocalStack(tmp_path, [alice])
    try:
        async with asyncio.timeout(90):
            await stack.start()
        rt = stack.runtime
        emu = stack.dataverse
        # (a) The registration's post-image brings the agent with a Target that lacks it.
        emu.set_presence(alice.dynamics_id, BUSY)
        await until(lambda: session(stack, alice) == "Busy/InACall")
        sent = list(emu.emissions)[-1]
        assert "msdyn_agentid" not in attributes(target_of(sent))
        assert [p["key"] for p in sent.body["PostEntityImages"]] == [POST_IMAGE_ALIAS]

        # (b) A step without the image (registered by hand), and an agent whose row the bridge never
        # read or saw created: added by hand while the Create step was off.
        steps = {emu.tables["sdkmessages"].rows[s["_sdkmessageid_value"]]["name"]: s for s in emu.steps()}
        update_step, create_step = (steps[m]["sdkmessageprocessingstepid"] for m in ("Update", "Create"))
        await drop_post_image(emu, rt.dataverse, update_step)
        await rt.dataverse.update("sdkmessageprocessingsteps", create_step, {"statecode": 1}, what="test")
        bob = StackAgent("Bob Agent", *agent_ids(2), AVAILABLE)
        stack.graph.add_user(bob.entra_id)
        emu.add_agent(bob.dynamics_id, bob.entra_id, bob.name, AVAILABLE, logged_in=True)
        added = await rt.bridge.add_agent(Agent(bob.dynamics_id, bob.entra_id, bob.name, True))
        assert added.agent is not None
        before = row_reads(emu)
        for presence, shown in ((BUSY, "Busy/InACall"), (DND, "DoNotDisturb/Presenting"), (BUSY, "Busy/InACall")):
            emu.set_presence(bob.dynamics_id, presence)
            await until(functools.partial(lambda want: session(stack, bob) == want, shown))
            await stack.settle()
        assert row_reads(emu) - before == 1  # three changes, one read of the row
        assert [e.status for e in list(emu.emissions)[-3:]] == [200, 200, 200]
    finally:
        async with asyncio.timeout(30):
            await stack.stop()
