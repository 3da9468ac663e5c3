"""``doctor``'s Entra checks against the Entra emulator: the tenant resolution line, the bot token
(client credentials for BOT_APP_ID against its tenant), and AADSTS7000218 / AADSTS700016 worded as
what to change wherever they are met. Also ``graph login`` (device code) meeting AADSTS7000218."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from emulators.entra import EntraEmulator, entra_error
from graph_sync.entra_errors import explain_entra_error
from graph_sync.login import device_code_login
from mapping.errors import PermanentError
from mapping.memory import MemoryStore
from service.doctor import run_doctor
from service.settings import load_settings

CLIENT_ID = "c1d2e3f4-0000-4000-8000-000000000003"
BOT_ID = "b0b0b0b0-0000-4000-8000-000000000004"
BOT_PASSWORD = "bot-password-value-0123456789"


@pytest.fixture
async def entra():
    emulator = EntraEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


class RefusingTokens:
    """The app token provider as azure-identity words Entra's refusal (doctor must not reach the
    internet, and azure-identity takes no http client): the description is the emulator's own."""

    def __init__(self, code: int) -> None:
        self.description = entra_error(code, client_id=CLIENT_ID, tenant="t")["error_description"]

    async def token(self, scope: str) -> str:
        raise PermanentError(f"Entra refused the app's credentials for {scope}: {self.description}")


async def doctor(tmp_path: Path, monkeypatch, entra: EntraEmulator, tokens: Any = None, **extra: Any) -> dict[str, str]:
    import os

    for k in list(os.environ):
        if k.startswith("PRESENCE_SYNC_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    if tokens is not None:
        monkeypatch.setattr("service.runtime.token_provider", lambda settings: tokens)
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'missing.db'}",
        "auth_mode": "entra",
        "tenant_id": entra.domain,
        "client_id": CLIENT_ID,
        "client_secret": "app-secret-value-0123456789",
        "bot_app_id": BOT_ID,
        "bot_app_password": BOT_PASSWORD,
    }
    values.update(extra)
    lines: list[str] = []
    async with asyncio.timeout(30):
        await run_doctor(load_settings(**values), lines.append, identity_http=entra.http_client())
    found = {}
    for line in lines[:-1]:
        m = re.match(r"^(PASS|FAIL|WARN|SKIP)  ([^:]+): ", line)
        assert m, line
        found[m.group(2)] = line
    assert BOT_PASSWORD not in "\n".join(lines)
    return found


async def test_tenant_and_bot_token_pass_and_aadsts700016_says_what_to_change(entra, tmp_path, monkeypatch) -> None:
    entra.add_app(BOT_ID, secret=BOT_PASSWORD)
    found = await doctor(tmp_path, monkeypatch, entra, RefusingTokens(700016))
    assert found["tenant"].startswith("PASS") and entra.tenant_id in found["tenant"]
    assert found["bot token"].startswith("PASS") and "https://api.botframework.com/.default" in found["bot token"]
    assert "SingleTenant" in found["bot token"]
    graph = found["graph token"]
    assert graph.startswith("FAIL") and "AADSTS700016" in graph
    assert "-> Entra does not know this application in this tenant" in graph and "PRESENCE_SYNC_CLIENT_ID" in graph
    assert entra.grants() == ["client_credentials"]
    bot_request = next(d for m, p, d in entra.requests if p.endswith("/token"))
    assert bot_request["scope"] == "https://api.botframework.com/.default" and bot_request["client_id"] == BOT_ID


async def test_aadsts7000218_names_allow_public_client_flows(entra, tmp_path, monkeypatch) -> None:
    found = await doctor(tmp_path, monkeypatch, entra, RefusingTokens(7000218), bot_app_id="")
    graph = found["graph token"]
    assert "AADSTS7000218" in graph and "Allow public client flows" in graph and "graph login --web" in graph
    assert found["bot token"].startswith("SKIP") and "BOT_APP_ID" in found["bot token"]


async def test_a_multitenant_bot_against_a_single_tenant_app_fails_with_the_setting(
    entra, tmp_path, monkeypatch
) -> None:
    entra.add_app(BOT_ID, secret=BOT_PASSWORD)  # registered in the customer's tenant only
    found = await doctor(tmp_path, monkeypatch, entra, RefusingTokens(700016), bot_app_type="MultiTenant")
    bot = found["bot token"]
    assert bot.startswith("FAIL") and "AADSTS700016" in bot and "botframework.com" in bot
    assert "BOT_APP_TYPE" in bot and "SingleTenant" in bot


async def test_a_bot_token_refused_with_aadsts7000218_gets_the_advice(entra, tmp_path, monkeypatch) -> None:
    entra.add_app(BOT_ID, secret=BOT_PASSWORD)
    entra.force_error = 7000218
    found = await doctor(tmp_path, monkeypatch, entra, RefusingTokens(700016))
    assert found["bot token"].startswith("FAIL") and "Allow public client flows" in found["bot token"]


async def test_an_unresolved_tenant_is_a_warning_with_what_to_set(entra, tmp_path, monkeypatch) -> None:
    found = await doctor(tmp_path, monkeypatch, entra, RefusingTokens(700016), tenant_id="nobody.onmicrosoft.com")
    assert found["tenant"].startswith("WARN") and "AADSTS90002" in found["tenant"]
    assert "PRESENCE_SYNC_TENANT_ID" in found["tenant"] and "issuer only" in found["tenant"]


def test_advice_matches_whole_codes_only() -> None:
    assert explain_entra_error("AADSTS7000218: The request body must contain") is not None
    assert "CLIENT_ID" in (explain_entra_error("x AADSTS700016: Application with identifier") or "")
    assert explain_entra_error("AADSTS7000016: something else") is None
    assert explain_entra_error("AADSTS70001: something else") is None
    assert explain_entra_error("no code here") is None


async def test_device_code_login_without_public_client_flows_says_what_to_change(entra) -> None:
    entra.add_app(CLIENT_ID, public_client_flows=False)
    store = MemoryStore()
    with pytest.raises(PermanentError, match=r"AADSTS7000218.*Allow public client flows.*graph login --web"):
        await device_code_login(
            tenant_id=entra.domain,
            client_id=CLIENT_ID,
            store=store,
            out=lambda _: None,
            http_client=entra.http_client(),
            sleep=lambda _: asyncio.sleep(0),
        )
    assert await store.list_docs("graph.account") == {}


async def test_device_code_login_against_the_emulator_with_public_client_flows(entra) -> None:
    entra.add_app(CLIENT_ID, public_client_flows=True)
    store = MemoryStore()
    info = await device_code_login(
        tenant_id=entra.domain,
        client_id=CLIENT_ID,
        store=store,
        out=lambda _: None,
        http_client=entra.http_client(),
        sleep=lambda _: asyncio.sleep(0),
    )
    assert info.name == entra.user.username and info.flow == "device_code"
    assert entra.grants()[-2:] == ["urn:ietf:params:oauth:grant-type:device_code"] * 2  # pending, then signed in
