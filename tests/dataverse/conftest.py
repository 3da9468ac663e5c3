"""Fixtures for the Dataverse adapter's tests: the Dataverse emulator on a free port, a client on it, a
bridge on the in-memory store with recording telemetry, and ``DataverseIntake`` served by a real aiohttp
server on a free loopback port. The seed payloads (Dataverse's ``RemoteExecutionContext`` of an Update
and of a Create of ``msdyn_agentstatus``, as the webhook receives them) are in ``tests/dataverse/data/``;
``test_context`` pins them byte for byte by SHA-256, so they cannot drift unnoticed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dataverse.client import DataverseClient
from dataverse.webhook import PATH, DataverseIntake
from emulators.dataverse import DataverseEmulator
from emulators.serving import serve_app
from mapping.bridge import Bridge
from tests.support import RecordingTelemetry, StaticTokens, make_bridge

DATA = Path(__file__).parent / "data"
TOKEN = "dataverse-test-token"
KEY = "webhook-key-0123456789"


def seed(name: str) -> dict[str, Any]:
    """A seed payload as parsed JSON (``update-presence`` or ``create-agent``); a fresh copy each call."""
    data: dict[str, Any] = json.loads((DATA / f"{name}.json").read_bytes())
    return data


def seed_bytes(name: str) -> bytes:
    return (DATA / f"{name}.json").read_bytes()


@pytest.fixture
async def emu() -> AsyncIterator[DataverseEmulator]:
    emulator = DataverseEmulator(token=TOKEN)
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
def tokens() -> StaticTokens:
    return StaticTokens(TOKEN)


@pytest.fixture
async def client(emu: DataverseEmulator, tokens: StaticTokens) -> AsyncIterator[DataverseClient]:
    c = DataverseClient(emu.url, tokens, timeout=2.0)
    yield c
    await c.close()


@pytest.fixture
def telemetry() -> RecordingTelemetry:
    return RecordingTelemetry()


@pytest.fixture
def bridge(telemetry: RecordingTelemetry) -> Bridge:
    b = make_bridge()
    b.telemetry = telemetry
    b.engine.telemetry = telemetry
    return b


@dataclass
class Served:
    intake: DataverseIntake
    runner: web.AppRunner
    base: str

    @property
    def url(self) -> str:
        return self.base + PATH

    async def close(self) -> None:
        await self.intake.stop()
        await self.runner.cleanup()


async def serve_intake(
    bridge: Bridge, *, key: str = KEY, client: DataverseClient | None = None, start: bool = True, **kw: Any
) -> Served:
    """The intake's route in a tiny aiohttp app on a free loopback port (as ``service.app`` mounts it)."""
    intake = DataverseIntake(bridge, webhook_key=key, client=client, **kw)
    app = web.Application()
    app.add_routes(intake.routes())
    runner, base = await serve_app(app)
    if start:
        await intake.start()
    return Served(intake, runner, base)


@pytest.fixture
async def served(bridge: Bridge, client: DataverseClient) -> AsyncIterator[Served]:
    s = await serve_intake(bridge, client=client, poll_interval=0.2)
    yield s
    await s.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
