"""The Bot Connector's signing keys, fetched and cached without ever blocking the event loop.

botbuilder validates each ``/api/messages`` token with keys from an OpenID metadata document (its
``jwks_uri``). Its own cache (``botframework.connector.auth.jwt_token_extractor._OpenIdMetadata``)
fetches them with a blocking ``requests.get`` without a timeout, inside a coroutine, so the whole
service stalls while login.botframework.com is slow, and it fetches again on every request while the
fetch fails: any unauthenticated caller could stall the service with forged tokens.

``OpenIdKeys`` takes its place, under the same interface (``await get(kid)`` returning an object with
``public_key`` and ``endorsements``); ``bot.teams`` (the only module that imports botbuilder) puts it
in botbuilder's own per-URL cache (``JwtTokenExtractor.metadataCache``):

- keys are fetched with aiohttp, bounded by ``timeout``, one fetch at a time per URL, and kept for
  ``max_age`` (a day, as botbuilder did); older keys keep serving while a refresh runs in the background;
- a token naming an unknown key id waits (at most ``wait``) for one refetch, at most every
  ``unknown_kid_after`` seconds (the Bot Connector rolls its keys; forged ids must not drive fetches);
- a failed fetch is backed off (``backoff`` doubling up to ``max_backoff``), never retried per request;
- a key that is not there is ``PermissionError``: the caller answers 401 at once.

Nothing else of botbuilder's validation changes (issuer, audience, endorsements, ``serviceUrl``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from jwt.algorithms import RSAAlgorithm

from mapping.redact import redact

log = logging.getLogger("presence_sync.bot")


class SigningKey:
    """What botbuilder's ``JwtTokenExtractor`` reads of a key: the public key and its endorsements
    (the channel ids it may sign for, such as ``msteams``)."""

    __slots__ = ("endorsements", "public_key")

    def __init__(self, public_key: Any, endorsements: list[str]) -> None:
        self.public_key = public_key
        self.endorsements = endorsements


def parse_keys(data: Any) -> dict[str, SigningKey]:
    """The usable RSA keys of a JWKS document by key id; a key that cannot be read is left out."""
    keys: dict[str, SigningKey] = {}
    for jwk in data.get("keys") or [] if isinstance(data, Mapping) else []:
        if not isinstance(jwk, Mapping) or not isinstance(jwk.get("kid"), str):
            continue
        try:
            public_key = RSAAlgorithm.from_jwk(json.dumps(jwk))
        except Exception:
            continue
        endorsements = jwk.get("endorsements")
        keys[jwk["kid"]] = SigningKey(
            public_key, [e for e in endorsements if isinstance(e, str)] if isinstance(endorsements, list) else []
        )
    return keys


class OpenIdKeys:
    """One OpenID metadata URL's signing keys (see the module docstring). ``source``: where to fetch
    them from instead of ``url`` (a loopback server in tests); ``url`` stays the key botbuilder asks by."""

    def __init__(
        self,
        url: str,
        *,
        source: str | None = None,
        timeout: float = 5.0,
        wait: float | None = None,
        max_age: float = 24 * 3600.0,
        unknown_kid_after: float = 300.0,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
    ) -> None:
        self.url = url
        self.source = source or url
        self.timeout = timeout
        self.wait = timeout if wait is None else wait
        self.max_age = max_age
        self.unknown_kid_after = unknown_kid_after
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.keys: dict[str, SigningKey] = {}
        self.fetches = 0
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._retry_at = 0.0
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    async def get(self, key_id: str | None) -> SigningKey:
        """The key ``key_id`` names (botbuilder's ``_OpenIdMetadata.get``). Raises ``PermissionError``
        when it is not known, after at most ``wait`` seconds, however the key server behaves."""
        now = time.monotonic()
        if self._fetched_at is None or now - self._fetched_at >= self.max_age:
            fetch = self.refresh()
            if fetch is not None and not self.keys:
                await self._await(fetch)  # nothing to check against yet: wait for the first keys
        key = self.keys.get(key_id) if key_id else None
        if key is None and key_id and self._may_refetch(time.monotonic()):
            fetch = self.refresh()
            if fetch is not None:
                await self._await(fetch)
                key = self.keys.get(key_id)
        if key is None:
            raise PermissionError("the token is not signed by a published Bot Connector key")
        return key

    def _may_refetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.unknown_kid_after

    def refresh(self) -> asyncio.Task[None] | None:
        """Starts a fetch in the background unless one is running (returned) or failures are being
        backed off (None)."""
        task = self._task
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            return task
        if time.monotonic() < self._retry_at:
            return None
        self._task = asyncio.get_running_loop().create_task(self._fetch(), name=f"bot-keys-{self.url}")
        return self._task

    async def _await(self, fetch: asyncio.Task[None]) -> None:
        await asyncio.wait({fetch}, timeout=self.wait)  # never cancels the fetch, never raises

    async def _fetch(self) -> None:
        self._attempted_at = time.monotonic()
        self.fetches += 1
        try:
            async with asyncio.timeout(self.timeout), aiohttp.ClientSession() as http:
                async with http.get(self.source) as resp:
                    resp.raise_for_status()
                    metadata = await resp.json(content_type=None)
                jwks_uri = metadata.get("jwks_uri") if isinstance(metadata, Mapping) else None
                if not isinstance(jwks_uri, str) or not jwks_uri:
                    raise ValueError("the OpenID metadata has no jwks_uri")
                async with http.get(jwks_uri) as resp:
                    resp.raise_for_status()
                    keys = parse_keys(await resp.json(content_type=None))
            if not keys:
                raise ValueError("the key set holds no usable RSA key")
        except Exception as e:  # any failure: backed off, and the keys we had keep serving
            self._failures += 1
            delay = min(self.max_backoff, self.backoff * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            log.warning(
                "Bot Connector signing keys not fetched; tokens signed by unknown keys are refused meanwhile",
                extra={
                    "fields": {
                        "url": self.source,
                        "error": redact(f"{type(e).__name__}: {e}"),
                        "retry_in_seconds": round(delay, 1),
                    }
                },
            )
            return
        self.keys = keys
        self._fetched_at = time.monotonic()
        self._failures = 0
        self._retry_at = 0.0

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
