"""Fixtures for the Graph adapter's tests: the Graph emulator on a free port sharing a frozen clock with
the bridge (so subscription expiry can be moved by hand), a bridge on the in-memory store with
recording telemetry, the notification routes of ``GraphIntake`` served by a real aiohttp server on a
free port, and a self-signed encryption certificate made here with ``cryptography``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from emulators.graph import GraphEmulator
from emulators.serving import serve_app
from graph_sync.accounts import SubscriberAccounts
from graph_sync.crypto import Decryptor
from graph_sync.notifications import GraphIntake
from graph_sync.subscriptions import SubscriptionManager
from graph_sync.teams import TeamsPresenceClient
from mapping.bridge import Bridge
from mapping.model import Agent, System
from mapping.ports import Store
from tests.support import FakeClock, RecordingTelemetry, RecordingWriter, StaticTokens, make_bridge

APP_TOKEN = "app-token"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TENANT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
CLIENT_STATE = "client-state-secret"
SUBSCRIBER_TOKENS = ["sub-token-1", "sub-token-2", "sub-token-3"]


def entra(n: int) -> str:
    return f"0a1b2c3d-0000-4000-8000-{n:012d}"


def dyn(n: int) -> str:
    return f"97c90b02-0000-4000-8000-{n:012d}"


def agents(count: int, start: int = 1) -> list[Agent]:
    return [Agent(dyn(i), entra(i), f"Agent {i:05d}") for i in range(start, start + count)]


@dataclass
class Certificate:
    cert_pem: bytes
    key_pem: bytes
    key: rsa.RSAPrivateKey
    cert: x509.Certificate


def make_certificate(name: str = "presence-sync-notifications") -> Certificate:
    """A self-signed RSA-2048 certificate, made with ``cryptography`` only."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Certificate(cert.public_bytes(serialization.Encoding.PEM), key_pem, key, cert)


@pytest.fixture(scope="session")
def certificate() -> Certificate:
    return make_certificate()


@pytest.fixture(scope="session")
def other_certificate() -> Certificate:
    return make_certificate("someone-else")


@pytest.fixture
def clock() -> FakeClock:
    # The emulator checks subscription expiry against this clock; JWTs use the wall clock.
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
async def emu(clock: FakeClock) -> AsyncIterator[GraphEmulator]:
    emulator = GraphEmulator(
        token=APP_TOKEN,
        subscriber_tokens={t: f"subscriber-{i}@contoso.example" for i, t in enumerate(SUBSCRIBER_TOKENS, 1)},
        client_id=CLIENT_ID,
        tenant_id=TENANT_ID,
        clock=clock,
        retry_delay=0.01,
        batch_window=0.01,
        tick_interval=0,
    )
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
def telemetry() -> RecordingTelemetry:
    return RecordingTelemetry()


@pytest.fixture
def dynamics_writer() -> RecordingWriter:
    return RecordingWriter(System.DYNAMICS)


@dataclass
class Rig:
    """Everything wired as the service wires it, against the emulator."""

    bridge: Bridge
    emu: GraphEmulator
    teams: TeamsPresenceClient
    accounts: SubscriberAccounts
    intake: GraphIntake
    manager: SubscriptionManager
    base: str
    telemetry: RecordingTelemetry
    dynamics: RecordingWriter

    @property
    def notify_url(self) -> str:
        return f"{self.base}/api/graph/notifications"

    @property
    def lifecycle_url(self) -> str:
        return f"{self.base}/api/graph/lifecycle"


async def build_rig(
    emu: GraphEmulator,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics: RecordingWriter,
    *,
    accounts: int = 3,
    certificate: Certificate | None = None,
    jwks_url: str | None = None,
    store: Store | None = None,
    **intake_kw: Any,
) -> tuple[Rig, web.AppRunner]:
    holder: dict[str, TeamsPresenceClient] = {}

    class LateWriter:
        system = System.TEAMS

        async def apply(self, agent: Agent, value: str) -> None:
            await holder["teams"].apply(agent, value)

    bridge = make_bridge(clock=clock, store=store, writers={System.TEAMS: LateWriter(), System.DYNAMICS: dynamics})
    bridge.telemetry = telemetry
    bridge.engine.telemetry = telemetry
    teams = TeamsPresenceClient(
        emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=bridge.store, clock=clock, retry=bridge.retry
    )
    holder["teams"] = teams
    subs = SubscriberAccounts(
        bridge.store, tenant_id=TENANT_ID, client_id=CLIENT_ID, static_tokens=SUBSCRIBER_TOKENS[:accounts]
    )
    decryptor = Decryptor(certificate.cert_pem, certificate.key_pem) if certificate else None
    intake = GraphIntake(
        bridge,
        client_state=CLIENT_STATE,
        client_id=CLIENT_ID,
        jwks_url=jwks_url or emu.jwks_url,
        decryptor=decryptor,
        reader=teams,
        subscriptions=None,
        **intake_kw,
    )
    app = web.Application()
    app.add_routes(intake.routes())
    runner, base = await serve_app(app)
    manager = SubscriptionManager(
        bridge,
        emu.url,
        subs,
        notification_url=f"{base}/api/graph/notifications",
        lifecycle_url=f"{base}/api/graph/lifecycle",
        client_state=CLIENT_STATE,
        encryption_cert_pem=certificate.cert_pem if certificate else None,
        encryption_cert_id=decryptor.certificate_id if decryptor else None,
        owner="test-instance",
        reader=teams,
    )
    intake.subscriptions = manager
    await intake.start()
    return Rig(bridge, emu, teams, subs, intake, manager, base, telemetry, dynamics), runner


@pytest.fixture
async def rig(
    emu: GraphEmulator, clock: FakeClock, telemetry: RecordingTelemetry, dynamics_writer: RecordingWriter
) -> AsyncIterator[Rig]:
    r, runner = await build_rig(emu, clock, telemetry, dynamics_writer)
    yield r
    await close_rig(r, runner)


@pytest.fixture
async def rich_rig(
    emu: GraphEmulator,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    certificate: Certificate,
) -> AsyncIterator[Rig]:
    r, runner = await build_rig(emu, clock, telemetry, dynamics_writer, certificate=certificate)
    yield r
    await close_rig(r, runner)


async def close_rig(r: Rig, runner: web.AppRunner) -> None:
    await r.intake.stop()
    await r.manager.close()
    await r.teams.close()
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
