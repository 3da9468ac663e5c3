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
from dataverse.registration import POST_IMAGE_ALIAS
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


PARTIAL_COLUMNS = (
    "modifiedby",
    "msdyn_isagentloggedin",
    "msdyn_currentpresenceid",
    "modifiedon",
    "modifiedonbehalfby",
    "msdyn_agentstatusid",
    "msdyn_presencemodifiedon",
    "msdyn_presencemodifiedby",
)
"""What a writer that sends only the presence columns puts in the Target (and the parent's): no
``msdyn_agentid``, which the update did not touch."""


def partial_update(
    presence: str,
    *,
    status_id: str | None = None,
    image_agent: str | None = None,
    row_version: int = 5948260,
) -> dict[str, Any]:
    """The update seed as a writer that sends only the changed columns produces it: Target and parent
    Target without ``msdyn_agentid``, no asynchronous-step image; with ``image_agent``, the post-image
    ``register-webhook`` registers (``PostImage``: agent, presence, modified by/on)."""
    ctx = seed("update-presence")
    levels = [ctx, ctx["ParentContext"]]
    for level in levels:
        entity = level["InputParameters"][0]["value"]
        entity["Attributes"] = [p for p in entity["Attributes"] if p["key"] in PARTIAL_COLUMNS]
        entity["RowVersion"] = str(row_version)
        for pair in entity["Attributes"]:
            if pair["key"] == "msdyn_currentpresenceid":
                pair["value"]["Id"] = presence
            elif pair["key"] == "msdyn_agentstatusid" and status_id is not None:
                pair["value"] = status_id
        if status_id is not None:
            entity["Id"] = status_id
            level["PrimaryEntityId"] = status_id
    ctx["PostEntityImages"] = []
    if image_agent is not None:
        image = {
            "Attributes": [
                {"key": "msdyn_agentid", "value": _reference("systemuser", image_agent)},
                {"key": "msdyn_currentpresenceid", "value": _reference("msdyn_presence", presence)},
                {"key": "msdyn_presencemodifiedby", "value": "AGENT"},
                {"key": "msdyn_presencemodifiedon", "value": "/Date(1722582038000)/"},
            ],
            "EntityState": None,
            "FormattedValues": [],
            "Id": status_id or ctx["PrimaryEntityId"],
            "KeyAttributes": [],
            "LogicalName": "msdyn_agentstatus",
            "RelatedEntities": [],
            "RowVersion": str(row_version),
        }
        ctx["PostEntityImages"] = [{"key": POST_IMAGE_ALIAS, "value": image}]
    return ctx


def _reference(logical: str, ref_id: str) -> dict[str, Any]:
    return {
        "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Id": ref_id,
        "KeyAttributes": [],
        "LogicalName": logical,
        "Name": None,
        "RowVersion": None,
    }


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
