"""1,000 random interleaved events from Dynamics 365 (routing and the agents' own changes), the
people's Teams clients and the bot, for five agents, across real HTTP; then the invariants.

Seeded: ``SCENARIO_SEED`` (environment) or ``DEFAULT_SEED``; every failure message starts with the
seed, so ``SCENARIO_SEED=<seed> pytest tests/scenarios/test_random.py`` plays the same events again
(the interleaving with the service's own timing can differ; the events and their pacing do not).

Invariants:
(a) no ping-pong: once the events stop and everything settles, no system is written any more
    (a few seconds of watching: zero setPresence / clearPresence / CCaaS_ModifyAgentPresence), and
    the writes made are bounded by twice the number of events (a Dynamics or Teams change causes at
    most one write to the other system, a bot command one to each);
(b) convergence, no lost update: per agent the two systems agree under the translation rules (the
    bridge's Teams session is the translation of Dynamics' presence, or the person's own Teams state
    outranks that session and Dynamics shows the override of that Teams state); and the newest event
    wins: a last Dynamics change per agent made after the conflict window stands in both systems,
    and so does a last bot command per agent;
(c) no dead letters, no rejected input, and every webhook and notification the service got was
    answered 200/202 (never a 4xx or 5xx).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass

from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND, LUNCH, OFFLINE, TRAINING
from emulators.stack import LocalStack, StackAgent
from tests.scenarios.conftest import (
    bounded,
    dyn,
    dynamics_writes,
    graph_answers,
    make_agents,
    metric,
    metrics,
    own,
    past_conflict_window,
    quiet_for,
    session,
    settle,
    teams,
    translation,
    upstream_writes,
    webhook_answers,
)

DEFAULT_SEED = 20240801
SEED = int(os.environ.get("SCENARIO_SEED", DEFAULT_SEED))
EVENTS = 1000
AGENTS = 5
QUIET_SECONDS = 3.0

DYNAMICS_PRESENCES = [AVAILABLE, BUSY, DND, AWAY, TRAINING, LUNCH, OFFLINE]
OWN_STATES = [
    ("Available", "Available"), ("Busy", "InACall"), ("Busy", "InAMeeting"), ("Busy", "InAConferenceCall"),
    ("DoNotDisturb", "Presenting"), ("Away", "Away"), ("BeRightBack", "BeRightBack"), ("Offline", "Offline"),
]
PREFERRED_STATES = [("DoNotDisturb", "DoNotDisturb"), ("Away", "Away"), ("BeRightBack", "BeRightBack"),
                    ("Busy", "Busy"), ("Available", "Available")]
BOT = {"available": AVAILABLE, "busy": BUSY, "away": AWAY, "dnd": DND, "offline": OFFLINE}


@dataclass(frozen=True)
class Event:
    at: float
    kind: str  # dynamics | teams | preferred | unprefer | bot
    agent: int
    value: str
    by: str = ""

    def line(self) -> str:
        return f"{self.at:7.3f}s agent{self.agent} {self.kind} {self.value} {self.by}".rstrip()


def plan(rng: random.Random, n: int) -> list[tuple[float, Event]]:
    """(pause before, event): hot and quiet agents, small gaps with some pauses, bursts for one
    agent inside the conflict window on purpose."""
    weights = [0.35, 0.25, 0.2, 0.12, 0.08][:AGENTS]
    out: list[tuple[float, Event]] = []
    t = 0.0
    while len(out) < n:
        agent = rng.choices(range(AGENTS), weights)[0]
        burst = rng.randint(2, 6) if rng.random() < 0.08 else 1
        for _ in range(min(burst, n - len(out))):
            r = rng.random()
            gap = rng.uniform(0, 0.02) if r < 0.7 else rng.uniform(0.02, 0.1) if r < 0.95 else rng.uniform(0.2, 0.6)
            if burst > 1:
                gap = rng.uniform(0, 0.01)
            t += gap
            k = rng.random()
            if k < 0.38:
                ev = Event(t, "dynamics", agent, rng.choice(DYNAMICS_PRESENCES), rng.choice(["SYSTEM", "AGENT"]))
            elif k < 0.78:
                ev = Event(t, "teams", agent, "/".join(rng.choice(OWN_STATES)))
            elif k < 0.84:
                ev = Event(t, "preferred", agent, "/".join(rng.choice(PREFERRED_STATES)))
            elif k < 0.88:
                ev = Event(t, "unprefer", agent, "-")
            else:
                ev = Event(t, "bot", agent, rng.choice(list(BOT)))
            out.append((gap, ev))
    return out


class Fail:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tail: list[str] = []

    def __call__(self, what: str) -> str:
        return f"SCENARIO_SEED={self.seed}: {what}\nlast events:\n" + "\n".join(self.tail[-25:])


def agreement(stack: LocalStack, agent: StackAgent) -> str | None:
    """Invariant (b), first half: None when Dynamics and Teams agree under the rules, else why not."""
    d = dyn(stack, agent)
    assert d is not None
    s = session(stack, agent)
    shown = teams(stack, agent)
    if s == translation(stack, d):
        return None
    rules = stack.runtime.bridge.rules
    action = rules.action_for(shown)
    if shown != s and action.base is not None and rules.dynamics_targets[action.base] == d:
        return None  # the person's own Teams state outranks the session, and Dynamics shows its override
    return (f"{agent.name}: Dynamics {d} but the bridge session is {s} (translation: {translation(stack, d)}); "
            f"Teams shows {shown}, own state {own(stack, agent)}")


async def play(stack: LocalStack, rng: random.Random, fail: Fail) -> tuple[list[asyncio.Task], dict[int, Event]]:
    agents = stack.agents
    chats: list[asyncio.Task] = []
    last: dict[int, Event] = {}
    started = time.monotonic()
    for gap, ev in plan(rng, EVENTS):
        if gap > 0.001:
            await asyncio.sleep(gap)  # pacing, not synchronisation
        a = agents[ev.agent]
        if ev.kind == "dynamics":
            stack.dataverse.set_presence(a.dynamics_id, ev.value, ev.by)
        elif ev.kind == "teams":
            stack.graph.set_user_state(a.entra_id, *ev.value.split("/"))
        elif ev.kind == "preferred":
            stack.graph.set_user_preferred(a.entra_id, *ev.value.split("/"))
        elif ev.kind == "unprefer":
            stack.graph.clear_user_preferred(a.entra_id)
        else:
            chats.append(asyncio.create_task(stack.chat(a, ev.value, timeout=60)))
        last[ev.agent] = ev
        fail.tail.append(f"{time.monotonic() - started:7.3f}s {a.name} {ev.kind} {ev.value} {ev.by}".rstrip())
    return chats, last


@bounded(170)
async def test_random_interleaved_events_converge_without_ping_pong_or_lost_updates(make_stack):
    rng = random.Random(SEED)
    fail = Fail(SEED)
    stack = await make_stack(make_agents(AGENTS, AVAILABLE))
    await past_conflict_window(stack)
    writes0 = upstream_writes(stack)
    webhooks0, notifications0 = len(stack.dataverse.emissions), len(stack.graph.notifications_sent)

    # ---- the random phase
    started = time.monotonic()
    chats, last = await play(stack, rng, fail)
    replies = await asyncio.gather(*chats, return_exceptions=True)
    played = time.monotonic() - started
    errors = [r for r in replies if isinstance(r, BaseException)]
    assert not errors, fail(f"{len(errors)} bot turns failed: {errors[:3]!r}")
    await settle(stack, timeout=60)

    # (a) no ping-pong, and writes bounded by the events
    more = await quiet_for(stack, QUIET_SECONDS)
    assert more == (0, 0), fail(f"still writing after the events stopped (Teams, Dynamics): {more}")
    teams_w, dyn_w = (x - y for x, y in zip(upstream_writes(stack), writes0, strict=True))
    assert teams_w + dyn_w <= 2 * EVENTS, fail(f"{teams_w} Teams + {dyn_w} Dynamics writes for {EVENTS} events")

    # (b) convergence under the translation rules
    disagree = [why for a in stack.agents if (why := agreement(stack, a))]
    assert not disagree, fail("systems disagree after quiescence:\n" + "\n".join(disagree))
    # ...and an agent whose last event was a bot command shows that command in Dynamics.
    for i, ev in last.items():
        a = stack.agents[i]
        if ev.kind == "bot":
            assert dyn(stack, a) == BOT[ev.value], fail(
                f"{a.name}'s last event was the bot command {ev.value!r}, yet Dynamics shows {dyn(stack, a)}")

    # ---- the last word: one Dynamics change per agent, after the conflict window
    await past_conflict_window(stack)
    finals: dict[str, str] = {}
    for a in stack.agents:
        finals[a.dynamics_id] = rng.choice([p for p in DYNAMICS_PRESENCES if p != dyn(stack, a)])
        stack.dataverse.set_presence(a.dynamics_id, finals[a.dynamics_id], rng.choice(["SYSTEM", "AGENT"]))
        fail.tail.append(f"final {a.name} dynamics {finals[a.dynamics_id]}")
    await settle(stack)
    await past_conflict_window(stack)  # nothing may overturn it late either
    assert (await quiet_for(stack, 1.0)) == (0, 0), fail("writes after the final Dynamics changes settled")
    for a in stack.agents:
        want = finals[a.dynamics_id]
        assert dyn(stack, a) == want, fail(f"{a.name}: the newest Dynamics change {want} was overwritten: "
                                           f"{dyn(stack, a)}")
        assert session(stack, a) == translation(stack, want), fail(
            f"{a.name}: Teams session {session(stack, a)}, want {translation(stack, want)} for {want}")

    # ---- the last word from the bot: a change in Dynamics answered by its webhook, then at once
    # the agent's own command; the command is newer and must stand in both systems.
    await past_conflict_window(stack)
    commands: dict[str, str] = {}
    turns = []
    for a in stack.agents:
        stack.dataverse.set_presence(a.dynamics_id, rng.choice(DYNAMICS_PRESENCES), "SYSTEM")
        await stack.dataverse.wait_emissions()
        commands[a.dynamics_id] = rng.choice([c for c in BOT if BOT[c] != dyn(stack, a)])
        fail.tail.append(f"final {a.name} dynamics {dyn(stack, a)} then bot {commands[a.dynamics_id]}")
        turns.append(stack.chat(a, commands[a.dynamics_id], timeout=60))
    await asyncio.gather(*turns)
    await settle(stack)
    assert (await quiet_for(stack, 1.0)) == (0, 0), fail("writes after the final bot commands settled")
    for a in stack.agents:
        want = BOT[commands[a.dynamics_id]]
        assert dyn(stack, a) == want, fail(
            f"{a.name}: the bot command {commands[a.dynamics_id]!r} was overwritten: Dynamics {dyn(stack, a)}")
        assert session(stack, a) == translation(stack, want), fail(f"{a.name}: Teams session {session(stack, a)}")

    # (c) nothing dead, nothing refused, every inbound call answered 2xx
    m = await metrics(stack)
    assert metric(m, "presence_sync_dead_letters") == 0, fail("dead letters")
    assert metric(m, "presence_sync_rejected_total") == 0, fail("the service rejected input")
    bad_webhooks = [s for s in webhook_answers(stack, webhooks0) if s != 200]
    bad_notes = [s for s in graph_answers(stack, notifications0) if s != 202]
    assert not bad_webhooks and not bad_notes, fail(f"non-2xx answers: webhooks {bad_webhooks}, Graph {bad_notes}")
    print(f"SCENARIO_SEED={SEED}: {EVENTS} events in {played:.1f} s; {teams_w} Teams and {dyn_w} Dynamics writes; "
          f"{len(stack.dataverse.emissions) - webhooks0} webhooks, "
          f"{len(stack.graph.notifications_sent) - notifications0} notification posts; "
          f"dynamics writes in all {dynamics_writes(stack)}")
