"""Subscriber accounts: the delegated identities presence subscriptions are created as.

Graph refuses application tokens for presence subscriptions and allows one subscription per account
per app, each covering at most 650 users; so covering N agents takes ceil(N / 650) signed-in accounts
(DESIGN, upstream-apis.md). ``presence-sync graph login`` signs one in (``graph_sync.login``); this
module hands out a ``TokenProvider`` per account:

- **entra**: an MSAL application over the account's ``SerializableTokenCache``. The cache (refresh
  token included) lives encrypted in the store (``put_secret("graph.account.<name>")``); the account
  list is docs kind ``graph.account``. ``acquire_token_silent`` refreshes with the refresh token when
  the access token is near expiry, and a changed cache is written back at once, so a rotated refresh
  token is never lost to a restart. The application is the kind that signed the account in (the
  doc's ``flow``): a ``PublicClientApplication`` for device code, a ``ConfidentialClientApplication``
  with the app's certificate or secret for ``graph login --web``, because Entra redeems a refresh
  token issued to a confidential client only with that client's credential (AADSTS7000218 otherwise).
- **static** (emulators): each configured bearer token is one account, ``static-1``, ``static-2``...

MSAL is synchronous (``requests``); its calls run in a worker thread so the event loop never waits
on the identity platform.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msal

from graph_sync.entra_errors import explain_entra_error
from mapping.clock import Clock, utcnow
from mapping.errors import ConfigError, PermanentError, RetryableError
from mapping.ports import AdapterRecords, TokenProvider

log = logging.getLogger("presence_sync.graph")

ACCOUNT_KIND = "graph.account"
SECRET_PREFIX = "graph.account."
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DELEGATED_SCOPES = ("https://graph.microsoft.com/Presence.Read.All",)
"""What a subscriber account consents to: reading presence is all a presence subscription needs."""
_REFRESH_MARGIN = 300.0
_SIGN_IN_AGAIN = ("invalid_grant", "interaction_required", "consent_required", "login_required")
DEVICE_CODE_FLOW = "device_code"
AUTH_CODE_FLOW = "auth_code"
"""The ``flow`` an account doc records: which client type signed it in, so it refreshes with the same."""


def secret_name(username: str) -> str:
    return SECRET_PREFIX + username


def app_credential(cert_path: str, secret: str) -> str | dict[str, str] | None:
    """The app's own credential as MSAL takes it: the certificate (``CLIENT_CERT_PATH``, one PEM file
    with the private key and the certificate, from which MSAL derives the thumbprint), else the
    ``CLIENT_SECRET``; None when neither is configured."""
    if cert_path:
        try:
            pem = Path(cert_path).read_text()
        except OSError as e:
            raise ConfigError(f"PRESENCE_SYNC_CLIENT_CERT_PATH={cert_path}: cannot read it ({e.strerror})") from None
        key = re.search(
            r"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", pem, re.S
        )
        cert = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
        if key is None or cert is None:
            raise ConfigError(
                f"PRESENCE_SYNC_CLIENT_CERT_PATH={cert_path}: expected one PEM file holding both the private key "
                "and the certificate"
            )
        return {"private_key": key.group(0), "public_certificate": cert.group(0)}
    return secret or None


def confidential_app(
    client_id: str,
    credential: str | dict[str, str],
    *,
    authority_host: str,
    tenant_id: str,
    cache: msal.SerializableTokenCache | None = None,
    http_client: Any = None,
) -> msal.ConfidentialClientApplication:
    """The one MSAL confidential client (the app's own certificate or secret): the web sign-in redeems
    codes with it, and the accounts it signed in are refreshed with it (a refresh token issued to a
    confidential client cannot be redeemed by a public one)."""
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=f"{authority_host}/{tenant_id}",
        token_cache=cache,
        http_client=http_client,
    )


@dataclass(frozen=True)
class AccountInfo:
    """One subscriber account as listed by ``graph subscriptions`` and returned by ``graph login``."""

    name: str
    kind: str = "delegated"
    home_account_id: str = ""
    tenant_id: str = ""
    signed_in_at: str = ""
    flow: str = DEVICE_CODE_FLOW

    def __str__(self) -> str:
        tenant = f" (tenant {self.tenant_id})" if self.tenant_id else ""
        return f"{self.name}{tenant}"


class StaticAccountTokens:
    """A fixed bearer for one emulator subscriber account."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self, scope: str) -> str:
        return self._token


class AccountTokens:
    """Delegated tokens for one signed-in account, from its MSAL cache in the store.

    The ``scope`` asked for is ignored: Graph clients ask for ``.default`` (the app's view), but a
    subscriber account holds the delegated ``Presence.Read.All`` it consented to at login."""

    def __init__(self, owner: SubscriberAccounts, name: str) -> None:
        self.owner = owner
        self.name = name
        self._lock = asyncio.Lock()
        self._app: msal.ClientApplication | None = None
        self._cache: msal.SerializableTokenCache | None = None
        self._token: tuple[str, float] | None = None

    async def token(self, scope: str) -> str:
        cached = self._token
        if cached and cached[1] - time.time() > _REFRESH_MARGIN:
            return cached[0]
        async with self._lock:
            cached = self._token
            if cached and cached[1] - time.time() > _REFRESH_MARGIN:
                return cached[0]
            try:
                return await self._acquire()
            except PermanentError:
                # A login made by another process (``graph login`` while ``serve`` runs) may have
                # replaced the cache in the store: reload once before giving up.
                self._app = None
                return await self._acquire()

    async def _load(self) -> msal.ClientApplication:
        if self._app is not None:
            return self._app
        doc = await self.owner.store.get_doc(ACCOUNT_KIND, self.name) or {}
        flow = str(doc.get("flow") or DEVICE_CODE_FLOW)
        blob = await self.owner.store.get_secret(secret_name(self.name))
        if not blob:
            raise PermanentError(
                f"subscriber account {self.name} has no token cache in the store; "
                "run `presence-sync graph login` to sign it in"
            )
        cache = msal.SerializableTokenCache()
        try:
            cache.deserialize(blob.decode())
        except ValueError as e:
            raise PermanentError(
                f"subscriber account {self.name}: stored token cache is unreadable ({e}); "
                "run `presence-sync graph login` again"
            ) from None
        self._cache = cache
        try:
            self._app = await asyncio.to_thread(self.owner.msal_app, cache, flow)
        except ConfigError as e:
            await self.owner.note(self.name, error=str(e))
            raise PermanentError(f"subscriber account {self.name}: {e}") from None
        return self._app

    async def _acquire(self) -> str:
        app = await self._load()
        try:
            result = await asyncio.to_thread(self._silent, app)
        except Exception as e:  # requests' connection errors and the like
            raise RetryableError(
                f"subscriber account {self.name}: cannot reach the identity platform ({type(e).__name__}: {e})"
            ) from None
        if self._cache is not None and self._cache.has_state_changed:
            await self.owner.store.put_secret(secret_name(self.name), self._cache.serialize().encode())
            self._cache.has_state_changed = False
            await self.owner.note(self.name, last_refresh=self.owner.clock().isoformat(), error=None)
        if result is None:
            await self.owner.note(self.name, error="signed out: no token in the cache")
            raise PermanentError(
                f"subscriber account {self.name} is not signed in (no usable token in its cache); "
                "run `presence-sync graph login`"
            )
        if "access_token" not in result:
            code = str(result.get("error", "unknown_error"))
            desc = str(result.get("error_description", "")).splitlines()[0] if result.get("error_description") else ""
            await self.owner.note(self.name, error=f"{code}: {desc}")
            if code in _SIGN_IN_AGAIN:
                raise PermanentError(
                    f"subscriber account {self.name} must sign in again ({code}: {desc}); "
                    "run `presence-sync graph login`"
                )
            advice = explain_entra_error(desc)
            if advice:  # the app registration or its credential, not the account: retrying cannot help
                raise PermanentError(
                    f"subscriber account {self.name}: token refresh refused ({code}: {desc}) -> {advice}"
                )
            raise RetryableError(f"subscriber account {self.name}: token refresh failed ({code}: {desc})")
        expires_in = float(result.get("expires_in") or 3600)
        self._token = (str(result["access_token"]), time.time() + expires_in)
        return self._token[0]

    def _silent(self, app: msal.ClientApplication) -> dict[str, Any] | None:
        accounts = app.get_accounts(username=self.name)
        if not accounts:
            return None
        result: dict[str, Any] | None = app.acquire_token_silent_with_error(list(self.owner.scopes), accounts[0])
        return result


class SubscriberAccounts:
    """The accounts subscriptions are created as, and a ``TokenProvider`` for each (see module doc).

    ``static_tokens`` not None selects static mode (emulators). ``http_client`` is handed to MSAL
    (a ``requests``-like object); tests use it to stand in for the identity platform."""

    def __init__(
        self,
        store: AdapterRecords,
        *,
        tenant_id: str,
        client_id: str,
        static_tokens: list[str] | None,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        http_client: Any = None,
        scopes: tuple[str, ...] = DELEGATED_SCOPES,
        clock: Clock = utcnow,
        client_credential: str | dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.client_credential = client_credential
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.static_tokens = list(static_tokens) if static_tokens is not None else None
        self.authority_host = authority_host.rstrip("/")
        self.http_client = http_client
        self.scopes = scopes
        self.clock = clock
        self._providers: dict[str, TokenProvider] = {}

    @property
    def static(self) -> bool:
        return self.static_tokens is not None

    def msal_app(self, cache: msal.SerializableTokenCache, flow: str = DEVICE_CODE_FLOW) -> msal.ClientApplication:
        """The client type that signed the account in (see the module doc)."""
        if not self.tenant_id or not self.client_id:
            raise ConfigError("subscriber accounts need PRESENCE_SYNC_TENANT_ID and PRESENCE_SYNC_CLIENT_ID")
        if flow == AUTH_CODE_FLOW:
            if not self.client_credential:
                raise ConfigError(
                    "signed in with `graph login --web`, so its tokens are refreshed with the app's own "
                    "credential: set PRESENCE_SYNC_CLIENT_CERT_PATH or PRESENCE_SYNC_CLIENT_SECRET"
                )
            return confidential_app(
                self.client_id,
                self.client_credential,
                authority_host=self.authority_host,
                tenant_id=self.tenant_id,
                cache=cache,
                http_client=self.http_client,
            )
        return msal.PublicClientApplication(
            self.client_id,
            authority=f"{self.authority_host}/{self.tenant_id}",
            token_cache=cache,
            http_client=self.http_client,
        )

    async def accounts(self) -> list[AccountInfo]:
        """Every account, sorted by name (stable: subscriptions are assigned in this order)."""
        if self.static_tokens is not None:
            return [AccountInfo(f"static-{i}", "static") for i in range(1, len(self.static_tokens) + 1)]
        docs = await self.store.list_docs(ACCOUNT_KIND)
        return [
            AccountInfo(
                name,
                "delegated",
                str(d.get("home_account_id", "")),
                str(d.get("tenant_id", "")),
                str(d.get("signed_in_at", "")),
                str(d.get("flow") or DEVICE_CODE_FLOW),
            )
            for name, d in sorted(docs.items())
            if not d.get("removed")
        ]

    def tokens(self, name: str) -> TokenProvider:
        """The ``TokenProvider`` of one account (the same object every time)."""
        provider = self._providers.get(name)
        if provider is None:
            if self.static_tokens is not None:
                index = int(name.removeprefix("static-")) - 1 if name.startswith("static-") else -1
                if not 0 <= index < len(self.static_tokens):
                    raise ConfigError(f"no static subscriber account {name!r}")
                provider = StaticAccountTokens(self.static_tokens[index])
            else:
                provider = AccountTokens(self, name)
            self._providers[name] = provider
        return provider

    async def note(self, name: str, **fields: Any) -> None:
        """Updates an account's listing document (last refresh, last error)."""
        if self.static:
            return
        doc = await self.store.get_doc(ACCOUNT_KIND, name) or {"username": name}
        doc.update(fields)
        await self.store.put_doc(ACCOUNT_KIND, name, doc)

    async def describe(self) -> list[dict[str, Any]]:
        """One row per account for ``graph subscriptions``: name, kind, sign-in, refresh, health."""
        if self.static:
            return [{"account": a.name, "kind": "static", "health": "ok"} for a in await self.accounts()]
        docs = await self.store.list_docs(ACCOUNT_KIND)
        return [
            {
                "account": name,
                "kind": "delegated",
                "flow": d.get("flow") or DEVICE_CODE_FLOW,
                "signed_in": d.get("signed_in_at", ""),
                "last_refresh": d.get("last_refresh") or "-",
                "health": f"error: {d['error']}" if d.get("error") else "ok",
            }
            for name, d in sorted(docs.items())
        ]
