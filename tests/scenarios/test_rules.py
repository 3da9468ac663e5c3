"""One scenario per sync rule of DESIGN.md, across real HTTP: Dynamics 365 changes come as the
emulator's webhooks, Teams changes as Graph change notifications, agent requests through the bot's
``/api/messages``; what both systems show is read from the emulators, the way a person sees it."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND, LUNCH, OFFLINE, TRAINING
from emulators.stack import StackAgent, agent_ids
from mapping.model import OutboxStatus, System
from tests.scenarios.conftest import (
    bounded,
    dyn,
    dynamics_writes,
    events,
    expect,
    make_agents,
    metric,
    metrics,
    own,
    past_conflict_window,
    quiet_for,
    session,
    settle,
    teams,
)

SEED_UPDATE = Path(__file__).parents[1] / "dataverse" / "data" / "update-presence.json"


# ------------------------------------------------------------------------------------------ rule 1


@bounded(150)
async def test_rule1_directory_discovers_agents_adds_created_ones_and_counts_unknown_ids(make_stack):
    stack = await make_stack(make_agents(2))
    rt = stack.runtime
    listed = {a.dynamics_user_id: a.entra_object_id for a in await rt.store.list_agents()}
    assert listed == {a.dynamics_id: a.entra_id for a in stack.agents}, "agents discover missed someone"

    # A new agent appears in Dynamics 365 (a Create on msdyn_agentstatus) with an Entra object id.
    new = StackAgent("Nia New", *agent_ids(50), BUSY)
    stack.graph.add_user(new.entra_id)
    stack.dataverse.add_agent(new.dynamics_id, new.entra_id, new.name, BUSY, logged_in=True)
    await expect(stack, "the Create webhook adds the agent", lambda: rt.store.get_agent(new.dynamics_id),
                 lambda: "not in the directory")
    agent = await rt.store.get_agent(new.dynamics_id)
    assert agent is not None and agent.entra_object_id == new.entra_id and agent.enabled
    await expect(stack, "its presence at creation reaches Teams", lambda: session(stack, new) == "Busy/InACall",
                 lambda: session(stack, new))
    stack.dataverse.set_presence(new.dynamics_id, AVAILABLE, "SYSTEM")
    await expect(stack, "its later changes reach Teams", lambda: session(stack, new) == "Available/Available",
                 lambda: session(stack, new))
    # Its Teams side is heard once a subscription covers it: the Create wakes the upkeep at once
    # (its own rounds are 60 s apart, polling 30 s: both longer than this wait).
    await expect(stack, "a subscription covers the new agent within seconds",
                 lambda: any(new.entra_id in s.user_ids for s in stack.graph.subscriptions),
                 lambda: [len(s.user_ids) for s in stack.graph.subscriptions], timeout=10)
    await past_conflict_window(stack)
    stack.graph.set_user_state(new.entra_id, "Busy", "InAMeeting")
    await expect(stack, "a Teams meeting of the new agent reaches Dynamics", lambda: dyn(stack, new) == BUSY,
                 lambda: dyn(stack, new))

    # A Create for a systemuser without an Entra object id: not guessed, counted and reported.
    nobody = StackAgent("No Entra", *agent_ids(51), AVAILABLE)
    emitted = len(stack.dataverse.emissions)
    stack.dataverse.add_agent(nobody.dynamics_id, None, nobody.name, AVAILABLE, logged_in=True)

    async def reported() -> bool:
        return any(u["id"] == nobody.dynamics_id for u in await rt.store.list_unknown())

    await expect(stack, "the id without Entra object id is reported as unknown", reported,
                 lambda: "not in list_unknown()")
    stack.dataverse.set_presence(nobody.dynamics_id, BUSY, "SYSTEM")
    await settle(stack)
    assert await rt.store.get_agent(nobody.dynamics_id) is None, "an agent was guessed without an Entra id"
    answers = [e.status for e in list(stack.dataverse.emissions)[emitted:] if e.agent_id == nobody.dynamics_id]
    assert answers == [202, 202], "unknown agents are answered 202 (counted), not 4xx/5xx"
    unknown = next(u for u in await rt.store.list_unknown() if u["id"] == nobody.dynamics_id)
    assert unknown["count"] >= 2 and unknown["system"] == str(System.DYNAMICS), unknown
    assert await events(stack, "unknown_agent", "dataverse_webhook") >= 2
    assert dynamics_writes(stack, nobody) == 0


# ------------------------------------------------------------------------------------------ rule 2


@bounded(180)
async def test_rule2_dynamics_to_teams_by_base_presence_custom_ones_included_and_offline_clears(make_stack):
    # The person is signed out of Teams, so Teams shows exactly the bridge's session.
    alice = make_agents(1, AVAILABLE, own=("Offline", "Offline"))[0]
    stack = await make_stack([alice])
    expected = [
        (BUSY, "Busy/InACall"),
        (DND, "DoNotDisturb/Presenting"),
        (AWAY, "Away/Away"),
        (TRAINING, "DoNotDisturb/Presenting"),  # custom, base Busy DND
        (AVAILABLE, "Available/Available"),
        (LUNCH, "Away/Away"),  # custom, base Away
    ]
    await expect(stack, "start: Available", lambda: teams(stack, alice) == "Available/Available",
                 lambda: teams(stack, alice))
    for presence, pair in expected:
        stack.dataverse.set_presence(alice.dynamics_id, presence, "AGENT")
        await expect(stack, f"Dynamics {presence} -> Teams {pair}",
                     lambda pair=pair: session(stack, alice) == pair and teams(stack, alice) == pair,
                     lambda: (session(stack, alice), teams(stack, alice)))
        await settle(stack)
    writes = stack.teams_writes(alice)
    stack.dataverse.set_presence(alice.dynamics_id, OFFLINE, "AGENT")
    await expect(stack, "Offline clears the bridge session", lambda: session(stack, alice) is None,
                 lambda: session(stack, alice))
    await settle(stack)
    assert teams(stack, alice) == "Offline/Offline", "Teams shows the person's own state after clearPresence"
    assert stack.graph.calls("POST", "clearPresence")[-1].status == 200
    assert stack.teams_writes(alice) == writes + 1
    assert dyn(stack, alice) == OFFLINE and dynamics_writes(stack) == 0, "no Dynamics write bounced back"

    # Teams -> Dynamics: the person is offline in Teams too; nothing changes (Offline -> no change).
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await settle(stack)
    stack.graph.set_user_state(alice.entra_id, "Offline", "Offline")
    await settle(stack)
    assert dyn(stack, alice) == OFFLINE and dynamics_writes(stack) == 0


@bounded(180)
async def test_rule2_teams_call_meeting_dnd_away_override_dynamics_and_the_end_restores_what_was_held(make_stack):
    alice, bob, carol = make_agents(3, AVAILABLE)
    stack = await make_stack([alice, bob, carol])
    stack.dataverse.set_presence(bob.dynamics_id, LUNCH, "AGENT")  # custom presence, base Away
    await expect(stack, "Bob's Lunch reaches Teams", lambda: session(stack, bob) == "Away/Away",
                 lambda: session(stack, bob))
    await settle(stack)
    await past_conflict_window(stack)

    # The person's own clients (a call, a meeting, presenting) and the status they pick in Teams
    # (a preferred presence: DND, Appear away, Be right back), which outranks every session.
    cases = [
        ("own", ("Busy", "InACall"), BUSY),
        ("own", ("Busy", "InAConferenceCall"), BUSY),
        ("own", ("Busy", "InAMeeting"), BUSY),
        ("own", ("DoNotDisturb", "Presenting"), DND),
        ("preferred", ("DoNotDisturb", "DoNotDisturb"), DND),
        ("preferred", ("Away", "Away"), AWAY),
        ("preferred", ("BeRightBack", "BeRightBack"), AWAY),
    ]
    for kind, state, presence in cases:
        # Alice: Available in Dynamics; the Teams state overrides it, and its end restores Available.
        if kind == "own":
            stack.graph.set_user_state(alice.entra_id, *state)
        else:
            stack.graph.set_user_preferred(alice.entra_id, *state)
        await expect(stack, f"Teams {state} -> Dynamics {presence}", lambda p=presence: dyn(stack, alice) == p,
                     lambda: dyn(stack, alice))
        await settle(stack)
        if kind == "own":
            stack.graph.set_user_state(alice.entra_id, "Available", "Available")
        else:
            stack.graph.clear_user_preferred(alice.entra_id)
        await expect(stack, f"end of {state} restores Available", lambda: dyn(stack, alice) == AVAILABLE,
                     lambda: dyn(stack, alice))
        await settle(stack)
        assert session(stack, alice) == "Available/Available", "the override must not change the bridge session"
        assert teams(stack, alice) == "Available/Available"

    # Bob: his custom Lunch is restored after a meeting, not a guessed Available.
    stack.graph.set_user_state(bob.entra_id, "Busy", "InAMeeting")
    await expect(stack, "Bob's meeting -> Busy", lambda: dyn(stack, bob) == BUSY, lambda: dyn(stack, bob))
    await settle(stack)
    stack.graph.set_user_state(bob.entra_id, "Available", "Available")
    await expect(stack, "the meeting ends: Lunch comes back", lambda: dyn(stack, bob) == LUNCH, lambda: dyn(stack, bob))
    await settle(stack)
    assert session(stack, bob) == "Away/Away" and teams(stack, bob) == "Available/Available"

    # Carol is signed out of Teams with Away in Dynamics: her Teams shows the bridge's Away session.
    # A call on her phone, then the call ends and Teams falls back to exactly the bridge's session
    # (Away, not Available): the override ends and Away is restored.
    stack.graph.set_user_state(carol.entra_id, "Offline", "Offline")
    await settle(stack)
    stack.dataverse.set_presence(carol.dynamics_id, AWAY, "AGENT")
    await expect(stack, "Carol shows the Away session", lambda: teams(stack, carol) == "Away/Away",
                 lambda: teams(stack, carol))
    await settle(stack)
    await past_conflict_window(stack)
    stack.graph.set_user_state(carol.entra_id, "Busy", "InACall")
    await expect(stack, "Carol's call -> Busy", lambda: dyn(stack, carol) == BUSY, lambda: dyn(stack, carol))
    await settle(stack)
    stack.graph.set_user_state(carol.entra_id, "Offline", "Offline")
    await expect(stack, "back to the bridge session: Away restored", lambda: dyn(stack, carol) == AWAY,
                 lambda: dyn(stack, carol))
    assert (await quiet_for(stack, 1.0)) == (0, 0)


# ------------------------------------------------------------------------------------------ rule 3


@bounded(150)
async def test_rule3_no_echo_and_the_stuck_busy_trap(make_stack):
    alice, bob = make_agents(2, AVAILABLE)
    stack = await make_stack([alice, bob])
    await past_conflict_window(stack)
    teams_before, dyn_before = stack.teams_writes(alice), dynamics_writes(stack, alice)

    # The trap: a Teams call -> Dynamics Busy -> Dynamics fires its webhook for the bridge's write.
    emitted = len(stack.dataverse.emissions)
    stack.graph.set_user_state(alice.entra_id, "Busy", "InACall")
    await expect(stack, "the call -> Dynamics Busy", lambda: dyn(stack, alice) == BUSY, lambda: dyn(stack, alice))
    await settle(stack)
    echoes = [e for e in list(stack.dataverse.emissions)[emitted:] if e.agent_id == alice.dynamics_id]
    assert echoes and all(e.status == 200 for e in echoes), "Dynamics fired (and the service took) the webhook"
    assert all(json.loads(e.response).get("result") == "echo" for e in echoes), [e.response for e in echoes]
    assert stack.teams_writes(alice) == teams_before, "the webhook of the bridge's own write changed Teams"
    assert session(stack, alice) == "Available/Available"
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await expect(stack, "the call ends: Dynamics restored", lambda: dyn(stack, alice) == AVAILABLE,
                 lambda: dyn(stack, alice))
    await settle(stack)
    assert teams(stack, alice) == "Available/Available", "stuck busy in Teams"
    assert dynamics_writes(stack, alice) - dyn_before == 2 and stack.teams_writes(alice) == teams_before
    assert (await quiet_for(stack, 1.5)) == (0, 0), "the systems ping-pong"

    # Dynamics -> Teams: the Graph notification of the bridge's own setPresence changes nothing.
    echo_before = await events(stack, "echo", "graph_notification")
    stack.dataverse.set_presence(bob.dynamics_id, BUSY, "SYSTEM")
    await expect(stack, "routing Busy -> Teams", lambda: teams(stack, bob) == "Busy/InACall", lambda: teams(stack, bob))
    await settle(stack)
    assert await events(stack, "echo", "graph_notification") > echo_before
    assert dyn(stack, bob) == BUSY and dynamics_writes(stack, bob) == 0

    # The bot writes both systems; neither write comes back as a change.
    writes = stack.teams_writes(bob), dynamics_writes(stack, bob)
    reply = await stack.chat(bob, "dnd")
    assert "Dynamics 365 shows" in reply.text, reply.text
    await expect(stack, "bot dnd -> Dynamics", lambda: dyn(stack, bob) == DND, lambda: dyn(stack, bob))
    await expect(stack, "bot dnd -> Teams", lambda: teams(stack, bob) == "DoNotDisturb/Presenting",
                 lambda: teams(stack, bob))
    assert (await quiet_for(stack, 1.5)) == (0, 0), "the systems ping-pong after a bot command"
    assert (stack.teams_writes(bob) - writes[0], dynamics_writes(stack, bob) - writes[1]) == (1, 1)


# ------------------------------------------------------------------------------------------ rule 4


def seed_update(agent_id: str, status_id: str, presence_id: str, row_version: int, modified_ms: int) -> dict[str, Any]:
    """The seed webhook (tests/dataverse/data/update-presence.json) for another agent, presence and version."""
    body = json.loads(SEED_UPDATE.read_text())
    old_agent, old_status = "97c90b02-4e38-ef11-a315-000d3a5a54dc", "3d1feef9-604d-ef11-bfe3-6045bd03d9d8"
    old_presence = "efdeb843-c07a-e811-8162-000d3aa11f50"
    text = json.dumps(body)
    text = text.replace(old_agent, agent_id).replace(old_status, status_id).replace(old_presence, presence_id)
    text = text.replace('"RowVersion": "5948260"', f'"RowVersion": "{row_version}"')
    text = text.replace("/Date(1722582038000)/", f"/Date({modified_ms})/")
    return json.loads(text)


@bounded(120)
async def test_rule4_stale_and_duplicate_webhooks_never_overwrite_newer_state(make_stack):
    alice = make_agents(1, AVAILABLE)[0]
    stack = await make_stack([alice])
    assert stack.http is not None
    url = f"/api/dataverse/webhook?code={stack.settings.dataverse_webhook_key}"
    emitted = len(stack.dataverse.emissions)
    stack.dataverse.set_presence(alice.dynamics_id, DND, "AGENT")
    await expect(stack, "DND reaches Teams", lambda: session(stack, alice) == "DoNotDisturb/Presenting",
                 lambda: session(stack, alice))
    await settle(stack)
    real = next(e for e in list(stack.dataverse.emissions)[emitted:] if e.agent_id == alice.dynamics_id)
    target = real.body["InputParameters"][0]["value"]
    version, status_id = int(target["RowVersion"]), target["Id"]
    row = stack.dataverse.agent_status(alice.dynamics_id)
    assert row is not None
    writes = stack.teams_writes(alice), dynamics_writes(stack)

    async def post(body: dict[str, Any]) -> dict[str, Any]:
        async with stack.http.post(url, json=body) as r:  # type: ignore[union-attr]
            assert r.status == 200, await r.text()
            return await r.json()

    # A late delivery of an older change (Away, an older RowVersion): stale.
    stale = seed_update(alice.dynamics_id, status_id, AWAY, version - 5, 1722582038000)
    assert (await post(stale))["result"] == "stale"
    # The same webhook delivered twice: a duplicate, idempotent.
    assert (await post(copy.deepcopy(real.body)))["result"] == "duplicate"
    assert (await post(copy.deepcopy(real.body)))["result"] == "duplicate"
    await settle(stack)
    assert session(stack, alice) == "DoNotDisturb/Presenting" and dyn(stack, alice) == DND
    assert (stack.teams_writes(alice), dynamics_writes(stack)) == writes
    assert await events(stack, "stale") == 1 and await events(stack, "duplicate") == 2

    # Control: the same crafted payload with a newer RowVersion is applied, so the two above were
    # refused for their order, not for their shape.
    newer = seed_update(alice.dynamics_id, status_id, AWAY, version + 1_000_000, 1722582038000)
    assert (await post(newer))["result"] == "applied"
    await expect(stack, "the newer change reaches Teams", lambda: session(stack, alice) == "Away/Away",
                 lambda: session(stack, alice))


# ------------------------------------------------------------------------------------------ rule 5


@bounded(150)
async def test_rule5_both_sides_inside_the_window_dynamics_wins_and_the_decision_is_logged(make_stack, caplog):
    caplog.set_level(logging.WARNING, logger="presence_sync.engine")
    alice, bob, carol = make_agents(3, AVAILABLE)
    stack = await make_stack([alice, bob, carol])
    window = stack.runtime.bridge.rules.conflict_window_seconds
    assert window == 2.0, "the default window of DESIGN.md"
    await past_conflict_window(stack)

    # Dynamics first (routing gives Alice a conversation), her Teams DND right after: Dynamics wins.
    stack.dataverse.set_presence(alice.dynamics_id, BUSY, "SYSTEM")
    await stack.dataverse.wait_emissions()
    stack.graph.set_user_state(alice.entra_id, "DoNotDisturb", "DoNotDisturb")
    await settle(stack)
    assert dyn(stack, alice) == BUSY and dynamics_writes(stack, alice) == 0, "Teams overrode Dynamics in the window"
    assert session(stack, alice) == "Busy/InACall"

    # Teams first (Bob's call overrides), Dynamics (routing: Away) right after: Dynamics wins, and
    # Teams follows Dynamics.
    stack.graph.set_user_state(bob.entra_id, "Busy", "InACall")
    await expect(stack, "Bob's call -> Busy", lambda: dyn(stack, bob) == BUSY, lambda: dyn(stack, bob))
    stack.dataverse.set_presence(bob.dynamics_id, AWAY, "SYSTEM")
    await settle(stack)
    assert dyn(stack, bob) == AWAY
    assert session(stack, bob) == "Away/Away" and teams(stack, bob) == "Busy/InACall"
    assert await events(stack, "conflict") >= 2

    logged = [r for r in caplog.records if r.getMessage() == "conflict"]
    fields = [getattr(r, "fields", {}) for r in logged]
    assert any(f.get("agent") == alice.dynamics_id and f.get("conflict_winner") == "dynamics"
               and f.get("conflict_teams") == "DoNotDisturb/DoNotDisturb" and f.get("conflict_dynamics") == BUSY
               for f in fields), fields
    assert any(f.get("agent") == bob.dynamics_id and f.get("conflict_winner") == "dynamics" for f in fields), fields

    # Control: Carol's Teams change well after her last Dynamics change is not a conflict.
    stack.graph.set_user_state(carol.entra_id, "DoNotDisturb", "Presenting")
    await expect(stack, "outside the window Teams overrides", lambda: dyn(stack, carol) == DND,
                 lambda: dyn(stack, carol))


# ------------------------------------------------------------------------------------------ rule 6


@bounded(120)
async def test_rule6_a_burst_of_changes_costs_one_teams_write(make_stack):
    alice, bob = make_agents(2, AVAILABLE)
    stack = await make_stack([alice, bob], teams_write_hold_seconds=0.5)
    writes = stack.teams_writes(alice), stack.teams_writes(bob)
    burst = [BUSY, AVAILABLE, DND, AWAY, TRAINING, BUSY, LUNCH, AVAILABLE, BUSY, DND]
    for presence in burst:
        stack.dataverse.set_presence(alice.dynamics_id, presence, "SYSTEM")
    stack.dataverse.set_presence(bob.dynamics_id, BUSY, "SYSTEM")
    await expect(stack, "the newest state reaches Teams", lambda: session(stack, alice) == "DoNotDisturb/Presenting",
                 lambda: session(stack, alice))
    assert (await quiet_for(stack, 1.0)) == (0, 0)
    assert stack.teams_writes(alice) - writes[0] == 1, f"{stack.teams_writes(alice) - writes[0]} writes for 10 changes"
    assert stack.teams_writes(bob) - writes[1] == 1 and session(stack, bob) == "Busy/InACall"
    assert dyn(stack, alice) == DND and dynamics_writes(stack) == 0


# ------------------------------------------------------------------------------------------ rule 7


@bounded(150)
async def test_rule7_outbox_waits_out_throttling_and_outages_then_delivers(make_stack):
    alice, bob = make_agents(2, AVAILABLE)
    stack = await make_stack([alice, bob])
    rt = stack.runtime
    await past_conflict_window(stack)

    # Graph throttles (429 + Retry-After) while Dynamics changes: queued durably before the webhook
    # is answered, delivered once the throttling ends.
    stack.graph.throttle_for(2.0, retry_after=1)
    calls = len(stack.graph.requests)
    stack.dataverse.set_presence(alice.dynamics_id, BUSY, "SYSTEM")
    [emission] = [e for e in await stack.dataverse.wait_emissions() if e.agent_id == alice.dynamics_id][-1:]
    assert emission.status == 200
    row = await rt.store.outbox_row(alice.dynamics_id, System.TEAMS)
    assert row is not None and row.value == "Busy/InACall", "the command was not in the outbox when acknowledged"
    await expect(stack, "delivered after the throttling", lambda: session(stack, alice) == "Busy/InACall",
                 lambda: session(stack, alice), timeout=30)
    assert any(r.status == 429 for r in list(stack.graph.requests)[calls:]), "Graph never throttled"

    # Dataverse answers 503 to the presence write twice: retried with backoff, then delivered.
    stack.dataverse.fail_next(2, 503, path="CCaaS_ModifyAgentPresence")
    stack.graph.set_user_state(bob.entra_id, "Busy", "InAMeeting")
    await expect(stack, "delivered after the outage", lambda: dyn(stack, bob) == BUSY, lambda: dyn(stack, bob),
                 timeout=30)
    failed = [c for c in stack.dataverse.calls if "CCaaS_ModifyAgentPresence" in c.path and c.status == 503]
    assert len(failed) == 2
    await settle(stack)
    m = await metrics(stack)
    assert metric(m, "presence_sync_dead_letters") == 0
    assert metric(m, "presence_sync_deliveries_total", system="dynamics", result="retry") == 2

    # A permanent error (Graph 403 on setPresence): a dead letter with the upstream's message, visible
    # in the store (`outbox list`) and /metrics; once the cause is fixed, a retry delivers it.
    stack.graph.fail_next(1, 403, paths="setPresence")
    stack.dataverse.set_presence(alice.dynamics_id, DND, "AGENT")
    await settle(stack)
    dead = await rt.store.list_outbox(OutboxStatus.DEAD)
    assert [(d.agent_id, d.system, d.value) for d in dead] == [
        (alice.dynamics_id, System.TEAMS, "DoNotDisturb/Presenting")
    ]
    assert dead[0].last_error and "403" in dead[0].last_error, dead[0].last_error
    m = await metrics(stack)
    assert metric(m, "presence_sync_dead_letters") == 1
    assert metric(m, "presence_sync_outbox_rows", status="dead") == 1
    assert metric(m, "presence_sync_deliveries_total", system="teams", result="dead") == 1
    assert session(stack, alice) == "Busy/InACall"
    assert await rt.store.retry_dead(None, rt.bridge.clock()) == 1
    rt.outbox.wake()
    await expect(stack, "the retried dead letter is delivered",
                 lambda: session(stack, alice) == "DoNotDisturb/Presenting", lambda: session(stack, alice))
    await settle(stack)
    assert metric(await metrics(stack), "presence_sync_dead_letters") == 0


# ------------------------------------------------------------------------------------------ rule 8


async def set_webhook_step(stack, active: bool) -> None:
    """An admin deactivates (or reactivates) the Update step in Dataverse, through its Web API."""
    from emulators.stack import TOKEN

    assert stack.http is not None
    steps = [s for s in stack.dataverse.steps() if "Update" in str(s.get("name"))] or stack.dataverse.steps()
    for step in steps:
        async with stack.http.patch(
            f"{stack.dataverse.api}/sdkmessageprocessingsteps({step['sdkmessageprocessingstepid']})",
            json={"statecode": 0 if active else 1, "statuscode": 1 if active else 2},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 204, await r.text()


@bounded(150)
async def test_rule8_reconcile_repairs_lost_notifications_missed_events_and_drift(make_stack):
    alice, bob, carol = make_agents(3, AVAILABLE)
    stack = await make_stack([alice, bob, carol])
    rt = stack.runtime
    await past_conflict_window(stack)

    # A notification is lost: Dynamics does not hear of Alice's call...
    stack.graph.drop_notifications(1)
    stack.graph.set_user_state(alice.entra_id, "Busy", "InACall")
    await settle(stack)
    assert stack.graph.notifications_dropped, "the emulator did not drop the notification"
    assert dyn(stack, alice) == AVAILABLE
    # ...until Graph says it missed some: the lifecycle event triggers a read of the covered users.
    for sub_id in stack.subscription_ids():
        delivery = await stack.graph.send_lifecycle(sub_id, "missed")
        assert delivery is not None and delivery.status == 202, delivery
    await expect(stack, "'missed' repaired Dynamics", lambda: dyn(stack, alice) == BUSY, lambda: dyn(stack, alice))
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await expect(stack, "the call ends: restored", lambda: dyn(stack, alice) == AVAILABLE, lambda: dyn(stack, alice))

    # Silent subscription: Bob's DND is never notified; the sweep finds it.
    stack.graph.drop_notifications(1)
    stack.graph.set_user_state(bob.entra_id, "DoNotDisturb", "DoNotDisturb")
    await settle(stack)
    assert dyn(stack, bob) == AVAILABLE

    # Drift behind the bridge's back in Dynamics: the webhook step is off while Carol's presence changes.
    await set_webhook_step(stack, active=False)
    emitted = len(stack.dataverse.emissions)
    stack.dataverse.set_presence(carol.dynamics_id, TRAINING, "AGENT")
    await settle(stack)
    assert len(stack.dataverse.emissions) == emitted, "the deactivated step still fired"
    assert session(stack, carol) == "Available/Available"
    await set_webhook_step(stack, active=True)

    summary = await rt.reconcile()
    assert summary.failed == 0 and summary.repaired == 2, summary.line()
    await expect(stack, "reconcile repaired Dynamics (Bob)", lambda: dyn(stack, bob) == DND, lambda: dyn(stack, bob))
    await expect(stack, "reconcile repaired Teams (Carol)",
                 lambda: session(stack, carol) == "DoNotDisturb/Presenting", lambda: session(stack, carol))
    await settle(stack)
    again = await rt.reconcile()
    assert again.repaired == 0 and again.in_sync == 3, again.line()
    assert (await quiet_for(stack, 1.0)) == (0, 0)
    assert own(stack, bob) == "DoNotDisturb/DoNotDisturb"


def test_seed_update_is_the_seed_with_our_ids():
    body = seed_update("11111111-0000-4000-8000-000000000001", "22222222-0000-4000-8000-000000000002", AWAY, 7, 9)
    target = body["InputParameters"][0]["value"]
    attrs = {a["key"]: a["value"] for a in target["Attributes"]}
    assert target["RowVersion"] == "7" and target["Id"] == "22222222-0000-4000-8000-000000000002"
    assert attrs["msdyn_agentid"]["Id"] == "11111111-0000-4000-8000-000000000001"
    assert attrs["msdyn_currentpresenceid"]["Id"] == AWAY and attrs["msdyn_presencemodifiedon"] == "/Date(9)/"


@bounded(120)
async def test_rule5_a_bot_command_is_not_overwritten_by_a_teams_change_notified_before_it_read_after_it(make_stack):
    alice = make_agents(1, AVAILABLE)[0]
    stack = await make_stack([alice])
    await past_conflict_window(stack)
    stack.graph.latency(0.5)  # Graph is slow to answer API calls (reads and writes), not to notify
    stack.graph.set_user_state(alice.entra_id, "Busy", "InACall")  # a call starts...
    await stack.graph.wait_idle()  # ...Graph has notified the service, which acknowledged it
    reply = await stack.chat(alice, "away")  # then the agent asks the bot for Away
    stack.graph.latency(0)
    await settle(stack)
    assert dyn(stack, alice) == AWAY, f"the older Teams call overwrote the newer command: {reply.text!r}"
    assert session(stack, alice) == "Away/Away"
    assert "overtaken" not in reply.text, reply.text
