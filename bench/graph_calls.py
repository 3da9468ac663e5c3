"""CPU per Teams presence call: ``TeamsPresenceClient`` beside a raw aiohttp client, same run.

    python bench/graph_calls.py [--calls 300] [--reads 20] [--rounds 5]

Why: the whole service runs on one event loop, so the CPU the Graph writer spends per call is taken
from the Dataverse webhook answers Dynamics is waiting for. The figure is CPU time of this process
(``time.process_time``) per call, the Graph emulator running in a child process so that its own work
is not counted. Calls are made one at a time over a kept-alive connection, as the outbox's workers
make them.

The rows, each on the same request bodies, URLs and answers:

- ``TeamsPresenceClient``: the adapter as the service runs it (``apply`` with a session pair,
  ``apply(CLEAR)``, ``read`` of 650 agents: one ``getPresencesByUserId``), everything included
  (token, request, typed errors on the way, ``PresenceObserved`` per user read);
- ``aiohttp raw`` (the baseline): ``aiohttp.ClientSession.post`` of the JSON body with the bearer
  header, the answer read (and parsed, for reads): the floor any client here pays;
- ``httpx raw, adapter client``: the same raw POST through the adapter's httpx client
  (``graph_sync.client.make_http_client``: kiota's transport with its middleware), the one Graph
  client ``subscriptions.py`` and ``accounts.py`` use;
- ``httpx raw, plain client``: the same through a bare ``httpx.AsyncClient``: what kiota's
  transport middleware costs on top;
- ``msgraph-sdk builders``: the request builders and kiota's request adapter
  (``graph.users.by_user_id(id).presence.set_presence.post(body)``), the path ``teams.py`` took
  before it sent its requests itself.

Each figure is the median over ``--rounds`` rounds (the clients' order rotates each round), with
the spread beside it; the ratio is to the aiohttp baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx

# Run as a script from anywhere: the repository root on the path.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulators.graph import GraphEmulator  # noqa: E402
from graph_sync.client import make_graph_client, make_http_client  # noqa: E402
from graph_sync.teams import MAX_IDS, TeamsPresenceClient  # noqa: E402
from mapping.memory import MemoryStore  # noqa: E402
from mapping.model import CLEAR, Agent  # noqa: E402

TOKEN = "bench-graph-token"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
PAIRS = ["Busy/InACall", "Away/Away", "DoNotDisturb/Presenting", "Busy/InAConferenceCall", "Available/Available"]
OPS = ("set", "clear", "read 650")


def say(text: str) -> None:
    print(text, flush=True)


def make_agents(n: int) -> list[Agent]:
    return [
        Agent(f"97c90b02-0000-4000-8000-{i:012d}", f"0a1b2c3d-0000-4000-8000-{i:012d}", f"Agent {i}") for i in range(n)
    ]


# ------------------------------------------------------------------ the emulator, in a child process


def serve_emulator(conn: Connection, users: list[str]) -> None:
    asyncio.run(_serve(conn, users))


async def _serve(conn: Connection, users: list[str]) -> None:
    emu = GraphEmulator(token=TOKEN, client_id=CLIENT_ID, presence_rate_limit=None, tick_interval=0, log_limit=100)
    emu.add_users(users)
    await emu.start()
    conn.send(emu.url)
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the parent says stop
    await emu.stop()


# ------------------------------------------------------------------ the clients measured


class Client(Protocol):
    name: str

    async def set(self, agent: Agent, value: str) -> None: ...
    async def clear(self, agent: Agent) -> None: ...
    async def read(self, agents: Sequence[Agent]) -> int: ...
    async def close(self) -> None: ...


def set_body(value: str) -> dict[str, str]:
    availability, activity = value.split("/")
    return {
        "activity": activity,
        "availability": availability,
        "sessionId": CLIENT_ID,
        "expirationDuration": "PT60M",
    }


def read_body(agents: Sequence[Agent]) -> dict[str, list[str]]:
    return {"ids": [a.entra_object_id.lower() for a in agents]}


HEADERS = {"Accept": "application/json", "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}


class Teams:
    name = "TeamsPresenceClient"

    def __init__(self, url: str) -> None:
        self.client = TeamsPresenceClient(url, _Tokens(), session_id=CLIENT_ID, store=MemoryStore())

    async def set(self, agent: Agent, value: str) -> None:
        await self.client.apply(agent, value)

    async def clear(self, agent: Agent) -> None:
        await self.client.apply(agent, CLEAR)

    async def read(self, agents: Sequence[Agent]) -> int:
        return len(await self.client.read(agents))

    async def close(self) -> None:
        await self.client.close()


class _Tokens:
    async def token(self, scope: str) -> str:
        return TOKEN


class AiohttpRaw:
    name = "aiohttp raw (baseline)"

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession()

    async def _post(self, path: str, body: Any) -> bytes:
        data = json.dumps(body).encode()
        async with self.session.post(self.url + path, data=data, headers=HEADERS) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: {resp.status} {raw[:200]!r}")
            return raw

    async def set(self, agent: Agent, value: str) -> None:
        await self._post(f"/users/{agent.entra_object_id}/presence/setPresence", set_body(value))

    async def clear(self, agent: Agent) -> None:
        await self._post(f"/users/{agent.entra_object_id}/presence/clearPresence", {"sessionId": CLIENT_ID})

    async def read(self, agents: Sequence[Agent]) -> int:
        raw = await self._post("/communications/getPresencesByUserId", read_body(agents))
        return len(json.loads(raw)["value"])

    async def close(self) -> None:
        await self.session.close()


class HttpxRaw:
    def __init__(self, url: str, *, adapter: bool) -> None:
        self.url = url
        self.name = "httpx raw, adapter client" if adapter else "httpx raw, plain client"
        self.http = make_http_client(url) if adapter else httpx.AsyncClient(timeout=httpx.Timeout(10.0))

    async def _post(self, path: str, body: Any) -> bytes:
        resp = await self.http.post(self.url + path, content=json.dumps(body).encode(), headers=HEADERS)
        if resp.status_code != 200:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.content[:200]!r}")
        return resp.content

    set = AiohttpRaw.set
    clear = AiohttpRaw.clear
    read = AiohttpRaw.read

    async def close(self) -> None:
        await self.http.aclose()


class SdkBuilders:
    """The msgraph-sdk path, as ``teams.py`` used it before it sent its own requests."""

    name = "msgraph-sdk builders"

    def __init__(self, url: str) -> None:
        from msgraph.generated.communications.get_presences_by_user_id.get_presences_by_user_id_post_request_body import (  # noqa: E501
            GetPresencesByUserIdPostRequestBody,
        )
        from msgraph.generated.models.o_data_errors.o_data_error import ODataError
        from msgraph.generated.users.item.presence.clear_presence.clear_presence_post_request_body import (
            ClearPresencePostRequestBody,
        )
        from msgraph.generated.users.item.presence.set_presence.set_presence_post_request_body import (
            SetPresencePostRequestBody,
        )

        self.models = (GetPresencesByUserIdPostRequestBody, ODataError, ClearPresencePostRequestBody)
        self.set_model = SetPresencePostRequestBody
        self.http = make_http_client(url)
        self.graph = make_graph_client(self.http, url, _Tokens())

    async def set(self, agent: Agent, value: str) -> None:
        availability, activity = value.split("/")
        body = self.set_model(session_id=CLIENT_ID, availability=availability, activity=activity)
        body.additional_data = {"expirationDuration": "PT60M"}
        await self.graph.users.by_user_id(agent.entra_object_id).presence.set_presence.post(body)

    async def clear(self, agent: Agent) -> None:
        await self.graph.users.by_user_id(agent.entra_object_id).presence.clear_presence.post(
            self.models[2](session_id=CLIENT_ID)
        )

    async def read(self, agents: Sequence[Agent]) -> int:
        request_body, odata_error, _ = self.models
        builder = self.graph.communications.get_presences_by_user_id
        request = builder.to_post_request_information(request_body(ids=read_body(agents)["ids"]))
        adapter: Any = self.graph.request_adapter
        raw = await adapter.send_primitive_async(request, "bytes", {"XXX": odata_error})
        return len(json.loads(raw)["value"])

    async def close(self) -> None:
        await self.http.aclose()


FACTORIES: list[Callable[[str], Client]] = [
    AiohttpRaw,
    Teams,
    lambda url: HttpxRaw(url, adapter=True),
    lambda url: HttpxRaw(url, adapter=False),
    SdkBuilders,
]


# ------------------------------------------------------------------ measuring


@dataclass
class Figures:
    cpu_ms: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, client: str, op: str, value: float) -> None:
        self.cpu_ms.setdefault((client, op), []).append(value)


async def cpu_per_call(calls: Sequence[Callable[[], Awaitable[Any]]]) -> float:
    """CPU milliseconds per call, the calls made one after the other."""
    gc.collect()
    start = time.process_time()
    for call in calls:
        await call()
    return (time.process_time() - start) * 1000 / len(calls)


async def one_round(client: Client, agents: list[Agent], args: argparse.Namespace, rnd: int, out: Figures) -> None:
    writers = agents[: args.calls]
    values = [PAIRS[(i + rnd) % len(PAIRS)] for i in range(len(writers))]
    sets = [functools.partial(client.set, a, v) for a, v in zip(writers, values, strict=True)]
    clears = [functools.partial(client.clear, a) for a in writers]
    chunk = agents[:MAX_IDS]

    async def read() -> None:
        seen = await client.read(chunk)
        if seen != len(chunk):
            raise RuntimeError(f"{client.name}: read {seen} presences of {len(chunk)}")

    out.add(client.name, "set", await cpu_per_call(sets))
    out.add(client.name, "clear", await cpu_per_call(clears))
    out.add(client.name, "read 650", await cpu_per_call([read] * args.reads))


async def measure(url: str, agents: list[Agent], args: argparse.Namespace) -> Figures:
    clients = [make(url) for make in FACTORIES]
    figures = Figures()
    try:
        warm = argparse.Namespace(calls=min(20, args.calls), reads=2)
        for client in clients:  # connections open, modules imported, caches filled
            await one_round(client, agents, warm, 0, Figures())
        for rnd in range(args.rounds):
            shift = rnd % len(clients)
            for client in clients[shift:] + clients[:shift]:
                await one_round(client, agents, args, rnd, figures)
    finally:
        for client in clients:
            await client.close()
    return figures


def report(figures: Figures, args: argparse.Namespace) -> None:
    names = list(dict.fromkeys(name for name, _ in figures.cpu_ms))
    baseline = AiohttpRaw.name
    say("")
    say(
        f"CPU ms per call in this process (median of {args.rounds} rounds; {args.calls} sets and clears, "
        f"{args.reads} reads of {MAX_IDS} ids per round); python {sys.version.split()[0]}, "
        f"aiohttp {aiohttp.__version__}, httpx {httpx.__version__}"
    )
    say(f"  {'call':<9} {'client':<28} {'cpu ms/call':>12} {'min..max':>16} {'x baseline':>11}")
    for op in OPS:
        floor = statistics.median(figures.cpu_ms[(baseline, op)])
        for name in names:
            runs = figures.cpu_ms[(name, op)]
            med = statistics.median(runs)
            spread = f"{min(runs):.3f}..{max(runs):.3f}"
            say(f"  {op:<9} {name:<28} {med:>12.3f} {spread:>16} {med / floor:>10.2f}x")
    say("")
    say("baseline: aiohttp.ClientSession.post of the same JSON body and bearer header, the answer read (and parsed).")
    say("The Graph emulator runs in a child process: its CPU is not in these figures.")


async def main_async(args: argparse.Namespace) -> int:
    agents = make_agents(max(args.calls, MAX_IDS))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_emulator, args=(child, [a.entra_object_id for a in agents]), daemon=True)
    proc.start()
    try:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, parent.poll, 60):
            raise RuntimeError("the Graph emulator did not start within 60 s")
        url = parent.recv()
        say(f"Graph emulator (child process {proc.pid}) at {url}; {len(agents)} users")
        figures = await measure(url, agents, args)
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    report(figures, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="sets and clears per client and round (default 300)")
    parser.add_argument("--reads", type=int, default=20, help="reads of 650 ids per client and round (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; figures are their medians (default 5)")
    args = parser.parse_args(argv)
    if min(args.calls, args.reads, args.rounds) < 1:
        parser.error("--calls, --reads and --rounds must be positive")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
