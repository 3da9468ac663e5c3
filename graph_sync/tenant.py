"""``TENANT_ID`` as Entra names it in tokens: a GUID, even when configured as a domain name.

Graph's ``validationTokens`` carry the tenant as a GUID (``tid``); an admin may configure
``contoso.onmicrosoft.com``. The tenant's OpenID configuration document,
``{authority_host}/{tenant}/v2.0/.well-known/openid-configuration``, answers for the domain name as for
the GUID, and its ``issuer`` and ``token_endpoint`` name the tenant by GUID: one look-up at start-up
resolves it. A failed look-up is not fatal: the caller falls back to checking only that each token's
issuer matches its own tenant, and says so.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from graph_sync.accounts import DEFAULT_AUTHORITY_HOST

GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RESOLVE_TIMEOUT = 5.0


@dataclass(frozen=True)
class TenantResolution:
    """What ``TENANT_ID`` came to: ``guid`` (lower case) or None with ``problem`` saying why."""

    configured: str
    guid: str | None
    problem: str | None = None
    looked_up: bool = False

    def line(self) -> str:
        if self.guid is None:
            return f"TENANT_ID {self.configured!r} not resolved to a tenant GUID: {self.problem}"
        if self.looked_up:
            return f"TENANT_ID {self.configured!r} is tenant {self.guid} (from its OpenID configuration)"
        return f"TENANT_ID is the tenant GUID {self.guid}"


def as_guid(value: str) -> str | None:
    lowered = value.strip().lower()
    return lowered if GUID.match(lowered) else None


async def resolve_tenant(
    tenant_id: str,
    *,
    authority_host: str = DEFAULT_AUTHORITY_HOST,
    http_client: Any = None,
    timeout: float = RESOLVE_TIMEOUT,
) -> TenantResolution:
    """A GUID as it is (lower case, no network); a domain name through its OpenID configuration.

    ``http_client``: ``requests``-like (the same hook MSAL takes, so tests point both at one
    emulator); by default a fresh ``requests`` session. Never raises: trouble is ``problem``."""
    configured = tenant_id.strip()
    if not configured:
        return TenantResolution(configured, None, "TENANT_ID is not set")
    guid = as_guid(configured)
    if guid is not None:
        return TenantResolution(configured, guid)
    url = f"{authority_host.rstrip('/')}/{configured}/v2.0/.well-known/openid-configuration"
    try:
        async with asyncio.timeout(timeout):
            status, text = await asyncio.to_thread(_get, http_client, url, timeout)
    except TimeoutError:
        return TenantResolution(configured, None, f"{url} did not answer within {timeout:g} s", True)
    except Exception as e:  # requests' connection errors and the like
        return TenantResolution(configured, None, f"cannot reach {url} ({type(e).__name__})", True)
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return TenantResolution(configured, None, f"{url} answered {status} without a JSON document", True)
    if status != 200:
        desc = str(doc.get("error_description") or doc.get("error") or "").split(" Trace ID:")[0].strip()
        return TenantResolution(configured, None, f"Entra answered {status}: {desc or 'no description'}", True)
    for field in ("token_endpoint", "issuer"):
        found = _guid_in(doc.get(field))
        if found is not None:
            return TenantResolution(configured, found, None, True)
    return TenantResolution(configured, None, f"{url} names no tenant GUID in issuer or token_endpoint", True)


def _guid_in(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    for part in urlsplit(url).path.split("/"):
        guid = as_guid(part)
        if guid is not None:
            return guid
    return None


def _get(http_client: Any, url: str, timeout: float) -> tuple[int, str]:
    if http_client is not None:
        resp = http_client.get(url)
        return int(resp.status_code), str(resp.text)
    import requests

    with requests.Session() as session:
        r = session.get(url, timeout=timeout)
        return r.status_code, r.text
