"""``presence-sync doctor``: what an admin runs before going live.

Each check prints one line as soon as it completes (``PASS``/``FAIL``/``WARN``/``SKIP``, what was
checked, and on trouble what to do: the setting to change or the admin-center step), so a slow
upstream shows where it is stuck instead of a silent pause. Exit code: 1 if any check failed, else 0.

Principles, and why:

- **Read-only.** Doctor is run against production. It never applies migrations (a pending migration is
  a FAIL telling to run ``presence-sync db upgrade``, so schema changes stay a deliberate step), never
  calls ``CCaaS_ModifyAgentPresence`` or ``setPresence`` (either would change what an agent shows),
  never creates or renews a subscription, and registers the webhook only as a dry run.
- **Bounded.** Every check runs under ``CHECK_TIMEOUT`` and makes one attempt (no retry policy, no
  backoff): an admin waiting on a hung upstream learns it in seconds, as a FAIL naming the setting.
- **Honest.** What cannot be verified without side effects is WARN ("could not verify"), and checks
  whose settings are absent are SKIP with the reason, so a green run means what it says.
- **One composition root.** Adapters come from ``service.runtime.Runtime.open``, the same assembly as
  ``serve``; doctor only swaps the start-up catalogue load for its own bounded, write-free check (see
  ``_DoctorRuntime``) and opens the store without migrating it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from dataverse.client import DataverseClient
from graph_sync.accounts import DEFAULT_AUTHORITY_HOST
from graph_sync.entra_errors import explain_entra_error
from mapping.errors import ConfigError, PermanentError, Throttled, UpstreamError
from mapping.memory import MemoryStore
from mapping.model import Agent, Presence
from mapping.ports import Store
from mapping.redact import redact
from service.runtime import Overrides, Runtime, bootstrap
from service.settings import PREFIX, Settings, is_loopback_url

CHECK_TIMEOUT = 5.0
"""Seconds any one check may take (upstream clients time out at 10 s; doctor wants an answer sooner)."""
HEALTHZ_TIMEOUT = 3.0
MODIFY_API = "CCaaS_ModifyAgentPresence"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
BOT_SCOPE = "https://api.botframework.com/.default"
BOT_MULTI_TENANT = "botframework.com"

GRAPH_PERMISSION_STEP = (
    "grant application permission Presence.ReadWrite.All (Microsoft Graph) to the app registration "
    f"{PREFIX}CLIENT_ID and admin-consent it (Entra admin center > App registrations > API permissions > "
    "Add a permission > Microsoft Graph > Application permissions > Presence.ReadWrite.All, then "
    "Grant admin consent)"
)

Status = Literal["PASS", "FAIL", "WARN", "SKIP"]


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``detail`` says what was checked (and found), ``advice`` what to do."""

    status: Status
    name: str
    detail: str
    advice: str = ""

    def line(self) -> str:
        text = f"{self.status}  {self.name}: {self.detail}"
        return f"{text} -> {self.advice}" if self.advice else text


async def run_doctor(
    settings: Settings, out: Callable[[str], None], *, timeout: float = CHECK_TIMEOUT, identity_http: Any = None
) -> int:
    """Runs every check in order, printing each line through ``out`` as it completes; returns the exit
    code (1 if any check failed, else 0). Settings are already loaded and valid: a bad setting exits 2
    in the CLI before doctor runs. ``timeout``: seconds per check. ``identity_http``: MSAL's
    ``http_client`` for what doctor asks Entra itself (tenant look-up, bot token); tests pass the
    Entra emulator's."""
    return await _Doctor(settings, out, timeout, identity_http).run()


def _short(message: str) -> str:
    """An adapter message without the outbox's promise to retry: doctor makes one attempt."""
    return message.removesuffix("; will retry")


class _Doctor:
    """The checks, in order, and what earlier ones found that later ones depend on."""

    def __init__(
        self, settings: Settings, out: Callable[[str], None], timeout: float, identity_http: Any = None
    ) -> None:
        self.s = settings
        self.identity_http = identity_http
        self.out = out
        self.timeout = timeout
        self.results: list[Check] = []
        self._rt: Runtime | None = None
        self.store_ok = False
        self.agent: Agent | None = None
        self.graph_token_ok = False
        self.dataverse_token_ok = False
        self.dataverse_ok = False
        self.presences: list[Presence] = []

    @property
    def rt(self) -> Runtime:
        assert self._rt is not None, "the runtime is built before any check that uses it"
        return self._rt

    # ------------------------------------------------------------------ running

    async def run(self) -> int:
        self.report(self.settings_summary())
        store = await self.checked(
            "store",
            self.open_store,
            f"the database did not answer: check {PREFIX}DATABASE_URL and that the server is up",
        )
        try:
            # With no usable store, the upstream checks still run on a throw-away in-memory store.
            # As ``serve`` builds it, except the start-up catalogue load: that reads Dataverse with
            # three tries and backoff (half a minute against a hung org) and writes the copy into the
            # store. Doctor reads ``msdyn_presences`` itself, once and bounded, and writes nothing.
            overrides = Overrides(store=store or MemoryStore(), load_catalogue=False, identity_http=self.identity_http)
            self._rt = await bootstrap(self.s, overrides=overrides)
        except ConfigError as e:
            self.report(Check("FAIL", "configuration", str(e), "fix the setting named and run doctor again"))
            return self.finish()
        try:
            await self.run_checks()
        finally:
            await self.rt.close()
        return self.finish()

    async def run_checks(self) -> None:
        await self.checked("tenant", self.tenant, "")
        await self.checked("graph token", self.graph_token, "Entra did not answer: check outbound network")
        await self.checked("dataverse token", self.dataverse_token, "Entra did not answer: check outbound network")
        await self.checked("bot token", self.bot_token, "Entra did not answer: check outbound network")
        await self.checked("graph presence", self.graph_presence, f"Graph did not answer: check {PREFIX}GRAPH_URL")
        dv_hang = f"Dataverse did not answer: check {PREFIX}DATAVERSE_URL and that the environment is up"
        await self.checked("dataverse", self.dataverse_reachable, dv_hang)
        await self.checked("mapping rules", self.mapping_rules, dv_hang)
        await self.checked("CCaaS_GetPresence", self.get_presence, dv_hang)
        await self.checked(MODIFY_API, self.modify_api_exists, dv_hang)
        await self.checked("dataverse webhook", self.webhook, dv_hang)
        await self.checked("graph subscriptions", self.subscriptions, "the store did not answer")
        await self.checked("public url", self.public_url, "")
        await self.checked("webhook spool", self.spool, "the spool folder did not answer (a hung network mount?)")

    async def checked(self, name: str, fn: Callable[[], Awaitable[Check | tuple[Check, Any]]], on_timeout: str) -> Any:
        """Runs one check under the per-check timeout and reports it; any error becomes a FAIL line (doctor
        itself never ends in a traceback). A check may return ``(Check, value)`` to hand a value on."""
        value: Any = None
        try:
            async with asyncio.timeout(self.timeout):
                got = await fn()
            check, value = got if isinstance(got, tuple) else (got, None)
        except TimeoutError:
            check = Check("FAIL", name, f"no answer within {self.timeout:g} s", on_timeout)
        except UpstreamError as e:
            check = Check("FAIL", name, _short(e.message))
        except ConfigError as e:
            check = Check("FAIL", name, str(e))
        except Exception as e:  # a doctor that crashes tells the admin nothing
            check = Check("FAIL", name, f"unexpected {type(e).__name__}: {e}")
        self.report(check)
        return value

    def report(self, check: Check) -> None:
        if check.status in ("FAIL", "WARN") and not check.advice:
            # An Entra error met anywhere (AADSTS7000218, AADSTS700016): say exactly what to change.
            advice = explain_entra_error(check.detail)
            if advice:
                check = Check(check.status, check.name, check.detail, advice)
        self.results.append(check)
        self.out(check.line())

    def finish(self) -> int:
        counts = {s: sum(1 for c in self.results if c.status == s) for s in ("PASS", "FAIL", "WARN", "SKIP")}
        failed = counts["FAIL"] > 0
        verdict = "not ready: fix the FAIL lines above" if failed else "ready"
        self.out(f"doctor: {', '.join(f'{n} {s}' for s, n in counts.items() if n)}; {verdict}")
        return 1 if failed else 0

    # ------------------------------------------------------------------ 1. settings

    def settings_summary(self) -> Check:
        """What this instance is configured to talk to; names of secrets only, never their values."""
        s = self.s
        if s.auth_mode == "static":
            auth = "static (fixed token, emulators only)"
        elif s.client_cert_path:
            auth = f"entra tenant={s.tenant_id or '-'} client={s.client_id or '-'} certificate"
        elif s.client_secret:
            auth = f"entra tenant={s.tenant_id or '-'} client={s.client_id or '-'} secret"
        else:
            auth = "entra (no app configured)"
        parts = [
            f"auth={auth}",
            f"store={_shown_db(s.database_url)}",
            f"graph={s.graph_url} ({s.graph_presence_mode})",
            f"dataverse={s.dataverse_url or 'off'}",
            f"public_url={s.public_url or 'unset'}",
            f"webhook key={'set' if s.dataverse_webhook_key else 'unset'}",
            f"graph client state={'set' if s.graph_client_state else 'unset'}",
            f"rich notifications={'on' if s.graph_encryption_cert_path else 'off'}",
            f"bot={s.bot_app_id or 'no app id (loopback only)'}",
            f"mapping={s.mapping_file or 'built-in'}",
            f"secret key={'set' if s.secret_key else 'unset'}",
        ]
        return Check("PASS", "settings", "loaded; " + " ".join(parts))

    # ------------------------------------------------------------------ 2. store

    async def open_store(self) -> tuple[Check, Store | None]:
        """Opens the store without migrating it and compares its schema with the code's."""
        from service.store.connect import parse_url
        from service.store.migrate import head_revision, script_directory
        from service.store.sql import SqlStore, migration_status, open_store

        target = parse_url(self.s.database_url)
        missing = _missing_sqlite_file(target.url.database if target.is_sqlite else None)
        if missing is not None:
            # Connecting would create an empty file: say so instead of leaving one behind.
            return Check(
                "FAIL",
                "store",
                f"no database file at {missing}",
                f"run `presence-sync db upgrade` to create it (or check {PREFIX}DATABASE_URL and the working folder)",
            ), None
        store: SqlStore = await open_store(self.s.database_url, secret_key=self.s.secret_key, migrate=False)
        try:
            current, head = await migration_status(store)
            if current != head:
                pending = [r.revision for r in script_directory().iterate_revisions(head_revision(), current or "base")]
                await store.close()
                return Check(
                    "FAIL",
                    "store",
                    f"{target.shown}: schema at {current or 'none'}, code needs {head}: "
                    f"{len(pending)} migration(s) pending ({', '.join(reversed(pending))})",
                    "run `presence-sync db upgrade`",
                ), None
            agents = await store.list_agents(enabled_only=True)
        except BaseException:
            await store.close()
            raise
        self.store_ok = True
        self.agent = next((a for a in agents if a.entra_object_id), None)
        return Check(
            "PASS",
            "store",
            f"{target.shown} reachable, schema at {head} (current); {len(agents)} enabled agent(s) in the directory",
        ), store

    # ------------------------------------------------------------------ 3. tokens

    async def graph_token(self) -> Check:
        check = await self._token("graph token", GRAPH_SCOPE)
        self.graph_token_ok = check.status == "PASS"
        return check

    async def dataverse_token(self) -> Check:
        if self.rt.dataverse is None:
            return Check("SKIP", "dataverse token", f"{PREFIX}DATAVERSE_URL unset (Dataverse side off)")
        check = await self._token("dataverse token", self.rt.dataverse.scope)
        self.dataverse_token_ok = check.status == "PASS"
        return check

    async def _token(self, name: str, scope: str) -> Check:
        problem = getattr(self.rt.tokens, "problem", None)
        if problem:  # UnconfiguredTokens: nothing to acquire a token with
            return Check("FAIL", name, "no Entra app configured", problem.removeprefix("no Entra app configured: "))
        if self.s.auth_mode == "static":
            await self.rt.tokens.token(scope)
            return Check(
                "PASS",
                name,
                f"static token for {scope} ({PREFIX}STATIC_TOKEN; whether the upstream accepts it is checked below)",
            )
        try:
            token = await self.rt.tokens.token(scope)
        except PermanentError as e:
            return Check(
                "FAIL",
                name,
                e.message,
                explain_entra_error(e.message)
                or f"check {PREFIX}TENANT_ID, {PREFIX}CLIENT_ID and "
                f"{PREFIX}CLIENT_CERT_PATH (or {PREFIX}CLIENT_SECRET), and that the certificate is "
                "uploaded to the app registration (Entra admin center > App registrations > "
                "Certificates & secrets)",
            )
        if not token:
            return Check("FAIL", name, f"Entra returned an empty token for {scope}")
        return Check("PASS", name, f"acquired an app token for {scope} (client credentials)")

    async def tenant(self) -> Check:
        """What ``TENANT_ID`` resolved to at start-up (a domain name is looked up once): Graph's
        validationTokens are compared with that GUID."""
        name = "tenant"
        if self.s.auth_mode == "static":
            return Check("SKIP", name, "AUTH_MODE=static (emulators): no tenant look-up")
        resolved = self.rt.tenant
        if not self.s.tenant_id or resolved is None:
            return Check("SKIP", name, f"{PREFIX}TENANT_ID unset (see the token checks)")
        if resolved.guid is None:
            return Check(
                "WARN",
                name,
                resolved.line(),
                explain_entra_error(resolved.problem or "")
                or f"set {PREFIX}TENANT_ID to the tenant GUID or its domain (e.g. contoso.onmicrosoft.com; Entra "
                "admin center > Overview > Tenant ID) and check outbound access to login.microsoftonline.com; until "
                "then Graph validationTokens are checked for a consistent issuer only, not for this tenant",
            )
        return Check("PASS", name, resolved.line())

    async def bot_token(self) -> Check:
        """Client credentials for the bot's own app (what the Bot Framework SDK does before every reply):
        a wrong app type or tenant shows here, before the first reply fails."""
        name = "bot token"
        s = self.s
        if not s.bot_app_id:
            return Check("SKIP", name, f"{PREFIX}BOT_APP_ID unset: the bot runs without authentication (loopback only)")
        if s.bot_app_type == "UserAssignedMSI":
            return Check("SKIP", name, "BOT_APP_TYPE=UserAssignedMSI: the token comes from the Azure host's identity")
        if not s.bot_app_password:
            return Check("FAIL", name, f"{PREFIX}BOT_APP_PASSWORD unset", "set it to the bot app's client secret")
        tenant = s.bot_tenant if s.bot_app_type == "SingleTenant" else BOT_MULTI_TENANT
        if not tenant:
            return Check(
                "FAIL",
                name,
                "BOT_APP_TYPE=SingleTenant needs a tenant",
                f"set {PREFIX}BOT_TENANT_ID (or {PREFIX}TENANT_ID)",
            )
        bot_advice = (
            f"{PREFIX}BOT_APP_ID must be the Azure Bot's Microsoft App ID, registered in tenant {tenant}: check "
            f"{PREFIX}BOT_TENANT_ID and {PREFIX}BOT_APP_TYPE (new Azure Bots are SingleTenant; MultiTenant asks "
            "the botframework.com tenant, which does not know a single-tenant app)"
        )
        authority = f"{DEFAULT_AUTHORITY_HOST}/{tenant}"
        result = await asyncio.to_thread(
            _client_credentials, s.bot_app_id, s.bot_app_password, authority, self.identity_http
        )
        if "access_token" in result:
            return Check("PASS", name, f"acquired a token for {BOT_SCOPE} from {authority} ({s.bot_app_type})")
        desc = str(result.get("error_description") or result.get("error") or "no token").split(" Trace ID:")[0].strip()
        detail = redact(f"{authority} refused the bot's credentials: {desc}")
        if "AADSTS700016" in desc or "AADSTS90002" in desc:
            return Check("FAIL", name, detail, bot_advice)
        if "AADSTS7000215" in desc:
            return Check(
                "FAIL", name, detail, f"{PREFIX}BOT_APP_PASSWORD is not a valid client secret of {PREFIX}BOT_APP_ID"
            )
        return Check("FAIL", name, detail)

    # ------------------------------------------------------------------ 4. Graph permissions

    async def graph_presence(self) -> Check:
        """Reads one agent's presence with the app token: proves reachability, token and read permission.
        The write permission can only be proven by writing, which doctor does not do; a refusal the
        service recorded on an earlier write is reported instead."""
        name = "graph presence"
        if not self.graph_token_ok:
            return Check("SKIP", name, "no Graph token (see above)")
        if not self.store_ok:
            return Check("SKIP", name, "no agent to read: the store is not usable (see above)")
        agent = self.agent
        if agent is None:
            return Check(
                "WARN",
                name,
                "could not verify: no enabled agent with an Entra object id in the directory",
                "run `presence-sync agents discover` or `presence-sync agents import FILE.csv`",
            )
        check = await self.rt.teams.check_read(agent)
        if check.error is not None:
            return self._graph_failure(name, check.error)
        shown = check.shown
        if check.refused_write is not None:
            return Check(
                "WARN",
                name,
                f"read {agent.label}: {shown}; but the last Teams write was refused "
                f"({check.refused_write.at}): {check.refused_write.error}",
                GRAPH_PERMISSION_STEP + " (the next successful write clears this note)",
            )
        return Check(
            "PASS",
            name,
            f"read {agent.label}: {shown} (application token; writes need "
            "Presence.ReadWrite.All, not verifiable without writing)",
        )

    def _graph_failure(self, name: str, err: UpstreamError) -> Check:
        detail = _short(err.message)
        if err.status == 403:
            return Check("FAIL", name, detail, GRAPH_PERMISSION_STEP)
        if err.status == 401:
            if self.s.auth_mode == "static":
                advice = f"set {PREFIX}STATIC_TOKEN to the token the Graph emulator accepts"
            else:
                advice = (
                    f"check {PREFIX}TENANT_ID (the agents' tenant), {PREFIX}CLIENT_ID and {PREFIX}GRAPH_URL "
                    "(https://graph.microsoft.com/v1.0)"
                )
            return Check("FAIL", name, detail, advice)
        if err.status == 404:
            return Check(
                "FAIL",
                name,
                detail,
                "the agent's Entra object id is not a user of this tenant: fix the "
                "directory (`presence-sync agents discover`, or the CSV for `agents import`)",
            )
        if isinstance(err, Throttled):
            return Check("WARN", name, detail, "Graph is throttling this app; run doctor again in a minute")
        if err.status is None:
            return Check("FAIL", name, detail, f"check {PREFIX}GRAPH_URL and outbound network (proxy, firewall)")
        return Check("FAIL", name, detail)

    # ------------------------------------------------------------------ 5. Dataverse

    @property
    def dv(self) -> DataverseClient:
        """The Dataverse client, in checks that ran ``_dataverse_skip`` first."""
        assert self.rt.dataverse is not None, "checked by _dataverse_skip"
        return self.rt.dataverse

    def _dataverse_skip(self, name: str) -> Check | None:
        if self.rt.dataverse is None:
            return Check("SKIP", name, f"{PREFIX}DATAVERSE_URL unset (Dataverse side off)")
        if not self.dataverse_token_ok:
            return Check("SKIP", name, "no Dataverse token (see above)")
        return None

    async def dataverse_reachable(self) -> Check:
        name = "dataverse"
        skip = self._dataverse_skip(name)
        if skip is not None:
            return skip
        try:
            self.presences = await self.dv.list_presences()
        except UpstreamError as e:
            return self._dataverse_failure(name, e)
        self.dataverse_ok = True
        return Check(
            "PASS",
            name,
            f"{self.dv.base_url} answered: {len(self.presences)} active presence(s) in msdyn_presences",
        )

    def _dataverse_failure(self, name: str, e: UpstreamError) -> Check:
        detail = _short(e.message)
        if e.status is None:  # transport: refused, unknown host, timed out
            return Check(
                "FAIL",
                name,
                detail,
                f"check {PREFIX}DATAVERSE_URL (the environment URL, e.g. "
                "https://contoso.crm.dynamics.com) and that it is reachable from here",
            )
        if e.status == 401 and self.s.auth_mode == "static":
            return Check("FAIL", name, detail, f"set {PREFIX}STATIC_TOKEN to the token the Dataverse emulator accepts")
        if isinstance(e, Throttled):
            return Check("WARN", name, detail, "Dataverse service protection is throttling; run doctor again later")
        return Check("FAIL", name, detail)  # the client's message already says what to do for 401/403/404/405

    async def mapping_rules(self) -> Check:
        name = "mapping rules"
        skip = self._dataverse_skip(name)
        if skip is not None:
            return skip
        if not self.dataverse_ok:
            return Check(
                "SKIP", name, "msdyn_presences not read (see above); `serve` would fall back to its stored copy"
            )
        problems = self.rt.bridge.rules.check_catalogue(self.presences)
        where = self.s.mapping_file or "the built-in defaults"
        if problems:
            return Check(
                "FAIL",
                name,
                f"{where} do not fit msdyn_presences: {'; '.join(problems)}",
                f"fix {PREFIX}MAPPING_FILE (format in mapping/translation.py)",
            )
        return Check("PASS", name, f"every Dynamics 365 target of {where} is an active presence of its base status")

    async def get_presence(self) -> Check:
        """``CCaaS_GetPresence`` as the first directory agent: reachability of the presence API, the app
        user's impersonation privilege and the agent's role, in one read with no side effect."""
        name = "CCaaS_GetPresence"
        skip = self._dataverse_skip(name)
        if skip is not None:
            return skip
        if not self.dataverse_ok:
            return Check("SKIP", name, "Dataverse not reachable (see above)")
        if not self.store_ok:
            return Check("SKIP", name, "no agent to impersonate: the store is not usable (see above)")
        agent = self.agent
        if agent is None:
            return Check(
                "WARN",
                name,
                "could not verify: no enabled agent in the directory to impersonate",
                "run `presence-sync agents discover`",
            )
        try:
            info = await self.dv.get_presence(agent)
        except UpstreamError as e:
            return self._dataverse_failure(name, e)
        names = {p.presence_id: p.name for p in self.presences}
        shown = names.get(info.presence_id or "", info.status_text or info.presence_id or "no presence")
        return Check("PASS", name, f"as {agent.label} (MSCRMCallerID impersonation): {shown}")

    async def modify_api_exists(self) -> Check:
        """Whether ``CCaaS_ModifyAgentPresence`` is defined, from the ``customapis`` table (then
        ``sdkmessages``): never by calling it, since a call changes an agent's presence."""
        name = MODIFY_API
        skip = self._dataverse_skip(name)
        if skip is not None:
            return skip
        if not self.dataverse_ok:
            return Check("SKIP", name, "Dataverse not reachable (see above)")
        try:
            lookup = await self.dv.custom_api_defined(MODIFY_API)
        except UpstreamError as e:
            return self._dataverse_failure(name, e)
        if lookup.unreadable is not None:
            return Check(
                "WARN",
                name,
                f"could not verify: customapis not readable ({lookup.unreadable}); doctor never "
                "calls this API, as a call would change an agent's presence",
            )
        if not lookup.defined:
            return Check(
                "FAIL",
                name,
                "not defined in this environment (neither customapis nor sdkmessages)",
                "install or update Dynamics 365 Contact Center in this environment (Power Platform admin "
                f"center > Environments > Dynamics 365 apps), and check {PREFIX}DATAVERSE_URL",
            )
        return Check("PASS", name, "defined in this environment (not called: it would change an agent's presence)")

    # ------------------------------------------------------------------ 6. webhook

    async def webhook(self) -> Check:
        """A dry run of ``dataverse register-webhook``: anything it would change is a FAIL."""
        name = "dataverse webhook"
        skip = self._dataverse_skip(name)
        if skip is not None:
            return skip
        if not self.dataverse_ok:
            return Check("SKIP", name, "Dataverse not reachable (see above)")
        if not self.s.public_url:
            return Check(
                "WARN",
                name,
                f"{PREFIX}PUBLIC_URL unset: Dataverse cannot call the service, so Dynamics "
                "365 changes reach Teams only through the reconcile sweep",
                f"set {PREFIX}PUBLIC_URL and run `presence-sync dataverse register-webhook`",
            )
        from dataverse.registration import ENDPOINT_NAME, register_webhook

        url = self.s.public("/api/dataverse/webhook")
        lines: list[str] = []
        result = await register_webhook(
            self.dv, url=url, key=self.s.dataverse_webhook_key, dry_run=True, progress=lines.append
        )
        if result.changed:
            changes = "[dry run] would "
            plan = "; ".join(line.removeprefix(changes) for line in lines if line.startswith(changes))
            return Check(
                "FAIL",
                name,
                f"not registered as it should be: would {plan}",
                "run `presence-sync dataverse register-webhook`",
            )
        steps = ", ".join(sorted(result.step_ids))
        return Check(
            "PASS",
            name,
            f"serviceendpoint {ENDPOINT_NAME!r} -> {url}, synchronous {steps} steps on "
            "msdyn_agentstatus (the key itself cannot be read back to compare)",
        )

    # ------------------------------------------------------------------ 7. Graph subscriptions

    async def subscriptions(self) -> Check:
        """The bridge's subscription records: one per account, each far enough from expiry."""
        name = "graph subscriptions"
        if not self.s.public_url:
            return Check(
                "WARN",
                name,
                f"{PREFIX}PUBLIC_URL unset, so no subscription can exist: Teams changes "
                f"reach Dynamics 365 only through the reconcile sweep (every "
                f"{self.s.reconcile_interval_seconds:g} s)",
                f"set {PREFIX}PUBLIC_URL (https)",
            )
        if self.rt.subscriptions is None:
            return Check(
                "FAIL",
                name,
                f"{PREFIX}GRAPH_CLIENT_STATE unset: subscriptions are off",
                f"set {PREFIX}GRAPH_CLIENT_STATE to a long random secret",
            )
        if not self.store_ok:
            return Check("SKIP", name, "the store is not usable (see above)")
        if not await self.rt.accounts.accounts():
            return Check(
                "FAIL",
                name,
                "no subscriber account signed in (presence subscriptions need a delegated token)",
                "run `presence-sync graph login`",
            )
        health = await self.rt.subscriptions.health()
        if not health.active:
            return Check(
                "FAIL",
                name,
                "none yet",
                "start `presence-sync serve` (it creates them within a minute) "
                "or run `presence-sync graph subscriptions --sync`",
            )
        if health.misdirected:
            shown = "; ".join(f"{a}: delivers to {u}" for a, u in sorted(health.misdirected.items()))
            return Check(
                "FAIL",
                name,
                f"{shown}, not {self.rt.subscriptions.notification_url} ({PREFIX}PUBLIC_URL)",
                "a running `presence-sync serve` recreates them at its next upkeep (within a minute); "
                "or run `presence-sync graph subscriptions --sync`",
            )
        if health.problems:
            shown = "; ".join(f"{account}: {why}" for account, why in health.problems.items())
            return Check(
                "FAIL",
                name,
                shown,
                "check that `presence-sync serve` is running (it renews them), "
                "then `presence-sync graph subscriptions --sync`",
            )
        soonest = min(s.minutes_left for s in health.active if s.minutes_left is not None)
        covered = sum(s.ids for s in health.active)
        detail = f"{len(health.active)} active, {covered} agent(s) covered, next expiry in {soonest:.0f} min"
        if health.polled:
            return Check(
                "WARN",
                name,
                f"{detail}; {health.polled} agent(s) not covered (polled instead)",
                "sign in more subscriber accounts with `presence-sync graph login` (650 agents each)",
            )
        return Check("PASS", name, detail)

    # ------------------------------------------------------------------ 8. public URL

    async def public_url(self) -> Check:
        """``GET PUBLIC_URL/healthz`` from here: the service answers at the URL upstreams are given.
        (From this machine: whether Graph and Dataverse can reach it from the internet is not provable
        here; see the subscriptions and webhook checks.)"""
        name = "public url"
        if not self.s.public_url:
            return Check("SKIP", name, f"{PREFIX}PUBLIC_URL unset")
        url = self.s.public_url.rstrip("/") + "/healthz"
        serve_it = (
            f"the service must be running (`presence-sync serve`) and reachable at {PREFIX}PUBLIC_URL="
            f"{self.s.public_url} (https, port 443, for Graph and Dataverse in production)"
        )
        limit = min(HEALTHZ_TIMEOUT, self.timeout * 0.8)  # its own line, before the check's deadline
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit)) as http,
                http.get(url, allow_redirects=False) as resp,
            ):
                status = resp.status
                body = await resp.read()
        except TimeoutError:
            return Check("FAIL", name, f"GET {url}: no answer within {limit:g} s", serve_it)
        except aiohttp.ClientError as e:
            return Check("FAIL", name, f"GET {url}: {type(e).__name__}: {e}", serve_it)
        if status != 200 or _json_status(body) != "ok":
            return Check("FAIL", name, f"GET {url} answered {status}, not presence-sync's health", serve_it)
        if urlsplit(self.s.public_url).scheme != "https":
            if is_loopback_url(self.s.public_url):
                return Check(
                    "PASS", name, f"GET {url}: ok (loopback http: fine for the emulators; production needs https)"
                )
            return Check(
                "FAIL",
                name,
                f"GET {url}: ok, but over http: Graph and Dataverse call https only",
                f"put the service behind TLS and set {PREFIX}PUBLIC_URL to its https URL",
            )
        return Check("PASS", name, f"GET {url}: ok")

    # ------------------------------------------------------------------ 9. webhook spool

    async def spool(self) -> Check:
        """The spool ``serve`` uses when the store does not commit in time: its folder writable, and
        what waits in the files there (read only: replaying is ``serve``'s business)."""
        from edge.spool import inspect, spool_path
        from service.runtime import serve_owner, spool_folder

        name = "webhook spool"
        folder = spool_folder(self.s)
        probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            return Check(
                "FAIL",
                name,
                f"{folder} is not a writable folder: a store outage would fail agents' changes (503)",
                f"set {PREFIX}SPOOL_DIR to a writable local folder",
            )
        own = spool_path(folder, serve_owner(self.s))
        files = sorted({own, *folder.glob("webhook-spool-*.bin")}) if folder.exists() else [own]
        waiting = [st for st in (await asyncio.to_thread(lambda: [inspect(f) for f in files])) if st.records]
        if not waiting:
            return Check("PASS", name, f"empty ({folder}, at most {self.s.spool_max_bytes} bytes per instance)")
        shown = "; ".join(f"{st.path.name}: {st.records} record(s), {st.bytes} bytes" for st in waiting)
        return Check(
            "WARN",
            name,
            f"{sum(st.records for st in waiting)} record(s) waiting in {folder} ({shown})",
            "a running `presence-sync serve` replays its own spool as soon as the store answers; "
            "check the store if this does not shrink",
        )


def _client_credentials(client_id: str, secret: str, authority: str, http_client: Any) -> dict[str, Any]:
    """One client-credentials request through MSAL (synchronous: run it in a thread). An unknown
    tenant is MSAL's ValueError at construction: returned as an error like Entra's own."""
    import msal

    try:
        app = msal.ConfidentialClientApplication(
            client_id, client_credential=secret, authority=authority, http_client=http_client, timeout=CHECK_TIMEOUT
        )
        result: dict[str, Any] = app.acquire_token_for_client([BOT_SCOPE])
    except ValueError as e:
        return {"error": "invalid_tenant", "error_description": f"AADSTS90002: {str(e).splitlines()[0]}"}
    except Exception as e:
        return {"error": "unreachable", "error_description": f"cannot reach Entra ({type(e).__name__})"}
    return result


def _missing_sqlite_file(database: str | None) -> Path | None:
    """The SQLite file's path when it does not exist (a quick local stat, before any connection)."""
    if not database or database.startswith("file:"):
        return None
    path = Path(database).expanduser().resolve()
    return None if path.exists() else path


def _json_status(body: bytes) -> Any:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("status") if isinstance(data, dict) else None


def _shown_db(database_url: str) -> str:
    from service.store.connect import parse_url

    try:
        return parse_url(database_url).shown
    except ConfigError:
        return "(unparseable)"
