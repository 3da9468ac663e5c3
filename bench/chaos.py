"""Chaos bench (rule 7): upstream outages and kill -9 during delivery, against the emulators.

Scenarios, each on a fresh ``service.stack.LocalStack`` (the real service, SQLite store, Dataverse and
Graph emulators on loopback):
- ``graph-503``: Graph presence calls answer 503 for ``--outage-seconds`` while ``--rounds`` changes per
  agent arrive in Dynamics (each one a Teams session write);
- ``dataverse-503``: Dataverse ``CCaaS_ModifyAgentPresence`` answers 503 while the agents' own Teams
  states change (each one a Dynamics override write);
- ``graph-429``: Graph answers 429 with ``Retry-After: 5`` for the outage (``throttle_for``);
- ``kill-9``: ``presence-sync serve`` in a subprocess, SIGKILL while every row is in flight to Graph,
  restarted on the same port (the same owner: it takes its rows back at once);
- ``kill-9-takeover``: the same, but another instance (another owner) starts instead: it takes the
  rows over once the dead one's heartbeat is three intervals old.

Columns: changes made, agents, upstream calls during the outage (write attempts of the system that is
down), dead letters, agents converged, seconds from recovery (the fault lifted, or the restart) until
each agent shows what it should (median / p95 / max), and the baseline: one delivery with no fault, in
the same run. Bounded: every wait has ``--timeout``.

    python bench/chaos.py [--agents 100] [--rounds 3] [--outage-seconds 60] [--scenario ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script from anywhere: the repository root on the path.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.fernet import Fernet  # noqa: E402

from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND, DataverseEmulator  # noqa: E402
from emulators.graph import GraphEmulator  # noqa: E402
from mapping.clock import utcnow  # noqa: E402
from mapping.model import Agent, OutboxStatus, SetPresence, System  # noqa: E402
from service.stack import TOKEN, LocalStack, StackAgent, agent_ids, free_port  # noqa: E402
from service.store.sql import open_store  # noqa: E402

SCENARIOS = ("graph-503", "dataverse-503", "graph-429", "kill-9", "kill-9-takeover")
TEAMS_STATES = [("Busy", "InACall"), ("DoNotDisturb", "Presenting"), ("Away", "Away")]
ASKS = {"Busy": BUSY, "DoNotDisturb": DND, "Away": AWAY}
DYNAMICS_VALUES = [BUSY, DND, AWAY]
SESSION = {BUSY: "Busy/InACall", DND: "DoNotDisturb/Presenting", AWAY: "Away/Away"}


@dataclass
class Row:
    scenario: str
    changes: int
    agents: int
    calls: int | None
    dead: int
    converged: int
    seconds: list[float]
    baseline: float

    def cells(self) -> list[str]:
        s = sorted(self.seconds)

        def pct(p: float) -> str:
            return f"{s[min(len(s) - 1, int(p * len(s)))]:.2f}" if s else "-"

        median = f"{statistics.median(s):.2f}" if s else "-"
        return [
            self.scenario,
            str(self.changes),
            str(self.agents),
            "-" if self.calls is None else str(self.calls),
            str(self.dead),
            f"{self.converged}/{self.agents}",
            median,
            pct(0.95),
            f"{s[-1]:.2f}" if s else "-",
            f"{self.baseline:.3f}",
        ]


HEADER = ["scenario", "changes", "agents", "calls in outage", "dead", "converged", "median s", "p95 s", "max s"]
HEADER.append("baseline s")


def say(text: str) -> None:
    print(text, flush=True)


def agents_for(n: int) -> list[StackAgent]:
    return [StackAgent(f"Agent {i:03d}", *agent_ids(i), AVAILABLE, ("Available", "Available")) for i in range(1, n + 1)]


async def per_agent(agents: list[StackAgent], check: Callable[[StackAgent], bool], timeout: float) -> dict[str, float]:
    """Seconds from now until each agent first passes ``check`` (agents that never do are left out)."""
    started = time.monotonic()
    done: dict[str, float] = {}
    while len(done) < len(agents) and time.monotonic() - started < timeout:
        for a in agents:
            if a.name not in done and check(a):
                done[a.name] = time.monotonic() - started
        await asyncio.sleep(0.05)
    return done


def graph_writes(stack: LocalStack) -> int:
    return len(stack.graph.calls("POST", "/presence/"))


def dataverse_writes(stack: LocalStack) -> int:
    return sum(1 for c in list(stack.dataverse.calls) if "CCaaS_ModifyAgentPresence" in c.path)


def session_of(stack: LocalStack, a: StackAgent) -> str | None:
    for s in stack.graph.sessions_of(a.entra_id).values():
        return f"{s.availability}/{s.activity}"
    return None


async def baseline(stack: LocalStack, system: System, timeout: float) -> float:
    """One change, one delivery, no fault: seconds until the other system shows it."""
    a = stack.agents[0]
    started = time.monotonic()
    if system is System.TEAMS:
        stack.dataverse.set_presence(a.dynamics_id, BUSY, "AGENT")
        ok = await stack.until(lambda: session_of(stack, a) == "Busy/InACall", timeout=timeout, interval=0.005)
        seconds = time.monotonic() - started
        stack.dataverse.set_presence(a.dynamics_id, AVAILABLE, "AGENT")
        await stack.until(lambda: session_of(stack, a) is None, timeout=timeout)
    else:
        stack.graph.set_user_state(a.entra_id, "Busy", "InACall")
        ok = await stack.until(lambda: stack.dataverse.presence_of(a.dynamics_id) == BUSY, timeout=timeout)
        seconds = time.monotonic() - started
        stack.graph.set_user_state(a.entra_id, "Available", "Available")
        await stack.until(lambda: stack.dataverse.presence_of(a.dynamics_id) == AVAILABLE, timeout=timeout)
    await stack.settle(timeout)
    return seconds if ok else float("nan")


async def outage_scenario(name: str, args: argparse.Namespace, workdir: Path) -> Row:
    stack = LocalStack(workdir, agents_for(args.agents), overrides={"teams_write_hold_seconds": 0})
    await asyncio.wait_for(stack.start(), args.timeout)
    try:
        writes_teams = name != "dataverse-503"
        base = await baseline(stack, System.TEAMS if writes_teams else System.DYNAMICS, args.timeout)
        count = (lambda: graph_writes(stack)) if writes_teams else (lambda: dataverse_writes(stack))
        if name == "graph-503":
            stack.graph.fail_next(10**7, 503, retry_after=None, paths="/presence/")
        elif name == "graph-429":
            stack.graph.throttle_for(args.outage_seconds, retry_after=5)
        else:
            stack.dataverse.fail_next(10**7, 503, path="CCaaS_ModifyAgentPresence")
        before, started = count(), time.monotonic()
        for r in range(args.rounds):
            for a in stack.agents:
                i = r + int(a.name[-3:])
                if writes_teams:
                    stack.dataverse.set_presence(a.dynamics_id, DYNAMICS_VALUES[i % 3], "AGENT")
                else:
                    stack.graph.set_user_state(a.entra_id, *TEAMS_STATES[i % 3])
            await asyncio.sleep(max(0.0, started + args.outage_seconds * (r + 1) / args.rounds - time.monotonic()))
        await asyncio.sleep(max(0.0, started + args.outage_seconds - time.monotonic()))
        calls = count() - before
        if name == "graph-503":
            stack.graph.clear_faults()
        elif name == "dataverse-503":
            stack.dataverse.clear_faults()  # the upstream is back
        last = args.rounds - 1
        if writes_teams:
            want = {a.name: SESSION[DYNAMICS_VALUES[(last + int(a.name[-3:])) % 3]] for a in stack.agents}
            done = await per_agent(stack.agents, lambda a: session_of(stack, a) == want[a.name], args.timeout)
        else:
            want = {a.name: ASKS[TEAMS_STATES[(last + int(a.name[-3:])) % 3][0]] for a in stack.agents}
            done = await per_agent(
                stack.agents, lambda a: stack.dataverse.presence_of(a.dynamics_id) == want[a.name], args.timeout
            )
        await stack.settle(args.timeout)
        dead = len(await stack.runtime.store.list_outbox(OutboxStatus.DEAD, 100_000))
        changes = args.rounds * len(stack.agents)
        return Row(name, changes, len(stack.agents), calls, dead, len(done), list(done.values()), base)
    finally:
        await stack.stop()


async def kill9_scenario(args: argparse.Namespace, workdir: Path, *, same_owner: bool) -> Row:
    graph, dataverse = GraphEmulator(token=TOKEN), DataverseEmulator(token=TOKEN)
    await dataverse.start()
    await graph.start()
    agents = [Agent(*agent_ids(i), f"Agent {i:03d}") for i in range(1, args.agents + 1)]
    for a in agents:
        dataverse.add_agent(a.dynamics_user_id, a.entra_object_id, a.display_name, AVAILABLE, logged_in=True)
        graph.add_user(a.entra_object_id)
    url = f"sqlite+aiosqlite:///{workdir / 'store.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_SYNC_")} | {
        "PYTHONPATH": str(ROOT),
        "PRESENCE_SYNC_DATABASE_URL": url,
        "PRESENCE_SYNC_AUTH_MODE": "static",
        "PRESENCE_SYNC_STATIC_TOKEN": TOKEN,
        "PRESENCE_SYNC_GRAPH_URL": graph.url,
        "PRESENCE_SYNC_DATAVERSE_URL": dataverse.url,
        "PRESENCE_SYNC_RECONCILE_INTERVAL_SECONDS": "0",
        "PRESENCE_SYNC_SECRET_KEY": Fernet.generate_key().decode(),
        "PRESENCE_SYNC_LOG_LEVEL": "WARNING",
    }

    async def serve(port: int) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            env=env | {"PRESENCE_SYNC_PORT": str(port)},
            cwd=workdir,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def counts() -> dict[str, int]:
        store = await open_store(url, migrate=False)
        try:
            return await store.outbox_counts()
        finally:
            await store.close()

    async def until(check: Callable[[dict[str, int]], bool]) -> bool:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if check(await counts()):
                return True
            await asyncio.sleep(0.1)
        return False

    second: asyncio.subprocess.Process | None = None
    try:
        store = await open_store(url)
        try:
            await store.upsert_agents(agents)
            async with store.transaction() as tx:
                for a in agents:
                    await tx.enqueue(SetPresence(a.dynamics_user_id, System.TEAMS, "Busy/InACall", "chaos"), utcnow())
        finally:
            await store.close()
        graph.latency(12)  # below the writer's time-out: every row stays in flight until the kill
        port = free_port()
        first = await serve(port)
        await until(lambda c: c["in_flight"] >= min(len(agents), 64))
        first.send_signal(signal.SIGKILL)
        await first.wait()
        graph.latency(0)
        second = await serve(port if same_owner else free_port())  # the owner is host and port
        done = await per_agent(
            [StackAgent(a.display_name, a.dynamics_user_id, a.entra_object_id, AVAILABLE) for a in agents],
            lambda s: bool(graph.sessions_of(s.entra_id)),
            args.timeout,
        )
        dead = (await counts())["dead"]
        name = "kill-9" if same_owner else "kill-9-takeover"
        return Row(name, len(agents), len(agents), None, dead, len(done), list(done.values()), float("nan"))
    finally:
        if second is not None:
            second.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(second.wait(), 10)
            except TimeoutError:
                second.kill()
                await second.wait()
        await graph.stop()
        await dataverse.stop()


async def main_async(args: argparse.Namespace) -> int:
    rows: list[Row] = []
    for name in args.scenario:
        say(f"{name}: {args.agents} agents, {args.rounds} changes each, outage {args.outage_seconds:g} s ...")
        with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
            work = Path(tmp)
            if name.startswith("kill-9"):
                row = await kill9_scenario(args, work, same_owner=name == "kill-9")
            else:
                row = await outage_scenario(name, args, work)
        rows.append(row)
    table = [HEADER, *[r.cells() for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    say("")
    for line in table:
        say("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
    say("\nseconds: from recovery (fault lifted, or restart) until the agent shows what it should; baseline: one")
    say("delivery with no fault in the same run (kill-9: rows seeded before the first start, no baseline)")
    return 0 if all(r.dead == 0 and r.converged == r.agents for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="changes per agent during the outage")
    parser.add_argument("--outage-seconds", type=float, default=60.0)
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of every wait, seconds")
    args = parser.parse_args(argv)
    if args.agents < 1 or args.rounds < 1 or args.outage_seconds <= 0:
        parser.error("--agents and --rounds must be at least 1, --outage-seconds above 0")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
