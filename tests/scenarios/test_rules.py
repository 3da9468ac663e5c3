"""One scenario per sync rule of ``docs/rules.md`` (version 2), across real HTTP: Dynamics 365 changes
come as the emulator's webhooks, Teams changes as Graph change notifications, agent requests through
the bot's ``/api/messages``; what both systems show is read from the emulators, the way a person sees
it.

Why scenarios on top of ``tests/mapping/test_rules.py``: the unit tests prove the pure functions; these
prove that the adapters feed them what the real systems say (who changed Dynamics, what Teams
aggregates, when Graph notifies nothing) and that what the functions decide is what both systems end
up showing. There is no time window in version 2, so no scenario waits one out: where one step must
come after another, the stack settles in between.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND, LUNCH, OFFLINE, TRAINING
from mapping.model import OutboxStatus, System
from service.stack import TOKEN, LocalStack, StackAgent, agent_ids
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
    quiet_for,
    session,
    settle,
    teams,
    teams_reads,
)

pytestmark = pytest.mark.slow

SEED_UPDATE = Path(__file__).parents[1] / "dataverse" / "data" / "update-presence.json"


NO_HOLD = {"teams_write_hold_seconds": 0}
"""For scenarios without bursts: the hold (rule 6, 0.5 s by default) folds a burst of Dynamics changes
into one Teams write; here every step settles before the next, so it changes nothing but the wall
time. Rules 6 and 7 and the random test keep the default."""

SKIP = object()
"""``Want.bridge`` default: the bridge's session is not checked (``None`` means: no session)."""


@dataclass(frozen=True)
class Want:
    """What one agent's systems should show: ``dynamics`` the presence id, ``bridge`` the bridge's
    Teams session (None: none), ``shown`` what Teams aggregates; unset ones are not checked."""

    agent: StackAgent
    what: str
    dynamics: str | None = None
    bridge: object = SKIP
    shown: str | None = None

    def state(self, stack: LocalStack) -> tuple[str | None, str | None, str]:
        return dyn(stack, self.agent), session(stack, self.agent), teams(stack, self.agent)

    def met(self, stack: LocalStack) -> bool:
        d, s, t = self.state(stack)
        return (
            (self.dynamics is None or d == self.dynamics)
            and (self.bridge is SKIP or s == self.bridge)
            and (self.shown is None or t == self.shown)
        )


async def shows(stack: LocalStack, *wants: Want, timeout: float = 15.0) -> None:
    """Waits until every agent's systems show what is wanted, then settles and checks again: a value
    seen on the way to another is not the answer."""
    for w in wants:
        await expect(
            stack, f"{w.agent.name}: {w.what}", lambda w=w: w.met(stack), lambda w=w: w.state(stack), timeout=timeout
        )
    await settle(stack)
    for w in wants:
        assert w.met(stack), f"{w.agent.name}: {w.what}: changed again after settling to {w.state(stack)!r}"


# ------------------------------------------------------------------------------------------ rule 1


@bounded(150)
async def test_rule1_directory_discovers_agents_adds_created_ones_and_counts_unknown_ids(make_stack):
    stack = await make_stack(make_agents(2), **NO_HOLD)
    rt = stack.runtime
    listed = {a.dynamics_user_id: a.entra_object_id for a in await rt.store.list_agents()}
    assert listed == {a.dynamics_id: a.entra_id for a in stack.agents}, "agents discover missed someone"

    # A new agent appears in Dynamics 365 (a Create on msdyn_agentstatus) with an Entra object id.
    new = StackAgent("Nia New", *agent_ids(50), BUSY)
    stack.graph.add_user(new.entra_id)
    stack.dataverse.add_agent(new.dynamics_id, new.entra_id, new.name, BUSY, logged_in=True)
    await expect(
        stack,
        "the Create webhook adds the agent",
        lambda: rt.store.get_agent(new.dynamics_id),
        lambda: "not in the directory",
    )
    agent = await rt.store.get_agent(new.dynamics_id)
    assert agent is not None and agent.entra_object_id == new.entra_id and agent.enabled
    await expect(
        stack,
        "its presence at creation reaches Teams",
        lambda: session(stack, new) == "Busy/InACall",
        lambda: session(stack, new),
    )
    # Its later changes reach Teams too: routing makes it Available, which is no session at all.
    stack.dataverse.set_presence(new.dynamics_id, AVAILABLE, "SYSTEM")
    await shows(stack, Want(new, "routing's Available clears the session", bridge=None, shown="Available/Available"))
    # Its Teams side is heard once a subscription covers it: the Create wakes the upkeep at once
    # (its own rounds are 60 s apart, polling 30 s: both longer than this wait).
    await expect(
        stack,
        "a subscription covers the new agent within seconds",
        lambda: any(new.entra_id in s.user_ids for s in stack.graph.subscriptions),
        lambda: [len(s.user_ids) for s in stack.graph.subscriptions],
        timeout=10,
    )
    stack.graph.set_user_state(new.entra_id, "Busy", "InAMeeting")
    await shows(stack, Want(new, "a Teams meeting of the new agent reaches Dynamics", dynamics=BUSY))

    # A Create for a systemuser without an Entra object id: not guessed, counted and reported.
    nobody = StackAgent("No Entra", *agent_ids(51), AVAILABLE)
    emitted = len(stack.dataverse.emissions)
    stack.dataverse.add_agent(nobody.dynamics_id, None, nobody.name, AVAILABLE, logged_in=True)

    async def reported() -> bool:
        return any(u["id"] == nobody.dynamics_id for u in await rt.store.list_unknown())

    await expect(
        stack, "the id without Entra object id is reported as unknown", reported, lambda: "not in list_unknown()"
    )
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


@bounded(150)
async def test_rule2_dynamics_to_teams_by_base_presence_custom_ones_included_available_and_offline_clear(make_stack):
    """The session table of rule 2, one write per change. The person is signed out of Teams, so Teams
    shows exactly the bridge's session, or their own Offline when there is none."""
    alice = make_agents(1, AVAILABLE, own=("Offline", "Offline"))[0]
    stack = await make_stack([alice], **NO_HOLD)
    await shows(stack, Want(alice, "start: Available is no session", bridge=None, shown="Offline/Offline"))
    assert stack.teams_writes(alice) == 0, "an Available agent got a session (it would hide Away in Teams)"
    expected = [
        (BUSY, "Busy/InACall"),
        (DND, "DoNotDisturb/Presenting"),
        (AVAILABLE, None),  # no session: an Available one would outrank and hide the person's Away
        (AWAY, "Away/Away"),
        (TRAINING, "DoNotDisturb/Presenting"),  # custom, base Busy DND
        (LUNCH, "Away/Away"),  # custom, base Away
        (OFFLINE, None),
    ]
    for presence, pair in expected:
        writes, clears = stack.teams_writes(alice), len(stack.graph.calls("POST", "clearPresence"))
        stack.dataverse.set_presence(alice.dynamics_id, presence, "AGENT")
        await shows(
            stack, Want(alice, f"Dynamics {presence} -> session {pair}", bridge=pair, shown=pair or "Offline/Offline")
        )
        assert stack.teams_writes(alice) == writes + 1, f"{stack.teams_writes(alice) - writes} writes for one change"
        if pair is None:
            assert [c.status for c in stack.graph.calls("POST", "clearPresence")[clears:]] == [200]
    assert dyn(stack, alice) == OFFLINE and dynamics_writes(stack) == 0, "a Dynamics write bounced back"

    # Teams -> Dynamics while the agent is Offline in Dynamics: nothing, whatever Teams says (an
    # override never brings an agent online).
    for state in (("Busy", "InAMeeting"), ("DoNotDisturb", "Presenting"), ("Away", "Away"), ("Offline", "Offline")):
        stack.graph.set_user_state(alice.entra_id, *state)
        await settle(stack)
        assert dyn(stack, alice) == OFFLINE, f"Teams {state} overrode an Offline agent"
    assert dynamics_writes(stack) == 0


@bounded(180)
async def test_rule2_teams_call_meeting_dnd_away_override_dynamics_and_the_end_shows_the_agents_own(make_stack):
    """Rule 2's second table, each Teams state on an agent of its own (at once: they are independent);
    when Teams stops asking, Dynamics is P (a custom presence included), and the override never
    changes the bridge's session (no "stuck busy" in Teams)."""
    # The person's own clients (calls, a meeting, presenting, Away, Be right back) and the status
    # they pick in Teams (a preferred presence: DND, Appear away, Be right back).
    cases = [
        ("own", ("Busy", "InACall"), BUSY),
        ("own", ("Busy", "InAConferenceCall"), BUSY),
        ("own", ("Busy", "InAMeeting"), BUSY),
        ("own", ("DoNotDisturb", "Presenting"), DND),
        ("own", ("Away", "Away"), AWAY),
        ("own", ("BeRightBack", "BeRightBack"), AWAY),
        ("preferred", ("DoNotDisturb", "DoNotDisturb"), DND),
        ("preferred", ("Away", "Away"), AWAY),
        ("preferred", ("BeRightBack", "BeRightBack"), AWAY),
    ]
    *people, bob, carol = make_agents(len(cases) + 2, AVAILABLE)
    stack = await make_stack([*people, bob, carol], **NO_HOLD)
    stack.dataverse.set_presence(bob.dynamics_id, LUNCH, "AGENT")  # custom presence, base Away
    stack.graph.set_user_state(carol.entra_id, "Offline", "Offline")
    await shows(stack, Want(bob, "Bob's Lunch reaches Teams", bridge="Away/Away"))

    # Available in Dynamics (no session): the Teams state overrides it, its end shows Available.
    for person, (kind, state, _) in zip(people, cases, strict=True):
        if kind == "own":
            stack.graph.set_user_state(person.entra_id, *state)
        else:
            stack.graph.set_user_preferred(person.entra_id, *state)
    await shows(
        stack,
        *(
            Want(person, f"Teams {state} -> Dynamics {presence}", dynamics=presence, bridge=None, shown="/".join(state))
            for person, (_, state, presence) in zip(people, cases, strict=True)
        ),
    )
    for person, (kind, _, _) in zip(people, cases, strict=True):
        if kind == "own":
            stack.graph.set_user_state(person.entra_id, "Available", "Available")
        else:
            stack.graph.clear_user_preferred(person.entra_id)
    await shows(
        stack,
        *(
            Want(
                person,
                f"the end of {state} shows Available",
                dynamics=AVAILABLE,
                bridge=None,
                shown="Available/Available",
            )
            for person, (_, state, _) in zip(people, cases, strict=True)
        ),
    )

    # Bob: his custom Lunch is what Dynamics shows after a meeting, not a guessed Available.
    # Carol is signed out of Teams with Away in Dynamics: her Teams shows the bridge's Away session.
    stack.graph.set_user_state(bob.entra_id, "Busy", "InAMeeting")
    stack.dataverse.set_presence(carol.dynamics_id, AWAY, "AGENT")
    await shows(
        stack,
        Want(bob, "Bob's meeting -> Busy", dynamics=BUSY, bridge="Away/Away"),
        Want(carol, "Carol shows the Away session", bridge="Away/Away", shown="Away/Away"),
    )
    # Carol: a call on her phone, then the call ends and Teams falls back to exactly the bridge's
    # session (Away, not Available): that is the session showing, not her own state.
    stack.graph.set_user_state(bob.entra_id, "Available", "Available")
    stack.graph.set_user_state(carol.entra_id, "Busy", "InACall")
    await shows(
        stack,
        Want(bob, "the meeting ends: Lunch", dynamics=LUNCH, bridge="Away/Away", shown="Available/Available"),
        Want(carol, "Carol's call -> Busy", dynamics=BUSY, shown="Busy/InACall"),
    )
    stack.graph.set_user_state(carol.entra_id, "Offline", "Offline")
    await shows(
        stack, Want(carol, "back to the bridge session: Away", dynamics=AWAY, bridge="Away/Away", shown="Away/Away")
    )
    assert (await quiet_for(stack, 1.0)) == (0, 0)


@bounded(150)
async def test_rule2_a_teams_away_stops_routing(make_stack):
    """Version 1's Available session outranked and hid a person's own Away; now an Available agent
    has no session, so their Away shows in Teams and keeps customers away. A Busy agent's Away asks
    less than Busy and changes nothing, until routing frees them: then it shows and counts."""
    alice, bob = make_agents(2, AVAILABLE)
    stack = await make_stack([alice, bob], **NO_HOLD)
    stack.graph.set_user_state(alice.entra_id, "Away", "Away")
    await shows(stack, Want(alice, "Teams Away -> Dynamics Away", dynamics=AWAY, bridge=None, shown="Away/Away"))
    stack.graph.set_user_state(alice.entra_id, "BeRightBack", "BeRightBack")
    await shows(
        stack, Want(alice, "Be right back keeps Away", dynamics=AWAY, bridge=None, shown="BeRightBack/BeRightBack")
    )
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await shows(stack, Want(alice, "back: Available", dynamics=AVAILABLE, bridge=None, shown="Available/Available"))
    assert dynamics_writes(stack, alice) == 2, "Away, then back to Available; nothing else"

    # Bob: routing gives him a conversation (Busy), he steps away from his desk meanwhile.
    stack.dataverse.set_presence(bob.dynamics_id, BUSY, "SYSTEM")
    await shows(stack, Want(bob, "routing Busy", dynamics=BUSY, bridge="Busy/InACall", shown="Busy/InACall"))
    stack.graph.set_user_state(bob.entra_id, "Away", "Away")
    await settle(stack)
    assert (dyn(stack, bob), teams(stack, bob)) == (BUSY, "Busy/InACall"), "Away under a Busy session changed Busy"
    # The conversation ends (routing: Available): the session goes, Teams shows his Away, and no new
    # customer is routed to an agent who is not at his desk.
    stack.dataverse.set_presence(bob.dynamics_id, AVAILABLE, "SYSTEM")
    await shows(stack, Want(bob, "routing frees him: his Away counts", dynamics=AWAY, bridge=None, shown="Away/Away"))
    stack.graph.set_user_state(bob.entra_id, "Available", "Available")
    await shows(stack, Want(bob, "back at his desk: what routing set", dynamics=AVAILABLE, bridge=None))
    assert (await quiet_for(stack, 1.0)) == (0, 0)


@bounded(150)
async def test_rule2_a_routing_change_during_a_meeting_keeps_dynamics_busy_until_it_ends(make_stack):
    """A routing (SYSTEM) change during an override changes P, not the override; when the meeting ends
    Dynamics shows what routing set meanwhile (nothing is restored from a snapshot). Also the cases
    version 1 dropped within its 2 s window: a Teams change right after a Dynamics change, and a
    routing change right after a Teams change, are each on their own."""
    alice, bob, carol = make_agents(3, AVAILABLE)
    stack = await make_stack([alice, bob, carol], **NO_HOLD)
    stack.graph.set_user_state(alice.entra_id, "Busy", "InAMeeting")
    await shows(stack, Want(alice, "the meeting -> Busy", dynamics=BUSY, bridge=None))
    # Routing assigns a conversation (Busy), the conversation ends (Available), an offer times out
    # (Away): each changes the session (P), none ends the meeting's Busy in Dynamics.
    for presence, pair in ((BUSY, "Busy/InACall"), (AVAILABLE, None), (AWAY, "Away/Away")):
        stack.dataverse.set_presence(alice.dynamics_id, presence, "SYSTEM")
        await shows(
            stack,
            Want(alice, f"routing {presence} during the meeting", dynamics=BUSY, bridge=pair, shown="Busy/InAMeeting"),
        )
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await shows(
        stack,
        Want(alice, "the meeting ends: routing's Away", dynamics=AWAY, bridge="Away/Away", shown="Available/Available"),
    )

    # Right after a routing change (its webhook answered, nothing settled), Bob's Teams DND: it is a
    # newer Teams state than anything the agent chose, so it overrides.
    stack.dataverse.set_presence(bob.dynamics_id, BUSY, "SYSTEM")
    await stack.dataverse.wait_emissions()
    stack.graph.set_user_state(bob.entra_id, "DoNotDisturb", "DoNotDisturb")
    await shows(stack, Want(bob, "DND right after routing Busy", dynamics=DND, bridge="Busy/InACall"))

    # Carol's call, and routing Away right after its override was written: Busy stays, the session
    # follows routing, and Teams still shows her call (it outranks the Away session).
    stack.graph.set_user_state(carol.entra_id, "Busy", "InACall")
    await expect(stack, "Carol's call -> Busy", lambda: dyn(stack, carol) == BUSY, lambda: dyn(stack, carol))
    stack.dataverse.set_presence(carol.dynamics_id, AWAY, "SYSTEM")
    await shows(stack, Want(carol, "routing Away right after", dynamics=BUSY, bridge="Away/Away", shown="Busy/InACall"))
    assert (await quiet_for(stack, 1.0)) == (0, 0)
    assert not [k for k in await metrics(stack) if "conflict" in k], "version 1's conflict results are gone"


@bounded(150)
async def test_rule2_the_agents_own_choice_ends_the_override(make_stack):
    """The agent's own choice (a Dynamics change marked AGENT, or a bot command) ends an override until
    the Teams state changes again; routing after the choice does not bring it back."""
    alice, bob = make_agents(2, AVAILABLE)
    stack = await make_stack([alice, bob], **NO_HOLD)

    stack.graph.set_user_state(alice.entra_id, "Busy", "InACall")
    await shows(stack, Want(alice, "the call -> Busy", dynamics=BUSY))
    writes = dynamics_writes(stack, alice)
    stack.dataverse.set_presence(alice.dynamics_id, AVAILABLE, "AGENT")  # still on the call, she wants work
    await shows(stack, Want(alice, "her Available stands", dynamics=AVAILABLE, bridge=None, shown="Busy/InACall"))
    # Routing changes P meanwhile (an offer times out: Away; then Available again): not her choice,
    # but it does not bring the override back either, since she chose after Teams began the call.
    stack.dataverse.set_presence(alice.dynamics_id, AWAY, "SYSTEM")
    await shows(stack, Want(alice, "routing's Away, still no override", dynamics=AWAY, bridge="Away/Away"))
    stack.dataverse.set_presence(alice.dynamics_id, AVAILABLE, "SYSTEM")
    await shows(stack, Want(alice, "routing's Available, still no override", dynamics=AVAILABLE, bridge=None))
    assert dynamics_writes(stack, alice) == writes, "the bridge overturned the agent's choice"
    # Teams changes again (the call becomes a conference call): the override is back.
    stack.graph.set_user_state(alice.entra_id, "Busy", "InAConferenceCall")
    await shows(stack, Want(alice, "a new Teams state overrides again", dynamics=BUSY, bridge=None))

    # The bot is the agent's choice too: Bob in a meeting asks for Available.
    stack.graph.set_user_state(bob.entra_id, "Busy", "InAMeeting")
    await shows(stack, Want(bob, "Bob's meeting -> Busy", dynamics=BUSY))
    reply = await stack.chat(bob, "available")
    await shows(
        stack, Want(bob, "the bot's Available stands", dynamics=AVAILABLE, bridge=None, shown="Busy/InAMeeting")
    )
    assert "overtaken" not in reply.text, reply.text
    stack.graph.set_user_state(bob.entra_id, "DoNotDisturb", "Presenting")
    await shows(stack, Want(bob, "he starts presenting: overridden again", dynamics=DND, bridge=None))
    assert (await quiet_for(stack, 1.0)) == (0, 0)


@bounded(150)
async def test_rule2_a_call_hidden_under_the_bridge_session_is_found_when_routing_frees_the_agent(make_stack):
    """Routing's Busy session and the person's own call show the same Busy/InACall, so the call
    starting changes nothing Teams shows and Graph notifies nothing. When routing frees the agent the
    bridge clears a session Teams was showing exactly: it reads Teams once the clear landed, finds
    the call, and Dynamics stays Busy instead of routing a customer to someone on the phone."""
    alice = make_agents(1, AVAILABLE)[0]
    stack = await make_stack([alice], **NO_HOLD)
    stack.dataverse.set_presence(alice.dynamics_id, BUSY, "SYSTEM")
    await shows(stack, Want(alice, "routing Busy", dynamics=BUSY, bridge="Busy/InACall", shown="Busy/InACall"))
    notified = len(stack.graph.notifications_sent)
    stack.graph.set_user_state(alice.entra_id, "Busy", "InACall")
    await settle(stack)
    assert len(stack.graph.notifications_sent) == notified, "Graph notified a change Teams does not show"
    reads, writes = teams_reads(stack, alice), dynamics_writes(stack, alice)

    stack.dataverse.set_presence(alice.dynamics_id, AVAILABLE, "SYSTEM")  # the conversation ends
    await shows(stack, Want(alice, "the hidden call is found", dynamics=BUSY, bridge=None, shown="Busy/InACall"))
    assert teams_reads(stack, alice) > reads, "the bridge did not read Teams after its clear landed"
    assert dynamics_writes(stack, alice) == writes + 1
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await shows(stack, Want(alice, "the call ends: routing's Available", dynamics=AVAILABLE, bridge=None))
    assert (await quiet_for(stack, 1.0)) == (0, 0)


@bounded(120)
async def test_rule2_a_bot_command_is_not_overturned_by_a_teams_state_shown_before_it(make_stack):
    """A bot command is the agent's choice, made after Teams began showing the call: the call does not
    overturn it, even when Graph's notification was basic and the bridge read the call only after the
    command (Graph slow to answer). Until Teams changes again: then the new state counts."""
    alice = make_agents(1, AVAILABLE)[0]
    stack = await make_stack([alice], **NO_HOLD)
    stack.graph.latency(0.5)  # Graph is slow to answer API calls (reads and writes), not to notify
    stack.graph.set_user_state(alice.entra_id, "Busy", "InACall")  # a call starts...
    await stack.graph.wait_idle()  # ...Graph has notified the service, which acknowledged it
    reply = await stack.chat(alice, "away")  # then the agent asks the bot for Away
    stack.graph.latency(0)
    await settle(stack)
    assert dyn(stack, alice) == AWAY, f"the older Teams call overwrote the newer command: {reply.text!r}"
    assert session(stack, alice) == "Away/Away" and teams(stack, alice) == "Busy/InACall"
    assert "overtaken" not in reply.text, reply.text
    stack.graph.set_user_state(alice.entra_id, "Busy", "InAMeeting")
    await shows(stack, Want(alice, "a meeting after the command overrides", dynamics=BUSY, bridge="Away/Away"))


# ------------------------------------------------------------------------------------------ rule 3


@bounded(150)
async def test_rule3_no_echo_and_the_stuck_busy_trap(make_stack):
    alice, bob = make_agents(2, AVAILABLE)
    stack = await make_stack([alice, bob], **NO_HOLD)
    teams_before, dyn_before = stack.teams_writes(alice), dynamics_writes(stack, alice)

    # The trap: a Teams call -> Dynamics Busy -> Dynamics fires its webhook for the bridge's write.
    emitted = len(stack.dataverse.emissions)
    stack.graph.set_user_state(alice.entra_id, "Busy", "InACall")
    await shows(stack, Want(alice, "the call -> Dynamics Busy", dynamics=BUSY))
    echoes = [e for e in list(stack.dataverse.emissions)[emitted:] if e.agent_id == alice.dynamics_id]
    assert echoes and all(e.status == 200 for e in echoes), "Dynamics fired (and the service took) the webhook"
    assert all(json.loads(e.response).get("result") == "echo" for e in echoes), [e.response for e in echoes]
    assert stack.teams_writes(alice) == teams_before, "the webhook of the bridge's own write changed Teams"
    assert session(stack, alice) is None
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await shows(stack, Want(alice, "the call ends: Dynamics Available", dynamics=AVAILABLE))
    assert teams(stack, alice) == "Available/Available", "stuck busy in Teams"
    assert dynamics_writes(stack, alice) - dyn_before == 2 and stack.teams_writes(alice) == teams_before
    assert (await quiet_for(stack, 1.5)) == (0, 0), "the systems ping-pong"

    # Dynamics -> Teams: the Graph notification of the bridge's own setPresence changes nothing.
    echo_before = await events(stack, "echo", "graph_notification")
    stack.dataverse.set_presence(bob.dynamics_id, BUSY, "SYSTEM")
    await shows(stack, Want(bob, "routing Busy -> Teams", shown="Busy/InACall"))
    assert await events(stack, "echo", "graph_notification") > echo_before
    assert dyn(stack, bob) == BUSY and dynamics_writes(stack, bob) == 0

    # The bot writes both systems; neither write comes back as a change.
    writes = stack.teams_writes(bob), dynamics_writes(stack, bob)
    reply = await stack.chat(bob, "dnd")
    assert "Dynamics 365 shows" in reply.text, reply.text
    await shows(stack, Want(bob, "bot dnd -> both systems", dynamics=DND, shown="DoNotDisturb/Presenting"))
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
    stack = await make_stack([alice], **NO_HOLD)
    assert stack.http is not None
    url = f"/api/dataverse/webhook?code={stack.settings.dataverse_webhook_key}"
    emitted = len(stack.dataverse.emissions)
    stack.dataverse.set_presence(alice.dynamics_id, DND, "AGENT")
    await shows(stack, Want(alice, "DND reaches Teams", bridge="DoNotDisturb/Presenting"))
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
    await expect(
        stack,
        "the newer change reaches Teams",
        lambda: session(stack, alice) == "Away/Away",
        lambda: session(stack, alice),
    )


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
    await expect(
        stack,
        "the newest state reaches Teams",
        lambda: session(stack, alice) == "DoNotDisturb/Presenting",
        lambda: session(stack, alice),
    )
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

    # Graph throttles (429 + Retry-After) while Dynamics changes: queued durably before the webhook
    # is answered, delivered once the throttling ends.
    stack.graph.throttle_for(2.0, retry_after=1)
    calls = len(stack.graph.requests)
    stack.dataverse.set_presence(alice.dynamics_id, BUSY, "SYSTEM")
    [emission] = [e for e in await stack.dataverse.wait_emissions() if e.agent_id == alice.dynamics_id][-1:]
    assert emission.status == 200
    row = await rt.store.outbox_row(alice.dynamics_id, System.TEAMS)
    assert row is not None and row.value == "Busy/InACall", "the command was not in the outbox when acknowledged"
    await expect(
        stack,
        "delivered after the throttling",
        lambda: session(stack, alice) == "Busy/InACall",
        lambda: session(stack, alice),
        timeout=30,
    )
    assert any(r.status == 429 for r in list(stack.graph.requests)[calls:]), "Graph never throttled"

    # Dataverse answers 503 to the presence write twice: retried with backoff, then delivered.
    stack.dataverse.fail_next(2, 503, path="CCaaS_ModifyAgentPresence")
    stack.graph.set_user_state(bob.entra_id, "Busy", "InAMeeting")
    await expect(
        stack, "delivered after the outage", lambda: dyn(stack, bob) == BUSY, lambda: dyn(stack, bob), timeout=30
    )
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
    await expect(
        stack,
        "the retried dead letter is delivered",
        lambda: session(stack, alice) == "DoNotDisturb/Presenting",
        lambda: session(stack, alice),
    )
    await settle(stack)
    assert metric(await metrics(stack), "presence_sync_dead_letters") == 0


# ------------------------------------------------------------------------------------------ rule 8


async def set_webhook_step(stack, active: bool) -> None:
    """An admin deactivates (or reactivates) the Update step in Dataverse, through its Web API."""
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
async def test_rule8_reconcile_repairs_lost_notifications_missed_events_dead_letters_and_drift(make_stack):
    """Every way a system can end up showing the wrong presence (a lost notification, a silent
    subscription, a Dynamics change with its webhook step off, a session gone behind the bridge's
    back, a dead letter on either side), then one sweep (``rt.reconcile``, the same function the
    periodic sweep and ``presence-sync reconcile`` run) repairs all of it, and a second sweep finds
    nothing. The dead letters come from transient failures outlasting
    ``PRESENCE_SYNC_OUTBOX_MAX_ATTEMPTS`` (2 here): the state records what each system really kept,
    so the sweep sees the difference and writes it again."""
    alice, bob, carol, dave, erin, frank = agents = make_agents(6, AVAILABLE)
    stack = await make_stack(agents, outbox_max_attempts=2, dead_letter_after_hours=0, **NO_HOLD)
    rt = stack.runtime
    stack.dataverse.set_presence(frank.dynamics_id, BUSY, "SYSTEM")
    await shows(stack, Want(frank, "routing Busy", bridge="Busy/InACall", shown="Busy/InACall"))

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
    await shows(stack, Want(alice, "'missed' repaired Dynamics", dynamics=BUSY))
    stack.graph.set_user_state(alice.entra_id, "Available", "Available")
    await shows(stack, Want(alice, "the call ends: Available", dynamics=AVAILABLE))

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
    assert session(stack, carol) is None
    await set_webhook_step(stack, active=True)

    # Frank's session vanishes behind the bridge's back (a script clears it, as a lapse would), and
    # the notification of that is lost: Teams shows his own Available while Dynamics routes him Busy.
    stack.graph.drop_notifications(1)
    assert stack.http is not None
    async with stack.http.post(
        f"{stack.graph.url}/users/{frank.entra_id}/presence/clearPresence",
        json={"sessionId": rt.teams.session_id},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as r:
        assert r.status == 200, await r.text()
    await settle(stack)
    assert (session(stack, frank), teams(stack, frank)) == (None, "Available/Available")

    # Dead letters: Graph fails Dave's session write (routing made him Busy) and Dataverse fails the
    # override for Erin's call, each as often as the outbox tries.
    stack.graph.fail_next(2, 503, retry_after=None, paths="setPresence")
    stack.dataverse.set_presence(dave.dynamics_id, BUSY, "SYSTEM")
    await settle(stack)
    stack.dataverse.fail_next(2, 503, path="CCaaS_ModifyAgentPresence")
    stack.graph.set_user_state(erin.entra_id, "Busy", "InACall")
    await settle(stack)
    dead = await rt.store.list_outbox(OutboxStatus.DEAD)
    assert sorted((d.agent_id, d.system) for d in dead) == sorted(
        [(dave.dynamics_id, System.TEAMS), (erin.dynamics_id, System.DYNAMICS)]
    ), [(d.agent_id, d.system, d.value, d.last_error) for d in dead]
    assert (session(stack, dave), dyn(stack, erin)) == (None, AVAILABLE)
    assert (await quiet_for(stack, 1.0)) == (0, 0), "a dead letter was retried at once (it would loop a dead upstream)"

    summary = await rt.reconcile()
    assert summary.failed == 0 and summary.repaired == 5, summary.line()
    await shows(stack, Want(bob, "reconcile repaired Dynamics (Bob)", dynamics=DND))
    await shows(stack, Want(carol, "reconcile repaired Teams (Carol)", bridge="DoNotDisturb/Presenting"))
    await shows(
        stack, Want(dave, "reconcile repaired Teams (Dave's dead letter)", bridge="Busy/InACall", dynamics=BUSY)
    )
    await shows(stack, Want(erin, "reconcile repaired Dynamics (Erin's dead letter)", dynamics=BUSY))
    # A read ranking below the session the bridge holds means the session is gone: it is set again.
    await shows(stack, Want(frank, "reconcile set Frank's session again", bridge="Busy/InACall", dynamics=BUSY))
    assert metric(await metrics(stack), "presence_sync_dead_letters") == 0, "the repairs replaced the dead rows"
    again = await rt.reconcile()
    assert again.repaired == 0 and again.in_sync == 6, again.line()
    assert (await quiet_for(stack, 1.0)) == (0, 0)
    assert own(stack, bob) == "DoNotDisturb/DoNotDisturb"


def test_seed_update_is_the_seed_with_our_ids():
    body = seed_update("11111111-0000-4000-8000-000000000001", "22222222-0000-4000-8000-000000000002", AWAY, 7, 9)
    target = body["InputParameters"][0]["value"]
    attrs = {a["key"]: a["value"] for a in target["Attributes"]}
    assert target["RowVersion"] == "7" and target["Id"] == "22222222-0000-4000-8000-000000000002"
    assert attrs["msdyn_agentid"]["Id"] == "11111111-0000-4000-8000-000000000001"
    assert attrs["msdyn_currentpresenceid"]["Id"] == AWAY and attrs["msdyn_presencemodifiedon"] == "/Date(9)/"
