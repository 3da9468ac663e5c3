"""Bot token validation never blocks the event loop: the Bot Connector's signing keys come from
``bot.keys`` (aiohttp, a timeout, a cache, backed-off failures), served here by a loopback OpenID
server the test controls (hanging, failing or answering), never Microsoft's."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from bot.keys import OpenIdKeys
from bot.teams import ROUTE, bot_keys
from emulators.serving import serve_app
from tests.bot.conftest import Harness, MakeHarness
from tests.support import ALICE

APP_ID = "0b6f8e2a-1111-4222-8333-444455556666"
KID = "test-signing-key"
ISSUER = "https://api.botframework.com"


@dataclass
class KeyServer:
    """An OpenID metadata document and its JWKS on loopback. ``mode``: "ok", "fail" (500) or "hang"
    (the request is held until ``release`` is set)."""

    key: rsa.RSAPrivateKey
    mode: str = "ok"
    url: str = ""
    requests: int = 0
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/openid", self._metadata)
        app.router.add_get("/keys", self._keys)
        return app

    async def _gate(self) -> None:
        self.requests += 1
        if self.mode == "hang":
            self.hanging.set()
            await self.release.wait()
        if self.mode == "fail":
            raise web.HTTPInternalServerError()

    async def _metadata(self, request: web.Request) -> web.Response:
        await self._gate()
        return web.json_response({"issuer": ISSUER, "jwks_uri": f"{self.url}/keys"})

    async def _keys(self, request: web.Request) -> web.Response:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return web.json_response({"keys": [{**jwk, "kid": KID, "use": "sig", "endorsements": ["msteams"]}]})


@pytest.fixture
async def key_server() -> AsyncIterator[KeyServer]:
    server = KeyServer(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    runner, base = await serve_app(server.app())
    server.url = base
    yield server
    server.release.set()
    await runner.cleanup()


def bot_token(key: rsa.RSAPrivateKey, service_url: str, *, kid: str = KID, **claims: Any) -> str:
    """A Bot Connector token as the channel signs it: issuer api.botframework.com, audience our app id,
    the activity's serviceUrl."""
    now = int(time.time())
    body = {"iss": ISSUER, "aud": APP_ID, "serviceurl": service_url, "nbf": now - 10, "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


async def harness_for(make_harness: MakeHarness, server: KeyServer, **kw: Any) -> Harness:
    keys = bot_keys(f"{server.url}/openid", **kw)
    return await make_harness(app_id=APP_ID, keys=keys)


async def _typing(h: Harness, token: str) -> int:
    act = h.activity(ALICE, text="x")
    act["type"] = "typing"  # accepted with a valid token and then ignored: nothing goes upstream
    status, _ = await h.post(act, headers={"Authorization": f"Bearer {token}"})
    return status


async def test_a_valid_token_signed_by_a_published_key_is_accepted(
    make_harness: MakeHarness, key_server: KeyServer
) -> None:
    h = await harness_for(make_harness, key_server)
    assert await _typing(h, bot_token(key_server.key, h.connector.url)) == 200
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await _typing(h, bot_token(other, h.connector.url)) == 401  # same kid, another signer
    assert await _typing(h, bot_token(key_server.key, h.connector.url, aud="someone-else")) == 401
    assert await _typing(h, bot_token(key_server.key, "https://elsewhere.example/")) == 401
    assert key_server.requests == 1  # fetched once, then cached


async def test_forged_tokens_while_the_key_server_hangs_get_401_and_the_loop_keeps_serving(
    make_harness: MakeHarness, key_server: KeyServer
) -> None:
    key_server.mode = "hang"
    h = await harness_for(make_harness, key_server, timeout=30.0, wait=0.2)
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = [bot_token(forger, h.connector.url, kid=f"forged-{i}") for i in range(18)]
    results = asyncio.gather(*(_typing(h, t) for t in forged))
    await asyncio.wait_for(key_server.hanging.wait(), 10)
    # The key fetch is held open by the server; another request completes meanwhile.
    async with h.http.get(h.url.replace("/api/messages", "/healthz")) as resp:
        assert resp.status == 200
    assert not key_server.release.is_set()
    assert await asyncio.wait_for(results, 10) == [401] * 18
    assert h.telemetry.rejections[(ROUTE, "unauthenticated")] == 18
    assert key_server.requests == 1  # one fetch for all of them, not one per request


async def test_a_failing_key_server_is_backed_off_not_asked_per_request(
    make_harness: MakeHarness, key_server: KeyServer
) -> None:
    key_server.mode = "fail"
    h = await harness_for(make_harness, key_server)
    token = bot_token(key_server.key, h.connector.url)
    assert [await _typing(h, token) for _ in range(10)] == [401] * 10  # unverifiable: refused
    assert key_server.requests == 1


async def test_keys_recover_after_the_backoff(key_server: KeyServer) -> None:
    keys = OpenIdKeys("https://login.example/openid", source=f"{key_server.url}/openid", backoff=0.05)
    key_server.mode = "fail"
    with pytest.raises(PermissionError):
        await keys.get(KID)
    key_server.mode = "ok"
    deadline = time.monotonic() + 10
    while True:  # the backoff ends; the next request that needs the keys fetches them again
        try:
            found = await keys.get(KID)
            break
        except PermissionError:
            assert time.monotonic() < deadline, "keys never fetched again after the backoff"
            await asyncio.sleep(0.05)
    assert found.endorsements == ["msteams"]
    assert key_server.requests == 2
    await keys.close()


async def test_forged_key_ids_do_not_drive_fetches_but_a_rolled_key_is_found(key_server: KeyServer) -> None:
    keys = OpenIdKeys("https://login.example/openid", source=f"{key_server.url}/openid", unknown_kid_after=0.2)
    assert (await keys.get(KID)).endorsements == ["msteams"]
    for i in range(20):
        with pytest.raises(PermissionError):
            await keys.get(f"forged-{i}")
    assert key_server.requests == 1  # unknown ids refetch at most once per interval, not per request
    # The Bot Connector rolls its keys: once the interval has passed, a new key id is fetched.
    rolled = key_server.key
    key_server.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    deadline = time.monotonic() + 10
    while key_server.requests < 2:
        with pytest.raises(PermissionError):  # the old key id is gone from the new set
            await keys.get("rolled-in")
        assert time.monotonic() < deadline, "never refetched"
        await asyncio.sleep(0.05)
    assert keys.keys[KID].public_key.public_numbers() != rolled.public_key().public_numbers()
    await keys.close()
