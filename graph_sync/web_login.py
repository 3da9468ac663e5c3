"""``presence-sync graph login --web``: a subscriber account signed in through the running service with
the authorization-code flow, as a confidential client (the app's own certificate or secret).

Why a second sign-in: device code needs "Allow public client flows" on the app registration
(AADSTS7000218 otherwise) and many tenants block it with Conditional Access. The authorization-code
flow of a confidential client, with a redirect URI of type Web, needs neither.

How it goes, and why each step is so:

1. The CLI (``issue_ticket``) stores a one-time ticket: random, 15 minutes, single use, only its SHA-256
   kept (the store is shared with the service; a store reader cannot replay a link). It prints
   ``PUBLIC_URL/auth/graph/login?ticket=...``. The ticket is what stops anyone who can reach the
   service from starting a sign-in that would plant *their* account as a subscriber.
2. ``GET /auth/graph/login?ticket=`` consumes the ticket and starts MSAL's
   ``initiate_auth_code_flow`` (MSAL makes the ``state``, the PKCE verifier and challenge, the
   ``nonce``). The flow dict is kept server-side, encrypted (``put_secret``), keyed by the hash of its
   ``state``, for 10 minutes, and the browser is sent (302) to Entra's authorize URL. Server-side, so
   any instance behind a load balancer can take the callback.
3. ``GET /auth/graph/callback?code=&state=`` takes the flow for that state (once: a replayed callback
   finds nothing), redeems the code with ``acquire_token_by_auth_code_flow`` (MSAL checks state and
   nonce, sends the verifier), and stores the account exactly like the device-code login, with
   ``flow="auth_code"`` so it is refreshed by a confidential client (``graph_sync.accounts``). The
   outcome is written where the waiting CLI finds it (``login_result``).

The page shown is small plain HTML; neither the code nor any token is ever in a page or a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import secrets
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import msal
from aiohttp import web

from graph_sync.accounts import (
    AUTH_CODE_FLOW,
    DEFAULT_AUTHORITY_HOST,
    DELEGATED_SCOPES,
    AccountInfo,
    confidential_app,
)
from graph_sync.entra_errors import explain_entra_error
from graph_sync.login import save_account
from mapping.clock import Clock, utcnow
from mapping.ports import AdapterRecords
from mapping.redact import redact
from mapping.telemetry import Telemetry

log = logging.getLogger("presence_sync.graph")

LOGIN_PATH = "/auth/graph/login"
CALLBACK_PATH = "/auth/graph/callback"
TICKET_KIND = "graph.login_ticket"
FLOW_KIND = "graph.login_flow"
RESULT_KIND = "graph.login_result"
FLOW_SECRET_PREFIX = "graph.login_flow."
TICKET_TTL = timedelta(minutes=15)
FLOW_TTL = timedelta(minutes=10)
AGAIN = "run `presence-sync graph login --web` again for a new link"


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def expired(doc: Mapping[str, Any], now: datetime) -> bool:
    """Whether a ticket or flow document is past its ``expires_at`` (or has none it can read)."""
    try:
        return datetime.fromisoformat(str(doc["expires_at"])) <= now
    except (KeyError, ValueError):
        return True


async def issue_ticket(
    store: AdapterRecords, *, kind: str = TICKET_KIND, clock: Clock = utcnow, ttl: timedelta = TICKET_TTL
) -> str:
    """A new one-time ticket of ``kind`` (the value goes into the link; the store keeps only its
    hash). Expired tickets are dropped on the way. The console's one-time link uses it too."""
    now = clock()
    for key, doc in (await store.list_docs(kind)).items():
        if expired(doc, now):
            await store.delete_doc(kind, key)
    ticket = secrets.token_urlsafe(32)
    await store.put_doc(kind, digest(ticket), {"expires_at": (now + ttl).isoformat()})
    return ticket


async def keep_flow(
    store: AdapterRecords,
    flow: Mapping[str, Any],
    now: datetime,
    *,
    kind: str = FLOW_KIND,
    secret_prefix: str = FLOW_SECRET_PREFIX,
    ttl: timedelta = FLOW_TTL,
    **fields: Any,
) -> None:
    """Keeps an MSAL auth-code flow (its PKCE verifier inside) encrypted, under the hash of its
    state, until ``ttl``; expired flows are dropped on the way (their secret emptied: the store has
    no delete for secrets). ``fields`` go into the flow's document."""
    for old, doc in (await store.list_docs(kind)).items():
        if expired(doc, now):
            await store.delete_doc(kind, old)
            await store.put_secret(secret_prefix + old, b"")
    key = digest(str(flow["state"]))
    await store.put_secret(secret_prefix + key, json.dumps(flow).encode())
    await store.put_doc(kind, key, {"expires_at": (now + ttl).isoformat(), **fields})


async def take_flow_secret(store: AdapterRecords, key: str, *, secret_prefix: str = FLOW_SECRET_PREFIX) -> bytes | None:
    """The flow kept under ``key``, read once: its secret is emptied (the PKCE verifier is not kept)."""
    blob = await store.get_secret(secret_prefix + key)
    await store.put_secret(secret_prefix + key, b"")
    return blob


async def login_result(store: AdapterRecords, ticket: str) -> dict[str, Any] | None:
    """What became of the sign-in started with ``ticket``: ``{"username"}`` or ``{"error"}``, once known."""
    return await store.get_doc(RESULT_KIND, digest(ticket))


async def wait_for_sign_in(
    store: AdapterRecords,
    ticket: str,
    *,
    timeout: float,
    poll: float = 2.0,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> dict[str, Any] | None:
    """Polls for ``login_result`` until ``timeout`` seconds have passed (None then); the result is
    removed once read. Ctrl+C cancels the sleep at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await login_result(store, ticket)
        if result is not None:
            await store.delete_doc(RESULT_KIND, digest(ticket))
            return result
        if loop.time() >= deadline:
            return None
        await sleep(min(poll, max(deadline - loop.time(), 0.0)))


class LoginRefused(Exception):
    """A step of the web sign-in that cannot go on: HTTP status, the line shown, the metric reason."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def page(status: int, title: str, line: str) -> web.Response:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>presence-sync</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(line)}</p></body></html>"
    )
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"},
    )


class WebLogin:
    """The two routes of the web sign-in (see the module doc). ``problem`` says what is missing when the
    service is not configured for it; the routes then answer 503 with that line."""

    def __init__(
        self,
        store: AdapterRecords,
        *,
        tenant_id: str,
        client_id: str,
        client_credential: str | dict[str, str] | None,
        redirect_uri: str | None,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        http_client: Any = None,
        scopes: tuple[str, ...] = DELEGATED_SCOPES,
        telemetry: Telemetry | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_credential = client_credential
        self.redirect_uri = redirect_uri
        self.authority_host = authority_host.rstrip("/")
        self.http_client = http_client
        self.scopes = scopes
        self.telemetry = telemetry
        self.clock = clock
        self._lock = asyncio.Lock()  # take-once of tickets and flows within this process

    @property
    def problem(self) -> str | None:
        missing = [
            name
            for name, value in (
                ("PRESENCE_SYNC_PUBLIC_URL", self.redirect_uri),
                ("PRESENCE_SYNC_TENANT_ID", self.tenant_id),
                ("PRESENCE_SYNC_CLIENT_ID", self.client_id),
                ("PRESENCE_SYNC_CLIENT_CERT_PATH or PRESENCE_SYNC_CLIENT_SECRET", self.client_credential),
            )
            if not value
        ]
        if missing:
            return f"web sign-in is not configured on this service: set {', '.join(missing)}"
        return None

    def _app(self, cache: msal.SerializableTokenCache | None = None) -> msal.ConfidentialClientApplication:
        assert self.client_credential is not None  # checked by ``problem`` before any flow starts
        return confidential_app(
            self.client_id,
            self.client_credential,
            authority_host=self.authority_host,
            tenant_id=self.tenant_id,
            cache=cache,
            http_client=self.http_client,
        )

    def _initiate(self, app: msal.ConfidentialClientApplication) -> dict[str, Any]:
        # The answer comes back in the query (the contract's GET callback): MSAL warns that form_post
        # would keep the code out of URLs. Here the code is single use and bound to the PKCE verifier
        # only this service holds, and the service keeps no access log, so the warning is noise.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended")
            flow: dict[str, Any] = app.initiate_auth_code_flow(
                list(self.scopes), redirect_uri=self.redirect_uri, prompt="select_account"
            )
        return flow

    async def _take(self, kind: str, key: str) -> dict[str, Any] | None:
        async with self._lock:
            doc = await self.store.get_doc(kind, key)
            if doc is not None:
                await self.store.delete_doc(kind, key)
            return doc

    # ------------------------------------------------------------------ the two steps

    async def begin(self, ticket: str) -> str:
        """Consumes ``ticket`` and returns Entra's authorize URL for a new flow."""
        if self.problem:
            raise LoginRefused(503, self.problem, "not_configured")
        if not ticket:
            raise LoginRefused(
                403,
                f"this page needs the one-time link printed by `presence-sync graph login --web`; {AGAIN}",
                "ticket",
            )
        held = await self._take(TICKET_KIND, digest(ticket))
        now = self.clock()
        if held is None:
            raise LoginRefused(403, f"this sign-in link is unknown or was already used; {AGAIN}", "ticket")
        if expired(held, now):
            raise LoginRefused(403, f"this sign-in link has expired (links last 15 minutes); {AGAIN}", "ticket_expired")
        try:
            app = await asyncio.to_thread(self._app)
            flow: dict[str, Any] = await asyncio.to_thread(self._initiate, app)
        except ValueError as e:  # MSAL: the authority (tenant) is not known
            raise LoginRefused(502, f"the identity platform refused tenant {self.tenant_id!r}: {e}", "entra") from None
        except Exception as e:
            raise LoginRefused(
                502, f"cannot reach the identity platform ({type(e).__name__}); {AGAIN}", "entra"
            ) from None
        await keep_flow(self.store, flow, now, ticket=digest(ticket))
        return str(flow["auth_uri"])

    async def complete(self, query: Mapping[str, str]) -> AccountInfo:
        """Redeems the callback's code for the flow its ``state`` names, and stores the account."""
        if self.problem:
            raise LoginRefused(503, self.problem, "not_configured")
        state = query.get("state", "")
        if not state:
            raise LoginRefused(400, f"the sign-in answer carries no state; {AGAIN}", "state")
        key = digest(state)
        held = await self._take(FLOW_KIND, key)
        if held is None:
            raise LoginRefused(400, f"this sign-in was already completed, or is unknown; {AGAIN}", "state")
        blob = await take_flow_secret(self.store, key)
        ticket_key = str(held.get("ticket", ""))
        try:
            if expired(held, self.clock()) or not blob:
                raise LoginRefused(400, f"this sign-in took too long (10 minutes at most); {AGAIN}", "state_expired")
            if query.get("error"):
                desc = redact(str(query.get("error_description", "")).split(" Trace ID:")[0].strip())
                advice = explain_entra_error(desc)
                raise LoginRefused(
                    400,
                    f"Entra refused the sign-in ({query['error']}: {desc})" + (f"; {advice}" if advice else ""),
                    "refused",
                )
            return await self._redeem(json.loads(blob), query, ticket_key)
        except LoginRefused as e:
            if ticket_key:
                await self.store.put_doc(RESULT_KIND, ticket_key, {"error": e.message})
            raise

    async def _redeem(self, flow: dict[str, Any], query: Mapping[str, str], ticket_key: str) -> AccountInfo:
        cache = msal.SerializableTokenCache()
        try:
            app = await asyncio.to_thread(self._app, cache)
            result: dict[str, Any] = await asyncio.to_thread(
                app.acquire_token_by_auth_code_flow, flow, dict(query), list(self.scopes)
            )
        except ValueError:  # MSAL: state or nonce does not match the flow
            raise LoginRefused(
                400, f"the sign-in answer does not match the sign-in it claims to be; {AGAIN}", "state"
            ) from None
        except Exception as e:
            raise LoginRefused(
                502, f"cannot reach the identity platform ({type(e).__name__}); {AGAIN}", "entra"
            ) from None
        if "access_token" not in result:
            code = str(result.get("error", "unknown_error"))
            desc = redact(str(result.get("error_description", "")).split(" Trace ID:")[0].strip())
            advice = explain_entra_error(desc)
            raise LoginRefused(
                400, f"Entra refused the code ({code}: {desc})" + (f"; {advice}" if advice else ""), "refused"
            )
        info = await save_account(
            self.store, app, cache, result, scopes=self.scopes, flow=AUTH_CODE_FLOW, tenant_id=self.tenant_id
        )
        if ticket_key:
            await self.store.put_doc(RESULT_KIND, ticket_key, {"username": info.name, "tenant_id": info.tenant_id})
        return info

    # ------------------------------------------------------------------ routes

    def _refused(self, route: str, e: LoginRefused) -> web.Response:
        if self.telemetry is not None:
            self.telemetry.rejected(route, e.reason)
        log.warning(
            "graph web sign-in refused", extra={"fields": {"route": route, "reason": e.reason, "why": e.message}}
        )
        return page(e.status, "Sign-in not completed", e.message)

    async def login(self, request: web.Request) -> web.StreamResponse:
        try:
            url = await self.begin(request.query.get("ticket", ""))
        except LoginRefused as e:
            return self._refused(LOGIN_PATH, e)
        return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})

    async def callback(self, request: web.Request) -> web.StreamResponse:
        try:
            info = await self.complete(request.query)
        except LoginRefused as e:
            return self._refused(CALLBACK_PATH, e)
        log.info("graph subscriber account signed in", extra={"fields": {"account": info.name, "flow": info.flow}})
        return page(
            200,
            "Signed in",
            f"Signed in as {info.name}; you can close this window. The service creates its presence "
            "subscriptions as this account (`presence-sync graph subscriptions` lists them).",
        )
