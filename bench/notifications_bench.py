"""Graph notification intake: throughput, CPU and ack latency of ``POST /api/graph/notifications``.

What is measured: the real ``GraphIntake`` route on a real aiohttp server on a free loopback port, on
a SQLite store (``service.store.open_store``, a temporary file, WAL, as in production), for

- **rich** notifications (``encryptedContent`` + ``validationTokens``): token check against a served
  JWKS, RSA-OAEP + HMAC + AES decryption, directory lookup, ``engine.observe_many`` (the commands it
  causes enqueued in the same transaction) and only then 202. Each round's bodies carry new presence
  values, so every observation is a change the core has to decide and write. Two rows: **agents
  first seen** (the intake's directory memory emptied before and every item a new agent, as long as
  ``--requests`` x ``--items`` <= ``--agents``, as when a shift starts: the first ``LIST_AFTER`` ask
  the store who their Entra id is, one by one, and one listing of the directory serves the rest) and
  **agents seen** (the same agents again, within ``AGENT_TTL``, as in a burst);
- **basic** notifications (no content): the durable pending-read note, then 202. The notes are read
  (``read_pending``: a Graph read, here an in-process reader, and an observation per user) in two
  ways, two rows: **reads after the run** (the batcher not running: the row is the answers' own
  cost, and ``+reads`` adds reading every note afterwards, in one round) and **reads during the
  run** (the batcher running, woken by each note, as in production: its CPU during the run is in the
  row's, and ``+reads`` adds what it still had to read after).

Baselines, in the same run on the same bodies: a **relay** (reads the body, parses the JSON, answers
202: the floor of any aiohttp endpoint here) and, for rich bodies, a **crypto relay**: what a minimal
correct receiver must do per request, i.e. the relay plus each distinct validation token verified
(RS256 with the key its ``kid`` names, ``aud``, ``azp``) and remembered by its exact text until its
``exp`` (a correct receiver may: the signature covers that text), plus each item decrypted. For basic
bodies also a **durable floor** (``bench/durable_floor.py``): the relay plus one small row per item
(its resource) committed before the 202, requests arriving together sharing one commit, on SQLite as
the store: the least any receiver pays that answers only once the read it owes is durable, as the
basic intake's pending-read note is.

Tokens: a token (one per app and tenant in a batch) lives about an hour and Graph sends the same one
on many batches, so by default every request carries the run's one token, and both the intake and the
crypto relay verify it once per run. ``--distinct-tokens`` gives each request a token of its own (a
``jti``), the worst case: both then verify one token per request.

The load generator runs in a separate process. Each scenario runs ``--rounds`` times; the table shows
medians: items/s (wall), **CPU us per item of the server process** (``time.process_time``; the
generator's CPU is not in it: on a shared 2-core machine this is the steadier figure), and latencies
(client-side: request sent -> 202 read; srv: the route's own ack time).

Two more rows give the intake's own part over HTTP, its ceiling: the rich "agents seen" run again
with the core's ``observe``/``observe_many`` a no-op, and the basic run with the note's ``put_docs``
a no-op (nothing stored, nothing to read).

Last, **in-process**: the route called directly (no HTTP, no client, the batcher stopped), 8 at a
time, CPU per item: in full, with the core's part replaced by a no-op (``observe``/``observe_many``
for rich, the note's ``put_docs`` for basic; the agents' directory entries held), and the crypto
floor (token check + decryption of each item) alone: the intake's own part and its ceiling, apart
from the core's.

    python bench/notifications_bench.py [--requests 1000] [--items 1] [--concurrency 8] [--agents 2000]
                                        [--rounds 3] [--distinct-tokens] [--timeout 600]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from multidict import CIMultiDict, MultiDict

# Run as a script from anywhere: the repository root on the path (the editable install predates
# graph_sync/ and emulators/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from durable_floor import sqlite_floor

from emulators.graph_crypto import SigningKey, encrypt_for_certificate, generate_certificate, sign_validation_token
from emulators.serving import serve_app
from graph_sync.crypto import Decryptor
from graph_sync.notifications import GRAPH_CHANGE_TRACKING_APP_ID, PENDING_KIND, GraphIntake
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
INTAKE_PATH = "/api/graph/notifications"


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


# ------------------------------------------------------------------ bodies


@dataclass
class Crypto:
    cert_pem: bytes
    decryptor: Decryptor
    signing: SigningKey


def make_token(args: argparse.Namespace, crypto: Crypto, shared: list[str]) -> str:
    """The request's validation token: the run's one token (as Graph reuses it), or one of its own."""
    if args.distinct_tokens:
        return sign_validation_token(
            crypto.signing, client_id=CLIENT_ID, tenant_id=TENANT_ID, extra_claims={"jti": uuid.uuid4().hex}
        )
    if not shared:
        shared.append(sign_validation_token(crypto.signing, client_id=CLIENT_ID, tenant_id=TENANT_ID))
    return shared[0]


def rich_bodies(
    args: argparse.Namespace, agents: list[Agent], crypto: Crypto, shift: int, shared: list[str]
) -> list[bytes]:
    """One set of rich requests; ``shift`` picks the presence values, so each set changes every agent."""
    bodies = []
    for r in range(args.requests):
        items = []
        for k in range(args.items):
            n = r * args.items + k
            agent = agents[n % len(agents)]
            availability, activity = VALUES[(shift + n // len(agents)) % len(VALUES)]
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
                    "encryptedContent": encrypt_for_certificate(
                        crypto.cert_pem, payload, certificate_id=crypto.decryptor.certificate_id
                    ),
                }
            )
        token = make_token(args, crypto, shared)
        bodies.append(json.dumps({"value": items, "validationTokens": [token]}).encode())
    return bodies


def floor_rows(body: Any) -> list[tuple[str, str]]:
    """The durable floor's rows of a basic body: each item's resource, as the pending-read note."""
    return [(str(item["resource"]), str(item["changeType"])) for item in body["value"]]


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


# ------------------------------------------------------------------ baselines


class MinimalTokenCheck:
    """What a minimal correct receiver does with ``validationTokens``: RS256 with the JWKS key the
    token's ``kid`` names, ``aud`` = the app, ``azp``/``appid`` = Graph's change tracking, not
    expired; a token verified before is taken from memory, by its exact text, until its ``exp``."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.keys = {k.key_id: k.key for k in jwt.PyJWKSet.from_dict(jwks).keys}
        self.verified: dict[str, float] = {}

    def check(self, token: str) -> None:
        exp = self.verified.get(token)
        if exp is not None and exp > time.time():
            return
        key = self.keys[jwt.get_unverified_header(token)["kid"]]
        claims = jwt.decode(token, key, algorithms=["RS256"], audience=CLIENT_ID, options={"require": ["exp", "aud"]})
        if (claims.get("azp") or claims.get("appid")) != GRAPH_CHANGE_TRACKING_APP_ID:
            raise ValueError("not Graph change tracking")
        self.verified[token] = float(claims["exp"])


async def relay(request: web.Request) -> web.Response:
    """The baseline: what any aiohttp endpoint taking a JSON body costs, and nothing more."""
    json.loads(await request.read())
    return web.Response(status=202)


def crypto_relay(decryptor: Decryptor, tokens: MinimalTokenCheck) -> Any:
    """The rich baseline: the relay plus what a minimal correct receiver must do (see the module doc)."""

    async def handler(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        for token in body.get("validationTokens", []):
            tokens.check(token)
        for item in body.get("value", []):
            decryptor.decrypt(item["encryptedContent"])
        return web.Response(status=202)

    return handler


# ------------------------------------------------------------------ scenarios


@dataclass
class Run:
    """One scenario's round: what the generator saw and what the server spent."""

    items: int
    wall: float
    latencies: list[float]
    statuses: dict[int, int]
    server: list[float]
    cpu: float
    cpu_after: float = 0.0

    @property
    def rate(self) -> float:
        return self.items * self.statuses.get(202, 0) / self.wall if self.wall else 0.0


@dataclass
class Row:
    scenario: str
    requests: int
    items: int
    runs: list[Run] = field(default_factory=list)

    def median(self, pick: Callable[[Run], float]) -> float:
        return statistics.median(pick(r) for r in self.runs) if self.runs else float("nan")

    @property
    def rate(self) -> float:
        return self.median(lambda r: r.rate)

    @property
    def cpu_us(self) -> float:
        return self.median(lambda r: r.cpu / (r.items * self.requests) * 1e6)

    @property
    def cpu_after_us(self) -> float:
        return self.median(lambda r: (r.cpu + r.cpu_after) / (r.items * self.requests) * 1e6)

    def line(self) -> str:
        def pct(pick: Callable[[Run], list[float]], q: float) -> float:
            values = [pct_of(pick(r), q) for r in self.runs if pick(r)]
            return statistics.median(values) * 1000 if values else float("nan")

        srv = (
            f"{pct(lambda r: r.server, 0.5):7.2f} {pct(lambda r: r.server, 0.99):7.2f}"
            if any(r.server for r in self.runs)
            else f"{'-':>7} {'-':>7}"
        )
        statuses: dict[int, int] = {}
        for r in self.runs:
            for s, n in r.statuses.items():
                statuses[s] = statuses.get(s, 0) + n
        others = ",".join(f"{s}:{n}" for s, n in sorted(statuses.items()) if s != 202) or "-"
        after = f"{self.cpu_after_us:9.0f}" if any(r.cpu_after for r in self.runs) else f"{'-':>9}"
        rates = "/".join(f"{r.rate:.0f}" for r in self.runs)
        return (
            f"{self.scenario:<34} {self.requests:>5} {self.items:>5} {self.rate:>8.0f} {self.cpu_us:>7.0f} {after} "
            f"{pct(lambda r: r.latencies, 0.5):7.2f} {pct(lambda r: r.latencies, 0.99):7.2f} {srv} {others:>7}"
            f"  {rates}"
        )


def pct_of(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def scenario(
    pool: concurrent.futures.ProcessPoolExecutor,
    url: str,
    bodies: list[bytes],
    args: argparse.Namespace,
    timings: Timings | None,
) -> Run:
    loop = asyncio.get_running_loop()
    if timings is not None:
        timings.acks.clear()
    cpu = time.process_time()
    latencies, statuses, wall = await loop.run_in_executor(
        pool, run_client, url, bodies, args.concurrency, args.timeout
    )
    cpu = time.process_time() - cpu
    server = list(timings.acks) if timings is not None else []
    return Run(args.items, wall, latencies, statuses, server, cpu)


GOALS = {
    "intake rich (agents first seen)": ("crypto relay (rich bodies)", 0.5),
    "intake rich (agents seen)": ("crypto relay (rich bodies)", 0.5),
    "intake rich (seen), core a no-op": ("crypto relay (rich bodies)", 0.5),
    "intake basic (reads after the run)": ("relay (basic bodies)", 0.5),
    "intake basic (reads during the run)": ("relay (basic bodies)", 0.5),
    "intake basic, no note written": ("relay (basic bodies)", 0.5),
    "durable floor (basic bodies)": ("relay (basic bodies)", 0.5),
}
"""Issue 16: each intake's item rate at least this fraction of its baseline's, in the same run."""
CEILINGS = {"intake rich (seen), core a no-op", "intake basic, no note written"}
"""Rows with the core's or the store's part left out: the intake's own part, what it allows at most."""
FLOOR = "durable floor (basic bodies)"
"""The durable floor's row: a baseline of its own (``bench/durable_floor.py``), not a goal of the issue."""


def goal_lines(rows: list[Row]) -> list[str]:
    by = {r.scenario: r for r in rows}
    out = []
    for name, (base_name, goal) in GOALS.items():
        mine, base = by.get(name), by.get(base_name)
        if mine is None or base is None or not mine.runs or not base.runs:
            continue
        ratio = mine.rate / base.rate if base.rate else 0.0
        by_cpu = base.cpu_us / mine.cpu_us if mine.cpu_us else 0.0
        if name == FLOOR:
            basic = by.get("intake basic (reads after the run)")
            of_floor = f"; the basic intake (reads after) = {basic.rate / mine.rate:.3f}x of it" if basic else ""
            out.append(
                f"{name}: {mine.rate:.0f} items/s beside {base_name} {base.rate:.0f} items/s = {ratio:.3f}x; by "
                f"server CPU per item {mine.cpu_us:.0f} us beside {base.cpu_us:.0f} us = {by_cpu:.3f}x (the least "
                f"a durable answer costs){of_floor}"
            )
            continue
        what = "ceiling" if name in CEILINGS else "goal"
        out.append(
            f"{what} {name}: {mine.rate:.0f} items/s beside {base_name} {base.rate:.0f} items/s = {ratio:.3f}x "
            f"(goal >= {goal}x: {'met' if ratio >= goal else 'not met'}); by server CPU per item "
            f"{mine.cpu_us:.0f} us beside {base.cpu_us:.0f} us = {by_cpu:.3f}x"
        )
    return out


# ------------------------------------------------------------------ in-process: the route alone


class _Body:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        for start in range(0, len(self.raw), n):
            yield self.raw[start : start + n]


class BareRequest:
    """What the route reads of an aiohttp request, and nothing more: aiohttp's mocked requests cost
    more than the route itself, and a real one needs the HTTP stack this measurement leaves out."""

    query: MultiDict[str] = MultiDict()
    remote = "127.0.0.1"
    content_type = "application/json"
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json; charset=utf-8"})

    def __init__(self, raw: bytes) -> None:
        self.content = _Body(raw)
        self.content_length = len(raw)


async def route_cpu(intake: GraphIntake, bodies: list[bytes], items: int, concurrency: int) -> float:
    """CPU us per item of ``intake``'s route over ``bodies``, ``concurrency`` at a time."""
    queue = [BareRequest(b) for b in reversed(bodies)]

    async def worker() -> None:
        while queue:
            resp = await intake.notifications(queue.pop())  # type: ignore[arg-type]
            if resp.status != 202:
                raise RuntimeError(f"in-process request answered {resp.status}")

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / (len(bodies) * items) * 1e6


def floor_cpu(bodies: list[bytes], decryptor: Decryptor, tokens: MinimalTokenCheck, items: int) -> float:
    """CPU us per item of the crypto floor alone: parse, token check, decryption."""
    cpu = time.process_time()
    for raw in bodies:
        body = json.loads(raw)
        for token in body["validationTokens"]:
            tokens.check(token)
        for item in body["value"]:
            decryptor.decrypt(item["encryptedContent"])
    return (time.process_time() - cpu) / (len(bodies) * items) * 1e6


@contextlib.contextmanager
def core_no_op(bridge: Bridge) -> Iterator[None]:
    """The core's part of a rich item (``observe``/``observe_many``) does nothing meanwhile."""

    async def no_observe_many(events: Sequence[PresenceObserved], *, intake: str | None = None) -> list[Any]:
        return [None] * len(events)

    async def no_observe(event: PresenceObserved, *, intake: str | None = None) -> Any:
        return None

    observe, observe_many = bridge.observe, bridge.observe_many
    bridge.observe, bridge.observe_many = no_observe, no_observe_many  # type: ignore[method-assign]
    try:
        yield
    finally:
        bridge.observe, bridge.observe_many = observe, observe_many  # type: ignore[method-assign]


@contextlib.contextmanager
def write_no_op(store: Any) -> Iterator[None]:
    """The store's part of a basic item (the note's ``put_docs``) does nothing meanwhile."""

    async def no_put_docs(kind: str, items: Any) -> None:
        return None

    put_docs = store.put_docs
    store.put_docs = no_put_docs
    try:
        yield
    finally:
        store.put_docs = put_docs


async def in_process(
    args: argparse.Namespace,
    intake: GraphIntake,
    bridge: Bridge,
    store: Any,
    rich_sets: Callable[[int], list[bytes]],
    basic: list[bytes],
    crypto: Crypto,
    tokens: MinimalTokenCheck,
) -> list[str]:
    results: dict[str, list[float]] = {k: [] for k in ("rich", "rich, core no-op", "floor", "basic", "basic, no write")}
    await intake.stop()  # no batcher: only the route's own work is measured here
    for r in range(args.rounds):
        intake.agents.remember(await store.list_agents())  # the steady state of a burst: entries held
        bodies = rich_sets(100 + 3 * r)  # new values: a change for the core to decide each time
        results["rich"].append(await route_cpu(intake, bodies, args.items, args.concurrency))
        bodies = rich_sets(101 + 3 * r)
        with core_no_op(bridge):
            results["rich, core no-op"].append(await route_cpu(intake, bodies, args.items, args.concurrency))
        results["floor"].append(floor_cpu(bodies, crypto.decryptor, tokens, args.items))
        results["basic"].append(await route_cpu(intake, basic, args.items, args.concurrency))
        with write_no_op(store):
            results["basic, no write"].append(await route_cpu(intake, basic, args.items, args.concurrency))
    med = {k: statistics.median(v) for k, v in results.items()}

    def each(k: str) -> str:
        return "/".join(f"{v:.0f}" for v in results[k])

    return [
        f"in-process, the route called directly, {args.concurrency} at a time, CPU us per item "
        f"(median of {args.rounds}; each round):",
        f"  rich in full (agents seen)               {med['rich']:7.0f}   {each('rich')}",
        f"  rich, core's observe a no-op             {med['rich, core no-op']:7.0f}   {each('rich, core no-op')}"
        "   <- the intake's part, its ceiling",
        f"  crypto floor: token check + decryption   {med['floor']:7.0f}   {each('floor')}",
        f"  basic in full (note written)             {med['basic']:7.0f}   {each('basic')}",
        f"  basic, the note's put_docs a no-op       {med['basic, no write']:7.0f}   {each('basic, no write')}"
        "   <- the intake's part",
        f"  => rich: intake {med['rich, core no-op']:.0f} us (of which crypto floor {med['floor']:.0f}) + core "
        f"{med['rich'] - med['rich, core no-op']:.0f} us; basic: intake {med['basic, no write']:.0f} us + note "
        f"write {med['basic'] - med['basic, no write']:.0f} us",
    ]


# ------------------------------------------------------------------ main


async def main_async(args: argparse.Namespace) -> int:
    from service.store.sql import open_store

    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory() as tmp:
        stack = contextlib.AsyncExitStack()  # closed with the servers, in the ``finally`` below
        store: Any = await open_store(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}")
        timings = Timings()
        bridge = Bridge.assemble(store, Catalogue(CATALOGUE), Rules(), {}, telemetry=timings, limiters={})
        agents = make_agents(args.agents)
        await store.replace_presences(CATALOGUE)
        for start in range(0, len(agents), 500):
            await store.upsert_agents(agents[start : start + 500])

        cert_pem, key_pem = generate_certificate("bench-notifications")
        crypto = Crypto(cert_pem, Decryptor(cert_pem, key_pem), SigningKey())
        jwks_app = web.Application()

        async def keys(_request: web.Request) -> web.Response:
            return web.json_response(crypto.signing.jwks())

        jwks_app.router.add_get("/keys", keys)
        jwks_runner, jwks_base = await serve_app(jwks_app)

        intake = GraphIntake(
            bridge,
            client_state=CLIENT_STATE,
            client_id=CLIENT_ID,
            jwks_url=f"{jwks_base}/keys",
            decryptor=crypto.decryptor,
            reader=InProcessReader(),
            subscriptions=None,
            tenant_id=TENANT_ID,
            read_interval=0.2,
        )  # not started: the batcher runs only in "reads during the run"
        app = web.Application()
        app.add_routes(intake.routes())
        app_runner, base = await serve_app(app)
        tokens = MinimalTokenCheck(crypto.signing.jwks())
        relay_app = web.Application(client_max_size=2 * 1024 * 1024)
        relay_app.router.add_post("/relay", relay)
        relay_app.router.add_post("/crypto", crypto_relay(crypto.decryptor, tokens))
        floor = await stack.enter_async_context(sqlite_floor(tmp))
        relay_app.router.add_post("/floor", floor.handler(floor_rows, 202))
        relay_runner, relay_base = await serve_app(relay_app)

        say(
            f"preparing {args.requests} requests of {args.items} item(s) per scenario and round "
            f"({'a token per request' if args.distinct_tokens else 'one token per run, as Graph reuses it'}) ..."
        )
        shared: list[str] = []

        def rich_set(shift: int) -> list[bytes]:
            return rich_bodies(args, agents, crypto, shift, shared)

        basic = basic_bodies(args, agents)
        names = [
            "relay (rich bodies)",
            "crypto relay (rich bodies)",
            "intake rich (agents first seen)",
            "intake rich (agents seen)",
            "intake rich (seen), core a no-op",
            "relay (basic bodies)",
            FLOOR,
            "intake basic (reads after the run)",
            "intake basic (reads during the run)",
            "intake basic, no note written",
        ]
        rows = {n: Row(n, args.requests, args.items) for n in names}
        inproc: list[str] = []
        left = 0
        try:
            with concurrent.futures.ProcessPoolExecutor(1) as pool:
                # Warm-up: JWKS fetch, code paths, the child's interpreter.
                await scenario(pool, f"{base}{INTAKE_PATH}", rich_set(0)[:20], args, timings)
                for r in range(args.rounds):
                    if time.monotonic() > deadline:
                        say(f"timeout: rounds {r + 1}.. skipped")
                        break
                    first, seen = rich_set(1 + 2 * r), rich_set(2 + 2 * r)
                    for name, url, bodies, timed in (
                        ("relay (rich bodies)", f"{relay_base}/relay", first, None),
                        ("crypto relay (rich bodies)", f"{relay_base}/crypto", first, None),
                        ("intake rich (agents first seen)", f"{base}{INTAKE_PATH}", first, timings),
                        ("intake rich (agents seen)", f"{base}{INTAKE_PATH}", seen, timings),
                        ("intake rich (seen), core a no-op", f"{base}{INTAKE_PATH}", seen, timings),
                        ("relay (basic bodies)", f"{relay_base}/relay", basic, None),
                        (FLOOR, f"{relay_base}/floor", basic, None),
                        ("intake basic (reads after the run)", f"{base}{INTAKE_PATH}", basic, timings),
                        ("intake basic (reads during the run)", f"{base}{INTAKE_PATH}", basic, timings),
                        ("intake basic, no note written", f"{base}{INTAKE_PATH}", basic, timings),
                    ):
                        if name == "intake rich (agents first seen)":
                            intake.agents.forget()
                        if name == "intake basic (reads during the run)":
                            await intake.start()
                        with contextlib.ExitStack() as no_op:
                            if name == "intake rich (seen), core a no-op":
                                no_op.enter_context(core_no_op(bridge))
                            elif name == "intake basic, no note written":
                                no_op.enter_context(write_no_op(store))
                            run = await scenario(pool, url, bodies, args, timed)
                        cpu = time.process_time()
                        if name == "intake basic (reads after the run)":
                            while await store.list_docs(PENDING_KIND):
                                await intake.read_pending()
                            run.cpu_after = time.process_time() - cpu
                        elif name == "intake basic (reads during the run)":
                            await intake.wait_idle(timeout=max(1.0, deadline - time.monotonic()))
                            run.cpu_after = time.process_time() - cpu
                            await intake.stop()
                        rows[name].runs.append(run)
                    say(f"  round {r + 1}: " + ", ".join(f"{n} {rows[n].runs[-1].rate:.0f}/s" for n in names))
            left = len(await store.list_docs(PENDING_KIND))
            if not args.no_in_process and time.monotonic() < deadline:
                say("in-process measurement ...")
                inproc = await in_process(args, intake, bridge, store, rich_set, basic, crypto, tokens)
        finally:
            await intake.stop()
            for runner in (app_runner, relay_runner, jwks_runner):
                await runner.cleanup()
            await stack.aclose()
            counts = await store.outbox_counts()
            await store.close()

    table = [r for r in rows.values() if r.runs]
    say("")
    say(
        f"store: sqlite (WAL, temp file); concurrency {args.concurrency}; {args.agents} agents; "
        f"{args.rounds} round(s); {'a token per request' if args.distinct_tokens else 'one token per run'}; "
        f"python {sys.version.split()[0]}"
    )
    say(
        f"{'scenario':<34} {'reqs':>5} {'items':>5} {'items/s':>8} {'CPU us':>7} {'+reads us':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'srv p50':>7} {'srv p99':>7} {'non-202':>7}  items/s per round"
    )
    for row in table:
        say(row.line())
    say("")
    say("items/s, CPU us (server process, per item), p50/p99 (client-side, request sent -> 202 read), srv (the")
    say("route's own ack time): medians over the rounds. +reads: CPU per item including the pending reads done")
    say("after the run (basic: every note read).")
    say(f"outbox after the runs: {counts}; pending-read notes left: {left}; rejections: {timings.rejections or 'none'}")
    for line in goal_lines(table):
        say(line)
    if table:
        ok = all(set(run.statuses) == {202} for r in table for run in r.runs)
        p99 = max(
            (pct_of(run.latencies, 0.99) * 1000 for r in table if r.scenario.startswith("intake") for run in r.runs),
            default=0.0,
        )
        say(f"all 202: {ok}; worst intake p99 {p99:.1f} ms (Graph's deadline: 3000 ms; target 50 ms)")
    for line in inproc:
        say(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per scenario and round (default 1000)")
    parser.add_argument("--items", type=int, default=1, help="notifications per request (default 1)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--agents", type=int, default=2000, help="agents in the directory (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario, for medians (default 3)")
    parser.add_argument(
        "--distinct-tokens", action="store_true", help="a validation token per request (default: one per run)"
    )
    parser.add_argument("--no-in-process", action="store_true", help="leave out the in-process measurement")
    parser.add_argument("--timeout", type=float, default=600.0, help="overall bound in seconds (default 600)")
    args = parser.parse_args(argv)
    if min(args.requests, args.items, args.concurrency, args.agents, args.rounds) < 1:
        parser.error("--requests, --items, --concurrency, --agents and --rounds must be positive")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
