"""Rule 7 against the emulators: an upstream answering 503 for a while, changes arriving meanwhile.

Measured before this test existed (issue 15, 60 s outages): Graph down cost 1,472 upstream calls,
4 dead letters, 3 agents never converged; Dataverse down left 22 dead letters and 22 agents
Presenting in Teams and Available in Dynamics, while the sweep reported them in sync. Here: no dead
letter, the calls during the outage bounded by the breaker's probe schedule (not rows times tries),
and every agent converged once the upstream answers. The time to converge is recorded (printed),
never asserted; every wait has a bounded timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND
from mapping.model import OutboxStatus
from mapping.upstream_health import BreakerPolicy
from service.stack import LocalStack, StackAgent
from tests.scenarios.conftest import aggregate, bounded, dyn, make_agents, settle, teams, translation

pytestmark = pytest.mark.slow

AGENTS = 100
ROUNDS = 3  # 300 changes
OUTAGE = 8.0  # seconds; bench/chaos.py runs the 60 s
FAST = {"teams_write_hold_seconds": 0}
TEAMS_STATES = [("Busy", "InACall"), ("DoNotDisturb", "Presenting"), ("Away", "Away")]
ASKS = {"Busy": BUSY, "DoNotDisturb": DND, "Away": AWAY, "Available": AVAILABLE}
DYNAMICS_VALUES = [BUSY, DND, AWAY]


def graph_presence_calls(stack: LocalStack) -> int:
    return len(stack.graph.calls("POST", "/presence/"))


def dataverse_writes(stack: LocalStack) -> int:
    return sum(1 for c in list(stack.dataverse.calls) if "CCaaS_ModifyAgentPresence" in c.path)


def end_dataverse_outage(stack: LocalStack) -> None:
    """The rest of the injected failures are dropped: the upstream is back."""
    stack.dataverse.clear_faults()


def bound_for(stack: LocalStack, seconds: float) -> int:
    """Upstream calls an outage may cost: the rows in flight when it began (one claim), the failures
    that open the breaker, and the probes its schedule allows in ``seconds``."""
    outbox = stack.runtime.outbox
    policy = outbox.health.policy
    return outbox.batch_size + policy.threshold + policy.max_probes(seconds)


async def converge(stack: LocalStack, check: Callable[[StackAgent], bool], timeout: float = 60.0) -> float:
    """Seconds until ``check`` holds for every agent (fails the test after ``timeout``)."""
    started = time.monotonic()
    ok = await stack.until(lambda: all(check(a) for a in stack.agents), timeout=timeout, interval=0.1)
    left = [a.name for a in stack.agents if not check(a)]
    assert ok, f"not converged within {timeout:g} s after recovery: {left[:10]} ({len(left)})"
    return time.monotonic() - started


async def outage(stack: LocalStack, change: Callable[[StackAgent, int], None], count: Callable[[], int]) -> int:
    """``ROUNDS`` changes per agent spread over ``OUTAGE`` seconds; returns the upstream calls made
    meanwhile."""
    before = count()
    started = time.monotonic()
    for r in range(ROUNDS):
        for a in stack.agents:
            change(a, r)
        await asyncio.sleep(max(0.0, started + OUTAGE * (r + 1) / ROUNDS - time.monotonic()))
    return count() - before


@bounded(240)
async def test_graph_down_costs_bounded_calls_no_dead_letter_and_every_agent_converges(make_stack):
    stack = await make_stack(make_agents(AGENTS), **FAST)
    stack.graph.fail_next(10**6, 503, retry_after=None, paths="/presence/")
    calls = await outage(
        stack,
        lambda a, r: stack.dataverse.set_presence(a.dynamics_id, DYNAMICS_VALUES[(r + int(a.name[-2:])) % 3], "AGENT"),
        lambda: graph_presence_calls(stack),
    )
    assert calls <= bound_for(stack, OUTAGE + 2), (calls, bound_for(stack, OUTAGE + 2))
    stack.graph.clear_faults()
    want = {a.entra_id: DYNAMICS_VALUES[(ROUNDS - 1 + int(a.name[-2:])) % 3] for a in stack.agents}

    def done(a: StackAgent) -> bool:
        return teams(stack, a) == aggregate("Available/Available", translation(stack, want[a.entra_id]))

    seconds = await converge(stack, done)
    print(f"graph down {OUTAGE:g} s: {calls} calls, converged {seconds:.1f} s after recovery")
    await settle(stack)
    assert await stack.runtime.store.list_outbox(OutboxStatus.DEAD) == []


@bounded(240)
async def test_dataverse_down_costs_bounded_calls_no_dead_letter_and_every_agent_converges(make_stack):
    stack = await make_stack(make_agents(AGENTS), **FAST)
    stack.dataverse.fail_next(10**6, 503, path="CCaaS_ModifyAgentPresence")
    calls = await outage(
        stack,
        lambda a, r: stack.graph.set_user_state(a.entra_id, *TEAMS_STATES[(r + int(a.name[-2:])) % 3]),
        lambda: dataverse_writes(stack),
    )
    assert calls <= bound_for(stack, OUTAGE + 2), (calls, bound_for(stack, OUTAGE + 2))
    end_dataverse_outage(stack)
    want = {a.dynamics_id: ASKS[TEAMS_STATES[(ROUNDS - 1 + int(a.name[-2:])) % 3][0]] for a in stack.agents}
    seconds = await converge(stack, lambda a: dyn(stack, a) == want[a.dynamics_id])
    print(f"dataverse down {OUTAGE:g} s: {calls} calls, converged {seconds:.1f} s after recovery")
    await settle(stack)
    assert await stack.runtime.store.list_outbox(OutboxStatus.DEAD) == []


@bounded(120)
async def test_dead_letters_leave_no_drift_the_sweep_cannot_see(make_stack):
    """Commands forced to die at their first failure (no budget, one try): Dataverse refuses the
    overrides of agents who started presenting in Teams. The state must then say Dynamics does not
    show the override, so the sweep (which reads both systems) writes it again, instead of finding
    everyone "in sync" while customers are routed to agents who are presenting."""
    agents = make_agents(6)
    stack = await make_stack(agents, outbox_max_attempts=1, dead_letter_after_hours=0, **FAST)
    rt = stack.runtime
    rt.outbox.health.policy = BreakerPolicy(threshold=len(agents) + 1)  # let every row fail on its own
    stack.dataverse.fail_next(len(agents), 503, path="CCaaS_ModifyAgentPresence")
    for a in agents:
        stack.graph.set_user_state(a.entra_id, "DoNotDisturb", "Presenting")
    await settle(stack)
    dead = await rt.store.list_outbox(OutboxStatus.DEAD)
    assert len(dead) == len(agents), [(d.agent_id, d.status, d.last_error) for d in dead]
    assert [dyn(stack, a) for a in agents] == [AVAILABLE] * len(agents)
    summary = await rt.reconcile()
    assert summary.repaired == len(agents), summary.line()
    await settle(stack)
    assert [dyn(stack, a) for a in agents] == [DND] * len(agents)
    again = await rt.reconcile()
    assert again.in_sync == len(agents), again.line()
