"""Scenario tests across real HTTP: the Dataverse, Graph and Bot Connector emulators and the real
service (``service.stack.LocalStack``), changed the way the real systems change and read back
the way a person would look at them.

Everything here is bounded: every test runs inside ``bounded(seconds)``, the stack starts within
``START_SECONDS`` and is always stopped, and every wait is a ``stack.until``/``settle`` with a
timeout. Sleeps appear only to pace random events and to watch that nothing more is written
(``quiet_for``): no sync rule waits out a time window (version 2 has none), so a scenario that needs
one step to come after another settles in between.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from emulators.dataverse import AVAILABLE
from emulators.graph import AVAILABILITY_RANK
from mapping.model import CLEAR
from service.stack import LocalStack, StackAgent, agent_ids

START_SECONDS = 90.0
"""Start-up does migrations, discovery, subscriptions with their validation handshake and a first
reconcile; on a loaded machine that has been seen to take 10 s."""

PENDING_READS = "graph.pending_read"
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def bounded(seconds: float) -> Callable[[F], F]:
    """Fails the test (instead of hanging the run) when its body takes longer than ``seconds``."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            try:
                async with asyncio.timeout(seconds):
                    return await fn(*args, **kwargs)
            except TimeoutError:
                pytest.fail(f"{fn.__name__} did not finish within {seconds:g} s")

        return run  # type: ignore[return-value]

    return wrap


def make_agents(
    n: int, presence: str = AVAILABLE, own: tuple[str, str] = ("Available", "Available"), first: int = 1
) -> list[StackAgent]:
    return [StackAgent(f"Agent {i:02d}", *agent_ids(i), presence, own) for i in range(first, first + n)]


StackFactory = Callable[..., Awaitable[LocalStack]]


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """``await make_stack(agents, **overrides)``: a started LocalStack in ``tmp_path``, stopped after
    the test whatever happened."""
    stacks: list[LocalStack] = []

    async def build(agents: Sequence[StackAgent] | None = None, **overrides: Any) -> LocalStack:
        folder = tmp_path / f"stack{len(stacks)}"
        folder.mkdir()
        stack = LocalStack(folder, list(agents) if agents is not None else make_agents(3), overrides=overrides)
        stacks.append(stack)
        async with asyncio.timeout(START_SECONDS):
            await stack.start()
        await settle(stack)
        return stack

    yield build
    for stack in reversed(stacks):
        async with asyncio.timeout(30):
            await stack.stop()


# ---------------------------------------------------------------------------------------- waiting


async def settle(stack: LocalStack, timeout: float = 30.0) -> None:
    """``stack.settle()`` plus the Graph intake's pending reads (basic notifications are read after
    they are answered, and ``LocalStack.settle`` does not wait for those reads): until the emulators,
    both intakes and the outbox are all quiet at once."""
    rt = stack.runtime
    async with asyncio.timeout(timeout):
        while True:
            await stack.settle(timeout)
            await rt.graph_intake.wait_idle(timeout)
            await stack.settle(timeout)
            if not await rt.store.list_docs(PENDING_READS):
                counts = await rt.store.outbox_counts()
                if counts.get("pending", 0) + counts.get("in_flight", 0) == 0:
                    return


async def expect(
    stack: LocalStack, what: str, check: Callable[[], Any], seen: Callable[[], Any], timeout: float = 15.0
) -> None:
    ok = await stack.until(check, timeout=timeout)
    assert ok, f"{what}: not within {timeout:g} s; seen {seen()!r}"


# ---------------------------------------------------------------------------------------- reading


def session(stack: LocalStack, agent: StackAgent) -> str | None:
    """The bridge's own Teams presence session (``Availability/Activity``), None when it has none."""
    sessions = stack.graph.sessions_of(agent.entra_id)
    assert len(sessions) <= 1, f"more than one app session for {agent.name}: {sessions}"
    for s in sessions.values():
        return f"{s.availability}/{s.activity}"
    return None


def teams(stack: LocalStack, agent: StackAgent) -> str:
    """What Teams shows (Graph's aggregate of the person's own state and the bridge's session)."""
    return "/".join(stack.graph.presence_of(agent.entra_id))


def own(stack: LocalStack, agent: StackAgent) -> str:
    return "/".join(stack.graph.own_state_of(agent.entra_id))


def dyn(stack: LocalStack, agent: StackAgent) -> str | None:
    return stack.dataverse.presence_of(agent.dynamics_id)


def translation(stack: LocalStack, presence_id: str) -> str | None:
    """Rule 2, Dynamics -> Teams: the bridge session a Dynamics presence calls for (None: cleared)."""
    presence = stack.runtime.bridge.catalogue.get(presence_id)
    assert presence is not None, f"{presence_id} not in the catalogue"
    target = stack.runtime.bridge.rules.teams_for(presence.base)
    return None if target in (None, CLEAR) else str(target)


def aggregate(own_state: str, bridge_session: str | None) -> str:
    """What Teams must show: the strongest of the person's own state and the bridge's session
    (DoNotDisturb > Busy > Available > Away); an Offline own state is no session at all; on a tie
    the person's own client wins (the emulator's documented choice)."""
    availability = own_state.split("/")[0]
    if bridge_session is None:
        return own_state
    if availability in ("Offline", "PresenceUnknown"):
        return bridge_session
    if AVAILABILITY_RANK[bridge_session.split("/")[0]] > AVAILABILITY_RANK[availability]:
        return bridge_session
    return own_state


def dynamics_writes(stack: LocalStack, agent: StackAgent | None = None) -> int:
    """Accepted ``CCaaS_ModifyAgentPresence`` calls (for one agent: impersonating it)."""
    return sum(
        1
        for c in list(stack.dataverse.calls)
        if "CCaaS_ModifyAgentPresence" in c.path
        and c.status < 300
        and (agent is None or (c.caller or "").lower() == agent.dynamics_id)
    )


def teams_reads(stack: LocalStack, agent: StackAgent) -> int:
    """Accepted ``getPresencesByUserId`` calls that asked for ``agent`` (the bridge reading Teams:
    after a basic notification, after a session write landed over what Teams showed, a sweep)."""
    return sum(
        1
        for r in stack.graph.calls("POST", "getPresencesByUserId")
        if r.status < 300
        and isinstance(r.body, dict)
        and agent.entra_id in [str(i).lower() for i in r.body.get("ids") or []]
    )


BASE_CODES = {192360000: "Available", 192360001: "Busy", 192360002: "Busy DND", 192360003: "Away", 192360004: "Offline"}
"""Dataverse's ``msdyn_basepresencestatus`` option values, named the way ``tests.reference_model`` names
bases."""


def presence_bases(stack: LocalStack) -> dict[str, str]:
    """Every presence id of the emulator's catalogue -> its base name (custom presences included: the
    reference model knows only the out-of-the-box ones), read from the emulator, not from the bridge."""
    rows = stack.dataverse.tables["msdyn_presences"].rows
    return {
        pid: BASE_CODES[int(row["msdyn_basepresencestatus"])]
        for pid, row in rows.items()
        if int(row.get("msdyn_basepresencestatus", -1)) in BASE_CODES
    }


def upstream_writes(stack: LocalStack) -> tuple[int, int]:
    return stack.teams_writes(), dynamics_writes(stack)


def graph_refusals(stack: LocalStack, since: int = 0) -> list[int | None]:
    """Notification POSTs the service refused or never answered, for good: an HTTP error answer, or a
    POST that went unanswered and that Graph's own retry did not deliver either. (An attempt that a
    loaded test machine did not answer within Graph's 3 s, redelivered and answered 202, lost
    nothing; counting it would make the check a timing assertion.)"""
    sent = stack.graph.notifications_sent[since:]
    delivered = {id(d.body) for d in sent if d.status == 202}
    return [d.status for d in sent if d.status != 202 and (d.status is not None or id(d.body) not in delivered)]


async def metrics(stack: LocalStack) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}`` (labels sorted as Prometheus prints them)."""
    assert stack.http is not None
    async with stack.http.get("/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


async def events(stack: LocalStack, result: str, source: str | None = None) -> float:
    labels = {"result": result} | ({"source": source} if source else {})
    return metric(await metrics(stack), "presence_sync_events_total", **labels)


async def quiet_for(stack: LocalStack, seconds: float) -> tuple[int, int]:
    """Watches the upstream write counters for ``seconds`` after settling; returns how many Teams and
    Dynamics writes happened meanwhile (two systems that ping-pong never stop writing)."""
    await settle(stack)
    before = upstream_writes(stack)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if upstream_writes(stack) != before:
            break
    await settle(stack)
    after = upstream_writes(stack)
    return after[0] - before[0], after[1] - before[1]
