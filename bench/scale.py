"""Issue 16, 50,000 agents on one instance: each goal's figure beside its baseline, measured in the
same run, on loopback (the emulators hold the agents; nothing leaves 127.0.0.1).

    python bench/scale.py [--agents 50000] [--burst 1000] [--skip-serve]

What is measured, and against what:

- set-up (``agents discover``, subscriptions) through the code the CLI runs, beside the raw paged
  read of ``systemusers`` from the Dataverse emulator;
- the first and a second start-up sweep (``Runtime.reconcile``): seconds, Graph reads
  (``getPresencesByUserId``, goal ceil(N/650)) and Dataverse pages, beside the raw reads alone (the
  same 650-id calls and the same paged query, nothing decided): the floor any sweep pays;
- a burst of ``--burst`` Dynamics changes over random agents: seconds until Teams shows every one
  (goal 30 s), and the most Graph requests in any 30 s (goal: inside 1,500);
- polling of the agents no subscription covers: the schedule's reads per 30 s beside Graph's budget,
  and its period (goal: each agent read at least once a minute);
- ``presence-sync serve`` as a process on the SQLite store the run built: seconds until ``/readyz``
  answers ready (goal 10 s) and its resident memory once ready and after its own sweep (goal 300 MB),
  beside a process that only imports the same modules;
- with ``--pg URL``: the burst again on PostgreSQL, served by one ``serve`` process and then by two
  behind a round-robin proxy (as a load balancer would spread Dataverse's webhooks and Graph's
  notifications), with the seconds until Teams shows the burst and the CPU each process used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web

from graph_sync.teams import MAX_IDS
from mapping.ratelimit import GRAPH_PRESENCE
from service.demo import demo_agents
from service.stack import SUBSCRIBER_TOKEN, TOKEN, LocalStack, free_port

BUSY = "efdeb843-c07a-e811-8162-000d3aa11f50"
ROOT = Path(__file__).resolve().parent.parent
IDLE_IMPORTS = "import service.app, service.runtime, service.cli, service.store.sql"


def say(line: str) -> None:
    print(line, flush=True)


def row(goal: str, figure: str, baseline: str, holds: bool | None) -> None:
    mark = "-" if holds is None else ("yes" if holds else "NO")
    say(f"  {goal:<44} {figure:<34} {baseline:<40} {mark}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def route_burst(stack: LocalStack, n: int) -> tuple[float, int]:
    """Routes ``n`` random agents (seeded) Busy in Dynamics and waits until Teams shows each in a call:
    the seconds it took (inf when some never showed within 120 s) and how many never showed."""
    chosen = random.Random(16).sample(stack.agents, min(n, len(stack.agents)))
    t0 = time.monotonic()
    for a in chosen:
        stack.dataverse.set_presence(a.dynamics_id, BUSY, "SYSTEM")
    waiting = list(chosen)

    def shown() -> bool:
        waiting[:] = [a for a in waiting if stack.graph.presence_of(a.entra_id) != ("Busy", "InACall")]
        return not waiting

    ok = await stack.until(shown, timeout=120, interval=0.1)
    return (time.monotonic() - t0 if ok else float("inf")), len(waiting)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busiest_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def raw_reads(stack: LocalStack) -> tuple[float, int, float, int]:
    """The floor: the sweep's Graph and Dataverse reads sent by hand, nothing decided."""
    ids = [a.entra_id for a in stack.agents]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        calls = 0
        for start in range(0, len(ids), MAX_IDS):
            async with http.post(
                f"{stack.graph.url}/communications/getPresencesByUserId",
                json={"ids": ids[start : start + MAX_IDS]},
                headers=headers,
            ) as r:
                await r.read()
                calls += 1
        graph_s = time.monotonic() - t0
        t0 = time.monotonic()
        pages = 0
        url: str | None = f"{stack.dataverse.url}/api/data/v9.2/msdyn_agentstatuses?$select=msdyn_agentstatusid"
        while url:
            async with http.get(url, headers=headers | {"Prefer": "odata.maxpagesize=5000"}) as r:
                body = await r.json()
            pages += 1
            url = body.get("@odata.nextLink")
        dv_s = time.monotonic() - t0
    return graph_s, calls, dv_s, pages


class Phases:
    """Timestamps of LocalStack's progress lines: the set-up steps, timed from outside."""

    def __init__(self, stack_counts: Callable[[], tuple[int, int]]) -> None:
        self.marks: list[tuple[str, float, tuple[int, int]]] = []
        self.counts = stack_counts

    def __call__(self, line: str) -> None:
        self.marks.append((line, time.monotonic(), self.counts()))
        say(f"  {time.strftime('%H:%M:%S')} {line.splitlines()[0][:150]}")

    def at(self, prefix: str, last: bool = False) -> tuple[float, tuple[int, int]]:
        found = [(t, c) for line, t, c in self.marks if line.startswith(prefix)]
        return found[-1] if last else found[0]


async def in_process(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    agents = demo_agents(args.agents)
    holder: dict[str, LocalStack] = {}

    def counts() -> tuple[int, int]:
        st = holder.get("stack")
        if st is None:
            return (0, 0)
        graph_reads = len(st.graph.calls("POST", "getPresencesByUserId"))
        dv_pages = sum(1 for c in st.dataverse.calls if "msdyn_agentstatuses" in c.path and c.method == "GET")
        return graph_reads, dv_pages

    phases = Phases(counts)
    t_start = time.monotonic()
    stack = LocalStack(
        folder,
        agents,
        progress=phases,
        overrides={"teams_write_hold_seconds": 0.0},
        graph_options={"log_limit": 1_000_000},
    )
    holder["stack"] = stack
    out: dict[str, Any] = {}
    await stack.start()
    try:
        t_disc0, _ = phases.at("dataverse register-webhook")
        t_disc1, _ = phases.at("agents discover")
        t_subs, c_subs = phases.at("graph subscriptions")
        t_sweep, c_sweep = phases.at("first reconcile: checked")
        out["setup_s"] = time.monotonic() - t_start
        out["discover_s"] = t_disc1 - t_disc0
        out["sweep_s"] = t_sweep - t_subs
        out["sweep_graph_reads"] = c_sweep[0] - c_subs[0]
        out["sweep_dv_pages"] = c_sweep[1] - c_subs[1]
        graph_s, calls, dv_s, pages = await raw_reads(stack)
        out |= {"raw_graph_s": graph_s, "raw_graph_calls": calls, "raw_dv_s": dv_s, "raw_dv_pages": pages}

        t0 = time.monotonic()
        again = await stack.runtime.reconcile()
        out["sweep2_s"] = time.monotonic() - t0
        out["sweep2"] = again.line()

        # The burst: random agents routed Busy in Dynamics; Teams must show every one.
        await stack.settle(timeout=max(60.0, args.agents / 200))
        mark = len(stack.graph.requests)
        sent_before = len(stack.dataverse.emissions)
        out["burst_s"], out["burst_missing"] = await route_burst(stack, args.burst)
        emitted = list(stack.dataverse.emissions)[sent_before:]
        answers = sorted(e.seconds for e in emitted)
        out["burst_webhook_p50"] = answers[len(answers) // 2] if answers else float("nan")
        out["burst_webhook_p99"] = answers[int(len(answers) * 0.99)] if answers else float("nan")
        out["burst_spooled"] = sum(1 for e in emitted if '"spooled"' in e.response)
        burst = list(stack.graph.requests)[mark:]
        out["burst_graph_requests"] = len(burst)
        out["busiest_30s"] = busiest_window([r.at.timestamp() for r in burst], 30.0) if burst else None

        subs = stack.runtime.subscriptions
        schedule = subs.schedule if subs is not None else None
        out["uncovered"] = len(await subs.uncovered()) if subs is not None else 0
        out["poll_chunks"] = schedule.chunks if schedule else 0
        out["poll_period"] = schedule.period if schedule else None
        out["poll_reads_30s"] = schedule.reads_per(30.0) if schedule else 0.0
        out["settings"] = {
            "graph_url": stack.graph.url,
            "dataverse_url": stack.dataverse.url,
            "client_id": stack.graph.client_id,
            "database_url": stack.database_url,
            "secret_key": stack.settings.secret_key,
        }
        out["rss_bench_mb"] = rss_mb(os.getpid())
    finally:
        # The emulators stay up for the serve process: only the in-process service stops.
        if stack.http is not None:
            await stack.http.close()
        if stack._runner is not None:
            await stack._runner.cleanup()
        await stack.runtime.close()
    out["stack"] = stack
    return out


def serve_process(folder: Path, s: dict[str, Any], agents: int) -> dict[str, Any]:
    """``presence-sync serve`` on the store the run built, against the same emulators (which keep
    answering on the bench's event loop while this runs in a thread)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_SYNC_")}
    env |= {
        "PRESENCE_SYNC_HOST": "127.0.0.1",
        "PRESENCE_SYNC_PORT": str(port),
        "PRESENCE_SYNC_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "PRESENCE_SYNC_DATABASE_URL": s["database_url"],
        "PRESENCE_SYNC_AUTH_MODE": "static",
        "PRESENCE_SYNC_STATIC_TOKEN": TOKEN,
        "PRESENCE_SYNC_STATIC_SUBSCRIBER_TOKENS": SUBSCRIBER_TOKEN,
        "PRESENCE_SYNC_GRAPH_URL": s["graph_url"],
        "PRESENCE_SYNC_CLIENT_ID": s["client_id"],
        "PRESENCE_SYNC_GRAPH_CLIENT_STATE": secrets.token_urlsafe(24),
        "PRESENCE_SYNC_DATAVERSE_URL": s["dataverse_url"],
        "PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY": secrets.token_urlsafe(24),
        "PRESENCE_SYNC_SECRET_KEY": s["secret_key"],
        "PRESENCE_SYNC_SPOOL_DIR": str(folder / "serve-spool"),
        "PRESENCE_SYNC_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    out: dict[str, Any] = {}
    idle = subprocess.Popen(
        [sys.executable, "-c", IDLE_IMPORTS + "; import time; print('ok', flush=True); time.sleep(60)"],
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        t0 = time.monotonic()
        assert idle.stdout is not None
        idle.stdout.readline()
        out["idle_import_s"] = time.monotonic() - t0
        out["idle_rss_mb"] = rss_mb(idle.pid)
    finally:
        idle.kill()
        idle.wait()
    log = (folder / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        t0 = time.monotonic()
        ready = None
        while time.monotonic() - t0 < 120 and proc.poll() is None:
            try:
                body = _get(f"http://127.0.0.1:{port}/readyz")
                if json.loads(body).get("status") == "ready":
                    ready = time.monotonic() - t0
                    break
            except OSError:
                pass
            time.sleep(0.1)
        out["ready_s"] = ready
        out["ready_rss_mb"] = rss_mb(proc.pid) if proc.poll() is None else None
        # Its own start-up sweep runs in the background (RECONCILE_INTERVAL_SECONDS, first after 1 s):
        # the resident memory is read again once it had time to read everyone.
        time.sleep(min(90.0, 10 + agents / 1000))
        out["later_rss_mb"] = rss_mb(proc.pid) if proc.poll() is None else None
        out["serve_cpu_s"] = cpu_seconds(proc.pid) if proc.poll() is None else None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return out


def _start_serve(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:  # loopback only
        return bytes(r.read())


class RoundRobin:
    """A loopback load balancer: every request to the next backend in turn."""

    def __init__(self) -> None:
        self.backends: Callable[[], list[int]] = lambda: []
        self._next = 0
        self.port = free_port()
        self._runner: aiohttp.web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = aiohttp.web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._http = aiohttp.ClientSession()

    async def _forward(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        ports = self.backends()
        if not ports or self._http is None:
            return aiohttp.web.Response(status=503)
        port = ports[self._next % len(ports)]
        self._next += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._http.request(
            request.method, f"http://127.0.0.1:{port}{request.path_qs}", headers=headers, data=await request.read()
        ) as r:
            body = await r.read()
            keep = {k: v for k, v in r.headers.items() if k.lower() == "content-type"}
            return aiohttp.web.Response(status=r.status, body=body, headers=keep)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()


async def instances_on_pg(args: argparse.Namespace, folder: Path, count: int) -> tuple[float, list[float]]:
    """The burst on PostgreSQL with ``count`` serve processes sharing one store (a schema of its
    own, dropped afterwards). Returns the seconds until Teams showed it and each process's CPU."""
    import asyncpg

    await asyncio.to_thread(folder.mkdir, parents=True)
    schema = f"ps_scale_{os.getpid()}_{secrets.token_hex(4)}"
    server = args.pg.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(server)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    proxy = RoundRobin()
    await proxy.start()
    key, state = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    stack = LocalStack(
        folder,
        demo_agents(args.agents),
        database_url=f"{args.pg}?schema={schema}",
        overrides={
            "public_url": f"http://127.0.0.1:{proxy.port}",
            "dataverse_webhook_key": key,
            "graph_client_state": state,
            "teams_write_hold_seconds": 0.0,
        },
        progress=lambda line: say(f"  [pg x{count}] {line.splitlines()[0][:140]}"),
    )
    proxy.backends = lambda: [stack.settings.port] if stack.settings is not None else []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await stack.start()
        settings = stack.settings
        if stack.http is not None:
            await stack.http.close()
        if stack._runner is not None:
            await stack._runner.cleanup()
        await stack.runtime.close()
        ports = [free_port() for _ in range(count)]
        for port in ports:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_SYNC_")} | {
                "PRESENCE_SYNC_HOST": "127.0.0.1",
                "PRESENCE_SYNC_PORT": str(port),
                "PRESENCE_SYNC_PUBLIC_URL": f"http://127.0.0.1:{proxy.port}",
                "PRESENCE_SYNC_DATABASE_URL": stack.database_url,
                "PRESENCE_SYNC_AUTH_MODE": "static",
                "PRESENCE_SYNC_STATIC_TOKEN": TOKEN,
                "PRESENCE_SYNC_STATIC_SUBSCRIBER_TOKENS": SUBSCRIBER_TOKEN,
                "PRESENCE_SYNC_GRAPH_URL": stack.graph.url,
                "PRESENCE_SYNC_CLIENT_ID": stack.graph.client_id,
                "PRESENCE_SYNC_GRAPH_CLIENT_STATE": state,
                "PRESENCE_SYNC_DATAVERSE_URL": stack.dataverse.url,
                "PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY": key,
                "PRESENCE_SYNC_SECRET_KEY": settings.secret_key,
                "PRESENCE_SYNC_SPOOL_DIR": str(folder / f"spool-{port}"),
                "PRESENCE_SYNC_RECONCILE_INTERVAL_SECONDS": "0",
                "PRESENCE_SYNC_TEAMS_WRITE_HOLD_SECONDS": "0",
                "PRESENCE_SYNC_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(ROOT),
            }
            procs.append(_start_serve(env, folder / f"serve-{port}.log"))
        proxy.backends = lambda: ports
        for port in ports:
            for _ in range(600):
                try:
                    if (
                        json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz"))["status"]
                        == "ready"
                    ):
                        break
                except (OSError, ValueError, KeyError):
                    pass
                await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # subscription upkeep and the first polls settle
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        seconds, _ = await route_burst(stack, args.burst)
        cpu = [cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
        return seconds, cpu
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for emu in (stack.connector, stack.graph, stack.dataverse):
            with contextlib.suppress(Exception):
                await emu.stop()
        await proxy.stop()
        conn = await asyncpg.connect(server)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def report(args: argparse.Namespace, a: dict[str, Any], s: dict[str, Any] | None) -> None:
    n = args.agents
    reads_goal = math.ceil(n / MAX_IDS)
    say("")
    say(f"issue 16 at {n} agents (goal figures are for 50,000)")
    say(f"  {'goal':<44} {'figure':<34} {'baseline (same run)':<40} holds")
    row(
        "agents discover",
        f"{a['discover_s']:.1f} s",
        f"raw paged read {a['raw_dv_s']:.2f} s ({a['raw_dv_pages']} pages)",
        None,
    )
    row(
        "start-up sweep within 60 s",
        f"{a['sweep_s']:.1f} s ({n / max(a['sweep_s'], 1e-9):.0f} agents/s)",
        f"raw reads {a['raw_graph_s'] + a['raw_dv_s']:.2f} s",
        a["sweep_s"] <= 60,
    )
    row(
        f"sweep Graph reads = ceil(N/650) = {reads_goal}",
        f"{a['sweep_graph_reads']} getPresencesByUserId",
        f"raw: {a['raw_graph_calls']} calls, {a['raw_graph_s']:.2f} s",
        a["sweep_graph_reads"] == reads_goal,
    )
    row("sweep Dataverse reads paged", f"{a['sweep_dv_pages']} page(s)", f"raw: {a['raw_dv_pages']} page(s)", None)
    row("second sweep (all known)", f"{a['sweep2_s']:.1f} s", a["sweep2"][:40], a["sweep2_s"] <= 60)
    row(
        f"burst of {args.burst} shown in Teams within 30 s",
        f"{a['burst_s']:.1f} s ({a['burst_missing']} missing)",
        f"{a['burst_graph_requests']} Graph requests meanwhile",
        a["burst_s"] <= 30,
    )
    row(
        "  Dynamics waits for each webhook's answer",
        f"p50 {a['burst_webhook_p50'] * 1000:.0f} ms, p99 {a['burst_webhook_p99'] * 1000:.0f} ms",
        f"{a['burst_spooled']} answered from the spool",
        None,
    )
    if a.get("busiest_30s") is not None:
        row(
            "inside 1,500 Graph requests per 30 s",
            f"busiest 30 s: {a['busiest_30s']}",
            f"Graph's limit {GRAPH_PRESENCE.requests}",
            a["busiest_30s"] <= GRAPH_PRESENCE.requests,
        )
    period = a["poll_period"]
    row(
        "uncovered agents polled within the budget",
        f"{a['uncovered']} polled, {a['poll_reads_30s']:.1f} reads/30 s",
        f"budget {GRAPH_PRESENCE.requests} per 30 s (shared)",
        a["poll_reads_30s"] <= GRAPH_PRESENCE.requests / 2,
    )
    row(
        "each polled agent read once a minute",
        f"every {period:g} s" if period else "-",
        f"{a['poll_chunks']} read(s) of 650 per period",
        period is not None and period <= 60,
    )
    if s is not None:
        ready = s.get("ready_s")
        row(
            "serve ready within 10 s",
            f"{ready:.1f} s" if ready is not None else "never",
            f"idle import {s['idle_import_s']:.1f} s",
            ready is not None and ready <= 10,
        )
        for key, what in (("ready_rss_mb", "once ready"), ("later_rss_mb", "after its sweep ran")):
            v = s.get(key)
            row(
                f"serve RSS at most 300 MB ({what})",
                f"{v:.0f} MB" if v is not None else "-",
                f"idle process, same imports: {s['idle_rss_mb']:.0f} MB",
                v is not None and v <= 300,
            )
        if s.get("serve_cpu_s") is not None:
            row("serve CPU used (ready + sweep window)", f"{s['serve_cpu_s']:.1f} s", "", None)
    say(f"  (bench process with the emulators: {a['rss_bench_mb']:.0f} MB; set-up in all {a['setup_s']:.1f} s)")


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=50_000)
    p.add_argument("--burst", type=int, default=1000)
    p.add_argument("--skip-serve", action="store_true", help="leave out the serve process (readiness, memory)")
    p.add_argument("--pg", metavar="URL", help="also compare one and two instances on this PostgreSQL server")
    p.add_argument("--pg-only", action="store_true", help="only the PostgreSQL comparison")
    args = p.parse_args()
    if args.pg_only and not args.pg:
        print("--pg-only needs --pg URL", file=sys.stderr)
        return 2
    if args.agents < 3:
        print("--agents must be at least 3", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="presence-sync-scale-") as tmp:
        folder = Path(tmp)
        if args.pg:
            runs = [await instances_on_pg(args, folder / f"pg{k}", k) for k in (1, 2)]
            say("")
            say(f"PostgreSQL, {args.agents} agents, burst of {args.burst} (reconcile off: the hot path only)")
            for k, (seconds, cpu) in zip((1, 2), runs, strict=True):
                shown = f"{seconds:.1f} s" if seconds != float("inf") else "not all shown within 120 s"
                say(
                    f"  {k} instance(s): burst shown in {shown}; CPU per process "
                    + ", ".join(f"{c:.1f} s" for c in cpu)
                )
            if args.pg_only:
                return 0
        a = await in_process(args, folder)
        stack: LocalStack = a.pop("stack")
        try:
            s = None if args.skip_serve else await asyncio.to_thread(serve_process, folder, a["settings"], args.agents)
        finally:
            for emu in (stack.connector, stack.graph, stack.dataverse):
                await emu.stop()
        report(args, a, s)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
