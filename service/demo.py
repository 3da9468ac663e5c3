"""``presence-sync demo``: a contact-center day on loopback, checked as it goes.

Starts the three emulators and the real service (``emulators.stack.LocalStack``: temporary SQLite
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
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.dataverse import AVAILABLE, BUSY, DND, OFFLINE, TRAINING
from emulators.stack import LocalStack, StackAgent, agent_ids

NAMES = {AVAILABLE: "Available", BUSY: "Busy", DND: "Busy - DND", OFFLINE: "Offline", TRAINING: "Training"}
MIN_AGENTS = 3


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

    def stamp(self) -> str:
        return f"{time.monotonic() - self.started:7.2f}s"

    def say(self, line: str) -> None:
        self.out(f"{self.stamp()}  {line}")

    def heading(self, title: str) -> None:
        self.out("")
        self.out(f"{self.stamp()}  == {title}")

    async def expect(self, what: str, check: Callable[[], Any], *, timeout: float = 15.0,
                     stack: LocalStack, shown: Callable[[], str] | None = None) -> bool:
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


async def run_demo(out: Callable[[str], None], *, agents: int = MIN_AGENTS, speed: float = 1.0,
                   workdir: Path | None = None) -> int:
    """Plays the day; returns the exit code (0: every expectation held)."""
    if agents < MIN_AGENTS:
        raise ValueError(f"--agents must be at least {MIN_AGENTS} (the day needs Alice, Bob and Carol)")
    with tempfile.TemporaryDirectory(prefix="presence-sync-demo-") as tmp:
        folder = workdir or Path(tmp)
        day = Day(out, speed)
        out("presence-sync demo: Dynamics 365 Contact Center <-> Microsoft Teams, all on loopback, no account")
        out("")
        stack = LocalStack(folder, demo_agents(agents), progress=day.say)
        try:
            await stack.start()
            await _play(day, stack)
            _table(day, stack)
            _summary(day, stack, await stack.runtime.store.outbox_counts())
        finally:
            await stack.stop()
        failed = [s for s in day.steps if not s.ok]
        out("")
        if failed:
            out(f"demo FAILED: {len(failed)} of {len(day.steps)} expectation(s) did not hold: "
                + "; ".join(s.title for s in failed))
            return 1
        out(f"demo passed: {len(day.steps)} expectation(s) held in {time.monotonic() - day.started:.1f} s")
        return 0


async def _play(day: Day, stack: LocalStack) -> None:
    alice, bob, carol, *others = stack.agents
    dv, graph = stack.dataverse, stack.graph

    def teams(a: StackAgent) -> tuple[str, str]:
        return tuple(graph.presence_of(a.entra_id))  # type: ignore[return-value]

    def dyn(a: StackAgent) -> str:
        value = dv.presence_of(a.dynamics_id) or "-"
        return NAMES.get(value, value)

    def teams_is(a: StackAgent, pair: tuple[str, str]) -> Callable[[], bool]:
        return lambda: teams(a) == pair

    def dyn_is(a: StackAgent, presence: str) -> Callable[[], bool]:
        return lambda: dv.presence_of(a.dynamics_id) == presence

    async def expect_teams(a: StackAgent, pair: tuple[str, str], why: str, timeout: float = 15.0) -> bool:
        return await day.expect(f"Teams shows {a.name} {pair[0]}/{pair[1]} ({why})", teams_is(a, pair),
                                timeout=timeout, stack=stack, shown=lambda: "/".join(teams(a)))

    async def expect_dyn(a: StackAgent, presence: str, why: str, timeout: float = 15.0) -> bool:
        return await day.expect(f"Dynamics 365 shows {a.name} {NAMES[presence]} ({why})", dyn_is(a, presence),
                                timeout=timeout, stack=stack, shown=lambda: dyn(a))

    day.heading("09:00 start of the day: both systems agree")
    await expect_teams(carol, ("DoNotDisturb", "Presenting"), "custom presence Training, base Busy DND")
    await expect_teams(alice, ("Available", "Available"), "Available")

    day.heading("09:05 a customer conversation is routed to Alice in Dynamics 365")
    await day.pause(0.5)
    writes = stack.teams_writes(alice)
    dv.set_presence(alice.dynamics_id, BUSY, "SYSTEM")
    day.say(f"Dynamics 365: routing sets {alice.name} Busy")
    await expect_teams(alice, ("Busy", "InACall"), "no Teams call rings through while she talks to a customer")
    await stack.settle()
    day.check("the Dynamics webhook of the bridge's own write is not bounced back", dyn(alice) == "Busy",
              dyn(alice))
    dv.set_presence(alice.dynamics_id, AVAILABLE, "SYSTEM")
    day.say(f"Dynamics 365: the conversation ends; {alice.name} Available")
    await expect_teams(alice, ("Available", "Available"), "conversation over")
    await stack.settle()
    day.check("2 Teams writes for 2 Dynamics changes", stack.teams_writes(alice) - writes == 2,
              f"{stack.teams_writes(alice) - writes} writes")

    day.heading("10:00 Bob joins a Teams meeting")
    await day.pause(0.5)
    graph.set_user_state(bob.entra_id, "Busy", "InAMeeting")
    day.say(f"Teams: {bob.name}'s client says Busy / InAMeeting")
    await expect_dyn(bob, BUSY, "no customer is routed to him during the meeting")
    await stack.settle()
    day.check("Teams still shows the meeting, not a bridge 'in a call' echo",
              teams(bob) == ("Busy", "InAMeeting"), "/".join(teams(bob)))
    await day.pause(0.5)
    graph.set_user_state(bob.entra_id, "Available", "Available")
    day.say("Teams: the meeting ends")
    await expect_dyn(bob, AVAILABLE, "the presence he held before the meeting is restored")
    await stack.settle()

    day.heading("11:00 Alice asks the bot for Do Not Disturb")
    await day.pause(0.5)
    reply = await stack.chat(alice, "dnd")
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
    dv.set_presence(bob.dynamics_id, TRAINING, "AGENT")
    day.say(f"Dynamics 365: {bob.name} sets Training while Graph answers 429")
    await expect_teams(bob, ("DoNotDisturb", "Presenting"), "delivered once the throttling ended", timeout=30)
    throttled = sum(1 for r in list(graph.requests)[before:] if r.status == 429)
    day.check("the outbox waited out Retry-After instead of dropping the change", throttled >= 1,
              f"{throttled} answers were 429")
    await stack.settle()

    day.heading("13:00 a burst: 100 Dynamics 365 changes for Carol in a row")
    await day.pause(0.5)
    writes = stack.teams_writes(carol)
    sequence = [BUSY, AVAILABLE] * 50
    for value in sequence:
        dv.set_presence(carol.dynamics_id, value, "SYSTEM")
    day.say(f"Dynamics 365: {len(sequence)} presence changes for {carol.name}, ending Available")
    await expect_teams(carol, ("Available", "Available"), "the newest state wins")
    await stack.settle()
    n = stack.teams_writes(carol) - writes
    day.check(f"the burst cost {n} Teams write(s), not {len(sequence)}", n == 1, f"{n} writes")

    day.heading("14:00 Teams loses a notification; Graph says 'missed'")
    # Not cosmetic: a Teams change inside the conflict window of Carol's last Dynamics change would
    # lose to it (rule 5). The story has an hour between; the demo needs the window to pass.
    await asyncio.sleep(stack.runtime.bridge.rules.conflict_window_seconds + 0.2)
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
    await expect_dyn(carol, AVAILABLE, "restored")
    await stack.settle()

    if others:
        day.heading(f"15:00 rush hour: {len(others)} other agent(s) get a conversation at once")
        await day.pause(0.5)
        t0 = time.monotonic()
        for a in others:
            dv.set_presence(a.dynamics_id, BUSY, "SYSTEM")
        ok = await stack.until(lambda: all(teams(a) == ("Busy", "InACall") for a in others), timeout=60)
        late = [a.name for a in others if teams(a) != ("Busy", "InACall")]
        day.check(f"Teams shows all {len(others)} Busy/InACall ({time.monotonic() - t0:.2f} s)", ok,
                  f"{len(late)} not yet: {', '.join(late[:5])}")
        await stack.settle(timeout=60)

    day.heading("17:00 end of the day: Alice signs out in Dynamics 365")
    dv.set_presence(alice.dynamics_id, OFFLINE, "AGENT")
    await expect_teams(alice, ("Available", "Available"), "the bridge's session is cleared; her own Teams state shows")
    await stack.settle()


def _table(day: Day, stack: LocalStack) -> None:
    out = day.out
    out("")
    out(f"{'agent':<16} {'Dynamics 365':<14} {'Teams':<28} {'in sync':<8}")
    rules = stack.runtime.bridge.rules
    catalogue = stack.runtime.bridge.catalogue
    shown = stack.agents if len(stack.agents) <= 12 else stack.agents[:12]
    mismatched = 0
    for a in stack.agents:
        pid = stack.dataverse.presence_of(a.dynamics_id) or ""
        presence = catalogue.get(pid)
        pair = tuple(stack.graph.presence_of(a.entra_id))
        own = tuple(stack.graph.own_state_of(a.entra_id))
        if presence is None:
            agree = False
        else:
            target = rules.teams_for(presence.base)
            # Offline clears the bridge's session: Teams then shows the person's own state.
            agree = pair == own if target is None or target == "clear" else "/".join(pair) == str(target)
        mismatched += 0 if agree else 1
        if a in shown:
            name = presence.name if presence else pid
            out(f"{a.name:<16} {name:<14} {'/'.join(pair):<28} {'yes' if agree else 'NO':<8}")
    if len(stack.agents) > len(shown):
        out(f"... and {len(stack.agents) - len(shown)} more agent(s)")
    day.check(f"both systems agree for all {len(stack.agents)} agent(s)", mismatched == 0,
              f"{mismatched} disagree")


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
