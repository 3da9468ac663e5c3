"""The Dataverse Web API client, and the core's Dynamics 365 port (``PresenceWriter``, ``PresenceReader``).

Plain aiohttp on one lazily created ``ClientSession``: the Web API is JSON over HTTP with OData query
options, and nothing here needs an SDK. Design points:

- **One call per operation.** No retry, no sleep: the outbox (writes) and ``bridge.retry`` (reads,
  paging) own retries, backoff and ``Retry-After``; this module only says what happened, as the typed
  errors of ``mapping.errors`` (``Throttled`` / ``RetryableError`` / ``PermanentError``) with messages
  that name the call, the agent and what an admin should do. Tokens never appear in messages (not even
  when an error body echoes the request's ``Authorization`` header).
- **Impersonation.** The CCaaS custom APIs act for an agent: ``MSCRMCallerID: <systemuserid>``, so the
  call is charged against that agent's service-protection quota (6,000 / 5 min, 52 concurrent) and
  Dataverse marks the change as the agent's (``msdyn_presencemodifiedby`` = ``AGENT``).
- **The token goes to the configured org only**: ``https`` anywhere, ``http`` only on loopback (the
  emulator), and an ``@odata.nextLink`` pointing anywhere else is refused instead of followed.
- **Versions.** Reconciliation reads ``versionnumber``, the same counter a webhook carries as
  ``RowVersion``, so reads and webhooks order against each other (rule 4).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from yarl import URL

from edge.upstream import retry_after_seconds, upstream_base_url
from mapping.clock import Clock, from_epoch_ms, utcnow
from mapping.errors import PermanentError, RetryableError, Throttled, UpstreamError
from mapping.model import Agent, BasePresence, Presence, PresenceObserved, System
from mapping.ports import TokenProvider

log = logging.getLogger("presence_sync.dataverse")

READ_BATCH = 100
"""Agent ids per ``msdyn_agentstatuses`` query: ~40 URL characters each keeps a GET far below the
Web API's URL length limit."""
MAX_PAGE = 5000
"""Dataverse's largest page (``odata.maxpagesize`` above it is ignored)."""
ODATA_HEADERS = {
    "Accept": "application/json",
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
}
_QUERY_SAFE = "$'(),=:@/"
APP_USER_HINT = (
    "check that the app registration is an application user in this Dataverse environment "
    "(Power Platform admin center > Environments > Settings > Users + permissions > Application users) "
    "and that PRESENCE_SYNC_DATAVERSE_URL is the environment's URL"
)
PRIVILEGE_HINT = (
    "give the application user a security role with read on systemuser, msdyn_presence and "
    "msdyn_agentstatus, and the 'Act on Behalf of Another User' privilege (prvActOnBehalfOfAnotherUser) "
    "for impersonation; the impersonated agent needs the Omnichannel Agent role"
)


def check_dataverse_url(url: str) -> str:
    """The org URL without a trailing slash; ``http`` only on loopback (a bearer token must never cross
    a network in clear text)."""
    return upstream_base_url(url.strip(), name="PRESENCE_SYNC_DATAVERSE_URL", expected="https://<org>.crm.dynamics.com")


def odata_query(params: Mapping[str, str]) -> str:
    """OData options percent-encoded with ``%20`` for spaces (not ``+``, which OData reads literally)."""
    return "&".join(f"{k}={urllib.parse.quote(v, safe=_QUERY_SAFE)}" for k, v in params.items())


def odata_string(value: str) -> str:
    """A string literal for ``$filter``: quotes doubled, as OData escapes them."""
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class SystemUser:
    systemuserid: str
    entra_object_id: str | None
    fullname: str
    disabled: bool


@dataclass(frozen=True)
class AgentPresence:
    """``CCaaS_GetPresence``'s answer."""

    agent_id: str
    agent_name: str
    presence_id: str | None
    status_text: str
    logged_in_at: datetime | None
    active_sessions: int
    allowed_channels: tuple[str, ...]
    disabled_channels: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass(frozen=True)
class ApiLookup:
    defined: bool
    unreadable: int | None = None


_STATUS_COLUMNS = (
    "msdyn_agentstatusid,_msdyn_agentid_value,_msdyn_currentpresenceid_value,"
    "msdyn_presencemodifiedon,msdyn_presencemodifiedby,versionnumber"
)
"""What a presence read selects of each ``msdyn_agentstatus`` row."""


class DataverseClient:
    """Web API client for one Dataverse environment; ``PresenceWriter`` and ``PresenceReader`` for
    ``System.DYNAMICS``. ``close()`` closes its HTTP session."""

    system = System.DYNAMICS

    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        *,
        timeout: float = 10.0,
        api_version: str = "v9.2",
        clock: Clock = utcnow,
    ) -> None:
        self.base_url = check_dataverse_url(base_url)
        self.api = f"{self.base_url}/api/data/{api_version}"
        self.scope = f"{self.base_url}/.default"
        self.tokens = tokens
        self.timeout = timeout
        self.clock = clock
        self._origin = URL(self.base_url).origin()
        self._session: aiohttp.ClientSession | None = None
        self.agent_status_sink: Callable[[dict[str, str]], Awaitable[None]] | None = None
        """Given the (msdyn_agentstatusid -> agent systemuserid) pairs of every ``msdyn_agentstatuses``
        page this client reads (the runtime points it at ``AgentStatusLookup.remember_many``)."""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), headers=ODATA_HEADERS
            )
        return self._session

    # ------------------------------------------------------------------------------------ transport

    def url(self, path: str, params: Mapping[str, str] | None = None) -> URL:
        """``path`` relative to the Web API root, or an absolute URL (a nextLink) on the same org."""
        if path.startswith(("http://", "https://")):
            url = URL(path, encoded=True)
            if url.origin() != self._origin:
                raise PermanentError(
                    f"Dataverse returned a link to {url.origin()}, not {self._origin}; refusing to send the token there"
                )
            return url
        raw = f"{self.api}/{path}"
        if params:
            raw += "?" + odata_query(params)
        return URL(raw, encoded=True)

    async def request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        caller: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One HTTP call; a non-2xx answer or a transport failure raises the typed error."""
        url = self.url(path, params)
        token = await self.tokens.token(self.scope)
        hdrs = {"Authorization": f"Bearer {token}", **(headers or {})}
        if caller is not None:
            hdrs["MSCRMCallerID"] = caller
        data = None
        if body is not None:
            hdrs["Content-Type"] = "application/json; charset=utf-8"
            data = json.dumps(body).encode()
        try:
            async with self._http().request(method, url, data=data, headers=hdrs, allow_redirects=False) as resp:
                raw = await resp.read()
                status, resp_headers = resp.status, resp.headers
        except TimeoutError:
            raise RetryableError(f"{what}: Dataverse did not answer within {self.timeout:g} s; will retry") from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"{what}: cannot reach Dataverse ({type(e).__name__}: {e}); will retry") from None
        parsed = _decode(raw)
        if 200 <= status < 300:
            return Reply(status, resp_headers, parsed)
        if token and token.encode() in raw:  # a proxy or gateway echoing the request: keep the token out
            raw = raw.replace(token.encode(), b"<token>")
            parsed = _decode(raw)
        raise dataverse_error(status, resp_headers, parsed, raw, what=what)

    async def get_json(
        self,
        path: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        caller: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        reply = await self.request("GET", path, what=what, params=params, caller=caller, headers=headers)
        if not isinstance(reply.body, dict):
            raise RetryableError(f"{what}: Dataverse answered {reply.status} without a JSON object; will retry")
        return reply.body

    # ------------------------------------------------------------------------------------ ports

    async def apply(self, agent: Agent, value: str) -> None:
        """``PresenceWriter``: ``CCaaS_ModifyAgentPresence`` as the agent (one call, no retry)."""
        await self.request(
            "POST",
            "CCaaS_ModifyAgentPresence",
            what=f"setting the Dynamics 365 presence of agent {agent.label} to {value}",
            body={"ApiVersion": "1.0", "AgentId": agent.dynamics_user_id, "PresenceId": value},
            caller=agent.dynamics_user_id,
        )

    async def read(self, agents: Sequence[Agent]) -> list[PresenceObserved]:
        """``PresenceReader``: the agents' ``msdyn_agentstatuses`` rows, ``READ_BATCH`` ids a query.
        Agents without a row (not contact-center agents) are left out."""
        wanted = {a.dynamics_user_id.lower() for a in agents}
        out: list[PresenceObserved] = []
        ids = sorted(wanted)
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH]
            values = ",".join(odata_string(i) for i in chunk)
            params = {
                "$select": _STATUS_COLUMNS,
                "$filter": f"Microsoft.Dynamics.CRM.In(PropertyName='msdyn_agentid',PropertyValues=[{values}])",
            }
            out += await self._observations(params, f"reading msdyn_agentstatuses of {len(chunk)} agent(s)", wanted)
        return out

    async def read_all(self, agents: Sequence[Agent]) -> list[PresenceObserved]:
        """``read`` for a whole directory: every ``msdyn_agentstatuses`` row in pages of ``MAX_PAGE``
        (10 pages at 50,000 agents, instead of 500 queries of ``READ_BATCH`` ids), kept for
        ``agents``. The sweep takes it when it reads everyone (``mapping.reconcile``)."""
        wanted = {a.dynamics_user_id.lower() for a in agents}
        return await self._observations({"$select": _STATUS_COLUMNS}, "reading msdyn_agentstatuses", wanted)

    async def _observations(self, params: Mapping[str, str], what: str, wanted: set[str]) -> list[PresenceObserved]:
        """The ``msdyn_agentstatuses`` rows of one query, every page, as observations of ``wanted``
        agents; each page's (row -> agent) pairs go to ``agent_status_sink`` on the way."""
        out: list[PresenceObserved] = []
        async for rows in self._pages("msdyn_agentstatuses", params, what=what, page_size=MAX_PAGE):
            await self._feed(rows)
            for row in rows:
                obs = self._observation(row, wanted)
                if obs is not None:
                    out.append(obs)
        return out

    def _observation(self, row: Mapping[str, Any], wanted: set[str]) -> PresenceObserved | None:
        agent_id = str(row.get("_msdyn_agentid_value") or "").lower()
        presence = row.get("_msdyn_currentpresenceid_value")
        if agent_id not in wanted or not isinstance(presence, str) or not presence:
            return None
        by = row.get("msdyn_presencemodifiedby")
        return PresenceObserved(
            agent_id,
            System.DYNAMICS,
            presence.lower(),
            self.clock(),
            _version(row),
            by.strip().upper() if isinstance(by, str) else None,
            "reconcile",
            current=True,
        )

    # ------------------------------------------------------------------------------------ reads

    async def get_presence(self, agent: Agent) -> AgentPresence:
        """``CCaaS_GetPresence`` as the agent: what Dynamics 365 shows for them now."""
        what = f"reading the Dynamics 365 presence of agent {agent.label}"
        body = await self.get_json("CCaaS_GetPresence", what=what, caller=agent.dynamics_user_id)
        stamp = body.get("Timestamp")
        presence = body.get("PresenceId")
        return AgentPresence(
            agent_id=str(body.get("AgentId") or agent.dynamics_user_id).lower(),
            agent_name=str(body.get("AgentName") or ""),
            presence_id=presence.lower() if isinstance(presence, str) and presence else None,
            status_text=str(body.get("CurrentPresenceStatusInfo") or ""),
            logged_in_at=from_epoch_ms(int(stamp) * 1000) if isinstance(stamp, int) and stamp > 0 else None,
            active_sessions=int(body.get("ActiveBrowserSessions") or 0),
            allowed_channels=tuple(str(c) for c in body.get("AllowedChannels") or ()),
            disabled_channels=tuple(str(c) for c in body.get("DisabledChannels") or ()),
        )

    async def list_presences(self) -> list[Presence]:
        """The live ``msdyn_presences`` catalogue (active rows). A row whose base status is not one of
        the five known values is left out with a warning: it cannot be translated."""
        params = {
            "$select": "msdyn_presenceid,msdyn_name,msdyn_presencestatustext,msdyn_basepresencestatus,msdyn_canuserset",
            "$filter": "statecode eq 0",
        }
        out: list[Presence] = []
        async for rows in self._pages("msdyn_presences", params, what="reading msdyn_presences", page_size=MAX_PAGE):
            for row in rows:
                pid = row.get("msdyn_presenceid")
                try:
                    base = BasePresence(int(row.get("msdyn_basepresencestatus")))  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    log.warning(
                        "presence with an unknown base status left out",
                        extra={"fields": {"presence": pid, "base": row.get("msdyn_basepresencestatus")}},
                    )
                    continue
                if not isinstance(pid, str):
                    continue
                name = row.get("msdyn_name") or row.get("msdyn_presencestatustext") or base.label
                out.append(Presence(pid.lower(), str(name), base, row.get("msdyn_canuserset") is not False))
        return out

    async def iter_systemusers(self, page_size: int = 500) -> AsyncIterator[list[SystemUser]]:
        """All ``systemusers``, one list per Web API page (``@odata.nextLink`` followed)."""
        link: str | None = None
        while True:
            users, link = await self.systemusers_page(link, page_size=page_size)
            yield users
            if link is None:
                return

    async def systemusers_page(
        self, next_link: str | None = None, *, page_size: int = 500
    ) -> tuple[list[SystemUser], str | None]:
        """One page of ``systemusers`` and the link to the next (``None`` on the last). Separate from
        ``iter_systemusers`` so a caller can retry one failed page without starting over."""
        headers = {"Prefer": f"odata.maxpagesize={max(1, min(page_size, MAX_PAGE))}"}
        params = None if next_link else {"$select": "systemuserid,azureactivedirectoryobjectid,fullname,isdisabled"}
        body = await self.get_json(
            next_link or "systemusers", what="reading systemusers", params=params, headers=headers
        )
        rows = body.get("value")
        if not isinstance(rows, list):
            raise RetryableError("reading systemusers: the answer has no 'value' list; will retry")
        link = body.get("@odata.nextLink")
        users = [u for u in (_systemuser(r) for r in rows if isinstance(r, dict)) if u is not None]
        return users, link if isinstance(link, str) and link else None

    async def get_systemuser(self, systemuserid: str) -> SystemUser | None:
        """One ``systemuser``; ``None`` when Dataverse says it does not exist (404)."""
        row = await self._get_row(
            f"systemusers({systemuserid})",
            what=f"reading systemuser {systemuserid}",
            params={"$select": "systemuserid,azureactivedirectoryobjectid,fullname,isdisabled"},
        )
        return None if row is None else _systemuser(row)

    async def agent_of_status(self, agent_status_id: str) -> str | None:
        """The agent (``systemuserid``) of one ``msdyn_agentstatus`` row; ``None`` when Dataverse says
        the row does not exist (404) or it has no agent. One call, no retry (the caller's policy)."""
        row = await self._get_row(
            f"msdyn_agentstatuses({agent_status_id})",
            what=f"reading the agent of msdyn_agentstatus {agent_status_id}",
            params={"$select": "_msdyn_agentid_value"},
        )
        agent = None if row is None else row.get("_msdyn_agentid_value")
        return agent.lower() if isinstance(agent, str) and agent else None

    async def _get_row(self, path: str, *, what: str, params: Mapping[str, str]) -> dict[str, Any] | None:
        """One row by its key; ``None`` when Dataverse says it does not exist (404)."""
        try:
            return await self.get_json(path, what=what, params=params)
        except PermanentError as e:
            if e.status == 404:
                return None
            raise

    async def _feed(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Hands a page's (agentstatusid -> agent) pairs to ``agent_status_sink``; its failure is logged,
        never raised: a cache must not fail a read."""
        if self.agent_status_sink is None:
            return
        pairs = {
            str(r["msdyn_agentstatusid"]).lower(): str(r["_msdyn_agentid_value"]).lower()
            for r in rows
            if isinstance(r.get("msdyn_agentstatusid"), str) and isinstance(r.get("_msdyn_agentid_value"), str)
        }
        if not pairs:
            return
        try:
            await self.agent_status_sink(pairs)
        except Exception as e:
            log.warning(
                "agent status pairs not kept",
                extra={"fields": {"rows": len(pairs), "error": f"{type(e).__name__}: {e}"}},
            )

    async def agent_ids(self, page_size: int = MAX_PAGE) -> set[str]:
        """The ``systemuserid`` of every user with an ``msdyn_agentstatus`` row: the contact-center agents."""
        params = {"$select": "msdyn_agentstatusid,_msdyn_agentid_value"}
        out: set[str] = set()
        async for rows in self._pages(
            "msdyn_agentstatuses", params, what="reading msdyn_agentstatuses", page_size=page_size
        ):
            await self._feed(rows)
            out.update(str(r["_msdyn_agentid_value"]).lower() for r in rows if r.get("_msdyn_agentid_value"))
        return out

    async def _pages(
        self, path: str, params: Mapping[str, str], *, what: str, page_size: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        headers = {"Prefer": f"odata.maxpagesize={max(1, min(page_size, MAX_PAGE))}"}
        next_path: str | None = path
        next_params: Mapping[str, str] | None = params
        page = 0
        while next_path is not None:
            page += 1
            body = await self.get_json(next_path, what=f"{what} (page {page})", params=next_params, headers=headers)
            rows = body.get("value")
            if not isinstance(rows, list):
                raise RetryableError(f"{what} (page {page}): the answer has no 'value' list; will retry")
            yield [r for r in rows if isinstance(r, dict)]
            link = body.get("@odata.nextLink")
            next_path, next_params = (link, None) if isinstance(link, str) and link else (None, None)

    # ------------------------------------------------------------------------------------ writes (registration)

    async def custom_api_defined(self, name: str) -> ApiLookup:
        """Whether the custom API (or SDK message) ``name`` exists in this environment, from the
        ``customapis`` table, then ``sdkmessages``: never by calling it, since a call of a CCaaS API
        changes an agent's presence. When ``customapis`` cannot be read here (no read privilege, or
        an emulator without the table), ``unreadable`` is the HTTP status that said so."""
        literal = f"'{name}'"
        try:
            rows = await self.query(
                "customapis",
                select="customapiid,uniquename",
                filter=f"uniquename eq {literal}",
                what=f"looking up {name} in customapis",
            )
        except PermanentError as e:
            if e.status in (400, 403, 404):
                return ApiLookup(False, unreadable=e.status)
            raise
        if not rows:
            rows = await self.query(
                "sdkmessages",
                select="sdkmessageid,name",
                filter=f"name eq {literal}",
                what=f"looking up the {name} sdkmessage",
            )
        return ApiLookup(bool(rows))

    async def query(self, entity_set: str, *, select: str, filter: str, what: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        params = {"$select": select, "$filter": filter}
        async for page in self._pages(entity_set, params, what=what, page_size=MAX_PAGE):
            rows.extend(page)
        return rows

    async def create(self, entity_set: str, body: Mapping[str, Any], *, what: str) -> str:
        """POST a row; returns its id (from ``OData-EntityId``, or the body with ``return=representation``)."""
        reply = await self.request("POST", entity_set, what=what, body=dict(body))
        entity_id = reply.headers.get("OData-EntityId", "")
        if "(" in entity_id:
            return entity_id.rsplit("(", 1)[1].rstrip(")").lower()
        raise RetryableError(f"{what}: Dataverse answered {reply.status} without an OData-EntityId header")

    async def update(self, entity_set: str, row_id: str, body: Mapping[str, Any], *, what: str) -> None:
        # If-Match: * makes it an update only: a row deleted meanwhile is a 404, not silently re-created.
        await self.request("PATCH", f"{entity_set}({row_id})", what=what, body=dict(body), headers={"If-Match": "*"})

    async def delete(self, entity_set: str, row_id: str, *, what: str) -> None:
        await self.request("DELETE", f"{entity_set}({row_id})", what=what)


# ---------------------------------------------------------------------------------------------- helpers


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None


def _version(row: Mapping[str, Any]) -> int | None:
    """``versionnumber`` (Edm.Int64: a number, or a string under IEEE754Compatible), else the ETag
    ``W/"5948260"``. Deliberately not ``msdyn_presencemodifiedon``: a timestamp is not on the same
    scale as the row version webhooks carry, and mixing them would make every later webhook stale."""
    raw = row.get("versionnumber")
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.isdigit():
        return int(raw)
    etag = row.get("@odata.etag")
    if isinstance(etag, str):
        digits = etag.removeprefix("W/").strip('"')
        if digits.isdigit():
            return int(digits)
    return None


def _systemuser(row: Mapping[str, Any]) -> SystemUser | None:
    uid = row.get("systemuserid")
    if not isinstance(uid, str) or not uid:
        return None
    entra = row.get("azureactivedirectoryobjectid")
    return SystemUser(
        uid.lower(),
        entra.lower() if isinstance(entra, str) and entra.strip("0-") else None,
        str(row.get("fullname") or ""),
        row.get("isdisabled") is True,
    )


def dataverse_message(body: Any, raw: bytes) -> str:
    """Dataverse's own words: ``{"error": {"code", "message"}}``, else the start of the body."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message") or "").strip()
        code = err.get("code")
        if message:
            return f"{message} ({code})" if code else message
    text = raw[:200].decode("utf-8", "replace").strip()
    return text or "no details"


def dataverse_error(status: int, headers: Mapping[str, str], body: Any, raw: bytes, *, what: str) -> UpstreamError:
    """The typed error for a non-2xx answer (the outbox decides retry, wait or dead letter from it)."""
    said = dataverse_message(body, raw)
    if status == 429 or (status == 503 and "Retry-After" in headers):
        wait = retry_after_seconds(headers)
        return Throttled(
            f"{what}: Dataverse service protection limit hit ({status}: {said}); "
            + (f"waiting {wait:g} s as Retry-After asks" if wait is not None else "backing off before the next try"),
            wait,
            status=status,
        )
    if status >= 500 or status == 408:
        return RetryableError(f"{what}: Dataverse failed with {status}: {said}; will retry", status=status)
    if status == 401:
        return PermanentError(f"{what}: Dataverse refused the token (401: {said}); {APP_USER_HINT}", status=status)
    if status == 403:
        return PermanentError(f"{what}: Dataverse denied it (403: {said}); {PRIVILEGE_HINT}", status=status)
    hint = {
        404: "the agent, presence or row does not exist in Dataverse (check the agent directory and msdyn_presences)",
        405: "the API is not allowed for this user: check the agent's Omnichannel Agent role and that Dynamics 365 "
        "Contact Center is installed",
    }.get(status, "fix the request or the data it names")
    return PermanentError(f"{what}: Dataverse answered {status}: {said}; {hint}", status=status)


__all__ = [
    "MAX_PAGE",
    "READ_BATCH",
    "AgentPresence",
    "DataverseClient",
    "Reply",
    "SystemUser",
    "check_dataverse_url",
    "dataverse_error",
    "odata_query",
    "odata_string",
]
