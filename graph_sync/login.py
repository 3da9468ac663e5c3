"""``presence-sync graph login``: sign in one subscriber account with the MSAL device-code flow.
(``graph login --web``, the authorization-code sign-in through the running service, is
``graph_sync.web_login``; both store the account with ``save_account``.)

Device code because the service runs headless: the admin opens the printed URL on any device, types
the code, and completes whatever the tenant asks (MFA, conditional access) in a real browser; no
password ever passes through the bridge. The resulting MSAL token cache (refresh token included) is
stored encrypted under ``graph.account.<username>`` and the account is listed in docs kind
``graph.account``, which ``SubscriberAccounts`` reads.

Polling is ours, not MSAL's: MSAL's own loop sleeps in a thread until the code expires (15 minutes)
and cannot be cancelled; here each poll is one short MSAL call and Ctrl+C stops at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msal

from graph_sync.accounts import (
    ACCOUNT_KIND,
    DEFAULT_AUTHORITY_HOST,
    DELEGATED_SCOPES,
    DEVICE_CODE_FLOW,
    AccountInfo,
    secret_name,
)
from graph_sync.entra_errors import explain_entra_error
from mapping.clock import utcnow
from mapping.errors import ConfigError, PermanentError, RetryableError
from mapping.ports import AdapterRecords, Store

_PENDING = ("authorization_pending", "slow_down")


async def device_code_login(
    *,
    tenant_id: str,
    client_id: str,
    store: Store,
    out: Callable[[str], None],
    authority_host: str = DEFAULT_AUTHORITY_HOST,
    http_client: Any = None,
    scopes: tuple[str, ...] = DELEGATED_SCOPES,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> AccountInfo:
    """Runs the device-code flow, prints what the admin must do through ``out``, and stores the
    account. Raises ``PermanentError`` when the sign-in is refused or the code expires."""
    if not tenant_id or not client_id:
        raise ConfigError("graph login needs PRESENCE_SYNC_TENANT_ID and PRESENCE_SYNC_CLIENT_ID")
    cache = msal.SerializableTokenCache()

    def build() -> msal.PublicClientApplication:
        return msal.PublicClientApplication(
            client_id, authority=f"{authority_host.rstrip('/')}/{tenant_id}", token_cache=cache, http_client=http_client
        )

    try:
        app = await asyncio.to_thread(build)
        flow: dict[str, Any] = await asyncio.to_thread(app.initiate_device_flow, scopes=list(scopes))
    except ValueError as e:  # MSAL: unknown tenant / authority
        raise ConfigError(f"graph login: the identity platform refused tenant {tenant_id!r}: {e}") from None
    except Exception as e:
        raise RetryableError(f"graph login: cannot reach the identity platform ({type(e).__name__}: {e})") from None
    if "user_code" not in flow:
        desc = str(flow.get("error_description", ""))
        advice = explain_entra_error(desc)
        raise PermanentError(
            f"graph login: device code not issued ({flow.get('error')}: {desc})" + (f" -> {advice}" if advice else "")
        )
    out(str(flow.get("message") or f"Open {flow['verification_uri']} and enter the code {flow['user_code']}"))
    out(f"  URL:  {flow['verification_uri']}")
    out(f"  code: {flow['user_code']}")
    interval = float(flow.get("interval") or 5)
    deadline = float(flow.get("expires_at") or time.time() + float(flow.get("expires_in") or 900))
    while True:
        result: dict[str, Any] = await asyncio.to_thread(
            app.acquire_token_by_device_flow, flow, exit_condition=lambda _flow: True
        )
        error = result.get("error")
        if error == "slow_down":
            interval += 5
        if error not in _PENDING:
            break
        if time.time() >= deadline:
            raise PermanentError("graph login: the code expired before the sign-in was completed; run it again")
        await sleep(interval)
    if "access_token" not in result:
        desc = str(result.get("error_description", "")).splitlines()[0] if result.get("error_description") else ""
        advice = explain_entra_error(desc)
        raise PermanentError(f"graph login failed: {error}: {desc}" + (f" -> {advice}" if advice else ""))
    return await save_account(store, app, cache, result, scopes=scopes, flow=DEVICE_CODE_FLOW, tenant_id=tenant_id)


async def save_account(
    store: AdapterRecords,
    app: msal.ClientApplication,
    cache: msal.SerializableTokenCache,
    result: dict[str, Any],
    *,
    scopes: tuple[str, ...],
    flow: str,
    tenant_id: str,
) -> AccountInfo:
    """Stores a signed-in account the one way every sign-in does: its MSAL cache encrypted under
    ``graph.account.<username>``, its listing in docs kind ``graph.account``, with the ``flow`` that
    signed it in (``SubscriberAccounts`` refreshes it with the same client type)."""
    claims = result.get("id_token_claims") or {}
    accounts = app.get_accounts()
    username = str(claims.get("preferred_username") or (accounts[0]["username"] if accounts else ""))
    if not username:
        raise PermanentError("graph login: the identity platform returned no username for the account")
    home = str(accounts[0].get("home_account_id", "")) if accounts else ""
    tenant = str(claims.get("tid") or tenant_id)
    await store.put_secret(secret_name(username), cache.serialize().encode())
    now = utcnow().isoformat()
    await store.put_doc(
        ACCOUNT_KIND,
        username,
        {
            "username": username,
            "home_account_id": home,
            "tenant_id": tenant,
            "signed_in_at": now,
            "last_refresh": now,
            "error": None,
            "scopes": list(scopes),
            "flow": flow,
        },
    )
    return AccountInfo(username, "delegated", home, tenant, now, flow)
