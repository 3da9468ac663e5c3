"""Fixtures for the bot's tests: a bridge on the in-memory store with a frozen clock (retries move only
when a test advances it), its outbox running in the background, ``BotIntake`` served by a real aiohttp
server on a free loopback port (no app id: the SDK's no-auth mode), and the fake Bot Connector that
records every reply. Readers are backed by the ``RecordingWriter`` of the same system, so what a reply
says a system "shows" is what was really written there."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.keys import OpenIdKeys
from bot.teams import BotIntake
from emulators.connector import BotConnectorEmulator, SentActivity, teams_message
from emulators.serving import serve_app
from mapping.bridge import Bridge
from mapping.errors import UpstreamError
from mapping.model import CLEAR, Agent, PresenceObserved, System, TeamsPresence
from mapping.retry import RetryPolicy
from tests.support import ALICE, BOB, FakeClock, RecordingTelemetry, RecordingWriter, make_bridge

RANK = {"DoNotDisturb": 7, "Busy": 6, "BusyIdle": 5, "Available": 4, "AvailableIdle": 3, "Away": 2, "BeRightBack": 2}


class WriterReader:
    """A PresenceReader over what a RecordingWriter applied: the upstream's truth in these tests.

    Teams: the strongest of the person's own state (``own``) and the bridge's session, as Graph
    aggregates them; a cleared session leaves the own state. ``errors`` are raised first (one a read)."""

    def __init__(
        self,
        writer: RecordingWriter,
        clock: Callable[[], Any],
        *,
        own: Mapping[str, str] | None = None,
        errors: Sequence[BaseException] = (),
    ) -> None:
        self.system = writer.system
        self.writer = writer
        self.clock = clock
        self.own: dict[str, str] = dict(own or {})
        self.errors = list(errors)
        self.reads = 0

    def value(self, agent_id: str) -> str | None:
        written = next((v for a, v in reversed(self.writer.calls) if a == agent_id), None)
        if self.system is System.DYNAMICS:
            return written
        own = self.own.get(agent_id, "Available/Available")
        if written is None or written == CLEAR:
            return own
        a, b = TeamsPresence.parse(written), TeamsPresence.parse(own)
        return written if RANK.get(a.availability, 0) >= RANK.get(b.availability, 0) else own

    async def read(self, agents: Sequence[Agent]) -> list[PresenceObserved]:
        self.reads += 1
        if self.errors:
            raise self.errors.pop(0)
        out = []
        for agent in agents:
            value = self.value(agent.dynamics_user_id)
            if value is not None:
                out.append(PresenceObserved(agent.dynamics_user_id, self.system, value, self.clock(), source="test"))
        return out


@dataclass
class Harness:
    bridge: Bridge
    intake: BotIntake
    connector: BotConnectorEmulator
    url: str
    http: aiohttp.ClientSession
    clock: FakeClock
    writers: dict[System, RecordingWriter]
    readers: dict[System, WriterReader]
    telemetry: RecordingTelemetry
    posted: list[dict[str, Any]] = field(default_factory=list)

    def activity(self, agent: Agent | None = ALICE, **kw: Any) -> dict[str, Any]:
        kw.setdefault("user_name", agent.display_name if agent else "Mallory Unknown")
        aad = kw.pop("aad_object_id", agent.entra_object_id if agent else None)
        return teams_message(service_url=self.connector.url, aad_object_id=aad, **kw)

    async def post(
        self, body: Any, *, headers: Mapping[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, str]:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        data = raw if raw is not None else (body if isinstance(body, bytes | str) else None)
        kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        if isinstance(body, dict):
            self.posted.append(body)
        async with self.http.post(self.url, headers=hdrs, **kwargs) as resp:
            return resp.status, await resp.text()

    async def say(self, text: str | None = None, agent: Agent | None = ALICE, **kw: Any) -> SentActivity:
        """Sends a message as ``agent`` and returns the bot's reply (a message, typing left out)."""
        since = len(self.connector.sent)
        status, body = await self.post(self.activity(agent, text=text, **kw))
        assert status == 200, body
        return await self.connector.wait_for(lambda s: s.type == "message", timeout=5, since=since)

    async def tap(self, data: Any, agent: Agent | None = ALICE) -> SentActivity:
        """A card button: Teams posts the button's data as ``value`` and no text."""
        since = len(self.connector.sent)
        status, body = await self.post(self.activity(agent, value=data, reply_to_id="1:1"))
        assert status == 200, body
        return await self.connector.wait_for(lambda s: s.type == "message", timeout=5, since=since)

    async def settle(self) -> None:
        """Lets the background outbox deliver what is due at the current (fake) time."""
        self.bridge.outbox.wake()
        await self.bridge.outbox.drain(timeout=2)
        await self.intake.followups.drain()


MakeHarness = Callable[..., Awaitable[Harness]]


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@pytest.fixture
async def make_harness() -> AsyncIterator[MakeHarness]:
    stops: list[Callable[[], Awaitable[None]]] = []

    async def make(
        *,
        writers: Mapping[System, RecordingWriter] | None = None,
        own: Mapping[str, str] | None = None,
        read_errors: Mapping[System, Sequence[BaseException]] | None = None,
        readers: Mapping[System, Any] | None = None,
        settle_seconds: float = 2.0,
        policy: RetryPolicy | None = None,
        agents: Sequence[Agent] = (ALICE, BOB),
        app_id: str = "",
        tenant_id: str = "",
        keys: list[OpenIdKeys] | None = None,
    ) -> Harness:
        clock = FakeClock()
        ws = dict(writers or {s: RecordingWriter(s) for s in System})
        bridge = make_bridge(clock=clock, writers=ws, policy=policy)
        telemetry = RecordingTelemetry()
        bridge.telemetry = telemetry
        await bridge.store.upsert_agents(list(agents))
        rs: dict[System, Any] = {
            s: WriterReader(ws[s], clock, own=own if s is System.TEAMS else None, errors=(read_errors or {}).get(s, ()))
            for s in System
        }
        if readers is not None:
            rs = dict(readers)
        intake = BotIntake(
            bridge,
            rs,
            app_id=app_id,
            app_password="secret" if app_id else "",
            app_type="MultiTenant",
            tenant_id=tenant_id,
            settle_seconds=settle_seconds,
            keys=keys,
        )
        stop = asyncio.Event()
        worker = asyncio.create_task(bridge.outbox.run(stop))
        await intake.start()
        connector = BotConnectorEmulator()
        await connector.start()
        app = web.Application()
        app.router.add_post("/api/messages", intake.handle)
        app.router.add_get("/healthz", _ok)
        runner, base = await serve_app(app)
        http = aiohttp.ClientSession()

        async def close() -> None:
            await http.close()
            await runner.cleanup()
            await intake.stop()
            stop.set()
            bridge.outbox.wake()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker, 2)
            await connector.stop()

        stops.append(close)
        return Harness(bridge, intake, connector, f"{base}/api/messages", http, clock, ws, rs, telemetry)

    yield make
    for close in reversed(stops):
        await close()


@pytest.fixture
async def harness(make_harness: MakeHarness) -> Harness:
    return await make_harness()


def failing(n: int, error: UpstreamError) -> list[UpstreamError]:
    return [error] * n
