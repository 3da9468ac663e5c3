"""Entra ID (the Microsoft identity platform) on loopback: what the bridge asks it for, and how it refuses.

Modelled on Microsoft's protocol documentation (the commit that added this file cites each page):

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` for the tenant's GUID and for its domain
  name alike; the document always carries the GUID (``issuer``, ``token_endpoint``), which is how a
  domain-name ``TENANT_ID`` is resolved. An unknown tenant is AADSTS90002.
- ``GET /{tenant}/oauth2/v2.0/authorize``: the authorization-code request. The configured test user
  "signs in and consents" at once and the browser is redirected to ``redirect_uri`` with ``code``,
  ``state`` and ``session_state``; a refused consent comes back as ``error`` + ``error_description``.
  An unknown app (AADSTS700016) or an unregistered redirect URI (AADSTS50011) is an error page, as
  Entra shows them, without a redirect.
- ``POST /{tenant}/oauth2/v2.0/token`` for ``authorization_code`` (single use, bound to its
  ``redirect_uri``, PKCE ``code_verifier`` checked against the S256 challenge), ``refresh_token``,
  ``client_credentials`` and the device-code grant; ``POST /{tenant}/oauth2/v2.0/devicecode``.
  A confidential app (a secret or certificate registered, redirect URI of type Web) must present its
  credential (``client_secret``, or ``client_assertion`` of type jwt-bearer) to redeem a code or a
  refresh token issued to it: without one Entra answers AADSTS7000218, which is also what a
  device-code poll gets when "Allow public client flows" is off.
- Errors in Entra's shape: ``error``, ``error_description`` starting ``AADSTSnnnnn:``, ``error_codes``,
  ``timestamp``, ``trace_id``, ``correlation_id``.

MSAL accepts only ``https`` authorities, so the emulator publishes its endpoints under
``public_host`` (by default ``https://login.microsoftonline.com``) and ``http_client()`` gives MSAL (and
any ``requests``-like caller) a client that sends those URLs to this loopback server instead;
``browser_url()`` does the same for the URL a browser would open.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
import requests
from aiohttp import web

from emulators.graph_crypto import SigningKey
from emulators.serving import serve_app

DEFAULT_TENANT = "7f3e2b1a-4c5d-4e6f-8a9b-0c1d2e3f4a5b"
DEFAULT_DOMAIN = "contoso.onmicrosoft.com"
PUBLIC_HOST = "https://login.microsoftonline.com"
BOT_FRAMEWORK_DOMAIN = "botframework.com"
BOT_FRAMEWORK_TENANT = "d6d49420-f39b-4df7-a1dc-d59a935871db"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_RESERVED_SCOPES = {"openid", "profile", "offline_access", "email"}

AADSTS = {
    7000215: (
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is "
        "the client secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    ),
    7000218: (
        "invalid_client",
        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
    ),
    700016: (
        "unauthorized_client",
        "Application with identifier '{client_id}' was not found in the directory "
        "'{tenant}'. This can happen if the application has not been installed by the administrator of the "
        "tenant or consented to by any user in the tenant. You may have sent your authentication request to "
        "the wrong tenant.",
    ),
    700027: ("invalid_client", "Client assertion failed signature validation."),
    90002: (
        "invalid_tenant",
        "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and "
        "are signing into the correct cloud.",
    ),
    50011: (
        "invalid_request",
        "The redirect URI '{redirect_uri}' specified in the request does not match the "
        "redirect URIs configured for the application '{client_id}'.",
    ),
    50148: (
        "invalid_grant",
        "The code_verifier does not match the code_challenge supplied in the authorization request for PKCE.",
    ),
    54005: (
        "invalid_grant",
        "OAuth2 Authorization code was already redeemed, please retry with a new valid code "
        "or use an existing refresh token.",
    ),
    70008: ("invalid_grant", "The provided authorization code or refresh token has expired due to inactivity."),
    70000: ("invalid_grant", "Provided grant is invalid or malformed."),
    65004: ("access_denied", "User declined to consent to access the app."),
    70011: ("invalid_scope", "The provided value for the input parameter 'scope' is not valid."),
    900144: ("invalid_request", "The request body must contain the following parameter: '{parameter}'."),
    70016: ("authorization_pending", "OAuth 2.0 device flow error. Authorization is pending. Continue polling."),
}


def entra_error(code: int, **values: str) -> dict[str, Any]:
    """An error body as Entra sends it (``error_description`` starts with ``AADSTSnnnnn:``)."""
    error, text = AADSTS[code]
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    described = text.format_map({"client_id": "", "tenant": "", "redirect_uri": "", "parameter": "", **values})
    return {
        "error": error,
        "error_description": f"AADSTS{code}: {described} Trace ID: {trace} Correlation ID: {correlation} "
        f"Timestamp: {now}",
        "error_codes": [code],
        "timestamp": now,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"{PUBLIC_HOST}/error?code={code}",
    }


@dataclass
class RegisteredApp:
    """An app registration: its credential(s), its Web redirect URIs, "Allow public client flows"."""

    client_id: str
    tenant_id: str
    secret: str | None = None
    certificate: bool = False
    redirect_uris: tuple[str, ...] = ()
    public_client_flows: bool = False

    @property
    def confidential(self) -> bool:
        return self.secret is not None or self.certificate


@dataclass
class User:
    username: str
    object_id: str
    name: str = "Test Subscriber"
    groups: list[str] = field(default_factory=list)
    """Group object ids put in the id token's ``groups`` claim (a registration emitting group claims,
    ``groupMembershipClaims``); none: no claim."""
    roles: list[str] = field(default_factory=list)
    """App role values assigned to the user, in the id token's ``roles`` claim; none: no claim."""
    groups_overage: bool = False
    """Too many groups for a JWT (more than 200): Entra leaves ``groups`` out and points to Graph with
    ``_claim_names`` / ``_claim_sources`` instead."""


@dataclass
class _Code:
    client_id: str
    tenant_id: str
    redirect_uri: str
    challenge: str | None
    method: str | None
    nonce: str | None
    scopes: list[str]
    expires_at: float
    redeemed: bool = False


@dataclass
class _Refresh:
    client_id: str
    tenant_id: str
    scopes: list[str]
    confidential: bool
    nonce: str | None = None


@dataclass
class Issued:
    """One token the emulator handed out, for tests to inspect (who, which grant, which credential)."""

    access_token: str
    client_id: str
    grant: str
    username: str | None
    client_auth: str


@dataclass
class EntraEmulator:
    tenant_id: str = DEFAULT_TENANT
    domain: str = DEFAULT_DOMAIN
    public_host: str = PUBLIC_HOST
    user: User = field(default_factory=lambda: User("subscriber@contoso.onmicrosoft.com", str(uuid.uuid4())))
    expires_in: int = 3600
    other_tenants: dict[str, str] = field(default_factory=lambda: {BOT_FRAMEWORK_DOMAIN: BOT_FRAMEWORK_TENANT})
    """Further tenants by domain -> GUID: by default the Bot Framework's, which a MultiTenant bot asks."""
    apps: dict[str, RegisteredApp] = field(default_factory=dict)
    refuse_consent: bool = False
    """The user declines consent at the authorize step (AADSTS65004 sent back to the redirect URI)."""
    force_error: int | None = None
    """An AADSTS code every token request is answered with (7000218, 700016...), to test how callers word it."""
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    issued: list[Issued] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.signing_key = SigningKey()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._device: dict[str, dict[str, Any]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ set-up

    def add_app(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate: bool = False,
        redirect_uris: tuple[str, ...] = (),
        public_client_flows: bool = False,
        tenant_id: str | None = None,
    ) -> RegisteredApp:
        tenant = self._tenant(tenant_id) if tenant_id else self.tenant_id
        app = RegisteredApp(
            client_id, tenant or str(tenant_id), secret, certificate, tuple(redirect_uris), public_client_flows
        )
        self.apps[client_id] = app
        return app

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/common/discovery/instance", self._instance_discovery)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self._keys)
        app.router.add_get("/{tenant}/oauth2/v2.0/authorize", self._authorize)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_post("/{tenant}/oauth2/v2.0/devicecode", self._devicecode)
        return app

    async def start(self) -> str:
        self._runner, self.url = await serve_app(self.app())
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def http_client(self) -> LoopbackHttp:
        """A ``requests``-like client for MSAL: ``public_host`` URLs go to this loopback server."""
        return LoopbackHttp(self.public_host, self.url)

    def browser_url(self, url: str) -> str:
        """Where a browser sent to ``url`` (on ``public_host``) actually lands: this server."""
        return _rewrite(url, self.public_host, self.url)

    def grants(self) -> list[str]:
        return [data.get("grant_type", "") for method, path, data in self.requests if path.endswith("/token")]

    # ------------------------------------------------------------------ helpers

    def _tenant(self, name: str) -> str | None:
        """The tenant GUID for a path segment: the GUID in any case or the domain name."""
        lowered = name.lower()
        if lowered in (self.tenant_id.lower(), self.domain.lower()):
            return self.tenant_id
        for domain, guid in self.other_tenants.items():
            if lowered in (domain.lower(), guid.lower()):
                return guid
        if any(lowered == app.tenant_id.lower() for app in self.apps.values()):
            return lowered
        return None

    def _base(self, tenant: str) -> str:
        return f"{self.public_host}/{tenant}"

    def _record(self, request: web.Request, data: dict[str, str]) -> None:
        shown = {k: v for k, v in data.items() if k not in ("client_secret", "client_assertion", "code_verifier")}
        self.requests.append((request.method, request.path, shown))

    @staticmethod
    def _error(code: int, status: int = 400, **values: str) -> web.Response:
        return web.json_response(entra_error(code, **values), status=status)

    @staticmethod
    def _page(code: int, status: int = 400, **values: str) -> web.Response:
        body = entra_error(code, **values)
        return web.Response(
            text=f"<html><body><h1>Sorry, but we're having trouble signing you in.</h1>"
            f"<p>{body['error_description']}</p></body></html>",
            status=status,
            content_type="text/html",
        )

    def _id_token(self, client_id: str, tenant: str, nonce: str | None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": client_id,
            "iss": f"{self._base(tenant)}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "tid": tenant,
            "oid": self.user.object_id,
            "sub": hashlib.sha256(f"{self.user.object_id}{client_id}".encode()).hexdigest()[:43],
            "preferred_username": self.user.username,
            "name": self.user.name,
            "ver": "2.0",
        }
        if nonce:
            claims["nonce"] = nonce
        if self.user.groups_overage:
            claims["_claim_names"] = {"groups": "src1"}
            claims["_claim_sources"] = {
                "src1": {"endpoint": f"https://graph.microsoft.com/v1.0/users/{self.user.object_id}/getMemberObjects"}
            }
        elif self.user.groups:
            claims["groups"] = list(self.user.groups)
        if self.user.roles:
            claims["roles"] = list(self.user.roles)
        return self.signing_key.sign(claims)

    def _user_tokens(
        self, app: RegisteredApp, grant: str, scopes: list[str], nonce: str | None, client_auth: str
    ) -> web.Response:
        access = "at-" + secrets.token_urlsafe(24)
        refresh = "rt-" + secrets.token_urlsafe(24)
        self._refresh[refresh] = _Refresh(app.client_id, app.tenant_id, scopes, client_auth != "none", nonce)
        self.issued.append(Issued(access, app.client_id, grant, self.user.username, client_auth))
        info = {"uid": self.user.object_id, "utid": app.tenant_id}
        return web.json_response(
            {
                "token_type": "Bearer",
                "scope": " ".join(s for s in scopes if s not in _RESERVED_SCOPES),
                "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in,
                "access_token": access,
                "refresh_token": refresh,
                "id_token": self._id_token(app.client_id, app.tenant_id, nonce),
                "client_info": base64.urlsafe_b64encode(json.dumps(info).encode()).rstrip(b"=").decode(),
            }
        )

    # ------------------------------------------------------------------ routes

    async def _instance_discovery(self, request: web.Request) -> web.Response:
        host = urlsplit(self.public_host).netloc
        return web.json_response(
            {
                "tenant_discovery_endpoint": f"{self.public_host}/common/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
        )

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        self._record(request, {})
        name = request.match_info["tenant"]
        tenant = self._tenant(name)
        if tenant is None:
            return self._error(90002, tenant=name)
        base = self._base(tenant)
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "preferred_username", "tid"],
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
            }
        )

    async def _keys(self, request: web.Request) -> web.Response:
        return web.json_response(self.signing_key.jwks())

    async def _authorize(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self._record(request, q)
        tenant = self._tenant(request.match_info["tenant"])
        if tenant is None:
            return self._page(90002, tenant=request.match_info["tenant"])
        client_id = q.get("client_id", "")
        app = self.apps.get(client_id)
        if app is None or app.tenant_id != tenant:
            return self._page(700016, client_id=client_id, tenant=tenant)
        redirect_uri = q.get("redirect_uri", "")
        if redirect_uri not in app.redirect_uris:
            return self._page(50011, redirect_uri=redirect_uri, client_id=client_id)
        back: dict[str, str] = {"state": q["state"]} if "state" in q else {}
        if q.get("response_type") != "code":
            back.update(error="unsupported_response_type", error_description="AADSTS70005: response_type is invalid")
        elif self.refuse_consent:
            err = entra_error(65004)
            back.update(error=err["error"], error_description=err["error_description"])
        else:
            code = "code-" + secrets.token_urlsafe(32)
            self._codes[code] = _Code(
                client_id,
                tenant,
                redirect_uri,
                q.get("code_challenge"),
                q.get("code_challenge_method"),
                q.get("nonce"),
                q.get("scope", "").split(),
                time.time() + 600,
            )
            back = {"code": code, **back, "session_state": str(uuid.uuid4())}
        raise web.HTTPFound(f"{redirect_uri}?{urlencode(back)}")

    async def _devicecode(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self._record(request, form)
        client_id = form.get("client_id", "")
        if self.apps.get(client_id) is None:
            return self._error(700016, client_id=client_id, tenant=request.match_info["tenant"])
        device = "dc-" + secrets.token_urlsafe(24)
        self._device[device] = {"client_id": client_id, "scopes": form.get("scope", "").split(), "polls": 0}
        return web.json_response(
            {
                "device_code": device,
                "user_code": "EMUL-ATOR",
                "verification_uri": "https://microsoft.com/devicelogin",
                "expires_in": 900,
                "interval": 1,
                "message": "To sign in, use a web browser to open the page https://microsoft.com/devicelogin and "
                "enter the code EMUL-ATOR to authenticate.",
            }
        )

    def _client_auth(self, app: RegisteredApp, form: dict[str, str]) -> str | web.Response:
        """``secret``, ``assertion`` or ``none``; or the error a wrong credential gets."""
        if form.get("client_secret"):
            if app.secret is None or not secrets.compare_digest(form["client_secret"], app.secret):
                return self._error(7000215, 401, client_id=app.client_id)
            return "secret"
        assertion = form.get("client_assertion")
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER or not app.certificate:
                return self._error(700027, 401)
            try:
                claims = jwt.decode(assertion, options={"verify_signature": False})
            except jwt.PyJWTError:
                return self._error(700027, 401)
            if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
                return self._error(700027, 401)
            if claims.get("aud") != f"{self._base(app.tenant_id)}/oauth2/v2.0/token":  # the token endpoint
                return self._error(700027, 401)
            return "assertion"
        return "none"

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self._record(request, form)
        name = request.match_info["tenant"]
        tenant = self._tenant(name)
        if tenant is None:
            return self._error(90002, tenant=name)
        client_id = form.get("client_id", "")
        if self.force_error is not None:
            return self._error(
                self.force_error, 401 if self.force_error == 7000218 else 400, client_id=client_id, tenant=tenant
            )
        app = self.apps.get(client_id)
        if app is None or app.tenant_id != tenant:
            return self._error(700016, client_id=client_id, tenant=tenant)
        auth = self._client_auth(app, form)
        if isinstance(auth, web.Response):
            return auth
        grant = form.get("grant_type", "")
        scopes = form.get("scope", "").split()
        if grant == "client_credentials":
            if auth == "none":
                return self._error(7000218, 401)
            if len(scopes) != 1 or not scopes[0].endswith("/.default"):
                return self._error(70011)
            access = "app-" + secrets.token_urlsafe(24)
            self.issued.append(Issued(access, client_id, grant, None, auth))
            return web.json_response(
                {
                    "token_type": "Bearer",
                    "expires_in": self.expires_in,
                    "ext_expires_in": self.expires_in,
                    "access_token": access,
                }
            )
        if grant == "authorization_code":
            return self._redeem_code(app, form, auth)
        if grant == "refresh_token":
            held = self._refresh.pop(form.get("refresh_token", ""), None)
            if held is None or held.client_id != client_id:
                return self._error(70000)
            if held.confidential and auth == "none":
                self._refresh[form["refresh_token"]] = held
                return self._error(7000218, 401)
            return self._user_tokens(app, grant, scopes or held.scopes, None, auth)
        if grant == DEVICE_CODE_GRANT:
            if auth == "none" and not app.public_client_flows:
                return self._error(7000218, 401)
            device = self._device.get(form.get("device_code", ""))
            if device is None:
                return self._error(70000)
            device["polls"] += 1
            if device["polls"] == 1:
                return self._error(70016)
            del self._device[form["device_code"]]
            return self._user_tokens(app, grant, device["scopes"], None, auth)
        return web.json_response(
            {
                "error": "unsupported_grant_type",
                "error_description": f"AADSTS70003: grant {grant!r} unsupported",
                "error_codes": [70003],
            },
            status=400,
        )

    def _redeem_code(self, app: RegisteredApp, form: dict[str, str], auth: str) -> web.Response:
        for needed in ("code", "redirect_uri"):
            if not form.get(needed):
                return self._error(900144, parameter=needed)
        if app.confidential and auth == "none":
            return self._error(7000218, 401)
        held = self._codes.get(form["code"])
        if held is None or held.client_id != app.client_id:
            return self._error(70000)
        if held.redeemed:
            return self._error(54005)
        if held.expires_at < time.time():
            return self._error(70008)
        if form["redirect_uri"] != held.redirect_uri:
            return self._error(50011, redirect_uri=form["redirect_uri"], client_id=app.client_id)
        if held.challenge is not None:
            verifier = form.get("code_verifier", "")
            if held.method == "S256":
                digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            else:
                digest = verifier
            if not verifier or not secrets.compare_digest(digest, held.challenge):
                return self._error(50148)
        held.redeemed = True
        scopes = form.get("scope", "").split() or held.scopes
        return self._user_tokens(app, "authorization_code", scopes, held.nonce, auth)


def _rewrite(url: str, public_host: str, base: str) -> str:
    return base + url[len(public_host) :] if url.startswith(public_host) else url


class _Response:
    """What MSAL reads of a response: ``status_code``, ``text``, ``headers``, ``raise_for_status``."""

    def __init__(self, resp: requests.Response) -> None:
        self.status_code = resp.status_code
        self.text = resp.text
        self.headers = resp.headers
        self._resp = resp

    def raise_for_status(self) -> None:
        self._resp.raise_for_status()


class LoopbackHttp:
    """A ``requests``-like client that sends ``public_host`` URLs to the emulator (MSAL refuses http
    authorities, so it is given the real-looking https one and this client as its ``http_client``)."""

    def __init__(self, public_host: str, base: str, *, timeout: float = 10.0) -> None:
        self.public_host = public_host
        self.base = base
        self.timeout = timeout
        self._session = requests.Session()
        self._session.trust_env = False  # loopback only: never a proxy from the environment

    def get(self, url: str, params: Any = None, headers: Any = None, **kw: Any) -> _Response:
        kw.setdefault("timeout", self.timeout)
        url = _rewrite(url, self.public_host, self.base)
        return _Response(self._session.get(url, params=params, headers=headers, allow_redirects=False, **kw))

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None, **kw: Any) -> _Response:
        kw.setdefault("timeout", self.timeout)
        url = _rewrite(url, self.public_host, self.base)
        return _Response(self._session.post(url, params=params, data=data, headers=headers, **kw))

    def close(self) -> None:
        self._session.close()
