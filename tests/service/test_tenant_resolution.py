"""``TENANT_ID`` as a domain name: resolved once at start-up to the tenant GUID from the tenant's OpenID
configuration (Entra emulator), handed to the validationToken check, which then refuses a token of
another tenant; a failed look-up is a warning and the issuer-only check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from emulators.entra import EntraEmulator
from emulators.graph_crypto import SigningKey, sign_validation_token
from graph_sync.tenant import resolve_tenant
from mapping.memory import MemoryStore
from service.runtime import Overrides, bootstrap
from service.settings import load_settings

CLIENT_ID = "c1d2e3f4-0000-4000-8000-000000000002"
OTHER = "99999999-8888-7777-6666-555555555555"
KEY = SigningKey()


class Keys:
    async def key(self, kid: str) -> Any:
        return KEY.private_key.public_key() if kid == KEY.kid else None


@pytest.fixture
async def entra():
    emulator = EntraEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


async def test_a_domain_name_resolves_to_the_tenant_guid(entra: EntraEmulator) -> None:
    got = await resolve_tenant(entra.domain.upper(), http_client=entra.http_client())
    assert got.guid == entra.tenant_id and got.problem is None and got.looked_up
    assert entra.requests[-1][1] == f"/{entra.domain.upper()}/v2.0/.well-known/openid-configuration"


async def test_a_guid_is_taken_as_it_is_without_a_look_up(entra: EntraEmulator) -> None:
    got = await resolve_tenant(f" {entra.tenant_id.upper()} ", http_client=entra.http_client())
    assert got.guid == entra.tenant_id and not got.looked_up
    assert entra.requests == []


async def test_an_unknown_domain_is_a_problem_not_an_exception(entra: EntraEmulator) -> None:
    got = await resolve_tenant("nobody.onmicrosoft.com", http_client=entra.http_client())
    assert got.guid is None and got.problem is not None and "AADSTS90002" in got.problem
    assert "Trace ID" not in got.problem


def settings(tmp_path: Path, tenant: str) -> Any:
    return load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        auth_mode="entra",
        tenant_id=tenant,
        client_id=CLIENT_ID,
        client_secret="app-secret-value-0123456789",
        reconcile_interval_seconds=0,
    )


def token(tenant: str) -> str:
    return sign_validation_token(KEY, client_id=CLIENT_ID, tenant_id=tenant)


async def test_the_runtime_checks_validation_tokens_against_the_resolved_guid(
    entra: EntraEmulator, tmp_path: Path
) -> None:
    rt = await bootstrap(
        settings(tmp_path, entra.domain), overrides=Overrides(store=MemoryStore(), identity_http=entra.http_client())
    )
    try:
        assert rt.tenant is not None and rt.tenant.guid == entra.tenant_id
        validator = rt.graph_intake.tokens
        validator.jwks = Keys()  # type: ignore[assignment]
        await validator.check(token(entra.tenant_id))
        with pytest.raises(ValueError, match="another tenant"):
            await validator.check(token(OTHER))
    finally:
        await rt.close()


async def test_a_failed_resolution_warns_and_falls_back_to_the_issuer_check(
    entra: EntraEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="presence_sync")
    rt = await bootstrap(
        settings(tmp_path, "nobody.onmicrosoft.com"),
        overrides=Overrides(store=MemoryStore(), identity_http=entra.http_client()),
    )
    try:
        assert rt.tenant is not None and rt.tenant.guid is None
        assert any("tenant not resolved" in r.getMessage() for r in caplog.records)
        validator = rt.graph_intake.tokens
        validator.jwks = Keys()  # type: ignore[assignment]
        await validator.check(token(OTHER))  # no GUID to compare: a consistent issuer is all that is checked
        with pytest.raises(ValueError, match="issuer"):
            await validator.check(
                sign_validation_token(
                    KEY, client_id=CLIENT_ID, tenant_id=OTHER, extra_claims={"iss": "https://evil.example/"}
                )
            )
    finally:
        await rt.close()
