"""Subscriber accounts: device-code login through MSAL against a stand-in identity platform (MSAL's
``http_client`` hook, so no network), the token cache kept encrypted in the store and written back
when a refresh rotates it, sign-in problems as clear errors; static accounts for the emulators."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from graph_sync.accounts import ACCOUNT_KIND, DELEGATED_SCOPES, SubscriberAccounts, secret_name
from graph_sync.login import device_code_login
from mapping.errors import ConfigError, PermanentError
from mapping.memory import MemoryStore
from tests.graph.conftest import CLIENT_ID, TENANT_ID

USER = "subscriber1@contoso.example"
AUTHORITY = "https://login.microsoftonline.com"


def _b64(d: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


class Response:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status_code = status
        self.text = json.dumps(body)
        self.headers: dict[str, str] = {"Content-Type": "application/json"}

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}")


class IdentityPlatform:
    """What MSAL asks login.microsoftonline.com for during a device-code sign-in and a refresh."""

    def __init__(self, *, pending: int = 1, expires_in: int = 3600) -> None:
        self.pending = pending
        self.expires_in = expires_in
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.refresh_error: str | None = None
        self.issued = 0

    def get(self, url: str, params: Any = None, headers: Any = None, **kw: Any) -> Response:
        self.requests.append(("GET", url, {}))
        base = f"{AUTHORITY}/{TENANT_ID}"
        if "/discovery/instance" in url:  # MSAL's authority aliases, asked for after a failed refresh
            return Response(
                200,
                {
                    "tenant_discovery_endpoint": f"{base}/v2.0/.well-known/openid-configuration",
                    "metadata": [
                        {
                            "preferred_network": "login.microsoftonline.com",
                            "preferred_cache": "login.windows.net",
                            "aliases": ["login.microsoftonline.com", "login.windows.net"],
                        }
                    ],
                },
            )
        return Response(
            200,
            {
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{AUTHORITY}/{TENANT_ID}/v2.0",
            },
        )

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None, **kw: Any) -> Response:
        data = dict(data or {})
        self.requests.append(("POST", url, data))
        if url.endswith("/devicecode"):
            return Response(
                200,
                {
                    "device_code": "dev-code",
                    "user_code": "ABCD-EFGH",
                    "verification_uri": "https://microsoft.com/devicelogin",
                    "expires_in": 900,
                    "interval": 1,
                    "message": "To sign in, open https://microsoft.com/devicelogin "
                    "and enter the code ABCD-EFGH to authenticate.",
                },
            )
        grant = data.get("grant_type")
        if grant == "urn:ietf:params:oauth:grant-type:device_code" and self.pending > 0:
            self.pending -= 1
            return Response(400, {"error": "authorization_pending", "error_description": "waiting for the user"})
        if grant == "refresh_token" and self.refresh_error:
            return Response(
                400, {"error": self.refresh_error, "error_description": "AADSTS70043: The refresh token has expired."}
            )
        self.issued += 1
        now = int(time.time())
        id_token = (
            "e30."
            + _b64(
                {
                    "aud": CLIENT_ID,
                    "iss": f"{AUTHORITY}/{TENANT_ID}/v2.0",
                    "tid": TENANT_ID,
                    "oid": "oid-1",
                    "preferred_username": USER,
                    "iat": now,
                    "exp": now + 3600,
                }
            )
            + ".x"
        )
        return Response(
            200,
            {
                "token_type": "Bearer",
                "access_token": f"access-{self.issued}",
                "refresh_token": f"refresh-{self.issued}",
                "expires_in": self.expires_in,
                "scope": " ".join(DELEGATED_SCOPES),
                "id_token": id_token,
                "client_info": _b64({"uid": "oid-1", "utid": TENANT_ID}),
            },
        )

    def close(self) -> None:
        pass

    def grants(self) -> list[str]:
        return [d.get("grant_type", "") for m, u, d in self.requests if u.endswith("/token")]


async def no_sleep(_: float) -> None:
    return None


async def login(store: MemoryStore, idp: IdentityPlatform, lines: list[str]) -> Any:
    return await device_code_login(
        tenant_id=TENANT_ID, client_id=CLIENT_ID, store=store, out=lines.append, http_client=idp, sleep=no_sleep
    )


async def test_device_code_login_prints_the_code_and_stores_the_account() -> None:
    store, idp, lines = MemoryStore(), IdentityPlatform(pending=2), list[str]()
    info = await login(store, idp, lines)
    assert str(info) == f"{USER} (tenant {TENANT_ID})"
    assert any("https://microsoft.com/devicelogin" in line for line in lines)
    assert any("ABCD-EFGH" in line for line in lines)
    assert idp.grants() == ["urn:ietf:params:oauth:grant-type:device_code"] * 3  # polled until signed in
    device_request = next(d for m, u, d in idp.requests if u.endswith("/devicecode"))
    assert "Presence.Read.All" in device_request["scope"]
    cache = json.loads((await store.get_secret(secret_name(USER))) or b"{}")
    assert any(t["secret"] == "refresh-1" for t in cache["RefreshToken"].values())
    doc = await store.get_doc(ACCOUNT_KIND, USER)
    assert doc is not None and doc["tenant_id"] == TENANT_ID and doc["home_account_id"] == f"oid-1.{TENANT_ID}"


async def test_refused_sign_in_is_a_clear_error() -> None:
    class Refusing(IdentityPlatform):
        def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None, **kw: Any) -> Response:
            if dict(data or {}).get("grant_type", "").endswith("device_code"):
                return Response(400, {"error": "authorization_declined", "error_description": "The user declined."})
            return super().post(url, params, data, headers, **kw)

    store = MemoryStore()
    with pytest.raises(PermanentError, match="authorization_declined"):
        await login(store, Refusing(), [])
    assert await store.list_docs(ACCOUNT_KIND) == {}


async def test_login_needs_tenant_and_client() -> None:
    with pytest.raises(ConfigError, match="TENANT_ID"):
        await device_code_login(tenant_id="", client_id=CLIENT_ID, store=MemoryStore(), out=print)


async def test_signed_in_account_gives_tokens_and_saves_a_refreshed_cache() -> None:
    store, idp = MemoryStore(), IdentityPlatform(pending=0, expires_in=60)  # expires inside MSAL's margin
    await login(store, idp, [])
    accounts = SubscriberAccounts(store, tenant_id=TENANT_ID, client_id=CLIENT_ID, static_tokens=None, http_client=idp)
    assert [a.name for a in await accounts.accounts()] == [USER]
    before = await store.get_secret(secret_name(USER))
    token = await accounts.tokens(USER).token("https://graph.microsoft.com/.default")
    assert token == "access-2" and idp.grants()[-1] == "refresh_token"
    after = await store.get_secret(secret_name(USER))
    assert after != before and b"refresh-2" in (after or b"")  # the rotated refresh token is kept
    doc = await store.get_doc(ACCOUNT_KIND, USER)
    assert doc is not None and doc["error"] is None and doc["last_refresh"]


async def test_cached_token_is_reused_without_calling_the_identity_platform() -> None:
    store, idp = MemoryStore(), IdentityPlatform(pending=0)
    await login(store, idp, [])
    accounts = SubscriberAccounts(store, tenant_id=TENANT_ID, client_id=CLIENT_ID, static_tokens=None, http_client=idp)
    provider = accounts.tokens(USER)
    assert await provider.token("x") == "access-1"
    calls = len(idp.requests)
    assert await provider.token("x") == "access-1"
    assert len(idp.requests) == calls


async def test_expired_refresh_token_asks_for_a_new_login() -> None:
    store, idp = MemoryStore(), IdentityPlatform(pending=0, expires_in=60)
    await login(store, idp, [])
    idp.refresh_error = "invalid_grant"
    accounts = SubscriberAccounts(store, tenant_id=TENANT_ID, client_id=CLIENT_ID, static_tokens=None, http_client=idp)
    with pytest.raises(PermanentError, match=r"must sign in again.*graph login"):
        await accounts.tokens(USER).token("x")
    rows = await accounts.describe()
    assert rows[0]["account"] == USER and rows[0]["health"].startswith("error: invalid_grant")


async def test_account_without_a_cache_is_not_signed_in() -> None:
    store = MemoryStore()
    await store.put_doc(ACCOUNT_KIND, "ghost@contoso.example", {"username": "ghost@contoso.example"})
    accounts = SubscriberAccounts(store, tenant_id=TENANT_ID, client_id=CLIENT_ID, static_tokens=None)
    with pytest.raises(PermanentError, match="graph login"):
        await accounts.tokens("ghost@contoso.example").token("x")


async def test_static_accounts_are_numbered() -> None:
    accounts = SubscriberAccounts(MemoryStore(), tenant_id="", client_id="", static_tokens=["t1", "t2"])
    assert [a.name for a in await accounts.accounts()] == ["static-1", "static-2"]
    assert await accounts.tokens("static-2").token("any") == "t2"
    with pytest.raises(ConfigError):
        accounts.tokens("static-3")
    assert [r["account"] for r in await accounts.describe()] == ["static-1", "static-2"]
