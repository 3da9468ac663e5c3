"""Who may use the console, and how they sign in.

Every console route needs a session: a signed cookie (HMAC-SHA256 with a key kept in the store's
secrets, so every instance honours it; HttpOnly, SameSite=Lax, Secure when ``PUBLIC_URL`` is https).
There is no "loopback is trusted" shortcut: behind a reverse proxy on the same host every request
comes from loopback. Two ways to get a session:

- **Entra** (authorization code with PKCE, as a confidential client of the same app registration:
  the pieces of ``graph_sync.web_login.WebLogin``). Allowed only when the id token's ``groups``
  claim holds ``CONSOLE_ALLOWED_GROUP_ID`` or its ``roles`` claim holds ``CONSOLE_ALLOWED_ROLE``.
- **A one-time link** printed by ``presence-sync console link`` (and ``demo --keep-running``):
  random, 15 minutes, single use, only its SHA-256 kept in the store; taken only from a loopback
  client, so a link seen over someone's shoulder is no use from another machine.

Actions are POSTs carrying the session's CSRF token (``X-CSRF-Token``), and are logged with who
did them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web

from edge.upstream import is_loopback
from graph_sync.web_login import WebLogin, digest, expired, issue_ticket, keep_flow, page, take_flow_secret
from mapping.clock import Clock, utcnow
from mapping.errors import ConfigError
from mapping.ports import AdapterRecords
from mapping.redact import redact

log = logging.getLogger("presence_sync.console")

COOKIE = "presence_sync_console"
SESSION_HOURS = 8
KEY_SECRET = "console.session_key"
TICKET_KIND = "console.link_ticket"
FLOW_KIND = "console.signin_flow"
FLOW_SECRET_PREFIX = "console.signin_flow."
TICKET_TTL = timedelta(minutes=15)
FLOW_TTL = timedelta(minutes=10)
SIGNIN_PATH = "/console/signin"
LINK_PATH = "/console/link"
LOGIN_PATH = "/console/auth/login"
CALLBACK_PATH = "/console/auth/callback"
SCOPES = ("User.Read",)
"""MSAL adds openid/profile itself; the id token is all the console reads."""
LINK_AGAIN = "run `presence-sync console link` on the service's machine for a new link"


@dataclass(frozen=True)
class Session:
    user: str
    via: str
    """``entra`` or ``link``."""
    nonce: str
    expires: float

    def csrf(self, key: bytes) -> str:
        return hmac.new(key, f"csrf:{self.nonce}".encode(), hashlib.sha256).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def issue_link_ticket(store: AdapterRecords, *, clock: Clock = utcnow, ttl: timedelta = TICKET_TTL) -> str:
    """A new one-time console ticket; the store keeps only its hash. Expired ones are dropped."""
    return await issue_ticket(store, kind=TICKET_KIND, clock=clock, ttl=ttl)


def allowed_by_claims(claims: Mapping[str, Any], *, group: str, role: str) -> tuple[bool, str]:
    """Whether an id token's claims let its holder in, and the line saying why not.

    ``groups`` holds group object ids (when the registration emits group claims); past 200 groups
    Entra leaves them out and sets ``_claim_names.groups`` instead (the overage): an app role is the
    way then. ``roles`` holds the values of the app roles assigned to the user."""
    if not group and not role:
        return False, (
            "console sign-in with Entra is not enabled: set PRESENCE_SYNC_CONSOLE_ALLOWED_GROUP_ID or "
            "PRESENCE_SYNC_CONSOLE_ALLOWED_ROLE"
        )
    roles = claims.get("roles") or []
    if role and isinstance(roles, list) and role in roles:
        return True, ""
    groups = claims.get("groups") or []
    if group and isinstance(groups, list) and group.lower() in (str(g).lower() for g in groups):
        return True, ""
    overage = isinstance(claims.get("_claim_names"), dict) and "groups" in claims["_claim_names"]
    who = claims.get("preferred_username") or claims.get("oid") or "this account"
    if group and overage:
        return False, (
            f"{who} is in too many groups for the id token to list them (groups overage); assign the "
            "app role named by PRESENCE_SYNC_CONSOLE_ALLOWED_ROLE instead"
        )
    wanted = " or ".join(
        x for x in (f"member of group {group}" if group else "", f"holder of app role {role!r}" if role else "") if x
    )
    return False, f"{who} may not use the console: it is for the {wanted}; ask an admin to add you"


class Access:
    """Sessions, the one-time link and the Entra sign-in of the console."""

    def __init__(
        self,
        store: AdapterRecords,
        *,
        entra: WebLogin | None,
        allowed_group: str,
        allowed_role: str,
        secure_cookie: bool,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.entra = entra
        self.allowed_group = allowed_group.strip()
        self.allowed_role = allowed_role.strip()
        self.secure_cookie = secure_cookie
        self.clock = clock
        self._key: bytes | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ sessions

    async def key(self) -> bytes:
        """The cookie-signing key, shared by every instance through the store (made once)."""
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    try:
                        stored = await self.store.get_secret(KEY_SECRET)
                        if not stored:
                            stored = secrets.token_bytes(32)
                            await self.store.put_secret(KEY_SECRET, stored)
                    except ConfigError as e:  # no SECRET_KEY: sessions of this process only
                        log.warning(
                            "console sessions last only as long as this process and are not shared with other "
                            "instances",
                            extra={"fields": {"why": str(e)}},
                        )
                        stored = secrets.token_bytes(32)
                    self._key = stored
        return self._key

    async def session(self, request: web.Request) -> Session | None:
        raw = request.cookies.get(COOKIE, "")
        body, _, sig = raw.partition(".")
        if not body or not sig:
            return None
        key = await self.key()
        want = hmac.new(key, body.encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(want, _unb64(sig)):
                return None
            doc = json.loads(_unb64(body))
            session = Session(str(doc["u"]), str(doc["via"]), str(doc["n"]), float(doc["exp"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    async def start_session(
        self, response: web.StreamResponse, user: str, via: str, *, secure: bool | None = None
    ) -> Session:
        """``secure`` (default: whether ``PUBLIC_URL`` is https) marks the cookie Secure."""
        session = Session(user, via, secrets.token_urlsafe(16), time.time() + SESSION_HOURS * 3600)
        body = _b64(json.dumps({"u": user, "via": via, "n": session.nonce, "exp": session.expires}).encode())
        sig = _b64(hmac.new(await self.key(), body.encode(), hashlib.sha256).digest())
        response.set_cookie(
            COOKIE,
            f"{body}.{sig}",
            max_age=SESSION_HOURS * 3600,
            path="/console",
            httponly=True,
            samesite="Lax",
            secure=self.secure_cookie if secure is None else secure,
        )
        log.info("console sign-in", extra={"fields": {"user": user, "via": via}})
        return session

    async def csrf_ok(self, request: web.Request, session: Session) -> bool:
        sent = request.headers.get("X-CSRF-Token", "")
        return bool(sent) and hmac.compare_digest(sent, session.csrf(await self.key()))

    # ------------------------------------------------------------------ the one-time link

    async def take_ticket(self, request: web.Request) -> web.StreamResponse:
        if not is_loopback(request.remote):
            return page(
                403, "Sign-in not completed", "a one-time console link works only from the service's own machine"
            )
        ticket = request.query.get("ticket", "")
        held = None
        if ticket:
            async with self._lock:
                held = await self.store.get_doc(TICKET_KIND, digest(ticket))
                if held is not None:
                    await self.store.delete_doc(TICKET_KIND, digest(ticket))
        if held is None:
            return page(403, "Sign-in not completed", f"this console link is unknown or was already used; {LINK_AGAIN}")
        if expired(held, self.clock()):
            return page(403, "Sign-in not completed", f"this console link has expired (15 minutes); {LINK_AGAIN}")
        response = web.Response(status=302, headers={"Location": "/console", "Cache-Control": "no-store"})
        # The link is opened on the machine itself, over plain http to loopback even when PUBLIC_URL
        # is https: a Secure cookie would not be sent back there.
        await self.start_session(response, "local (one-time link)", "link", secure=request.secure)
        return response

    # ------------------------------------------------------------------ Entra

    @property
    def entra_problem(self) -> str | None:
        if self.entra is None:
            return "Entra sign-in is not configured on this service"
        if self.entra.problem:
            return self.entra.problem.replace("web sign-in", "console sign-in")
        if not self.allowed_group and not self.allowed_role:
            return (
                "console sign-in with Entra is not enabled: set PRESENCE_SYNC_CONSOLE_ALLOWED_GROUP_ID or "
                "PRESENCE_SYNC_CONSOLE_ALLOWED_ROLE"
            )
        return None

    async def login(self, request: web.Request) -> web.StreamResponse:
        problem = self.entra_problem
        if problem or self.entra is None:
            return page(503, "Sign-in not available", f"{problem}; on the service's machine, {LINK_AGAIN}")
        entra = self.entra
        try:
            app = await asyncio.to_thread(entra._app)
            flow: dict[str, Any] = await asyncio.to_thread(entra._initiate, app)
        except Exception as e:
            return page(502, "Sign-in not available", f"cannot reach the identity platform ({type(e).__name__})")
        await keep_flow(self.store, flow, self.clock(), kind=FLOW_KIND, secret_prefix=FLOW_SECRET_PREFIX, ttl=FLOW_TTL)
        return web.Response(status=302, headers={"Location": str(flow["auth_uri"]), "Cache-Control": "no-store"})

    async def callback(self, request: web.Request) -> web.StreamResponse:
        again = f"start again at {SIGNIN_PATH}"
        if self.entra is None or self.entra_problem:
            return page(503, "Sign-in not available", self.entra_problem or "not configured")
        query = dict(request.query)
        state = query.get("state", "")
        key = digest(state)
        held = await self.entra._take(FLOW_KIND, key) if state else None
        blob = await take_flow_secret(self.store, key, secret_prefix=FLOW_SECRET_PREFIX) if held is not None else None
        if held is None or not blob or expired(held, self.clock()):
            return page(400, "Sign-in not completed", f"this sign-in is unknown, used or too old; {again}")
        if query.get("error"):
            desc = redact(str(query.get("error_description", "")).split(" Trace ID:")[0].strip())
            return page(400, "Sign-in not completed", f"Entra refused the sign-in ({query['error']}: {desc}); {again}")
        try:
            app = await asyncio.to_thread(self.entra._app)
            result: dict[str, Any] = await asyncio.to_thread(
                app.acquire_token_by_auth_code_flow, json.loads(blob), query, list(SCOPES)
            )
        except ValueError:
            return page(400, "Sign-in not completed", f"the sign-in answer does not match its sign-in; {again}")
        except Exception as e:
            return page(502, "Sign-in not completed", f"cannot reach the identity platform ({type(e).__name__})")
        claims = result.get("id_token_claims")
        if "access_token" not in result or not isinstance(claims, dict):
            desc = redact(str(result.get("error_description", "")).split(" Trace ID:")[0].strip())
            return page(400, "Sign-in not completed", f"Entra refused the code ({result.get('error')}: {desc})")
        ok, why = allowed_by_claims(claims, group=self.allowed_group, role=self.allowed_role)
        user = str(claims.get("preferred_username") or claims.get("name") or claims.get("oid") or "?")
        if not ok:
            log.warning("console sign-in refused", extra={"fields": {"user": user, "why": why}})
            return page(403, "Not allowed", why)
        response = web.Response(status=302, headers={"Location": "/console", "Cache-Control": "no-store"})
        await self.start_session(response, user, "entra")
        return response
