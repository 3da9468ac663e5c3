"""The composition root at run time: builds the store, the core and the adapters from ``Settings``,
and owns the background workers. ``serve``, ``demo``, ``reconcile``, ``doctor`` and the tests all
build the service through here, so there is one way to assemble it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bot.teams import BotIntake
from dataverse.agent_lookup import AgentStatusLookup
from dataverse.client import DataverseClient
from dataverse.webhook import DataverseIntake
from edge.poison import quarantine_poison
from edge.spool import Spool, spool_path
from graph_sync.accounts import SubscriberAccounts, app_credential
from graph_sync.crypto import Decryptor
from graph_sync.notifications import GraphIntake
from graph_sync.subscriptions import SubscriptionManager
from graph_sync.teams import TeamsPresenceClient
from graph_sync.tenant import TenantResolution, as_guid, resolve_tenant
from graph_sync.web_login import CALLBACK_PATH, WebLogin
from mapping.bridge import Bridge, default_limiters
from mapping.catalogue import Catalogue
from mapping.errors import ConfigError, UpstreamError
from mapping.model import OOB_PRESENCE_IDS, BasePresence, Presence, System
from mapping.ports import PresenceReader, PresenceWriter, Store, TokenProvider
from mapping.reconcile import ReconcileSummary, reconcile
from mapping.retry import RetryPolicy
from mapping.translation import load_rules
from service.auth import token_provider
from service.metrics import PrometheusTelemetry
from service.settings import PREFIX, Settings

log = logging.getLogger("presence_sync.service")

OOB_CATALOGUE = [
    Presence(OOB_PRESENCE_IDS[BasePresence.AVAILABLE], "Available", BasePresence.AVAILABLE),
    Presence(OOB_PRESENCE_IDS[BasePresence.BUSY], "Busy", BasePresence.BUSY),
    Presence(OOB_PRESENCE_IDS[BasePresence.BUSY_DND], "Busy - DND", BasePresence.BUSY_DND),
    Presence(OOB_PRESENCE_IDS[BasePresence.AWAY], "Away", BasePresence.AWAY),
    Presence(OOB_PRESENCE_IDS[BasePresence.OFFLINE], "Offline", BasePresence.OFFLINE),
]


async def open_configured_store(settings: Settings) -> Store:
    from service.store.sql import open_store

    return await open_store(
        settings.database_url, secret_key=settings.secret_key, quarantine_max_items=settings.quarantine_max_items
    )


def serve_owner(settings: Settings) -> str:
    """The owner id of ``serve`` (outbox leases, the spool file): host and port survive a restart,
    and two instances on one host cannot share a port."""
    return f"{socket.gethostname()}:{settings.port}"


def spool_folder(settings: Settings) -> Path:
    """``SPOOL_DIR``, else a ``spool`` folder next to the SQLite file, else ``./spool``."""
    if settings.spool_dir:
        return Path(settings.spool_dir).expanduser()
    if settings.is_sqlite:
        from service.store.connect import parse_url

        folder = parse_url(settings.database_url).sqlite_folder
        if folder is not None:
            return folder / "spool"
    return Path("spool")


@dataclass(frozen=True)
class Overrides:
    """What tests, benches and ``doctor`` change in the assembly; everything else comes from
    ``Settings``. ``store``: an open store to use instead of ``DATABASE_URL`` (closed with the
    runtime). ``load_catalogue``: False skips reading ``msdyn_presences`` at start-up (doctor reads it
    itself, once and bounded, and writes nothing)."""

    store: Store | None = None
    load_catalogue: bool = True
    owner: str | None = None
    """The outbox lease owner. ``serve`` passes one that survives a restart (host and port), so that
    a restarted instance takes back the rows it was delivering at once; by default a fresh one per
    process (a CLI command beside a running ``serve`` must never take that instance's rows)."""
    identity_http: Any = None
    """A ``requests``-like client for everything said to Entra through MSAL and the tenant look-up
    (MSAL's ``http_client``); tests hand in the Entra emulator's. None: MSAL's own."""


class Runtime:
    """Everything one running instance owns, built complete by ``bootstrap`` (``Runtime.open``)."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        telemetry: PrometheusTelemetry,
        owner: str,
        tokens: TokenProvider,
        bridge: Bridge,
        readers: Mapping[System, PresenceReader],
        dataverse: DataverseClient | None,
        dataverse_intake: DataverseIntake,
        teams: TeamsPresenceClient,
        accounts: SubscriberAccounts,
        subscriptions: SubscriptionManager | None,
        graph_intake: GraphIntake,
        bot: BotIntake,
        web_login: WebLogin | None = None,
        tenant: TenantResolution | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        """This instance's webhook spool (opened when the intakes start)."""
        self.store = store
        self.telemetry = telemetry
        self.owner = owner
        self.tokens = tokens
        self.bridge = bridge
        self.outbox = bridge.outbox
        self.readers = readers
        self.dataverse = dataverse
        self.dataverse_intake = dataverse_intake
        self.teams = teams
        self.accounts = accounts
        self.subscriptions = subscriptions
        self.graph_intake = graph_intake
        self.bot = bot
        self.web_login = web_login
        self.tenant = tenant
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, settings: Settings, *, store: Store | None = None, owner: str | None = None) -> Runtime:
        return await bootstrap(settings, overrides=Overrides(store=store, owner=owner))

    async def load_catalogue(self) -> None:
        """The live ``msdyn_presences`` when Dataverse answers (kept in the store for the next start),
        else the stored copy, else the out-of-the-box five; then the rules' targets are checked."""
        presences: list[Presence] = []
        if self.dataverse is not None:
            try:
                presences = await self.bridge.retry.run(self.dataverse.list_presences, max_attempts=3)
                await self.store.replace_presences(presences)
            except UpstreamError as e:
                log.warning(
                    "presence catalogue not read from Dataverse; using the stored copy",
                    extra={"fields": {"error": e.message}},
                )
        if not presences:
            presences = await self.store.list_presences() or OOB_CATALOGUE
        self.bridge.catalogue.replace(presences)
        problems = self.bridge.rules.check_catalogue(presences)
        if problems:
            where = self.settings.mapping_file or "the built-in defaults"
            raise ConfigError(f"mapping rules ({where}) do not fit msdyn_presences: " + "; ".join(problems))

    # Background work
    def start_background(self) -> None:
        s = self.settings
        self._spawn("outbox", self.outbox.run(self._stop))
        self._spawn("heartbeat", self._every(s.heartbeat_seconds, self._heartbeat, first_delay=0.0))
        self._spawn("session-refresh", self._every(60, self._refresh_sessions))
        if s.reconcile_interval_seconds > 0:
            self._spawn(
                "reconcile", self._every(s.reconcile_interval_seconds, self._reconcile_if_leader, first_delay=1.0)
            )
        if self.subscriptions is not None:
            self._spawn("subscriptions", self.subscriptions.run(self._stop, 60))

    async def take_back_own_rows(self) -> int:
        """Rows this instance (same owner) was delivering when it stopped, claimable at once."""
        released = await self.store.release_leases(self.owner, self.bridge.clock())
        if released:
            log.info(
                "outbox rows taken back after a restart", extra={"fields": {"rows": released, "owner": self.owner}}
            )
            self.outbox.wake()
        return released

    async def _heartbeat(self) -> None:
        await self.outbox.heartbeat(self.settings.heartbeat_seconds)

    async def start_intakes(self) -> None:
        for intake in (self.dataverse_intake, self.graph_intake, self.bot):
            if intake is not None:
                await intake.start()

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task stopped", extra={"fields": {"task": name}})

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def _every(
        self, seconds: float, fn: Callable[[], Awaitable[Any]], *, first_delay: float | None = None
    ) -> None:
        delay = seconds if first_delay is None else first_delay
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                await fn()
            except Exception:
                log.exception("periodic task failed; will try again", extra={"fields": {"task": fn.__name__}})
            delay = seconds

    async def _refresh_sessions(self) -> None:
        expiry = timedelta(minutes=self.settings.graph_session_expiration_minutes)
        await self.bridge.engine.refresh_sessions(
            available_every=timedelta(minutes=4), others_every=max(expiry - timedelta(minutes=10), expiry / 2)
        )

    async def _reconcile_if_leader(self) -> None:
        """The sweep, in the background: ``serve`` is ready (store and catalogue) before it runs, and
        at 50,000 agents it takes a while, so its progress is logged every 10 s."""
        if await self.store.try_lead("reconcile", self.owner):
            started = last = time.monotonic()

            def progress(line: str) -> None:
                nonlocal last
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    log.info("reconcile progress", extra={"fields": {"progress": line}})

            summary = await self.reconcile(progress)
            log.info(
                "reconcile",
                extra={
                    "fields": {
                        "summary": summary.line(),
                        "errors": summary.errors[:5],
                        "seconds": round(time.monotonic() - started, 1),
                    }
                },
            )

    async def reconcile(self, progress: Callable[[str], None] | None = None) -> ReconcileSummary:
        agents = await self.store.list_agents(enabled_only=True)
        return await reconcile(self.bridge.engine, self.readers, agents, progress=progress)

    async def close(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for part in (self.bot, self.graph_intake, self.dataverse_intake):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        lookup = getattr(self.dataverse_intake, "lookup", None)
        if lookup is not None:  # its background writes stop before the store closes
            await lookup.close()
        for client in (self.subscriptions, self.teams, self.dataverse, self.tokens):
            close = getattr(client, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        await self.store.close()


async def bootstrap(settings: Settings, *, overrides: Overrides = Overrides()) -> Runtime:
    """The one composition root: every object built complete, in dependency order, from ``settings``
    (``serve``, ``demo``, every CLI command, the tests and the benches all come through here).

    With no ``DATAVERSE_URL`` the webhook intake still records changes (agents in the directory), and
    Dynamics commands wait in the outbox, visible in `presence-sync outbox list`."""
    store = overrides.store or await open_configured_store(settings)
    try:
        tenant = await resolve_configured_tenant(settings, overrides.identity_http)
        rt = _assemble(settings, store, overrides.owner, tenant, overrides.identity_http)
        if overrides.load_catalogue:
            await rt.load_catalogue()
    except BaseException:
        await store.close()
        raise
    return rt


async def resolve_configured_tenant(settings: Settings, identity_http: Any = None) -> TenantResolution:
    """``TENANT_ID`` as a GUID, looked up once when it is a domain name (``graph_sync.tenant``). A
    failed look-up is a warning, not a stop: Graph's validationTokens are then checked for a
    consistent issuer only, and ``doctor`` reports the resolution."""
    configured = settings.tenant_id.strip()
    if not configured or as_guid(configured) is not None:
        return await resolve_tenant(configured)
    if settings.auth_mode == "static":  # emulators: never a look-up on the internet
        return TenantResolution(configured, None, "not looked up with AUTH_MODE=static")
    tenant = await resolve_tenant(configured, http_client=identity_http)
    if tenant.guid is None:
        log.warning(
            "tenant not resolved; validationTokens are checked for a consistent issuer only",
            extra={"fields": {"tenant": configured, "problem": tenant.problem}},
        )
    else:
        log.info("tenant resolved", extra={"fields": {"tenant": configured, "guid": tenant.guid}})
    return tenant


def _assemble(
    settings: Settings,
    store: Store,
    owner: str | None,
    tenant: TenantResolution | None = None,
    identity_http: Any = None,
) -> Runtime:
    s = settings
    telemetry = PrometheusTelemetry()
    owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tokens = token_provider(s)
    retry = RetryPolicy(max_attempts=s.outbox_max_attempts, dead_letter_after_seconds=s.dead_letter_after_hours * 3600)
    limiters = default_limiters()
    dataverse = DataverseClient(s.dataverse_url, tokens) if s.dataverse_enabled else None
    teams = TeamsPresenceClient(
        s.graph_url,
        tokens,
        session_id=s.client_id or "presence-sync",
        expiration_minutes=s.graph_session_expiration_minutes,
        store=store,
        limiter=limiters[System.TEAMS],
        retry=retry,
    )
    ports: dict[System, PresenceWriter] = {System.TEAMS: teams}
    readers: dict[System, PresenceReader] = {System.TEAMS: teams}
    if dataverse is not None:
        ports[System.DYNAMICS] = dataverse
        readers[System.DYNAMICS] = dataverse
    bridge = Bridge.assemble(
        store,
        Catalogue(),
        load_rules(s.mapping_file),
        ports,
        telemetry=telemetry,
        limiters=limiters,
        retry=retry,
        holds={System.TEAMS: s.teams_write_hold_seconds},
        owner=owner,
    )
    credential = app_credential(s.client_cert_path, s.client_secret) if s.auth_mode == "entra" else None
    accounts = SubscriberAccounts(
        store,
        tenant_id=s.tenant_id,
        client_id=s.client_id,
        static_tokens=s.subscriber_tokens if s.auth_mode == "static" else None,
        http_client=identity_http,
        client_credential=credential,
    )
    web_login = WebLogin(
        store,
        tenant_id=s.tenant_id if s.auth_mode == "entra" else "",
        client_id=s.client_id,
        client_credential=credential,
        redirect_uri=s.public(CALLBACK_PATH) if s.public_url else None,
        http_client=identity_http,
        telemetry=telemetry,
    )
    cert_pem = Path(s.graph_encryption_cert_path).read_bytes() if s.graph_encryption_cert_path else None
    decryptor = Decryptor(cert_pem, Path(s.graph_encryption_key_path).read_bytes()) if cert_pem else None
    subscriptions = None
    if s.public_url and s.graph_client_state:
        subscriptions = SubscriptionManager(
            bridge,
            s.graph_url,
            accounts,
            notification_url=s.public("/api/graph/notifications"),
            lifecycle_url=s.public("/api/graph/lifecycle"),
            client_state=s.graph_client_state,
            encryption_cert_pem=cert_pem,
            encryption_cert_id=decryptor.certificate_id if decryptor else None,
            owner=owner,
            reader=teams,
        )
    poison = quarantine_poison(bridge)  # every queue's poison items end in the one quarantine
    agent_lookup = AgentStatusLookup(bridge.records, dataverse, retry=retry)
    if dataverse is not None:
        dataverse.agent_status_sink = agent_lookup.remember_many  # the sweep's reads fill the cache
    spool = Spool(spool_path(spool_folder(s), owner), max_bytes=s.spool_max_bytes)
    telemetry.spools.append(lambda: spool)
    dataverse_intake = DataverseIntake(
        bridge,
        webhook_key=s.dataverse_webhook_key,
        client=dataverse,
        on_agent_added=subscriptions.directory_changed if subscriptions is not None else None,
        lookup=agent_lookup,
        on_poison=poison,
        spool=spool,
        commit_timeout=s.store_commit_timeout_seconds,
    )
    graph_intake = GraphIntake(
        bridge,
        client_state=s.graph_client_state,
        client_id=s.client_id,
        jwks_url=s.jwks_url,
        decryptor=decryptor,
        reader=teams,
        subscriptions=subscriptions,
        tenant_id=tenant.guid if tenant is not None else (s.tenant_id or None),
        on_poison=poison,
    )
    bot = BotIntake(
        bridge,
        readers,
        app_id=s.bot_app_id,
        app_password=s.bot_app_password,
        app_type=s.bot_app_type,
        tenant_id=s.bot_tenant,
        warm_keys=True,  # the Bot Connector's signing keys fetched at start, in the background
        on_poison=poison,
    )
    return Runtime(
        settings=s,
        store=store,
        telemetry=telemetry,
        owner=owner,
        tokens=tokens,
        bridge=bridge,
        readers=readers,
        dataverse=dataverse,
        dataverse_intake=dataverse_intake,
        teams=teams,
        accounts=accounts,
        subscriptions=subscriptions,
        graph_intake=graph_intake,
        bot=bot,
        web_login=web_login,
        tenant=tenant,
        spool=spool,
    )


def describe(settings: Settings) -> str:
    """One line on what this instance talks to, for start-up logs (no secrets)."""
    parts = [
        f"store={settings.database_url.split('@')[-1]}",
        f"auth={settings.auth_mode}",
        f"graph={settings.graph_url}",
        f"dataverse={settings.dataverse_url or 'off'}",
    ]
    if not settings.public_url:
        parts.append(f"no {PREFIX}PUBLIC_URL: Graph subscriptions off, Teams changes come from reconcile only")
    return " ".join(parts)
