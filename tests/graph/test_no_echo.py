"""DESIGN rule 3 end to end on the Graph side: the bridge's own setPresence comes back from Graph as a
change notification (the emulator notifies every change of what Teams shows, whatever caused it),
and it must not turn into a Dynamics 365 command. Real TeamsPresenceClient, real subscription, real
notification route on a free port, the engine and outbox of ``make_bridge``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mapping.model import System
from tests.graph.conftest import Certificate, Rig, agents, build_rig, close_rig
from tests.support import BUSY, DND, FakeClock, RecordingTelemetry, RecordingWriter, ev

ALICE = agents(1)[0]


@pytest.fixture(params=["rich", "basic"])
async def loop_rig(
    request: pytest.FixtureRequest,
    emu: object,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    certificate: Certificate,
) -> AsyncIterator[Rig]:
    cert = certificate if request.param == "rich" else None
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer, certificate=cert)  # type: ignore[arg-type]
    await rig.bridge.store.upsert_agents([ALICE])
    rig.emu.add_user(ALICE.entra_object_id, own=("Available", "Available"))
    await rig.manager.sync()
    yield rig
    await close_rig(rig, runner)


async def settle(rig: Rig) -> None:
    await rig.emu.wait_idle()
    await rig.intake.wait_idle()


@pytest.mark.slow
async def test_the_bridges_own_write_notified_back_changes_nothing_in_dynamics(loop_rig: Rig) -> None:
    rig = loop_rig
    # A customer conversation: Dynamics 365 says Busy; the bridge makes Teams show Busy/InACall.
    await rig.bridge.engine.observe(
        ev(ALICE, System.DYNAMICS, BUSY, rig.bridge.clock(), version=10, source="dataverse_webhook")
    )
    await rig.bridge.outbox.drain()
    assert rig.emu.presence_of(ALICE.entra_object_id) == ("Busy", "InACall")
    await settle(rig)

    # Graph did tell the bridge about its own write...
    (delivery,) = rig.emu.notifications_sent
    assert delivery.status == 202 and delivery.body["value"][0]["resourceData"]["id"] == ALICE.entra_object_id
    assert rig.telemetry.events[("graph_notification", "echo")] == 1
    # ...and nothing was queued for, or sent to, Dynamics 365.
    assert await rig.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS) is None
    await rig.bridge.outbox.drain()
    assert rig.dynamics.calls == []

    # Control: a genuine Teams change on the same path does reach Dynamics 365 (a minute later, out
    # of the conflict window, where Dynamics would win a simultaneous change).
    rig.bridge.clock.advance(60)  # type: ignore[attr-defined]
    rig.emu.set_user_state(ALICE.entra_object_id, "DoNotDisturb", "Presenting")
    await settle(rig)
    row = await rig.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.value == DND
