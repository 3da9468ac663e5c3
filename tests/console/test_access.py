"""Who gets into the console: the real service (``create_app``, SQLite) and the Entra emulator.

A request from off loopback without a session is sent to sign in (pages) or answered 401 (API);
the one-time link works once and only from loopback; the signed cookie, not the address, is what
lets a request in; actions need the CSRF token and are logged with who did them; Entra sign-in is
allowed by the configured group or app role from the id token's claims, and refused otherwise."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from console.access import CALLBACK_PATH, COOKIE, LOGIN_PATH, Access, issue_link_ticket
from emulators.entra import EntraEmulator
from mapping.memory import MemoryStore
from mapping.model import SetPresence, System
from service.app import create_app
from service.runtime import Overrides, Runtime, bootstrap
from tests.service.test_web_login import CLIENT_ID, SECRET, clean_env, free_port, web_settings

GROUP = "7f2c1d9e-0000-4000-8000-00000000c0de"
ROLE = "Console.Operator"
OUTSIDE = "203.0.113.7"  # TEST-NET-3: not loopback


@web.middleware
async def remote_from_test(request: web.Request, handler: Any) -> web.StreamResponse:
    """Test-only: ``X-Test-Remote`` plays a client on another machine (aiohttp's own ``clone``)."""
    remote = request.headers.get("X-Test-Remote")
    return await handler(request.clone(remote=remote) if remote else request)


@dataclass
class Served:
    entra: EntraEmulator
    rt: Runtime
    base: str

    def client(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    entra = EntraEmulator()
    await entra.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    entra.add_app(CLIENT_ID, secret=SECRET, redirect_uris=(f"{base}{CALLBACK_PATH}",))
    settings = web_settings(tmp_path, port, entra, console_allowed_group_id=GROUP, console_allowed_role=ROLE)
    rt = await bootstrap(settings, overrides=Overrides(identity_http=entra.http_client()))
    app = create_app(settings, runtime=rt, background=False)
    app.middlewares.insert(0, remote_from_test)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Served(entra, rt, base)
    finally:
        await runner.cleanup()
        await rt.close()
        await entra.stop()


async def link_session(s: Served, http: aiohttp.ClientSession) -> None:
    ticket = await issue_link_ticket(s.rt.store)
    async with http.get(f"{s.base}/console/link", params={"ticket": ticket}, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()


async def test_off_loopback_without_a_session_is_sent_to_sign_in_or_refused(served: Served):
    away = {"X-Test-Remote": OUTSIDE}
    async with served.client() as http:
        for path in ("/console", "/console/static/app.js"):
            async with http.get(served.base + path, headers=away, allow_redirects=False) as resp:
                assert resp.status == 302, path
                assert resp.headers["Location"] == "/console/signin"
        for path in ("/console/api/agents", "/console/api/ops", "/console/api/events", "/console/api/session"):
            async with http.get(served.base + path, headers=away) as resp:
                assert resp.status == 401, path
                assert "sign in" in (await resp.json())["error"]
        async with http.post(served.base + "/console/api/outbox/1/retry", headers=away) as resp:
            assert resp.status == 401
        async with http.get(served.base + "/console/signin", headers=away) as resp:
            assert "Sign in with Microsoft" in await resp.text()


async def test_the_one_time_link_works_once_and_only_from_loopback(served: Served):
    ticket = await issue_link_ticket(served.rt.store)
    url = f"{served.base}/console/link"
    async with served.client() as http:
        async with http.get(url, params={"ticket": ticket}, headers={"X-Test-Remote": OUTSIDE}) as resp:
            assert resp.status == 403
            assert "only from the service" in await resp.text()
        async with http.get(url, params={"ticket": ticket}, allow_redirects=False) as resp:
            assert resp.status == 302
            cookie = resp.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/console" in cookie
            assert "Secure" not in cookie  # PUBLIC_URL is http here
        async with http.get(url, params={"ticket": ticket}) as resp:
            assert resp.status == 403
            assert "already used" in await resp.text()


async def test_the_signed_cookie_lets_in_not_the_address(served: Served):
    async with served.client() as http:
        await link_session(served, http)
        async with http.get(served.base + "/console/api/agents", headers={"X-Test-Remote": OUTSIDE}) as resp:
            assert resp.status == 200
            assert (await resp.json())["total"] == 0
        value = next(c.value for c in http.cookie_jar if c.key == COOKIE)
        body, _, sig = value.partition(".")
        forged = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + sig
    async with aiohttp.ClientSession() as bare:
        async with bare.get(served.base + "/console/api/agents", headers={"Cookie": f"{COOKIE}={forged}"}) as resp:
            assert resp.status == 401


async def test_actions_need_the_csrf_token_and_are_logged_with_who(served: Served, caplog: pytest.LogCaptureFixture):
    store = served.rt.store
    now = datetime.now(UTC)
    async with store.transaction() as tx:
        await tx.enqueue(SetPresence("agent-x", System.DYNAMICS, "f523f628-c07a-e811-8162-000d3aa11f50"), now)
    [delivery] = await store.claim([System.DYNAMICS], 1, 30, "test", now)
    await store.fail(delivery, "400 Bad Request: the presence is not allowed", None, now)
    async with served.client() as http:
        await link_session(served, http)
        url = f"{served.base}/console/api/outbox/{delivery.id}/retry"
        async with http.post(url) as resp:
            assert resp.status == 403
            assert "X-CSRF-Token" in (await resp.json())["error"]
        async with http.get(served.base + "/console/api/session") as resp:
            csrf = (await resp.json())["csrf"]
        with caplog.at_level(logging.INFO, logger="presence_sync.console"):
            async with http.post(url, headers={"X-CSRF-Token": csrf}) as resp:
                assert resp.status == 200, await resp.text()
        action = [r for r in caplog.records if r.getMessage() == "console action"]
        assert action and action[0].fields == {
            "action": "outbox_retry",
            "row": delivery.id,
            "by": "local (one-time link)",
        }
        async with http.post(url, headers={"X-CSRF-Token": csrf}) as resp:
            assert resp.status == 409  # not a dead letter any more


async def entra_sign_in(served: Served, http: aiohttp.ClientSession) -> tuple[int, str]:
    async with http.get(served.base + LOGIN_PATH, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        authorize = resp.headers["Location"]
    async with http.get(served.entra.browser_url(authorize), allow_redirects=False) as resp:
        assert resp.status == 302
        callback = resp.headers["Location"]
    async with http.get(callback, allow_redirects=False) as resp:
        return resp.status, await resp.text()


@pytest.mark.parametrize(
    ("groups", "roles", "allowed"),
    [([GROUP], [], True), ([], [ROLE], True), (["another-group"], ["Reader"], False), ([], [], False)],
)
async def test_entra_sign_in_is_allowed_by_the_group_or_the_app_role(served: Served, groups, roles, allowed):
    served.entra.user.groups = groups
    served.entra.user.roles = roles
    async with served.client() as http:
        status, page = await entra_sign_in(served, http)
        if allowed:
            assert status == 302
            async with http.get(served.base + "/console/api/session") as resp:
                assert (await resp.json())["user"] == served.entra.user.username
        else:
            assert status == 403
            assert "may not use the console" in page and GROUP in page and ROLE in page
            async with http.get(served.base + "/console/api/session") as resp:
                assert resp.status == 401


async def test_a_groups_overage_says_to_use_the_app_role(served: Served):
    served.entra.user.groups_overage = True
    async with served.client() as http:
        status, page = await entra_sign_in(served, http)
    assert status == 403
    assert "too many groups" in page and "PRESENCE_SYNC_CONSOLE_ALLOWED_ROLE" in page


async def test_the_cookie_is_secure_when_the_public_url_is_https():
    access = Access(MemoryStore(), entra=None, allowed_group="", allowed_role="", secure_cookie=True)
    response = web.Response()
    await access.start_session(response, "someone", "link")
    morsel = response.cookies[COOKIE]
    assert morsel["secure"] is True
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
