"""One way to talk to Microsoft Graph for the whole adapter: one client object per owner, built here.

``make_http_client`` builds a ``GraphHttp``: an httpx client carrying kiota's Graph transport, on which
msgraph-sdk makes the subscription calls (``graph_sync.subscriptions``), and beside it one aiohttp
session on which the presence calls (``graph_sync.teams``) send their own JSON. Two HTTP stacks to one
upstream, because the presence calls are the hot path and the numbers say so (``bench/graph_calls.py``,
CPU per call in process, medians of 3 runs): ``setPresence`` through msgraph-sdk cost 1.07 ms, a raw
POST through this httpx client 0.68 ms, through aiohttp 0.17 ms; a 650-id ``getPresencesByUserId``
1.56 ms raw on httpx, 0.92 ms on aiohttp. The whole service runs on one event loop, so that CPU is
taken from the Dataverse webhook answers Dynamics waits for. Subscriptions are a handful of calls an
hour whose paging and models the SDK is worth; they stay on it. One owner closes both (``aclose``).

Why not ``GraphServiceClient(credentials)`` as the SDK's samples do:

- The credential comes from ``mapping.ports.TokenProvider`` (azure-identity in production, a fixed
  bearer for the emulators, MSAL for subscriber accounts); the adapter never builds credentials.
  ``TokenAccess`` adapts it to kiota's ``AccessTokenProvider``.
- The base URL is configurable (``GRAPH_URL``), loopback ``http://`` for the emulator included.
- kiota's default middleware retries 429/503/504 by itself (up to three times, sleeping up to 180 s
  inside one call) and follows redirects. The outbox owns retries, backoff and ``Retry-After``
  (DESIGN rule 7: the writer makes ONE call), so the pipeline here has no retry and no redirect
  handler; a 429 surfaces at once as ``Throttled(retry_after)``. The aiohttp side follows no
  redirect and retries nothing either.

``graph_error`` turns what either side raises into the typed errors the core understands.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from kiota_abstractions.api_error import APIError
from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_http.middleware import ParametersNameDecodingHandler, UserAgentHandler
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph_core import GraphClientFactory
from yarl import URL

from edge.upstream import retry_after_seconds, upstream_base_url
from mapping.errors import PermanentError, RetryableError, Throttled, UpstreamError
from mapping.ports import TokenProvider

log = logging.getLogger("presence_sync.graph")

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
DEFAULT_TIMEOUT = 10.0
"""Every Graph call but subscription creation: presence reads and writes answer in well under a second."""

VALIDATION_TIME = 10.0
"""How long Graph lets a notification endpoint take to answer a ``validationToken`` request."""

SUBSCRIPTION_CREATE_TIMEOUT = 2 * VALIDATION_TIME + 10.0
"""``POST /subscriptions`` answers only after Graph validated the notification URL and then the
lifecycle URL, up to ``VALIDATION_TIME`` each, so it may take 20 s before Graph's own work; 10 s
of margin on top. With ``DEFAULT_TIMEOUT`` the client gave up on creations Graph then completed,
and the subscription existed without the bridge knowing it."""


def check_graph_url(graph_url: str) -> str:
    """The base URL without a trailing slash. ``https`` anywhere, ``http`` only on loopback: a bearer
    token must never cross a network in clear text."""
    return upstream_base_url(graph_url, name="Graph URL")


class TokenAccess(AccessTokenProvider):
    """kiota's token hook backed by a ``TokenProvider``. Tokens go only to the configured Graph host:
    an ``@odata.nextLink`` or a redirect elsewhere gets no ``Authorization`` header."""

    def __init__(self, tokens: TokenProvider, graph_url: str, scope: str = GRAPH_SCOPE) -> None:
        self.tokens = tokens
        self.scope = scope
        self.host = (urlsplit(graph_url).hostname or "").lower()
        self._validator = AllowedHostsValidator([self.host])

    async def get_authorization_token(self, uri: str, additional_authentication_context: Any = None) -> str:
        if (urlsplit(uri).hostname or "").lower() != self.host:
            return ""
        return await self.tokens.token(self.scope)

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return self._validator


class GraphAnswer(Exception):
    """Graph's answer other than 2xx to a request ``GraphHttp.send_json`` made: its status, its headers
    (``Retry-After``) and Graph's own words (``said``), for ``graph_error``."""

    def __init__(self, status: int, headers: Mapping[str, str], said: str) -> None:
        super().__init__(f"{status}: {said}")
        self.status = status
        self.headers = headers
        self.said = said


class GraphHttp(httpx.AsyncClient):
    """The adapter's HTTP client for Graph (build it with ``make_http_client``): kiota's Graph transport
    minus retry and redirect for msgraph-sdk, and ``send_json`` for the calls that build their own JSON
    (the presence calls), on one aiohttp session made on first use. ``aclose`` closes both.

    The aiohttp side keeps the httpx side's settings: the same timeout per phase (connect, then each
    read; httpx's ``Timeout(t)`` has no overall bound either), the same TLS trust
    (``httpx.create_ssl_context``: certifi, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), the proxy the
    environment names for the Graph host (looked up once, not per request), no redirects, no
    cookies (Graph's API sets none that matter; a bearer token authenticates every call)."""

    def __init__(self, base: str, timeout: float) -> None:
        super().__init__(base_url=base, timeout=httpx.Timeout(timeout), follow_redirects=False)
        self.base = base
        self.request_timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the Graph client has been closed")
        base = URL(self.base)
        proxy, proxy_auth = None, None
        with suppress(LookupError):
            proxy, proxy_auth = get_env_proxy_for_url(base)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.request_timeout, sock_read=self.request_timeout),
            connector=aiohttp.TCPConnector(ssl=httpx.create_ssl_context() if base.scheme == "https" else False),
            cookie_jar=aiohttp.DummyCookieJar(),
            proxy=proxy,
            proxy_auth=proxy_auth,
        )
        return self._session

    async def send_json(self, method: str, path: str, *, token: str, body: bytes | None = None) -> bytes:
        """The body of Graph's 2xx answer to ``method`` ``path`` (below the base URL, already
        percent-encoded) with ``body`` (JSON) and ``token`` as bearer (none when empty). Another
        status raises ``GraphAnswer``; the network, aiohttp's errors and ``TimeoutError``."""
        session = self._session or self._open()
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        url = URL(self.base + path, encoded=True)
        async with session.request(method, url, data=body, headers=headers, allow_redirects=False) as resp:
            raw = await resp.read()
            if 200 <= resp.status < 300:
                return raw
            raise GraphAnswer(resp.status, resp.headers, answer_words(raw, resp.reason))

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
        await super().aclose()

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def make_http_client(graph_url: str, *, timeout: float = DEFAULT_TIMEOUT) -> GraphHttp:
    """The adapter's one HTTP client object for Graph: kiota's Graph transport minus retry and
    redirect, and the raw side for the presence calls (see ``GraphHttp``)."""
    client = GraphHttp(check_graph_url(graph_url), timeout)
    middleware = [ParametersNameDecodingHandler(), UserAgentHandler()]
    GraphClientFactory.create_with_custom_middleware(middleware, client=client)
    return client


def make_graph_client(
    http: httpx.AsyncClient, graph_url: str, tokens: TokenProvider, scope: str = GRAPH_SCOPE
) -> GraphServiceClient:
    """A ``GraphServiceClient`` on ``http`` (shareable between clients with different tokens)."""
    base = check_graph_url(graph_url)
    adapter = GraphRequestAdapter(BaseBearerTokenAuthenticationProvider(TokenAccess(tokens, base, scope)), http)
    adapter.base_url = base
    return GraphServiceClient(request_adapter=adapter)


def graph_message(exc: BaseException) -> str:
    """Graph's own words from an ``ODataError`` (``code: message``), else the SDK's."""
    err = getattr(exc, "error", None)
    code = getattr(err, "code", None)
    message = getattr(err, "message", None)
    if message:
        return f"{code}: {message}" if code else str(message)
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


ANSWER_SNIPPET = 200
"""How much of an answer that is not a Graph error (a gateway's HTML page) an error message quotes."""


def answer_words(body: bytes, reason: str | None) -> str:
    """Graph's own words from an error answer's body, as ``graph_message`` says them for the SDK
    (``code: message``); for a body that is no Graph error, the HTTP reason and the start of the
    body. (The typed error redacts whatever it echoes.)"""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code, message = err.get("code"), err.get("message")
        if message:
            return f"{code}: {message}" if code else str(message)
        if code:
            return str(code)
    text = " ".join(body[: ANSWER_SNIPPET * 4].decode("utf-8", "replace").split())[:ANSWER_SNIPPET]
    said = reason or "no reason given"
    return f"{said}: {text}" if text else said


def graph_error(exc: BaseException, *, what: str, permission: str | None = None) -> UpstreamError:
    """The typed error for a failed Graph call, made through msgraph-sdk or ``GraphHttp.send_json``.
    ``what`` says which call for whom (it goes into the message an admin reads); ``permission`` is
    what a 403 means is missing."""
    if isinstance(exc, UpstreamError):  # from the TokenProvider: already typed and worded
        return exc
    if isinstance(exc, httpx.TimeoutException | TimeoutError):  # aiohttp's timeouts are TimeoutErrors
        return RetryableError(f"{what}: Graph did not answer in time ({type(exc).__name__}); will retry")
    if isinstance(exc, httpx.TransportError | aiohttp.ClientError):
        return RetryableError(f"{what}: cannot reach Graph ({type(exc).__name__}: {exc}); will retry")
    headers: Mapping[str, str] | None
    if isinstance(exc, GraphAnswer):
        status, headers, said = exc.status, exc.headers, exc.said
    elif isinstance(exc, APIError):
        status, headers, said = exc.response_status_code or 0, exc.response_headers, graph_message(exc)
    else:
        return RetryableError(f"{what}: unexpected {type(exc).__name__}: {exc}")
    if status == 429 or (status == 503 and retry_after_seconds(headers) is not None):
        wait = retry_after_seconds(headers)
        return Throttled(
            f"{what}: Graph throttled the request ({status}; Retry-After {wait}); {said}", wait, status=status
        )
    if status >= 500 or status in (408,):
        return RetryableError(f"{what}: Graph failed with {status}: {said}; will retry", status=status)
    if status == 401:
        # A token can expire between issue and use; a persistent 401 dead-letters after the
        # outbox's bounded attempts with this message.
        return RetryableError(
            f"{what}: Graph refused the token (401: {said}); check the app registration and tenant if this persists",
            status=status,
        )
    if status == 403:
        need = f"the app needs {permission} with admin consent" if permission else "permission missing"
        return PermanentError(f"{what}: Graph refused (403: {said}); {need}", status=status)
    return PermanentError(f"{what}: Graph answered {status}: {said}", status=status)
