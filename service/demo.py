"""``presence-sync demo``: a contact-center day on loopback, checked as it goes.

Starts the three emulators and the real service (``service.stack.LocalStack``: temporary SQLite
store, webhook registered, agents discovered, Graph subscriptions made), then plays the day. Every
step acts on an emulator the way the real system would change (routing in Dynamics 365, a person's
Teams client, an agent typing to the bot, Graph throttling, lost notifications) and then waits for
what a person would see in the *other* system, printing when it arrived. The run exits 0 only if
every expectation held: the demo is also a test (``tests/service/test_demo.py`` runs it).

``--speed`` scales the pauses between steps (what a person watching needs), never the waits for
expectations; ``--agents N`` adds agents beyond the three named ones, who take part in a rush hour.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND, OFFLINE, TRAINING
from mapping.errors import UpstreamError
from mapping.outputs import Inputs, no_session, outputs
from service.stack import LocalStack, StackAgent, agent_ids

NAMES = {
    AVAILABLE: "Available",
    AWAY: "Away",
    BUSY: "Busy",
    DND: "Busy - DND",
    OFFLINE: "Offline",
    TRAINING: "Training",
}
MIN_AGENTS = 3
RUSH = 1000
"""Agents in the rush hour at most (a random sample beyond that): issue 16's burst of 1,000 changes."""


@dataclass
class Step:
    title: str
    ok: bool
    detail: str


@dataclass
class Day:
    """The timeline: what happened when, and which expectations held."""

    out: Callable[[str], None]
    speed: float
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)
    own_dynamics: dict[str, str] = field(default_factory=dict)
    """Each agent's own Dynamics presence (P in ``docs/rules.md``) as the day set it: routing, the agent,
    the bot; never the bridge. The closing table checks both systems against it."""

    def stamp(self) -> str:
        return f"{time.monotonic() - self.started:7.2f}s"

    def say(self, line: str) -> None:
        self.out(f"{self.stamp()}  {line}")

    def heading(self, title: str) -> None:
        self.out("")
        self.out(f"{self.stamp()}  == {title}")

    async def expect(
        self,
        what: str,
        check: Callable[[], Any],
        *,
        timeout: float = 15.0,
        stack: LocalStack,
        shown: Callable[[], str] | None = None,
    ) -> bool:
        """Waits for ``check``; prints how long it took, or what was seen instead."""
        t0 = time.monotonic()
        ok = await stack.until(check, timeout=timeout)
        took = time.monotonic() - t0
        if ok:
            self.say(f"   ok   {what} ({took:.2f} s)")
        else:
            seen = f"; seen: {shown()}" if shown else ""
            self.say(f"   FAIL {what}: not within {timeout:g} s{seen}")
        self.steps.append(Step(what, ok, f"{took:.2f} s"))
        return ok

    def check(self, what: str, ok: bool, seen: str = "") -> bool:
        self.say(f"   {'ok  ' if ok else 'FAIL'} {what}{'' if ok or not seen else ': ' + seen}")
        self.steps.append(Step(what, ok, seen))
        return ok

    async def pause(self, seconds: float) -> None:
        if self.speed > 0:
            await asyncio.sleep(seconds / self.speed)


def demo_agents(n: int) -> list[StackAgent]:
    named = [("Alice Ahmed", AVAILABLE), ("Bob Brennan", AVAILABLE), ("Carol Castro", TRAINING)]
    agents = []
    for i in range(max(n, MIN_AGENTS)):
        dyn, entra = agent_ids(i + 1)
        name, presence = named[i] if i < len(named) else (f"Agent {i + 1:04d}", AVAILABLE)
        agents.append(StackAgent(name, dyn, entra, presence))
    return agents


async def run_demo(
    out: Callable[[str], None],
    *,
    agents: int = MIN_AGENTS,
    speed: float = 1.0,
    workdir: Path | None = None,
    keep_running: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Plays the day; returns the exit code (0: every expectation held). ``keep_running``: after the
    day, print the console's one-time link and keep everything up until it returns (the CLI's waits
    for Ctrl+C)."""
    if agents < MIN_AGENTS:
        raise ValueError(f"--agents must be at least {MIN_AGENTS} (the day needs Alice, Bob and Carol)")
    with tempfile.TemporaryDirectory(prefix="presence-sync-demo-") as tmp:
        folder = workdir or Path(tmp)
        day = Day(out, speed)
        day.own_dynamics = {a.dynamics_id: a.presence_id for a in demo_agents(agents)}
        out("presence-sync demo: Dynamics 365 Contact Center <-> Microsoft Teams, all on loopback, no account")
        out("")
        stack = LocalStack(folder, demo_agents(agents), progress=day.say)
        try:
            await stack.start()
            await _play(day, stack)
            await _table(day, stack)
            _summary(day, stack, await stack.runtime.store.outbox_counts())
            code = _verdict(day)
            if keep_running is not None:
                await _keep_running(out, stack, keep_running)
        except Exception as e:  # the demo's contract: a failure is one line, not a traceback
            what = e.message if isinstance(e, UpstreamError) else str(e)
            if not what and isinstance(e, TimeoutError):
                what = "the service did not settle in time (webhooks, notifications or the outbox still busy)"
            out(f"demo FAILED at {day.stamp().strip()}: {type(e).__name__}: {what}")
            return 1
        finally:
            await stack.stop()
        return code


def _verdict(day: Day) -> int:
    failed = [s for s in day.steps if not s.ok]
    day.out("")
    if failed:
        day.out(
            f"demo FAILED: {len(failed)} of {len(day.steps)} expectation(s) did not hold: "
            + "; ".join(s.title for s in failed)
        )
        return 1
    day.out(f"demo passed: {len(day.steps)} expectation(s) held in {time.monotonic() - day.started:.1f} s")
    return 0


async def _keep_running(out: Callable[[str], None], stack: LocalStack, wait: Callable[[], Awaitable[None]]) -> None:
    from console.access import issue_link_ticket

    ticket = await issue_link_ticket(stack.runtime.store)
    out("")
    out(f"console: {stack.base_url}/console/link?ticket={ticket}")
    out("  (a one-time link for this machine, valid 15 minutes; the emulators and the service stay up: Ctrl+C stops)")
    await wait()


async def _play(day: Day, stack: LocalStack) -> None:
    alice, bob, carol, *others = stack.agents
    dv, graph = stack.dataverse, stack.graph

    def teams(a: StackAgent) -> tuple[str, str]:
        return tuple(graph.presence_of(a.entra_id))  # type: ignore[return-value]

    def dyn(a: StackAgent) -> str:
        value = dv.presence_of(a.dynamics_id) or "-"
        return NAMES.get(value, value)

    def set_dyn(a: StackAgent, presence: str, by: str) -> None:
        """A change in Dynamics 365 by routing (``SYSTEM``) or the agent (``AGENT``): the agent's own
        presence from now on."""
        dv.set_presence(a.dynamics_id, presence, by)
        day.own_dynamics[a.dynamics_id] = presence

    def teams_is(a: StackAgent, pair: tuple[str, str]) -> Callable[[], bool]:
        return lambda: teams(a) == pair

    def dyn_is(a: StackAgent, presence: str) -> Callable[[], bool]:
        return lambda: dv.presence_of(a.dynamics_id) == presence

    async def expect_teams(a: StackAgent, pair: tuple[str, str], why: str, timeout: float = 15.0) -> bool:
        return await day.expect(
            f"Teams shows {a.name} {pair[0]}/{pair[1]} ({why})",
            teams_is(a, pair),
            timeout=timeout,
            stack=stack,
            shown=lambda: "/".join(teams(a)),
        )

    async def expect_dyn(a: StackAgent, presence: str, why: str, timeout: float = 15.0) -> bool:
        return await day.expect(
            f"Dynamics 365 shows {a.name} {NAMES[presence]} ({why})",
            dyn_is(a, presence),
            timeout=timeout,
            stack=stack,
            shown=lambda: dyn(a),
        )

    def count(what: str, n: int, expected: int) -> bool:
        return day.check(f"{what}: {n}, as the rules say", n == expected, f"{n}, expected {expected}")

    day.heading("09:00 start of the day: both systems agree")
    await expect_teams(carol, ("DoNotDisturb", "Presenting"), "custom presence Training, base Busy DND")
    await expect_teams(alice, ("Available", "Available"), "Available: no bridge session, her own Teams state")

    day.heading("09:05 a customer conversation is routed to Alice in Dynamics 365")
    await day.pause(0.5)
    writes, dyn_writes = stack.teams_writes(alice), stack.dynamics_writes()
    set_dyn(alice, BUSY, "SYSTEM")
    day.say(f"Dynamics 365: routing sets {alice.name} Busy")
    await expect_teams(alice, ("Busy", "InACall"), "no Teams call rings through while she talks to a customer")
    await stack.settle()
    day.check(
        "the Teams notification of the bridge's own session is not bounced back to Dynamics 365",
        dyn(alice) == "Busy" and stack.dynamics_writes() == dyn_writes,
        f"{dyn(alice)}, {stack.dynamics_writes() - dyn_writes} Dynamics write(s)",
    )
    set_dyn(alice, AVAILABLE, "SYSTEM")
    day.say(f"Dynamics 365: the conversation ends; {alice.name} Available")
    await expect_teams(alice, ("Available", "Available"), "conversation over: the session is cleared")
    await stack.settle()
    count(
        "Teams writes for Busy then Available (setPresence, then clearPresence of the session held)",
        stack.teams_writes(alice) - writes,
        2,
    )

    day.heading("09:30 Bob steps away: Away in Teams stops routing")
    await day.pause(0.5)
    writes = stack.teams_writes(bob)
    graph.set_user_state(bob.entra_id, "Away", "Away")
    day.say(f"Teams: {bob.name} sets Away")
    await expect_dyn(bob, AWAY, "no customer is routed to him while he is away")
    await stack.settle()
    day.check(
        "Teams shows his own Away: no bridge session for Available hides it",
        teams(bob) == ("Away", "Away"),
        "/".join(teams(bob)),
    )
    await day.pause(0.5)
    graph.set_user_state(bob.entra_id, "Available", "Available")
    day.say(f"Teams: {bob.name} is back, Available")
    await expect_dyn(bob, AVAILABLE, "his own presence again")
    await stack.settle()
    count("Teams writes for Bob", stack.teams_writes(bob) - writes, 0)

    day.heading("10:00 Bob joins a Teams meeting")
    await day.pause(0.5)
    writes = stack.teams_writes(bob)
    graph.set_user_state(bob.entra_id, "Busy", "InAMeeting")
    day.say(f"Teams: {bob.name}'s client says Busy / InAMeeting")
    await expect_dyn(bob, BUSY, "no customer is routed to him during the meeting")
    await stack.settle()
    day.check(
        "Teams still shows the meeting, not a bridge 'in a call' session",
        teams(bob) == ("Busy", "InAMeeting"),
        "/".join(teams(bob)),
    )
    await day.pause(0.5)
    graph.set_user_state(bob.entra_id, "Available", "Available")
    day.say("Teams: the meeting ends")
    await expect_dyn(bob, AVAILABLE, "his own presence again")
    await stack.settle()
    count("Teams writes for Bob's meeting", stack.teams_writes(bob) - writes, 0)

    day.heading("10:30 a meeting outlasts a customer conversation")
    await day.pause(0.5)
    writes, dyn_writes = stack.teams_writes(alice), stack.dynamics_writes()
    set_dyn(alice, BUSY, "SYSTEM")
    day.say(f"Dynamics 365: routing sets {alice.name} Busy")
    await expect_teams(alice, ("Busy", "InACall"), "in a customer conversation")
    await stack.settle()
    graph.set_user_state(alice.entra_id, "Busy", "InAMeeting")
    day.say(f"Teams: {alice.name} joins a meeting (her client says Busy / InAMeeting)")
    await expect_teams(alice, ("Busy", "InAMeeting"), "her own meeting shows over the bridge's session")
    await stack.settle()
    day.check(
        "Dynamics 365 still shows Busy: the conversation already keeps work away",
        dyn(alice) == "Busy" and stack.dynamics_writes() == dyn_writes,
        f"{dyn(alice)}, {stack.dynamics_writes() - dyn_writes} Dynamics write(s)",
    )
    await day.pause(0.5)
    set_dyn(alice, AVAILABLE, "SYSTEM")
    day.say(f"Dynamics 365: routing ends the conversation; {alice.name} Available")
    await expect_dyn(alice, BUSY, "the meeting goes on: routing does not end it")
    await stack.settle()
    day.check(
        "after settling, Dynamics 365 still Busy and Teams her meeting (the session is cleared)",
        dyn(alice) == "Busy" and teams(alice) == ("Busy", "InAMeeting") and not graph.sessions_of(alice.entra_id),
        f"{dyn(alice)}, {'/'.join(teams(alice))}, {len(graph.sessions_of(alice.entra_id))} session(s)",
    )
    await day.pause(0.5)
    graph.set_user_state(alice.entra_id, "Available", "Available")
    day.say("Teams: the meeting ends")
    await expect_dyn(alice, AVAILABLE, "what routing set meanwhile")
    await stack.settle()
    count("Teams writes (setPresence Busy, clearPresence)", stack.teams_writes(alice) - writes, 2)
    count("Dynamics 365 writes (Busy for the meeting, then Available)", stack.dynamics_writes() - dyn_writes, 2)

    day.heading("11:00 Alice asks the bot for Do Not Disturb")
    await day.pause(0.5)
    reply = await stack.chat(alice, "dnd")
    day.own_dynamics[alice.dynamics_id] = DND
    first = reply.text.splitlines()[0] if reply.text else "(a card)"
    day.say(f"bot -> {alice.name}: {first[:150]}")
    await expect_dyn(alice, DND, "the bot's command reached Dynamics 365")
    await expect_teams(alice, ("DoNotDisturb", "Presenting"), "and Teams follows")
    confirms = "Dynamics 365 shows" in reply.text and "Teams shows" in reply.text and "queued" not in reply.text
    day.check("the bot's reply says what both systems show after the change", confirms, reply.text[:200])
    await stack.settle()

    day.heading("12:00 Graph throttles the tenant (429 with Retry-After) for 3 seconds")
    await day.pause(0.5)
    graph.throttle_for(3.0, retry_after=1)
    before = len(graph.calls())
    set_dyn(bob, TRAINING, "AGENT")
    day.say(f"Dynamics 365: {bob.name} sets Training while Graph answers 429")
    await expect_teams(bob, ("DoNotDisturb", "Presenting"), "delivered once the throttling ended", timeout=30)
    throttled = sum(1 for r in list(graph.requests)[before:] if r.status == 429)
    day.check(
        "the outbox waited out Retry-After instead of dropping the change",
        throttled >= 1,
        f"{throttled} answers were 429",
    )
    await stack.settle()

    day.heading("13:00 a burst: 100 Dynamics 365 changes for Carol in a row")
    await day.pause(0.5)
    writes = stack.teams_writes(carol)
    sequence = [BUSY, AVAILABLE] * 50
    for value in sequence:
        set_dyn(carol, value, "SYSTEM")
    day.say(f"Dynamics 365: {len(sequence)} presence changes for {carol.name}, ending Available")
    await expect_teams(carol, ("Available", "Available"), "the newest state wins: her session is cleared")
    await stack.settle()
    n = stack.teams_writes(carol) - writes
    day.check(f"the burst cost {n} Teams write(s), not {len(sequence)}", n == 1, f"{n} writes")

    day.heading("14:00 Teams loses a notification; Graph says 'missed'")
    await graph.wait_idle()
    graph.drop_notifications(1)
    graph.set_user_state(carol.entra_id, "Busy", "InACall")
    day.say(f"Teams: {carol.name} takes a call, and its change notification is lost")
    await graph.wait_idle()
    await stack.settle()
    day.check("Dynamics 365 did not hear of it", dv.presence_of(carol.dynamics_id) == AVAILABLE, dyn(carol))
    for sub_id in stack.subscription_ids():
        await graph.send_lifecycle(sub_id, "missed")
    day.say("Graph: lifecycle event 'missed' on the subscriptions")
    await expect_dyn(carol, BUSY, "reconciliation read Teams and repaired Dynamics 365")
    graph.set_user_state(carol.entra_id, "Available", "Available")
    day.say(f"Teams: {carol.name}'s call ends")
    await expect_dyn(carol, AVAILABLE, "her own presence again")
    await stack.settle()

    if others:
        rush = others if len(others) <= RUSH else random.Random(16).sample(others, RUSH)
        day.heading(f"15:00 rush hour: {len(rush)} other agent(s) get a conversation at once")
        await day.pause(0.5)
        t0 = time.monotonic()
        for a in rush:
            set_dyn(a, BUSY, "SYSTEM")
        waiting = list(rush)

        def all_shown() -> bool:  # the agents already shown are not looked at again
            waiting[:] = [a for a in waiting if teams(a) != ("Busy", "InACall")]
            return not waiting

        ok = await stack.until(all_shown, timeout=60, interval=0.1)
        day.check(
            f"Teams shows all {len(rush)} Busy/InACall ({time.monotonic() - t0:.2f} s)",
            ok,
            f"{len(waiting)} not yet: {', '.join(a.name for a in waiting[:5])}",
        )
        await stack.settle(timeout=120)

    day.heading("17:00 end of the day: Alice signs out in Dynamics 365")
    set_dyn(alice, OFFLINE, "AGENT")
    await expect_teams(alice, ("Available", "Available"), "the bridge's session is cleared; her own Teams state shows")
    await stack.settle()


async def _table(day: Day, stack: LocalStack) -> None:
    """Both systems against the rules, per agent: the bridge's Teams session is the translation of the
    agent's own Dynamics presence (none for Available and Offline: Teams then shows the person's own
    state), and Dynamics shows what ``mapping.outputs`` says for that presence and the person's own
    Teams state. The own presence is the day's record, not the bridge's; only the times the override
    test needs (when the agent last chose, since when Teams shows its state) come from the bridge."""
    out = day.out
    out("")
    out(f"{'agent':<16} {'Dynamics 365':<14} {'Teams':<24} {'bridge session':<24} {'in sync':<8}")
    rules = stack.runtime.bridge.rules
    catalogue = stack.runtime.bridge.catalogue
    states = await stack.runtime.store.load_states([a.dynamics_id for a in stack.agents])
    shown = stack.agents if len(stack.agents) <= 12 else stack.agents[:12]
    mismatched = 0
    for a in stack.agents:
        pid = stack.dataverse.presence_of(a.dynamics_id) or ""
        own = catalogue.get(day.own_dynamics[a.dynamics_id])
        pair = "/".join(stack.graph.presence_of(a.entra_id))
        sessions = {f"{s.availability}/{s.activity}" for s in stack.graph.sessions_of(a.entra_id).values()}
        state = states.get(a.dynamics_id)
        if own is None or state is None:
            agree = False
        else:
            person = "/".join(stack.graph.own_state_of(a.entra_id))
            want = outputs(Inputs(own, state.chose_at, person, state.own_teams_since), rules)
            session_ok = not sessions if no_session(want.session) else sessions == {want.session}
            agree = session_ok and pid == want.dynamics
        mismatched += 0 if agree else 1
        if a in shown:
            presence = catalogue.get(pid)
            name = presence.name if presence else pid
            held = ", ".join(sorted(sessions)) or "none"
            out(f"{a.name:<16} {name:<14} {pair:<24} {held:<24} {'yes' if agree else 'NO':<8}")
    if len(stack.agents) > len(shown):
        out(f"... and {len(stack.agents) - len(shown)} more agent(s)")
    day.check(f"both systems agree for all {len(stack.agents)} agent(s)", mismatched == 0, f"{mismatched} disagree")


def _summary(day: Day, stack: LocalStack, counts: dict[str, int]) -> None:
    graph_writes = stack.teams_writes()
    dv_writes = stack.dynamics_writes()
    webhooks = len(stack.dataverse.emissions)
    notifications = len(stack.graph.notifications_sent)
    day.out("")
    day.out(
        f"traffic: {webhooks} Dataverse webhook(s) in, {notifications} Graph notification post(s) in, "
        f"{graph_writes} Teams presence write(s) out, {dv_writes} Dynamics 365 presence write(s) out; "
        f"outbox: {' '.join(f'{k}={v}' for k, v in counts.items())}"
    )
    day.check("no dead letters", counts.get("dead", 0) == 0, f"{counts.get('dead', 0)} dead")


Runner = Callable[..., Awaitable[int]]
