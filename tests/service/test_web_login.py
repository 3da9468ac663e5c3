"""``graph login --web`` end to end: the real service (``create_app``, SQLite store) on a free port and
the Entra emulator. Ticket -> 302 to Entra's authorize URL (state, PKCE) -> the emulator's consent ->
callback -> the account stored encrypted, marked as signed in by the confidential client -> later
refreshed with the app's own credential; and every refusal (replayed ticket or callback, expired
ticket, declined consent, a stolen code without its verifier) as a clear 4xx page, counted under
its route template, with no code or token in a page or a log line."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography.fernet import Fernet

from emulators.entra import EntraEmulator
from emulators.graph_crypto import generate_certificate
from graph_sync.accounts import ACCOUNT_KIND, AUTH_CODE_FLOW, SubscriberAccounts, secret_name
from graph_sync.web_login import CALLBACK_PATH, LOGIN_PATH, issue_ticket, login_result
from mapping.errors import PermanentError
from service import cli
from service.app import create_app
from service.runtime import Overrides, Runtime, bootstrap
from service.settings import Settings, load_settings

CLIENT_ID = "c1d2e3f4-0000-4000-8000-000000000001"
SECRET = "app-secret-value-0123456789"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("PRESENCE_SYNC_"):
            monkeypatch.delenv(k)


@dataclass
class Stack:
    entra: EntraEmulator
    settings: Settings
    rt: Runtime
    http: aiohttp.ClientSession
    base: str
    db: Path

    async def login_redirect(self, ticket: str) -> aiohttp.ClientResponse:
        return await self.http.get(f"{self.base}{LOGIN_PATH}", params={"ticket": ticket}, allow_redirects=False)

    async def authorize(self, authorize_url: str) -> str:
        """The browser at Entra: the emulator's test user consents, and the browser is sent back."""
        async with self.http.get(self.entra.browser_url(authorize_url), allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            return resp.headers["Location"]

    async def sign_in(self) -> tuple[str, str]:
        """A whole sign-in; returns the callback URL the browser was sent to and the page it shows."""
        ticket = await issue_ticket(self.rt.store)
        async with await self.login_redirect(ticket) as resp:
            assert resp.status == 302, await resp.text()
            callback = await self.authorize(resp.headers["Location"])
        async with self.http.get(callback, allow_redirects=False) as resp:
            assert resp.status == 200, await resp.text()
            return callback, await resp.text()


def web_settings(tmp_path: Path, port: int, entra: EntraEmulator, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        "auth_mode": "entra",
        "tenant_id": entra.domain,  # a domain name: resolved to the GUID at start-up
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "public_url": f"http://127.0.0.1:{port}",
        "port": port,
        "secret_key": Fernet.generate_key().decode(),
        "reconcile_interval_seconds": 0,
    }
    values.update(extra)
    return load_settings(**values)


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    entra = EntraEmulator(expires_in=60)  # inside MSAL's 5-minute margin: the next token() refreshes
    await entra.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    entra.add_app(CLIENT_ID, secret=SECRET, redirect_uris=(f"{base}{CALLBACK_PATH}",))
    settings = web_settings(tmp_path, port, entra)
    rt = await bootstrap(settings, overrides=Overrides(identity_http=entra.http_client()))
    runner = web.AppRunner(create_app(settings, runtime=rt, background=False), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Stack(entra, settings, rt, http, base, tmp_path / "store.db")
    finally:
        await runner.cleanup()
        await rt.close()
        await entra.stop()


async def test_web_sign_in_stores_the_account_encrypted_and_refreshes_it_as_a_confidential_client(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="presence_sync")
    user = stack.entra.user.username
    ticket = await issue_ticket(stack.rt.store)
    async with await stack.login_redirect(ticket) as resp:
        assert resp.status == 302
        authorize = resp.headers["Location"]
    parts = urlsplit(authorize)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    # Entra's authorize endpoint of the resolved tenant, with state, PKCE (S256) and our redirect URI.
    assert authorize.startswith(f"https://login.microsoftonline.com/{stack.entra.tenant_id}/oauth2/v2.0/authorize")
    assert query["client_id"] == CLIENT_ID and query["response_type"] == "code"
    assert query["redirect_uri"] == f"{stack.base}{CALLBACK_PATH}"
    assert query["code_challenge_method"] == "S256" and query["code_challenge"] and query["state"]
    assert "Presence.Read.All" in query["scope"] and "offline_access" in query["scope"]

    callback = await stack.authorize(authorize)
    code = parse_qs(urlsplit(callback).query)["code"][0]
    async with stack.http.get(callback, allow_redirects=False) as resp:
        page = await resp.text()
        assert resp.status == 200, page
    assert f"Signed in as {user}; you can close this window" in page
    redemption = stack.entra.requests[-1][2]
    assert redemption["grant_type"] == "authorization_code" and stack.entra.issued[-1].client_auth == "secret"

    # Stored like a device-code login, plus the flow; the cache is encrypted at rest.
    doc = await stack.rt.store.get_doc(ACCOUNT_KIND, user)
    assert doc is not None and doc["flow"] == AUTH_CODE_FLOW and doc["tenant_id"] == stack.entra.tenant_id
    cache = await stack.rt.store.get_secret(secret_name(user))
    refresh_token = next(t for t in json.loads(cache or b"{}")["RefreshToken"].values())["secret"]
    on_disk = b"".join(p.read_bytes() for p in stack.db.parent.glob("store.db*"))
    assert refresh_token.startswith("rt-") and refresh_token.encode() not in on_disk
    assert [a.name for a in await stack.rt.accounts.accounts()] == [user]
    assert await login_result(stack.rt.store, ticket) == {"username": user, "tenant_id": stack.entra.tenant_id}

    # Later: the access token is near expiry, so MSAL redeems the refresh token, with the app's secret.
    issued = len(stack.entra.issued)
    token = await stack.rt.accounts.tokens(user).token(GRAPH_SCOPE)
    assert stack.entra.grants()[-1] == "refresh_token"
    assert stack.entra.issued[issued:] and all(i.client_auth == "secret" for i in stack.entra.issued[issued:])
    assert token == stack.entra.issued[-1].access_token

    # Neither the code nor any token reached a page or a log line.
    logged = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    for value in (code, refresh_token, token, SECRET):
        assert value not in page and value not in logged


async def test_a_public_client_cannot_refresh_a_web_signed_in_account(stack: Stack) -> None:
    """Why the account remembers its flow: Entra redeems a confidential client's refresh token only
    with that client's credential (AADSTS7000218), and without one the service says what to set."""
    user = stack.entra.user.username
    await stack.sign_in()
    doc = await stack.rt.store.get_doc(ACCOUNT_KIND, user)
    assert doc is not None
    await stack.rt.store.put_doc(ACCOUNT_KIND, user, {**doc, "flow": "device_code"})
    public = SubscriberAccounts(
        stack.rt.store,
        tenant_id=stack.entra.tenant_id,
        client_id=CLIENT_ID,
        static_tokens=None,
        http_client=stack.entra.http_client(),
    )
    with pytest.raises(PermanentError, match="AADSTS7000218"):
        await public.tokens(user).token(GRAPH_SCOPE)
    await stack.rt.store.put_doc(ACCOUNT_KIND, user, doc)
    no_credential = SubscriberAccounts(
        stack.rt.store,
        tenant_id=stack.entra.tenant_id,
        client_id=CLIENT_ID,
        static_tokens=None,
        http_client=stack.entra.http_client(),
    )
    with pytest.raises(PermanentError, match="CLIENT_CERT_PATH or PRESENCE_SYNC_CLIENT_SECRET"):
        await no_credential.tokens(user).token(GRAPH_SCOPE)


async def test_replayed_ticket_and_replayed_callback_are_refused(stack: Stack) -> None:
    ticket = await issue_ticket(stack.rt.store)
    async with await stack.login_redirect(ticket) as resp:
        assert resp.status == 302
        callback = await stack.authorize(resp.headers["Location"])
    async with await stack.login_redirect(ticket) as resp:
        assert resp.status == 403
        assert "unknown or was already used" in await resp.text()
    async with stack.http.get(callback, allow_redirects=False) as resp:
        assert resp.status == 200
    async with stack.http.get(callback, allow_redirects=False) as resp:
        text = await resp.text()
        assert resp.status == 400 and "already completed" in text
        assert "Traceback" not in text and parse_qs(urlsplit(callback).query)["code"][0] not in text
    assert len([g for g in stack.entra.grants() if g == "authorization_code"]) == 1  # the replay never reached Entra
    async with stack.http.get(f"{stack.base}/metrics") as resp:
        metrics = await resp.text()
    assert 'presence_sync_rejected_total{reason="ticket",route="/auth/graph/login"} 1.0' in metrics
    assert 'presence_sync_rejected_total{reason="state",route="/auth/graph/callback"} 1.0' in metrics


async def test_two_callbacks_racing_for_one_state_redeem_it_once(stack: Stack) -> None:
    ticket = await issue_ticket(stack.rt.store)
    async with await stack.login_redirect(ticket) as resp:
        callback = await stack.authorize(resp.headers["Location"])

    async def hit() -> int:
        async with stack.http.get(callback, allow_redirects=False) as resp:
            return resp.status

    assert sorted(await asyncio.gather(hit(), hit(), hit())) == [200, 400, 400]
    assert stack.entra.grants().count("authorization_code") == 1


async def test_missing_and_expired_tickets_are_403(stack: Stack) -> None:
    async with stack.http.get(f"{stack.base}{LOGIN_PATH}", allow_redirects=False) as resp:
        assert resp.status == 403 and "graph login --web" in await resp.text()
    expired = await issue_ticket(stack.rt.store, ttl=timedelta(seconds=-1))
    async with await stack.login_redirect(expired) as resp:
        assert resp.status == 403 and "expired" in await resp.text()
    assert not any("authorize" in path for _, path, _ in stack.entra.requests)


async def test_declined_consent_is_a_clear_page_and_the_cli_hears_of_it(stack: Stack) -> None:
    stack.entra.refuse_consent = True
    ticket = await issue_ticket(stack.rt.store)
    async with await stack.login_redirect(ticket) as resp:
        callback = await stack.authorize(resp.headers["Location"])
    async with stack.http.get(callback, allow_redirects=False) as resp:
        text = await resp.text()
        assert resp.status == 400 and "AADSTS65004" in text and "Traceback" not in text
    result = await login_result(stack.rt.store, ticket)
    assert result is not None and "AADSTS65004" in result["error"]
    assert await stack.rt.store.list_docs(ACCOUNT_KIND) == {}


async def test_a_code_without_its_pkce_verifier_is_refused_by_entra(stack: Stack) -> None:
    """The emulator checks PKCE as Entra does: a code taken from the redirect is useless alone."""
    ticket = await issue_ticket(stack.rt.store)
    async with await stack.login_redirect(ticket) as resp:
        callback = await stack.authorize(resp.headers["Location"])
    query = parse_qs(urlsplit(callback).query)
    form = {
        "grant_type": "authorization_code",
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "code": query["code"][0],
        "redirect_uri": f"{stack.base}{CALLBACK_PATH}",
        "code_verifier": "not-the-verifier-" + "x" * 40,
    }
    url = f"{stack.entra.url}/{stack.entra.tenant_id}/oauth2/v2.0/token"
    async with stack.http.post(url, data=form) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["error_codes"] == [50148]
    assert body["error_description"].startswith("AADSTS50148:")
    async with stack.http.get(callback, allow_redirects=False) as resp:  # the service's own redemption still works
        assert resp.status == 200


async def test_certificate_credential_signs_in_with_a_client_assertion(tmp_path: Path, monkeypatch) -> None:
    clean_env(monkeypatch)
    entra = EntraEmulator()
    await entra.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    entra.add_app(CLIENT_ID, certificate=True, redirect_uris=(f"{base}{CALLBACK_PATH}",))
    cert, key = generate_certificate("presence-sync-app")
    pem = tmp_path / "app.pem"
    pem.write_bytes(key + cert)
    settings = web_settings(tmp_path, port, entra, client_secret="", client_cert_path=str(pem))
    rt = await bootstrap(settings, overrides=Overrides(identity_http=entra.http_client()))
    runner = web.AppRunner(create_app(settings, runtime=rt, background=False), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            st = Stack(entra, settings, rt, http, base, tmp_path / "store.db")
            _, page = await st.sign_in()
        assert "Signed in as" in page
        assert entra.issued[-1].client_auth == "assertion"
    finally:
        await runner.cleanup()
        await rt.close()
        await entra.stop()


async def test_cli_prints_the_link_and_reports_the_sign_in(stack: Stack, monkeypatch, capsys) -> None:
    """``presence-sync graph login --web`` against the running service: it shares the store, prints one
    link, waits, and prints who signed in."""
    s = stack.settings
    for name in ("database_url", "tenant_id", "client_id", "client_secret", "public_url", "secret_key"):
        monkeypatch.setenv(f"PRESENCE_SYNC_{name.upper()}", str(getattr(s, name)))
    cli_run = asyncio.create_task(asyncio.to_thread(cli.main, ["graph", "login", "--web"]))
    link = ""
    async with asyncio.timeout(20):
        while not link:
            await asyncio.sleep(0.05)
            out = capsys.readouterr().out
            link = next((w for w in out.split() if w.startswith(f"{stack.base}{LOGIN_PATH}?ticket=")), "")
            assert not cli_run.done(), out
    ticket = parse_qs(urlsplit(link).query)["ticket"][0]
    async with await stack.login_redirect(ticket) as resp:
        callback = await stack.authorize(resp.headers["Location"])
    async with stack.http.get(callback, allow_redirects=False) as resp:
        assert resp.status == 200
    async with asyncio.timeout(20):
        code = await cli_run
    out = capsys.readouterr().out
    assert code == 0 and f"signed in {stack.entra.user.username}" in out


def test_cli_without_public_url_is_one_line_exit_2(monkeypatch, capsys, tmp_path: Path) -> None:
    clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRESENCE_SYNC_TENANT_ID", "contoso.onmicrosoft.com")
    monkeypatch.setenv("PRESENCE_SYNC_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("PRESENCE_SYNC_CLIENT_SECRET", SECRET)
    code = cli.main(["graph", "login", "--web"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "PRESENCE_SYNC_PUBLIC_URL" in err and "Traceback" not in err and SECRET not in err
    assert not (tmp_path / "presence-sync.db").exists()


def test_cli_without_a_credential_or_in_static_mode_is_one_line_exit_2(monkeypatch, capsys, tmp_path: Path) -> None:
    clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRESENCE_SYNC_PUBLIC_URL", "https://bridge.contoso.example")
    monkeypatch.setenv("PRESENCE_SYNC_TENANT_ID", "contoso.onmicrosoft.com")
    monkeypatch.setenv("PRESENCE_SYNC_CLIENT_ID", CLIENT_ID)
    assert cli.main(["graph", "login", "--web"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CLIENT_CERT_PATH or PRESENCE_SYNC_CLIENT_SECRET" in err
    monkeypatch.setenv("PRESENCE_SYNC_AUTH_MODE", "static")
    monkeypatch.setenv("PRESENCE_SYNC_STATIC_TOKEN", "static-token-value")
    monkeypatch.setenv("PRESENCE_SYNC_PUBLIC_URL", "http://127.0.0.1:3978")
    assert cli.main(["graph", "login", "--web"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "AUTH_MODE=static" in err
