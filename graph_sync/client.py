"""One way to talk to Microsoft Graph for the whole adapter: msgraph-sdk on an httpx client we build.

Why not ``GraphServiceClient(credentials)`` as the SDK's samples do:

- The credential comes from ``mapping.ports.TokenProvider`` (azure-identity in production, a fixed
  bearer for the emulators, MSAL for subscriber accounts); the adapter never builds credentials.
  ``TokenAccess`` adapts it to kiota's ``AccessTokenProvider``.
- The base URL is configurable (``GRAPH_URL``), loopback ``http://`` for the emulator included.
- kiota's default middleware retries 429/503/504 by itself (up to three times, sleeping up to 180 s
  inside one call) and follows redirects. The outbox owns retries, backoff and ``Retry-After``
  (DESIGN rule 7: the writer makes ONE call), so the pipeline here has no retry and no redirect
  handler; a 429 surfaces at once as ``Throttled(retry_after)``.

``graph_error`` turns what the SDK raises into the typed errors the core understands.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import httpx
from kiota_abstractions.api_error import APIError
from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_http.middleware import ParametersNameDecodingHandler, UserAgentHandler
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph_core import GraphClientFactory

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


def make_http_client(graph_url: str, *, timeout: float = DEFAULT_TIMEOUT) -> httpx.AsyncClient:
    """The adapter's one HTTP client for Graph: kiota's Graph transport minus retry and redirect."""
    base = check_graph_url(graph_url)
    client = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(timeout), follow_redirects=False)
    middleware = [ParametersNameDecodingHandler(), UserAgentHandler()]
    return GraphClientFactory.create_with_custom_middleware(middleware, client=client)


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


def graph_error(exc: BaseException, *, what: str, permission: str | None = None) -> UpstreamError:
    """The typed error for a failed Graph call. ``what`` says which call for whom (it goes into the
    message an admin reads); ``permission`` is what a 403 means is missing."""
    if isinstance(exc, UpstreamError):  # from the TokenProvider: already typed and worded
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return RetryableError(f"{what}: Graph did not answer in time ({type(exc).__name__}); will retry")
    if isinstance(exc, httpx.TransportError):
        return RetryableError(f"{what}: cannot reach Graph ({type(exc).__name__}: {exc}); will retry")
    if isinstance(exc, APIError):
        status = exc.response_status_code or 0
        said = graph_message(exc)
        if status == 429 or (status == 503 and retry_after_seconds(exc.response_headers) is not None):
            wait = retry_after_seconds(exc.response_headers)
            return Throttled(
                f"{what}: Graph throttled the request ({status}; Retry-After {wait}); {said}", wait, status=status
            )
        if status >= 500 or status in (408,):
            return RetryableError(f"{what}: Graph failed with {status}: {said}; will retry", status=status)
        if status == 401:
            # A token can expire between issue and use; a persistent 401 dead-letters after the
            # outbox's bounded attempts with this message.
            return RetryableError(
                f"{what}: Graph refused the token (401: {said}); check the app registration "
                "and tenant if this persists",
                status=status,
            )
        if status == 403:
            need = f"the app needs {permission} with admin consent" if permission else "permission missing"
            return PermanentError(f"{what}: Graph refused (403: {said}); {need}", status=status)
        return PermanentError(f"{what}: Graph answered {status}: {said}", status=status)
    return RetryableError(f"{what}: unexpected {type(exc).__name__}: {exc}")
