"""The whole thing on loopback: the three emulators and the real service, set up as an admin would.

``presence-sync demo`` and the scenario tests need the same assembly, so it lives here once: the
Dataverse, Graph and Bot Connector emulators on free ports; the service built by
``service.runtime.Runtime`` and served by ``service.app.create_app`` on a free port (static tokens,
an SQLite store in a given folder unless a database URL is given); then the going-live steps of the
README done through the same code the CLI runs: ``dataverse register-webhook``, ``agents discover``,
Graph subscriptions, a first reconcile. Nothing here reaches past 127.0.0.1.

Settings are built from explicit values only (no environment, no ``.env``): a developer's
``PRESENCE_SYNC_*`` variables must not point the demo at a real tenant or change its expectations.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.fernet import Fernet

from dataverse.discovery import discover_agents
from dataverse.registration import register_webhook
from emulators.connector import BotConnectorEmulator, SentActivity, teams_message
from emulators.dataverse import DataverseEmulator
from emulators.graph import GraphEmulator
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings

TOKEN = "local-stack-app-token"
SUBSCRIBER_TOKEN = "local-stack-subscriber-token"
SUBSCRIBER_ACCOUNT = "presence-subscriber@contoso.example"


@dataclass(frozen=True)
class StackAgent:
    name: str
    dynamics_id: str
    entra_id: str
    presence_id: str
    """The Dynamics 365 presence the agent starts with."""
    teams_own: tuple[str, str] = ("Available", "Available")
    """What the person's own Teams clients say at the start."""


def agent_ids(i: int) -> tuple[str, str]:
    """Deterministic (systemuserid, Entra object id) for the i-th generated agent."""
    return f"{i:08x}-5eed-4000-8000-00000000d365", f"{i:08x}-5eed-4000-8000-0000000e0a1d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    """Build, then ``await stack.start()`` (or ``async with``); ``await stack.stop()`` ends it all.

    ``progress`` gets one line per set-up step. ``overrides`` are extra ``Settings`` values (for
    example ``teams_write_hold_seconds``)."""

    def __init__(
        self,
        workdir: Path,
        agents: Sequence[StackAgent],
        *,
        database_url: str | None = None,
        overrides: dict[str, Any] | None = None,
        progress: Callable[[str], None] = lambda line: None,
        graph_options: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.agents = list(agents)
        self.database_url = database_url or f"sqlite+aiosqlite:///{workdir / 'presence-sync.db'}"
        self.overrides = dict(overrides or {})
        self.progress = progress
        self.graph = GraphEmulator(
            token=TOKEN, subscriber_tokens={SUBSCRIBER_TOKEN: SUBSCRIBER_ACCOUNT}, **(graph_options or {})
        )
        self.dataverse = DataverseEmulator(token=TOKEN)
        self.connector = BotConnectorEmulator()
        self.settings: Any = None
        self.runtime: Any = None
        self.http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.setup_report: dict[str, Any] = {}

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return str(self.settings.public_url)

    async def start(self) -> None:
        started = time.monotonic()
        await self.dataverse.start()
        await self.graph.start()
        await self.connector.start()
        for a in self.agents:
            self.dataverse.add_agent(a.dynamics_id, a.entra_id, a.name, a.presence_id, logged_in=True)
            self.graph.add_user(a.entra_id, own=a.teams_own)
        self.progress(
            f"emulators up: Dataverse {self.dataverse.url}, Graph {self.graph.url}, Bot Connector "
            f"{self.connector.url}; {len(self.agents)} agent(s) seeded"
        )
        port = free_port()
        values: dict[str, Any] = dict(
            host="127.0.0.1",
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            database_url=self.database_url,
            auth_mode="static",
            static_token=TOKEN,
            static_subscriber_tokens=SUBSCRIBER_TOKEN,
            graph_url=self.graph.url,
            client_id=self.graph.client_id,
            graph_client_state=secrets.token_urlsafe(24),
            dataverse_url=self.dataverse.url,
            dataverse_webhook_key=secrets.token_urlsafe(24),
            reconcile_interval_seconds=0,
            secret_key=Fernet.generate_key().decode(),
            log_level="WARNING",
            spool_dir=str(self.workdir / "spool"),  # the stack's own, whatever the store (never ./spool)
        )
        values.update(self.overrides)
        # No environment and no .env: see the module docstring.
        self.settings = Settings(
            _env_file=None,
            _env_prefix="PRESENCE_SYNC_LOCAL_STACK_UNUSED_",
            **values,  # type: ignore[call-arg]
        )
        self.runtime = await Runtime.open(self.settings)
        # Workers start below, once set-up is done (not twice: the app would start them too).
        app = create_app(self.settings, runtime=self.runtime, background=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.http = aiohttp.ClientSession(base_url=self.base_url)
        self.progress(f"service up on {self.base_url} (SQLite store in {self.workdir})")

        rt = self.runtime
        reg = await register_webhook(
            rt.dataverse,
            url=self.settings.public("/api/dataverse/webhook"),
            key=self.settings.dataverse_webhook_key,
            dry_run=False,
            progress=lambda line: None,
        )
        self.progress(f"dataverse register-webhook: {reg}")
        summary = await discover_agents(rt.dataverse, rt.bridge, lambda line: None)
        self.progress(
            f"agents discover: added {summary.added}, updated {summary.updated}, skipped {summary.skipped_count}"
        )
        report = await rt.subscriptions.sync()
        self.progress(f"graph subscriptions: {report}")
        shown = [0.0]

        def sweeping(line: str) -> None:  # at most one line every 5 s: 77 batches at 50,000 agents
            if time.monotonic() - shown[0] >= 5:
                shown[0] = time.monotonic()
                self.progress(f"first reconcile: {line}")

        rec = await rt.reconcile(sweeping)
        self.progress(f"first reconcile: {rec.line()}")
        self.setup_report = {"webhook": str(reg), "discovered": summary.added, "reconcile": rec.line()}
        rt.start_background()
        await self.settle(timeout=max(20.0, len(self.agents) / 500))
        self.progress(f"ready in {time.monotonic() - started:.2f} s")

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.runtime is not None:
            await self.runtime.close()
        for emu in (self.connector, self.graph, self.dataverse):
            try:
                await emu.stop()
            except Exception:  # a half-started stack still stops the rest
                pass

    # ------------------------------------------------------------------------------------ waiting

    async def settle(self, timeout: float = 20.0) -> None:
        """Waits until nothing is moving: no webhook or notification in flight, no pending new agent,
        the outbox empty of pending and in-flight rows, twice in a row."""
        rt = self.runtime
        quiet = 0
        async with asyncio.timeout(timeout):
            while quiet < 2:
                await self.dataverse.wait_emissions(timeout)
                await self.graph.wait_idle(timeout)
                await rt.dataverse_intake.wait_idle(timeout)
                await rt.graph_intake.wait_idle(timeout)
                counts = await rt.store.outbox_counts()
                busy = counts.get("pending", 0) + counts.get("in_flight", 0)
                quiet = quiet + 1 if busy == 0 else 0
                await asyncio.sleep(0.05)

    async def until(self, check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.01) -> bool:
        """Polls ``check`` (sync or async) until truthy; False at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------------------------ acting

    async def chat(
        self, agent: StackAgent, text: str | None = None, *, value: Any = None, timeout: float = 20.0
    ) -> SentActivity:
        """The agent writes to the bot in Teams; returns the bot's reply as the connector got it."""
        assert self.http is not None
        before = len(self.connector.sent)
        activity = teams_message(
            service_url=self.connector.url, aad_object_id=agent.entra_id, text=text, value=value, user_name=agent.name
        )
        conversation = activity["conversation"]["id"]
        async with self.http.post("/api/messages", json=activity) as r:
            if r.status >= 300:
                raise RuntimeError(f"/api/messages answered {r.status}: {await r.text()}")
        return await self.connector.wait_for(
            lambda a: a.type == "message" and a.conversation_id == conversation, timeout=timeout, since=before
        )

    def teams_writes(self, agent: StackAgent | None = None) -> int:
        """How many presence writes (setPresence / clearPresence) Graph accepted, for one agent or all."""
        return sum(
            1
            for r in self.graph.calls("POST")
            if r.status < 300
            and (agent is None or agent.entra_id in r.path)
            and ("/setPresence" in r.path or "/clearPresence" in r.path)
        )

    def dynamics_writes(self) -> int:
        """How many ``CCaaS_ModifyAgentPresence`` calls Dataverse accepted."""
        return sum(1 for c in self.dataverse.calls if "CCaaS_ModifyAgentPresence" in c.path and c.status < 300)

    def subscription_ids(self) -> list[str]:
        return [s.id for s in self.graph.subscriptions]
