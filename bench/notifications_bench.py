"""Graph notification intake: throughput and ack latency of ``POST /api/graph/notifications``.

What is measured: the real ``GraphIntake`` route on a real aiohttp server on a free loopback port, on
a SQLite store (``service.store.open_store``, a temporary file, WAL, as in production), for

- **rich** notifications (``encryptedContent`` + a ``validationTokens`` JWT per request, freshly
  signed each time so the token cache never helps): JWT check against a served JWKS, RSA-OAEP +
  HMAC + AES decryption, directory lookup, ``engine.observe_many`` (the request's items in one
  committed transaction per 128, with the resulting Dynamics commands enqueued) and only then 202;
- **basic** notifications (no content): directory lookup and the durable pending-read note, then
  202 (the background batcher's reads run in the same process, as in production, against an
  in-process reader);

each beside a **raw aiohttp relay** measured in the same run on the same bodies: a handler that reads
the body, parses the JSON and answers 202, i.e. the floor any aiohttp endpoint pays here.

The load generator runs in a separate process (so its CPU does not inflate the server's latency);
latencies are measured client-side (request sent -> 202 read) and server-side (``ack.*`` timing).
Bounded: ``--requests`` per scenario and ``--timeout`` seconds overall.

    python bench/notifications_bench.py [--requests 1000] [--items 1] [--concurrency 8] [--agents 2000]
                                        [--timeout 300]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from emulators.serving import serve_app

# Run as a script from anywhere: the repository root on the path (the editable install predates
# graph_sync/ and emulators/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulators.graph_crypto import SigningKey, encrypt_for_certificate, generate_certificate, sign_validation_token
from graph_sync.crypto import Decryptor
from graph_sync.notifications import GraphIntake
from mapping.bridge import Bridge
from mapping.catalogue import Catalogue
from mapping.clock import utcnow
from mapping.model import OOB_PRESENCE_IDS, Agent, BasePresence, Presence, PresenceObserved, System
from mapping.translation import Rules

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TENANT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
CLIENT_STATE = "bench-client-state"
VALUES = [("Busy", "InACall"), ("Available", "Available"), ("DoNotDisturb", "Presenting"), ("Away", "Away")]
CATALOGUE = [Presence(OOB_PRESENCE_IDS[b], b.label, b) for b in BasePresence]


def say(text: str) -> None:
    print(text, flush=True)


class Timings:
    """Telemetry that keeps the server-side ack timings."""

    def __init__(self) -> None:
        self.acks: list[float] = []
        self.rejections: dict[str, int] = {}

    def event(self, source: str, result: str) -> None:
        pass

    def rejected(self, route: str, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def delivery(self, system: str, result: str, seconds: float) -> None:
        pass

    def latency(self, name: str, seconds: float) -> None:
        if name == "ack.graph_notifications":
            self.acks.append(seconds)


class InProcessReader:
    """Stands in for Graph in the basic scenario: what the batcher reads costs no network."""

    system = System.TEAMS

    async def read(self, agents: Sequence[Agent]) -> list[PresenceObserved]:
        now = utcnow()
        return [
            PresenceObserved(a.dynamics_user_id, System.TEAMS, "Available/Available", now, None, None, "reconcile")
            for a in agents
        ]


def make_agents(n: int) -> list[Agent]:
    return [
        Agent(f"{i:08x}-0000-4000-8000-00000000d000", f"{i:08x}-0000-4000-8000-00000000e000", f"Agent {i}")
        for i in range(n)
    ]


def rich_bodies(
    args: argparse.Namespace, agents: list[Agent], cert_pem: bytes, cert_id: str, key: SigningKey
) -> list[bytes]:
    bodies = []
    for r in range(args.requests):
        items = []
        for k in range(args.items):
            n = r * args.items + k
            agent = agents[n % len(agents)]
            availability, activity = VALUES[(n // len(agents)) % len(VALUES)]
            uid = agent.entra_object_id
            payload = {
                "@odata.type": "#Microsoft.Graph.presence",
                "id": uid,
                "availability": availability,
                "activity": activity,
            }
            items.append(
                {
                    "subscriptionId": "bench",
                    "clientState": CLIENT_STATE,
                    "changeType": "updated",
                    "resource": f"communications/presences('{uid}')",
                    "tenantId": TENANT_ID,
                    "resourceData": {"@odata.type": "#Microsoft.Graph.presence", "id": uid},
                    "encryptedContent": encrypt_for_certificate(cert_pem, payload, certificate_id=cert_id),
                }
            )
        token = sign_validation_token(key, client_id=CLIENT_ID, tenant_id=TENANT_ID)
        bodies.append(json.dumps({"value": items, "validationTokens": [token]}).encode())
    return bodies


def basic_bodies(args: argparse.Namespace, agents: list[Agent]) -> list[bytes]:
    bodies = []
    for r in range(args.requests):
        items = []
        for k in range(args.items):
            uid = agents[(r * args.items + k) % len(agents)].entra_object_id
            items.append(
                {
                    "subscriptionId": "bench",
                    "clientState": CLIENT_STATE,
                    "changeType": "updated",
                    "resource": f"communications/presences('{uid}')",
                    "tenantId": TENANT_ID,
                    "resourceData": {"@odata.type": "#Microsoft.Graph.presence", "id": uid},
                }
            )
        bodies.append(json.dumps({"value": items}).encode())
    return bodies


# ------------------------------------------------------------------ load generator (child process)


def run_client(
    url: str, bodies: list[bytes], concurrency: int, timeout: float
) -> tuple[list[float], dict[int, int], float]:
    """Posts every body with ``concurrency`` requests in flight; returns latencies, statuses, wall time."""
    return asyncio.run(_client(url, bodies, concurrency, timeout))


async def _client(
    url: str, bodies: list[bytes], concurrency: int, timeout: float
) -> tuple[list[float], dict[int, int], float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = list(reversed(bodies))
    headers = {"Content-Type": "application/json; charset=utf-8"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    latencies.append(time.perf_counter() - started)
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout)
        wall = time.perf_counter() - started
    return latencies, statuses, wall


# ------------------------------------------------------------------ servers


async def relay(request: web.Request) -> web.Response:
    """The baseline: what any aiohttp endpoint taking a JSON body costs, and nothing more."""
    json.loads(await request.read())
    return web.Response(status=202)


def crypto_relay(decryptor: Decryptor) -> Any:
    """The rich baseline: the relay plus each item's decryption (RSA-OAEP unwrap of the key, HMAC
    check, AES decryption), the crypto floor no rich intake can go below."""

    async def handler(request: web.Request) -> web.Response:
        for item in json.loads(await request.read()).get("value", []):
            decryptor.decrypt(item["encryptedContent"])
        return web.Response(status=202)

    return handler


GOALS = {"intake rich": ("crypto relay (rich bodies)", 0.5), "intake basic": ("relay (basic bodies)", 0.5)}
"""Issue 16: each intake's item rate at least this fraction of its baseline's, in the same run."""


def goal_lines(rows: list[Row]) -> list[str]:
    by = {r.scenario: r for r in rows}
    out = []
    for name, (base_name, goal) in GOALS.items():
        mine, base = by.get(name), by.get(base_name)
        if mine is None or base is None:
            continue
        rate = mine.items * mine.statuses.get(202, 0) / mine.wall
        floor = base.items * base.statuses.get(202, 0) / base.wall
        ratio = rate / floor if floor else 0.0
        out.append(
            f"goal {name}: {rate:.0f} items/s beside {base_name} {floor:.0f} items/s = {ratio:.3f}x "
            f"(goal >= {goal}x: {'met' if ratio >= goal else 'not met'})"
        )
    return out


@dataclass
class Row:
    scenario: str
    requests: int
    items: int
    wall: float
    latencies: list[float]
    statuses: dict[int, int]
    server: list[float]

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    def line(self) -> str:
        ok = self.statuses.get(202, 0)
        rate = self.items * ok / self.wall if self.wall else 0.0
        server = (
            f"{self.pct(self.server, 0.5):7.2f} {self.pct(self.server, 0.99):7.2f}"
            if self.server
            else f"{'-':>7} {'-':>7}"
        )
        others = ",".join(f"{s}:{n}" for s, n in sorted(self.statuses.items()) if s != 202) or "-"
        return (
            f"{self.scenario:<28} {self.requests:>6} {self.items:>5} {rate:>10.0f} "
            f"{self.pct(self.latencies, 0.5):7.2f} {self.pct(self.latencies, 0.99):7.2f} "
            f"{max(self.latencies) * 1000 if self.latencies else 0:7.2f} {server} {others:>8}"
        )


async def scenario(
    pool: concurrent.futures.ProcessPoolExecutor,
    name: str,
    url: str,
    bodies: list[bytes],
    args: argparse.Namespace,
    timings: Timings | None,
) -> Row:
    loop = asyncio.get_running_loop()
    if timings is not None:
        timings.acks.clear()
    latencies, statuses, wall = await loop.run_in_executor(
        pool, run_client, url, bodies, args.concurrency, args.timeout
    )
    server = list(timings.acks) if timings is not None else []
    row = Row(name, len(bodies), args.items, wall, latencies, statuses, server)
    say(f"  {name}: {len(latencies)} requests in {wall:.2f} s")
    return row


async def main_async(args: argparse.Namespace) -> int:
    try:
        from service.store.sql import open_store
    except ImportError:  # pragma: no cover - the SQL store is part of the project
        open_store = None  # type: ignore[assignment]
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory() as tmp:
        if open_store is not None:
            store: Any = await open_store(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}")
            store_name = "sqlite (WAL, temp file)"
        else:
            from mapping.memory import MemoryStore

            store = MemoryStore()
            store_name = "memory"
        timings = Timings()
        catalogue = Catalogue(CATALOGUE)
        rules = Rules()
        bridge = Bridge.assemble(store, catalogue, rules, {}, telemetry=timings, limiters={})
        agents = make_agents(args.agents)
        await store.replace_presences(CATALOGUE)
        for start in range(0, len(agents), 500):
            await store.upsert_agents(agents[start : start + 500])

        cert_pem, key_pem = generate_certificate("bench-notifications")
        decryptor = Decryptor(cert_pem, key_pem)
        signing = SigningKey()
        jwks_app = web.Application()

        async def keys(_request: web.Request) -> web.Response:
            return web.json_response(signing.jwks())

        jwks_app.router.add_get("/keys", keys)
        jwks_runner, jwks_base = await serve_app(jwks_app)

        intake = GraphIntake(
            bridge,
            client_state=CLIENT_STATE,
            client_id=CLIENT_ID,
            jwks_url=f"{jwks_base}/keys",
            decryptor=decryptor,
            reader=InProcessReader(),
            subscriptions=None,
            tenant_id=TENANT_ID,
            read_interval=0.2,
        )
        app = web.Application()
        app.add_routes(intake.routes())
        app_runner, base = await serve_app(app)
        relay_app = web.Application(client_max_size=2 * 1024 * 1024)
        relay_app.router.add_post("/relay", relay)
        relay_app.router.add_post("/crypto", crypto_relay(decryptor))
        relay_runner, relay_base = await serve_app(relay_app)
        await intake.start()

        say(f"preparing {args.requests} rich and {args.requests} basic requests of {args.items} item(s) ...")
        rich = rich_bodies(args, agents, cert_pem, decryptor.certificate_id, signing)
        basic = basic_bodies(args, agents)
        rows: list[Row] = []
        try:
            with concurrent.futures.ProcessPoolExecutor(1) as pool:
                # Warm-up: JWKS fetch, code paths, the child's interpreter.
                await scenario(pool, "warm-up", f"{base}/api/graph/notifications", rich[:20], args, timings)
                for name, url, bodies, timed in (
                    ("relay (rich bodies)", f"{relay_base}/relay", rich, None),
                    ("crypto relay (rich bodies)", f"{relay_base}/crypto", rich, None),
                    ("intake rich", f"{base}/api/graph/notifications", rich, timings),
                    ("relay (basic bodies)", f"{relay_base}/relay", basic, None),
                    ("intake basic", f"{base}/api/graph/notifications", basic, timings),
                ):
                    if time.monotonic() > deadline:
                        say(f"timeout: skipped {name}")
                        continue
                    rows.append(await scenario(pool, name, url, bodies, args, timed))
            try:  # let the batcher finish the basic run's reads before the store closes
                await intake.wait_idle(timeout=max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                say("timeout: pending reads of the basic run not finished")
        finally:
            await intake.stop()
            for runner in (app_runner, relay_runner, jwks_runner):
                await runner.cleanup()
            counts = await store.outbox_counts()
            await store.close()

    say("")
    say(f"store: {store_name}; concurrency {args.concurrency}; {args.agents} agents; python {sys.version.split()[0]}")
    say(
        f"{'scenario':<28} {'reqs':>6} {'items':>5} {'items/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'srv p50':>7} {'srv p99':>7} {'non-202':>8}"
    )
    for row in rows:
        say(row.line())
    say("")
    say("p50/p99/max: client-side, request sent -> 202 read; srv: the route's own ack time (telemetry).")
    say(f"commands enqueued by the rich run (outbox): {counts}; rejections: {timings.rejections or 'none'}")
    for line in goal_lines(rows):
        say(line)
    if rows:
        ok = all(set(r.statuses) == {202} for r in rows)
        p99 = max((r.pct(r.latencies, 0.99) for r in rows if r.scenario.startswith("intake")), default=0.0)
        say(f"all 202: {ok}; worst intake p99 {p99:.1f} ms (Graph's deadline: 3000 ms; target 50 ms)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per scenario (default 1000)")
    parser.add_argument("--items", type=int, default=1, help="notifications per request (default 1)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--agents", type=int, default=2000, help="agents in the directory (default 2000)")
    parser.add_argument("--timeout", type=float, default=300.0, help="overall bound in seconds (default 300)")
    args = parser.parse_args(argv)
    if min(args.requests, args.items, args.concurrency, args.agents) < 1:
        parser.error("--requests, --items, --concurrency and --agents must be positive")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
