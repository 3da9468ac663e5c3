"""Stateful property test: the real engine (in-memory store) against the reference model of rules v2.

Why stateful: the bridge's promises (both systems converge on the outputs of P and Q, a genuine change
is never dropped, nothing ping-pongs) are about histories, not single events. Hypothesis builds random
interleavings of the agent's, routing's and the person's changes, bot commands, outbox runs (some
failing), late, reordered and duplicated echoes, and served Teams reads; after every settled point
both systems must show what ``tests.reference_model.Truth`` says, for both agents.

The simulated world is deliberately simple and follows the specification:

- Dynamics keeps one presence per agent with a RowVersion; every write (the bridge's included, even
  of the same value) bumps it and fires a webhook. The bridge writes as the agent (modified-by AGENT).
- Teams shows ``aggregate(own, session)`` and notifies whenever that aggregate changes, and only then.
- Genuine events and Teams notifications reach the bridge in the order they happened, all of them
  before the next genuine change (each possibly twice in a row); the bridge's own Dynamics echoes are
  held back, delivered late, out of order and twice.
- A read the engine requests is served later with what Teams shows at that moment (``current=True``).

Only genuine changes and what Teams shows are told to the model; the bridge's writes never are.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from mapping.errors import UpstreamError
from mapping.model import CLEAR, Agent, OutboxStatus, PresenceObserved, System
from mapping.ports import PresenceWriter
from tests import reference_model as ref
from tests.reference_model import BASES, Truth, aggregate
from tests.support import ALICE, AVAILABLE, AWAY, BOB, BUSY, DND, OFFLINE, TRAINING, FakeClock, make_bridge

D, T = System.DYNAMICS, System.TEAMS
T_ = TypeVar("T_")

AGENTS = (ALICE, BOB)
BY_NAME = {"Alice": ALICE, "Bob": BOB}
"""Rules draw names, not ``Agent`` objects or GUIDs, so that a counterexample reads as a story."""
DYNAMICS = {"Available": AVAILABLE, "Busy": BUSY, "DND": DND, "Away": AWAY, "Offline": OFFLINE, "Training": TRAINING}
TEAMS_OWN = [
    "Available/Available",
    "Busy/InACall",
    "Busy/InAMeeting",
    "Busy/InAConferenceCall",
    "DoNotDisturb/Presenting",
    "DoNotDisturb/DoNotDisturb",
    "Away/Away",
    "BeRightBack/BeRightBack",
    "Offline/Offline",
    "Busy/Busy",
]
MODEL_BASES = {**BASES, TRAINING: "Busy DND"}
"""The model's own table: written here from the catalogue's description (TRAINING is a custom Busy DND
presence), not taken from ``mapping``."""
NAMES = {presence_id: name for name, presence_id in DYNAMICS.items()}

STEP = 0.1
"""Seconds the clock moves before every non-genuine action, so no two events share a timestamp and no
"since" comparison is a tie."""
MAX_FAILURES = 3
"""At most this many failed attempts in a row per (agent, system): retried, never a dead letter (the
retry policy gives up after 8; dead letters are another test's business)."""
SETTLE_ROUNDS = 60


def _ts(at: datetime) -> float:
    return at.timestamp()


def _name(value: str | None) -> str:
    if value is None:
        return "none"
    return NAMES.get(value, value)


@dataclass
class Queued:
    """An event on its way to the bridge; ``twice``: delivered twice in a row (a duplicate delivery)."""

    event: PresenceObserved
    twice: bool = False
    again: bool = False
    """Echoes only: delivered once more, later, after it was first delivered."""


@dataclass
class AgentWorld:
    """What Dynamics and Teams really show for one agent."""

    dynamics: str = AVAILABLE
    version: int = 1
    modified_by: str = "SYSTEM"
    own: str = "Available/Available"
    session: str | None = None

    @property
    def shown(self) -> str:
        return aggregate(self.own, self.session)


class WorldDynamicsWriter:
    """Applies the bridge's Dynamics writes to the world: Dataverse bumps the RowVersion and fires the
    webhook even when the value does not change; the echo is held back with the other echoes.

    Dataverse calls its synchronous webhook inside the update's transaction and updates one row at a
    time, so the webhook of an earlier genuine change of the row has been answered, by the bridge,
    before the bridge's own write of that row can commit: those are delivered first. (The bridge's own
    echoes may still be held back: it answers a webhook before it has judged it only with the spool.)"""

    system = D

    def __init__(self, machine: BridgeMachine) -> None:
        self.m = machine

    async def apply(self, agent: Agent, value: str) -> None:
        await self.m.deliver_dynamics_before_write(agent)
        self.m.maybe_fail(agent, D)
        w = self.m.world[agent.dynamics_user_id]
        w.dynamics, w.version, w.modified_by = value, w.version + 1, "AGENT"
        event = PresenceObserved(agent.dynamics_user_id, D, value, self.m.clock(), w.version, "AGENT", "webhook")
        self.m.echoes.append(Queued(event))
        self.m.note(f"  outbox: Dynamics[{agent.display_name}] := {_name(value)} (v{w.version}, echo held)")


class WorldTeamsWriter:
    """Sets or clears the bridge's Teams session; Teams notifies only when the aggregate changes."""

    system = T

    def __init__(self, machine: BridgeMachine) -> None:
        self.m = machine

    async def apply(self, agent: Agent, value: str) -> None:
        self.m.maybe_fail(agent, T)
        w = self.m.world[agent.dynamics_user_id]
        before = w.shown
        w.session = None if value == CLEAR else value
        self.m.note(f"  outbox: Teams session[{agent.display_name}] := {w.session}")
        if w.shown != before:
            self.m.teams_changed(agent, self.m.dup_notifications)


class RecordingReads:
    """``mapping.ports.ReadRequests``: keeps the engine's requests for the harness to serve later."""

    def __init__(self) -> None:
        self.pending: list[tuple[System, str, str]] = []

    async def request_read(self, system: System, agent_id: str, why: str) -> None:
        self.pending.append((system, agent_id, why))


class BridgeMachine(RuleBasedStateMachine):
    """Two agents, one bridge on the in-memory store, one simulated world, one ``Truth`` per agent."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.t0 = self.now
        self.reads = RecordingReads()
        self.writers: dict[System, PresenceWriter] = {D: WorldDynamicsWriter(self), T: WorldTeamsWriter(self)}
        self.bridge = make_bridge(clock=self.clock, writers=self.writers, reads=self.reads)
        self.world = {a.dynamics_user_id: AgentWorld() for a in AGENTS}
        self.truth = {
            a.dynamics_user_id: Truth(AVAILABLE, "Available/Available", self.now, MODEL_BASES) for a in AGENTS
        }
        self.ordered: list[Queued] = []
        """Genuine events and Teams notifications, in the order they happened."""
        self.echoes: list[Queued] = []
        """The bridge's own Dynamics echoes, held back until the harness lets one through."""
        self.armed: dict[tuple[str, System], int] = {}
        """One-shot failures armed per (agent, system)."""
        self.failures: dict[tuple[str, System], int] = {}
        self.dup_notifications = False
        self.history: list[str] = []
        self.failed = False

    # -- plumbing -------------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return _ts(self.clock())

    def run(self, coro: Coroutine[Any, Any, T_]) -> T_:
        """Runs one async step on this example's loop; remembers a failure so teardown does not pile a
        second error on top of the first (which hypothesis is shrinking)."""
        try:
            return self.loop.run_until_complete(coro)
        except BaseException:
            self.failed = True
            raise

    def note(self, line: str) -> None:
        self.history.append(f"t={self.now - self.t0:7.1f} {line}")

    def maybe_fail(self, agent: Agent, system: System) -> None:
        key = (agent.dynamics_user_id, system)
        if self.armed.get(key, 0) > 0:
            self.armed[key] -= 1
            self.failures[key] = self.failures.get(key, 0) + 1
            self.note(f"  outbox: {system} write for {agent.display_name} fails")
            raise UpstreamError(f"simulated {system} outage")
        self.failures[key] = 0

    def teams_changed(self, agent: Agent, twice: bool) -> None:
        """The aggregate changed: Graph notifies (in order), and the model learns what Teams shows."""
        shown = self.world[agent.dynamics_user_id].shown
        event = PresenceObserved(agent.dynamics_user_id, T, shown, self.clock(), None, None, "notification")
        self.ordered.append(Queued(event, twice=twice))
        self.truth[agent.dynamics_user_id].teams_shown(shown, self.now)
        self.note(f"  Teams[{agent.display_name}] shows {shown} (notification queued)")

    async def _observe(self, queued: Queued) -> None:
        for _ in range(2 if queued.twice else 1):
            await self.bridge.engine.observe(queued.event)

    async def _deliver_ordered(self) -> bool:
        if not self.ordered:
            return False
        queued = self.ordered.pop(0)
        e = queued.event
        self.note(f"  deliver {e.system} {_name(e.value)} v{e.version} {e.modified_by}{' x2' if queued.twice else ''}")
        await self._observe(queued)
        return True

    async def deliver_dynamics_before_write(self, agent: Agent) -> None:
        """Delivers the queue up to this agent's last genuine Dynamics event, in order."""
        last = max(
            (
                i
                for i, q in enumerate(self.ordered)
                if q.event.system is D and q.event.agent_id == agent.dynamics_user_id
            ),
            default=None,
        )
        for _ in range(0 if last is None else last + 1):
            await self._deliver_ordered()

    async def _flush_ordered(self) -> None:
        """Every genuine event reaches the bridge before the next genuine change happens."""
        while await self._deliver_ordered():
            pass

    async def _deliver_echo(self, index: int, again: bool) -> None:
        queued = self.echoes[index % len(self.echoes)]
        e = queued.event
        if again and not queued.again:
            queued.again = True  # delivered now, and once more later
        else:
            self.echoes.remove(queued)
        self.note(f"  deliver echo Dynamics {_name(e.value)} v{e.version}")
        await self.bridge.engine.observe(e)

    async def _serve_read(self, index: int) -> None:
        system, agent_id, why = self.reads.pending.pop(index % len(self.reads.pending))
        w = self.world[agent_id]
        if system is T:
            event = PresenceObserved(agent_id, T, w.shown, self.clock(), None, None, "reconcile", current=True)
        else:
            event = PresenceObserved(
                agent_id, D, w.dynamics, self.clock(), w.version, w.modified_by, "reconcile", current=True
            )
        self.note(f"  serve read {system} -> {_name(event.value)} ({why})")
        await self.bridge.engine.observe(event)

    async def _genuine(self, gap: float) -> None:
        await self._flush_ordered()
        self.clock.advance(gap)

    async def _settle(self, rnd: random.Random | None) -> None:
        """Delivers, serves and writes until nothing is queued, requested or due; waits out backoffs."""
        for _ in range(SETTLE_ROUNDS):
            moved = False
            while await self._deliver_ordered():
                moved = True
            while self.echoes:
                self.clock.advance(STEP)
                index = rnd.randrange(len(self.echoes)) if rnd else 0
                await self._deliver_echo(index, again=bool(rnd and rnd.random() < 0.2))
                moved = True
            while self.reads.pending:
                self.clock.advance(STEP)
                await self._serve_read(0)
                moved = True
            self.clock.advance(STEP)
            if await self.bridge.outbox.run_once():
                continue
            if moved:
                continue
            waiting = [
                r.next_attempt_at
                for r in await self.bridge.store.list_outbox(OutboxStatus.PENDING)
                if r.next_attempt_at is not None
            ]
            if waiting:
                self.clock.advance(max(0.0, (max(waiting) - self.clock()).total_seconds()) + STEP)
                continue
            return
        raise AssertionError("no quiescence: the bridge keeps writing (ping-pong?)\n" + "\n".join(self.history))

    def _check(self, where: str) -> None:
        problems: list[str] = []
        for agent in AGENTS:
            w, truth = self.world[agent.dynamics_user_id], self.truth[agent.dynamics_user_id]
            if w.dynamics != truth.expected_dynamics() or w.session != truth.expected_session():
                problems.append(
                    f"{agent.display_name}: world Dynamics {_name(w.dynamics)}, session {w.session}, Teams shows "
                    f"{w.shown}; expected Dynamics {_name(truth.expected_dynamics())}, session "
                    f"{truth.expected_session()}\n    model: {truth.explain()}"
                )
        if problems:
            self.failed = True
            raise AssertionError(f"{where}:\n" + "\n".join(problems) + "\nhistory:\n" + "\n".join(self.history))

    # -- rules ----------------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        """Both agents Available in both systems; the bridge learns that from reads, as at start-up."""

        async def go() -> None:
            await self.bridge.store.upsert_agents(list(AGENTS))
            for agent in AGENTS:
                aid = agent.dynamics_user_id
                await self.bridge.engine.observe(
                    PresenceObserved(aid, D, AVAILABLE, self.clock(), 1, "SYSTEM", "reconcile", current=True)
                )
                await self.bridge.engine.observe(
                    PresenceObserved(aid, T, "Available/Available", self.clock(), None, None, "reconcile", current=True)
                )
            self.note("start: both agents Available / Available/Available")
            await self._settle(None)

        self.run(go())
        self._check("after start")

    @rule(
        name=st.sampled_from(sorted(BY_NAME)),
        presence=st.sampled_from(list(DYNAMICS)),
        by=st.sampled_from(["AGENT", "SYSTEM"]),
        twice=st.booleans(),
        gap=st.sampled_from([1.0, 3.0]),
    )
    def dynamics_changes(self, name: str, presence: str, by: str, twice: bool, gap: float) -> None:
        """The agent (AGENT) or routing (SYSTEM) sets a presence in Dynamics: a genuine change (Dataverse
        fires the webhook with a new RowVersion even when the value is the one it already shows)."""
        who, value = BY_NAME[name], DYNAMICS[presence]

        async def go() -> None:
            await self._genuine(gap)
            w = self.world[who.dynamics_user_id]
            w.dynamics, w.version, w.modified_by = value, w.version + 1, by
            event = PresenceObserved(who.dynamics_user_id, D, value, self.clock(), w.version, by, "webhook")
            self.ordered.append(Queued(event, twice=twice))
            truth = self.truth[who.dynamics_user_id]
            (truth.dynamics_chosen if by == "AGENT" else truth.dynamics_routed)(value, self.now)
            self.note(f"{'agent' if by == 'AGENT' else 'routing'} sets {who.display_name} {_name(value)} v{w.version}")

        self.run(go())

    @rule(
        name=st.sampled_from(sorted(BY_NAME)), presence=st.sampled_from(list(DYNAMICS)), gap=st.sampled_from([1.0, 3.0])
    )
    def bot_command(self, name: str, presence: str, gap: float) -> None:
        """The agent chooses a presence through the bot: the bridge writes Dynamics itself."""
        who, value = BY_NAME[name], DYNAMICS[presence]

        async def go() -> None:
            await self._genuine(gap)
            self.note(f"bot: {who.display_name} chooses {_name(value)}")
            self.truth[who.dynamics_user_id].dynamics_chosen(value, self.now)
            await self.bridge.engine.command(who, value, source="bot")

        self.run(go())

    @rule(
        name=st.sampled_from(sorted(BY_NAME)),
        value=st.sampled_from(TEAMS_OWN),
        twice=st.booleans(),
        gap=st.sampled_from([1.0, 3.0]),
    )
    def teams_own(self, name: str, value: str, twice: bool, gap: float) -> None:
        """The person's own Teams state changes (a call, a meeting, DND, away, signing out...); Teams
        notifies only if what it shows changes, and that notification may come twice."""
        who = BY_NAME[name]

        async def go() -> None:
            await self._genuine(gap)
            w = self.world[who.dynamics_user_id]
            before = w.shown
            w.own = value
            self.truth[who.dynamics_user_id].teams_own(value, self.now)
            self.note(f"person {who.display_name}: own Teams {value}")
            if w.shown != before:
                self.teams_changed(who, twice)

        self.run(go())

    @rule(duplicate_notifications=st.booleans())
    def run_outbox(self, duplicate_notifications: bool) -> None:
        """One outbox pass: claims due rows and applies them to the world."""

        async def go() -> None:
            self.clock.advance(STEP)
            self.dup_notifications = duplicate_notifications
            try:
                await self.bridge.outbox.run_once()
            finally:
                self.dup_notifications = False

        self.run(go())

    @rule(name=st.sampled_from(sorted(BY_NAME)), system=st.sampled_from([D, T]))
    def outage(self, name: str, system: System) -> None:
        """The next write to ``system`` for the agent fails (retried after a backoff)."""
        who = BY_NAME[name]
        key = (who.dynamics_user_id, system)
        if self.armed.get(key, 0) + self.failures.get(key, 0) < MAX_FAILURES:
            self.armed[key] = self.armed.get(key, 0) + 1
            self.note(f"outage armed: next {system} write for {who.display_name} fails")

    @precondition(lambda self: bool(self.ordered))
    @rule()
    def deliver_next(self) -> None:
        """The oldest genuine event or notification reaches the bridge."""

        async def go() -> None:
            self.clock.advance(STEP)
            await self._deliver_ordered()

        self.run(go())

    @precondition(lambda self: bool(self.echoes))
    @rule(index=st.integers(0, 7), again=st.booleans())
    def deliver_echo(self, index: int, again: bool) -> None:
        """One held-back echo of the bridge's own Dynamics write arrives (any of them: out of order),
        possibly to be delivered once more later."""

        async def go() -> None:
            self.clock.advance(STEP)
            await self._deliver_echo(index, again)

        self.run(go())

    @precondition(lambda self: bool(self.reads.pending))
    @rule(index=st.integers(0, 3))
    def serve_read(self, index: int) -> None:
        """A read the engine asked for is made now: it sees what the system shows at this moment."""

        async def go() -> None:
            self.clock.advance(STEP)
            await self._serve_read(index)

        self.run(go())

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0, 60.0]))
    def wait(self, seconds: float) -> None:
        """Time passes (backoffs fall due)."""
        self.clock.advance(seconds)

    @rule(rnd=st.randoms(use_true_random=False))
    def settle_and_check(self, rnd: random.Random) -> None:
        """Everything in flight arrives (echoes in a random order, some twice); then both systems must
        show what the model says, for both agents."""
        self.note("settle")
        self.run(self._settle(rnd))
        self._check("after settling")

    def teardown(self) -> None:
        """Settle once more and check; then an outbox pass must write nothing (no ping-pong) and no row
        may be left pending or in flight."""
        try:
            if not self.failed:
                self.note("teardown: settle")
                self.run(self._settle(None))
                self._check("at teardown")
                self.clock.advance(STEP)
                writes = self.run(self.bridge.outbox.run_once())
                assert writes == 0, f"{writes} write(s) after settling (ping-pong)\n" + "\n".join(self.history)
                counts = self.run(self.bridge.store.outbox_counts())
                assert counts.get("pending", 0) == 0 and counts.get("in_flight", 0) == 0, (
                    f"outbox not empty after settling: {counts}\n" + "\n".join(self.history)
                )
        finally:
            self.loop.close()


# 2,000 examples of 20 steps: about 85 s of CPU on this suite's 2-core runner; at 30 steps the run came
# too close to the 3-minute budget (the in-memory store and the rules deep-copy state on every event).
# CI plays the same 2,000 derandomized examples every run; STATEFUL_RANDOM=1 draws new ones (how
# counterexamples are hunted).
RANDOM = os.environ.get("STATEFUL_RANDOM", "") == "1"
BridgeMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("STATEFUL_EXAMPLES", "2000")),
    stateful_step_count=20,
    deadline=None,
    derandomize=not RANDOM,
    # Derandomized, no example database either: a checkout with a database left by random sweeps
    # would replay their counterexamples first and play other histories than CI's fresh clone.
    database=None if not RANDOM else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow],
)
test_bridge_converges_to_the_model = pytest.mark.slow(BridgeMachine.TestCase)


# -- the model itself: the specification's named cases ----------------------------------------------


class Timeline:
    """Drives a ``Truth`` the way the world would: keeps the own state and the session, feeds every
    change of what Teams shows, so each case reads like the story it tells."""

    def __init__(self, dynamics: str = AVAILABLE, own: str = "Available/Available") -> None:
        self.t = 0.0
        self.own = own
        self.session: str | None = None
        self.truth = Truth(dynamics, own, self.t, MODEL_BASES)
        self.follow()

    def tick(self) -> float:
        self.t += 1.0
        return self.t

    def follow(self) -> None:
        """The bridge's session lands (a moment after P changed), as the world would show it."""
        self._show(own=self.own, session=self.truth.expected_session())

    def _show(self, own: str, session: str | None) -> None:
        self.own, self.session = own, session
        self.truth.teams_shown(aggregate(own, session), self.t)

    def teams(self, own: str) -> None:
        self.truth.teams_own(own, self.tick())
        self._show(own, self.session)

    def chosen(self, presence: str) -> None:
        self.truth.dynamics_chosen(presence, self.tick())
        self.tick()
        self.follow()

    def routed(self, presence: str) -> None:
        self.truth.dynamics_routed(presence, self.tick())
        self.tick()
        self.follow()

    def expect(self, dynamics: str, session: str | None) -> None:
        assert (self.truth.expected_dynamics(), self.truth.expected_session()) == (dynamics, session), (
            self.truth.explain()
        )


def test_model_stuck_busy_trap() -> None:
    """A Teams call makes Dynamics Busy without a session (a session would keep Teams busy after the
    call); when the call ends, Dynamics is Available again."""
    tl = Timeline()
    tl.expect(AVAILABLE, None)
    tl.teams("Busy/InACall")
    tl.expect(BUSY, None)
    tl.teams("Available/Available")
    tl.expect(AVAILABLE, None)


def test_model_meeting_outlasts_routed_conversation() -> None:
    """Routing Busy, a meeting starts, routing ends the conversation (Available): the meeting still
    holds Dynamics Busy; when it ends, Dynamics is P as it is then (Available), no snapshot."""
    tl = Timeline()
    tl.routed(BUSY)
    tl.expect(BUSY, "Busy/InACall")
    tl.teams("Busy/InAMeeting")
    tl.expect(BUSY, "Busy/InACall")
    tl.routed(AVAILABLE)
    tl.expect(BUSY, None)
    tl.teams("Available/Available")
    tl.expect(AVAILABLE, None)


def test_model_routing_change_during_override_comes_back_when_q_ends() -> None:
    """What routing set during an override is what Dynamics shows after it."""
    tl = Timeline()
    tl.teams("DoNotDisturb/Presenting")
    tl.expect(DND, None)
    tl.routed(AWAY)
    tl.expect(DND, "Away/Away")
    tl.teams("Available/Available")
    tl.expect(AWAY, "Away/Away")


def test_model_agent_choice_ends_override_until_q_changes() -> None:
    """The agent's own choice during a meeting wins over the meeting; a new Q asks again."""
    tl = Timeline()
    tl.teams("Busy/InAMeeting")
    tl.expect(BUSY, None)
    tl.chosen(AVAILABLE)
    tl.expect(AVAILABLE, None)
    tl.teams("Busy/InACall")
    tl.expect(BUSY, None)


def test_model_teams_away_makes_dynamics_away() -> None:
    tl = Timeline()
    tl.teams("Away/Away")
    tl.expect(AWAY, None)
    tl.teams("BeRightBack/BeRightBack")
    tl.expect(AWAY, None)


def test_model_offline_is_never_overridden() -> None:
    tl = Timeline()
    tl.routed(OFFLINE)
    tl.teams("Busy/InACall")
    tl.expect(OFFLINE, None)
    tl.teams("DoNotDisturb/DoNotDisturb")
    tl.expect(OFFLINE, None)


def test_model_no_override_below_p() -> None:
    """Q asking no more than P keeps Dynamics at P (TRAINING is a custom Busy DND: nothing is more)."""
    tl = Timeline()
    tl.chosen(TRAINING)
    tl.teams("DoNotDisturb/Presenting")
    tl.expect(TRAINING, "DoNotDisturb/Presenting")
    tl.chosen(BUSY)
    tl.expect(BUSY, "Busy/InACall")


def test_model_hidden_own_state_asks_nothing() -> None:
    """Away below a Busy session is hidden: it asks nothing, and Q's "since" is when it shows."""
    tl = Timeline()
    tl.routed(BUSY)
    tl.teams("Away/Away")
    assert tl.truth.q_since is None
    tl.expect(BUSY, "Busy/InACall")


@pytest.mark.parametrize(
    ("own", "session", "shown"),
    [
        ("Available/Available", None, "Available/Available"),
        ("Available/Available", "Busy/InACall", "Busy/InACall"),
        ("Busy/InAMeeting", "Busy/InACall", "Busy/InAMeeting"),  # a tie: the own state wins
        ("DoNotDisturb/Presenting", "Away/Away", "DoNotDisturb/Presenting"),
        ("Offline/Offline", "Away/Away", "Away/Away"),  # no client: the session shows
        ("Offline/Offline", None, "Offline/Offline"),
        ("BeRightBack/BeRightBack", "Away/Away", "BeRightBack/BeRightBack"),
    ],
)
def test_model_aggregate(own: str, session: str | None, shown: str) -> None:
    assert aggregate(own, session) == shown


def test_model_asks() -> None:
    assert [ref.asks(v) for v in TEAMS_OWN] == [
        None,
        "Busy",
        "Busy",
        "Busy",
        "Busy DND",
        "Busy DND",
        "Away",
        "Away",
        None,
        None,
    ]
