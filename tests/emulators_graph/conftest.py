"""Fixtures for the Graph emulator's tests: the emulator on a free port with a controllable clock,
a subscriber endpoint (a real aiohttp server) whose behaviour each test sets, an HTTP client, and an
encryption certificate built here with ``cryptography`` alone (not with the emulator's helpers), so
that decrypting in the tests proves the wire format rather than the emulator agreeing with itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from multidict import CIMultiDictProxy

from emulators.graph import GraphEmulator
from emulators.serving import serve_app

APP_TOKEN = "app-token"
SUB_A = "token-a"
SUB_B = "token-b"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TENANT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
ALICE = "0a1b2c3d-0000-4000-8000-000000000001"
BOB = "0a1b2c3d-0000-4000-8000-000000000002"
CAROL = "0a1b2c3d-0000-4000-8000-000000000003"


class Clock:
    """Frozen time that moves only when told (the emulator adds its own ``advance`` offset on top)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Receiver:
    """The subscriber's endpoints: ``/notify`` and ``/lifecycle`` (and anything else), recording all.

    ``validation``: "ok", "status" (answer ``validation_status``), "wrong-body", "wrong-type", "slow".
    ``notify_statuses``: statuses to answer the next notification POSTs with (then 202)."""

    base: str = ""
    validation: str = "ok"
    validation_status: int = 403
    slow_seconds: float = 2.0
    notify_statuses: list[int] = field(default_factory=list)
    notify_delay: float = 0.0
    validation_requests: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    posts: list[tuple[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/notify") -> str:
        return f"{self.base}{path}"

    def bodies(self, path: str = "/notify") -> list[dict[str, Any]]:
        return [body for p, body in self.posts if p == path]

    def items(self, path: str = "/notify") -> list[dict[str, Any]]:
        return [item for body in self.bodies(path) for item in body["value"]]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("validationToken")
        raw = await request.read()
        if token is not None:
            self.validation_requests.append((request.path, token, raw, request.content_type))
            if self.validation == "status":
                return web.Response(status=self.validation_status, text="no")
            if self.validation == "wrong-body":
                return web.Response(text=token + "x", content_type="text/plain")
            if self.validation == "wrong-type":
                return web.json_response(token)
            if self.validation == "slow":
                await asyncio.sleep(self.slow_seconds)
            return web.Response(text=token, content_type="text/plain")
        self.posts.append((request.path, await request.json()))
        self.arrived.set()
        if self.notify_delay:
            await asyncio.sleep(self.notify_delay)
        if self.notify_statuses:
            return web.Response(status=self.notify_statuses.pop(0))
        return web.Response(status=202)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", rec.handle)
    runner, rec.base = await serve_app(app)
    yield rec
    await runner.cleanup()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def emu(clock: Clock) -> AsyncIterator[GraphEmulator]:
    emulator = GraphEmulator(
        token=APP_TOKEN,
        subscriber_tokens={SUB_A: "subscriber-a@contoso.example", SUB_B: "subscriber-b@contoso.example"},
        client_id=CLIENT_ID,
        tenant_id=TENANT_ID,
        clock=clock,
        retry_delay=0.01,
        batch_window=0.02,
    )
    for uid in (ALICE, BOB, CAROL):
        emulator.add_user(uid)
    await emulator.start()
    yield emulator
    await emulator.stop()


class Graph:
    """A tiny Graph client for the tests: ``await graph.post(path, body, token=...)`` -> (status, json)."""

    def __init__(self, session: aiohttp.ClientSession, emulator: GraphEmulator) -> None:
        self.session = session
        self.emulator = emulator

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = APP_TOKEN,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        url = path if path.startswith("http") else f"{self.emulator.url}{path}"
        async with self.session.request(method, url, json=body, headers=hdrs) as resp:
            text = await resp.text()
            data: Any = None
            if text and resp.content_type == "application/json":
                data = await resp.json()
            return resp.status, data, resp.headers

    async def get(self, path: str, token: str | None = APP_TOKEN) -> tuple[int, Any]:
        status, data, _ = await self.call("GET", path, token=token)
        return status, data

    async def post(self, path: str, body: Any = None, token: str | None = APP_TOKEN) -> tuple[int, Any]:
        status, data, _ = await self.call("POST", path, body, token=token)
        return status, data

    async def patch(self, path: str, body: Any, token: str | None = SUB_A) -> tuple[int, Any]:
        status, data, _ = await self.call("PATCH", path, body, token=token)
        return status, data

    async def delete(self, path: str, token: str | None = SUB_A) -> tuple[int, Any]:
        status, data, _ = await self.call("DELETE", path, token=token)
        return status, data

    async def set_presence(
        self, user: str, availability: str, activity: str, duration: str | None = "PT1H", session: str = CLIENT_ID
    ) -> tuple[int, Any]:
        body: dict[str, Any] = {"sessionId": session, "availability": availability, "activity": activity}
        if duration is not None:
            body["expirationDuration"] = duration
        return await self.post(f"/users/{user}/presence/setPresence", body)

    def subscription_body(
        self,
        receiver: Receiver,
        ids: list[str] | None = None,
        *,
        minutes: float = 45,
        lifecycle: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        ids = ids if ids is not None else [ALICE, BOB]
        body: dict[str, Any] = {
            "changeType": "updated",
            "notificationUrl": receiver.url("/notify"),
            "resource": "/communications/presences?$filter=id in ({})".format(",".join(f"'{i}'" for i in ids)),
            "expirationDateTime": (self.emulator.now() + timedelta(minutes=minutes)).isoformat(),
            "clientState": "s3cret-state",
        }
        if lifecycle:
            body["lifecycleNotificationUrl"] = receiver.url("/lifecycle")
        body.update(extra)
        return body

    async def subscribe(
        self, receiver: Receiver, ids: list[str] | None = None, token: str = SUB_A, **extra: Any
    ) -> tuple[int, Any]:
        return await self.post("/subscriptions", self.subscription_body(receiver, ids, **extra), token=token)


@pytest.fixture
async def graph(emu: GraphEmulator) -> AsyncIterator[Graph]:
    async with aiohttp.ClientSession() as session:
        yield Graph(session, emu)


@dataclass
class Certificate:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    pem: bytes
    der: bytes


def make_certificate(name: str = "bridge-notifications") -> Certificate:
    """Self-signed RSA-2048 certificate, built here without the emulator's helpers."""
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
    return Certificate(
        cert, key, cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER)
    )


@pytest.fixture(scope="session")
def certificate() -> Certificate:
    return make_certificate()
