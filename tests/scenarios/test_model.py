"""Random scripts checked against the reference model (``tests/reference_model.py``) at every step,
across real HTTP: the Dataverse, Graph and Bot Connector emulators and the real service
(``service.stack.LocalStack``).

What is checked. For each seed, a script of genuine changes for eight agents: an agent picks a
presence in Dynamics 365 (``AGENT``), routing sets one (``SYSTEM``), an agent sends the bot a
command (``busy``, ``available``, ``away``, ``dnd``, ``offline``), or the person's own Teams
clients change (a call, a conference call, a meeting, Do not disturb, presenting, Away, Be right
back, Offline, back to Available). Dynamics presences are the five out-of-the-box ones and the
emulator's custom Training and Lunch (their base status is read from the emulator's catalogue).
The model hears each genuine change at its step index ``k`` before the stack is touched; then the
whole stack settles (no outbox row pending or in flight, no webhook, notification or Graph read
left, emulators idle). At that settled point every agent is checked: Dynamics must show
``truth.expected_dynamics()`` and the bridge's own Teams session (the emulator's session under the
bridge's session id) must be ``truth.expected_session()``. What Teams then shows (Graph's
aggregate) is fed back to the model as ``teams_shown`` at ``k + 0.5``: the aggregate changes that
the bridge's own session causes land after the step's genuine change.

Mismatches do not stop a script: they are counted per seed with the settled points checked, and
the test fails if there is any, with a message starting with the seed that lists each agent's
expected and actual values, ``truth.explain()`` and the last steps.

Replaying a seed. Scripts depend only on the seed and the model (never on what the bridge did), so
``pytest 'tests/scenarios/test_model.py::test_bridge_matches_the_reference_model_at_every_settled_point[seed3]'``
plays seed 3's script again; ``MODEL_SCENARIO_STEPS=200`` makes every script longer (the first 25
steps stay the same).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND, LUNCH, OFFLINE, TRAINING
from service.stack import LocalStack, StackAgent
from tests.reference_model import BASES, Truth, aggregate
from tests.scenarios.conftest import START_SECONDS, bounded, dyn, make_agents, own, settle, teams

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3, 4, 5)
AGENTS = 8
STEPS = int(os.environ.get("MODEL_SCENARIO_STEPS", "25"))
STEP_SECONDS = 4.0
"""Budget per step for ``bounded`` (a step settles in well under a second; this only stops a hang)."""
SETTLE_SECONDS = 30.0
TAIL = 10
"""How many of the last steps a failure message shows."""
DETAILED = 4
"""How many mismatches a failure message explains in full (the rest are listed one line each)."""
LISTED = 20
"""How many more mismatches a failure message lists, one line each."""

PRESENCES: Mapping[str, str] = {
    AVAILABLE: "Available",
    BUSY: "Busy",
    DND: "Busy DND",
    AWAY: "Away",
    OFFLINE: "Offline",
    TRAINING: "Training",
    LUNCH: "Lunch",
}
"""The Dynamics presences a script uses (id -> a name for messages)."""
BASE_CODES: Mapping[int, str] = {
    192360000: "Available",
    192360001: "Busy",
    192360002: "Busy DND",
    192360003: "Away",
    192360004: "Offline",
}
"""Dataverse's ``msdyn_basepresencestatus`` option values, named the way the model names bases."""
BOT: Mapping[str, str] = {"available": AVAILABLE, "busy": BUSY, "away": AWAY, "dnd": DND, "offline": OFFLINE}
TEAMS_OWN = (
    "Busy/InACall",
    "Busy/InAConferenceCall",
    "Busy/InAMeeting",
    "DoNotDisturb/DoNotDisturb",
    "DoNotDisturb/Presenting",
    "Away/Away",
    "BeRightBack/BeRightBack",
    "Offline/Offline",
    "Available/Available",
)
START_OWN = "Available/Available"
START_OWN_PAIR = ("Available", "Available")
OVERRIDES: Mapping[str, object] = {"teams_write_hold_seconds": 0}
"""The hold folds bursts of Dynamics changes into one Teams write; every step here settles before the
next, so there is never a burst and the hold changes nothing but the wall time (half a second per
Dynamics-driven step: about 45 s of a default run on two cores)."""
AGENT_WEIGHTS = (0.24, 0.18, 0.14, 0.12, 0.1, 0.08, 0.08, 0.06)
"""Hot and quiet agents: with 25 steps the hottest agents see long sequences of their own, which
is where overrides begin, survive routing and end."""
KINDS: Mapping[str, float] = {"agent": 0.25, "routing": 0.2, "bot": 0.2, "teams": 0.35}


@dataclass(frozen=True)
class Step:
    """One genuine change: ``agent`` (Dynamics AGENT) and ``routing`` (SYSTEM) carry a presence id,
    ``bot`` a command, ``teams`` the person's own ``Availability/Activity``."""

    k: int
    agent: int
    kind: str
    value: str

    def line(self, agents: list[StackAgent]) -> str:
        what = {
            "agent": f"picks {PRESENCES.get(self.value, self.value)} in Dynamics (AGENT)",
            "routing": f"routing sets {PRESENCES.get(self.value, self.value)} (SYSTEM)",
            "bot": f"tells the bot {self.value!r}",
            "teams": f"own Teams -> {self.value}",
        }[self.kind]
        return f"step {self.k:3d} {agents[self.agent].name} {what}"


def next_step(rng: random.Random, k: int, truths: list[Truth], owns: list[str]) -> Step:
    """Step ``k`` of the script, from the seed's generator and the model only (not from anything the
    bridge did, so a seed always plays the same script). A Dynamics change is to a presence other
    than the one the model says Dynamics shows, a Teams change to a state other than the person's
    current one (neither system reports a change to what it already shows); a bot command can be
    anything, since asking for what is shown is still the agent's own choice."""
    i = rng.choices(range(AGENTS), AGENT_WEIGHTS)[0]
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    if kind in ("agent", "routing"):
        value = rng.choice([p for p in PRESENCES if p != truths[i].expected_dynamics()])
    elif kind == "bot":
        value = rng.choice(list(BOT))
    else:
        value = rng.choice([s for s in TEAMS_OWN if s != owns[i]])
    return Step(k, i, kind, value)


def emulator_bases(stack: LocalStack) -> dict[str, str]:
    """The base of every presence a script uses, as the emulator's catalogue has it (the custom ones
    are defined there, not in the model), checked against the model's out-of-the-box bases."""
    rows = stack.dataverse.tables["msdyn_presences"].rows
    bases = {pid: BASE_CODES[int(rows[pid]["msdyn_basepresencestatus"])] for pid in PRESENCES}
    for pid, base in BASES.items():
        assert bases.get(pid, base) == base, f"emulator and model disagree on the base of {pid}: {bases[pid]} vs {base}"
    return dict(BASES) | bases


def bridge_session(stack: LocalStack, agent: StackAgent) -> str | None:
    """The bridge's session only (the one under its session id), ``Availability/Activity``; None
    when it holds none."""
    sessions = stack.graph.sessions_of(agent.entra_id)
    mine = sessions.get(stack.runtime.teams.session_id)
    return None if mine is None else f"{mine.availability}/{mine.activity}"


def name(presence_id: str | None) -> str:
    return f"{PRESENCES.get(presence_id, '?')} ({presence_id})" if presence_id else "None"


@dataclass
class Run:
    """One seed's bookkeeping: the steps played, the settled points checked, the mismatches seen."""

    seed: int
    steps: list[Step] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    points: int = 0
    mismatches: list[str] = field(default_factory=list)

    def tail(self, agent: StackAgent | None = None) -> str:
        lines = self.lines if agent is None else [x for x in self.lines if f" {agent.name} " in x]
        return "\n".join(f"    {x}" for x in lines[-TAIL:]) or "    (none)"

    def summary(self, seconds: float) -> str:
        return (
            f"seed {self.seed}: {self.points} settled points checked ({len(self.steps)} steps + start, "
            f"{AGENTS} agents), {len(self.mismatches)} mismatches, {seconds:.1f} s"
        )

    def report(self, seconds: float) -> str:
        head = [self.summary(seconds)]
        head += self.mismatches[:DETAILED]
        rest = [m.splitlines()[0] for m in self.mismatches[DETAILED:]]
        if rest:
            head.append(f"... and {len(rest)} more:")
            head += [f"  {line}" for line in rest[:LISTED]]
            if len(rest) > LISTED:
                head.append(f"  ... ({len(rest) - LISTED} not listed)")
        head.append(f"last steps:\n{self.tail()}")
        return "\n".join(head)


def check(stack: LocalStack, truths: list[Truth], run: Run, k: int) -> None:
    """One settled point: every agent's Dynamics presence and bridge session against the model."""
    for i, a in enumerate(stack.agents):
        run.points += 1
        want_d, got_d = truths[i].expected_dynamics(), dyn(stack, a)
        want_s, got_s = truths[i].expected_session(), bridge_session(stack, a)
        if (want_d, want_s) == (got_d, got_s):
            continue
        run.mismatches.append(
            f"after step {k} {a.name}: Dynamics expected {name(want_d)}, actual {name(got_d)}; "
            f"session expected {want_s}, actual {got_s}\n"
            f"  own Teams {own(stack, a)}, Teams shows {teams(stack, a)}\n"
            f"  model: {truths[i].explain()}\n"
            f"  {a.name}'s last steps:\n{run.tail(a)}"
        )


def feed_shown(stack: LocalStack, truths: list[Truth], shown: list[str], at: float) -> None:
    """Tells the model what Teams shows now, for every agent whose aggregate changed since it was
    last told (the model needs to know since when Teams has been showing the person's own state)."""
    for i, a in enumerate(stack.agents):
        now = teams(stack, a)
        if now != shown[i]:
            truths[i].teams_shown(now, at)
            shown[i] = now


async def play(stack: LocalStack, step: Step, truth: Truth) -> str:
    """Feeds the genuine change to the model (at time ``k``) and makes it happen; returns a note for
    the step log (the bot's reply)."""
    a = stack.agents[step.agent]
    if step.kind == "agent":
        truth.dynamics_chosen(step.value, step.k)
        stack.dataverse.set_presence(a.dynamics_id, step.value, "AGENT")
    elif step.kind == "routing":
        truth.dynamics_routed(step.value, step.k)
        stack.dataverse.set_presence(a.dynamics_id, step.value, "SYSTEM")
    elif step.kind == "bot":
        truth.dynamics_chosen(BOT[step.value], step.k)
        reply = await stack.chat(a, step.value, timeout=SETTLE_SECONDS)
        return f" (bot: {reply.text[:60]!r})"
    else:
        truth.teams_own(step.value, step.k)
        stack.graph.set_user_state(a.entra_id, *step.value.split("/"))
    return ""


async def settled(stack: LocalStack, run: Run, where: str) -> None:
    """``settle``, with a timeout that names the seed and the step instead of a bare TimeoutError
    (a stack that does not settle is a finding of its own)."""
    try:
        await settle(stack, timeout=SETTLE_SECONDS)
    except TimeoutError:
        counts = await stack.runtime.store.outbox_counts()
        pytest.fail(
            f"seed {run.seed}: the stack did not settle within {SETTLE_SECONDS:g} s {where}; outbox "
            f"{counts}\nlast steps:\n{run.tail()}"
        )


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
@bounded(START_SECONDS + 30 + STEPS * STEP_SECONDS)
async def test_bridge_matches_the_reference_model_at_every_settled_point(make_stack, seed: int) -> None:
    started = time.monotonic()
    rng = random.Random(seed)
    run = Run(seed)
    stack = await make_stack(make_agents(AGENTS, AVAILABLE, own=START_OWN_PAIR), **OVERRIDES)
    bases = emulator_bases(stack)
    truths = [Truth(AVAILABLE, START_OWN, 0.0, bases) for _ in stack.agents]
    owns = [START_OWN] * AGENTS
    shown = [aggregate(START_OWN, None)] * AGENTS  # the model's start: Teams shows the own state, no session
    await settled(stack, run, "after start-up")
    feed_shown(stack, truths, shown, 0.5)
    check(stack, truths, run, 0)

    for k in range(1, STEPS + 1):
        step = next_step(rng, k, truths, owns)
        if step.kind == "teams":
            owns[step.agent] = step.value
        note = await play(stack, step, truths[step.agent])
        run.steps.append(step)
        await settled(stack, run, f"after {step.line(stack.agents)}")
        feed_shown(stack, truths, shown, k + 0.5)
        a = stack.agents[step.agent]
        run.lines.append(
            f"{step.line(stack.agents)}{note} => Dynamics {PRESENCES.get(dyn(stack, a) or '', dyn(stack, a))}, "
            f"session {bridge_session(stack, a)}, Teams shows {teams(stack, a)}"
        )
        check(stack, truths, run, k)

    seconds = time.monotonic() - started
    print(run.summary(seconds))
    if run.mismatches:
        pytest.fail(run.report(seconds), pytrace=False)
