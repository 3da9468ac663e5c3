"""A faithful local fake of the Dataverse parts the bridge uses: the Web API tables, the Dynamics 365
Contact Center presence APIs, webhook registration and webhook emission. It powers
``presence-sync demo`` and the Dataverse adapter's tests, so it must fail the way Dataverse fails, not
only succeed the way it succeeds.

What it models (the upstream facts are summarised in ``docs/DESIGN.md``; the seed payloads are
``tests/dataverse/data/update-presence.json`` and ``create-agent.json``):

- **Web API** under ``/api/data/v9.2``: ``systemusers``, ``msdyn_presences`` (the five out-of-the-box
  presences, custom "Training" (base Busy DND) and "Lunch" (base Away), and an inactive custom one),
  ``msdyn_agentstatuses``, ``serviceendpoints``, ``sdkmessageprocessingsteps``,
  ``sdkmessageprocessingstepimages``, ``sdkmessages``,
  ``sdkmessagefilters``, ``customapis`` (the two CCaaS presence APIs, read-only).
  Collections take ``$select`` and ``$filter`` (``eq``/``ne``/``gt``/``ge``/
  ``lt``/``le``, ``and``/``or``/``not``, parentheses, ``Microsoft.Dynamics.CRM.In``), ``$top``, and
  ``Prefer: odata.maxpagesize`` paging with an opaque ``@odata.nextLink``; an unknown property or an
  option the emulator does not implement is a 400, as Dataverse refuses what it cannot do. Rows carry
  ``@odata.etag`` ``W/"<versionnumber>"``; ``versionnumber`` is one database-wide counter, as SQL's
  rowversion is. One row by key (``msdyn_agentstatuses(<id>)?$select=...``) or 404. Writes
  (``serviceendpoints``, ``sdkmessageprocessingsteps``, ``sdkmessageprocessingstepimages`` only):
  POST answers 204 with ``OData-EntityId`` (201 and the row with ``Prefer: return=representation``), PATCH with
  ``If-Match: *`` updates or 404s (without it, upserts), DELETE; ``@odata.bind`` references are
  checked. ``serviceendpoint.authvalue`` is write-only, as in Dataverse. An image needs its step,
  ``name``, ``entityalias``, ``imagetype`` 0/1/2 and ``messagepropertyname`` (``Target``; ``Id`` on
  Create); a Create has no pre-image, a post-image needs a post-operation step, ``attributes`` must be
  columns of the table; deleting a step deletes its images.
- **Auth**: a static bearer token (401 with ``WWW-Authenticate`` without it). Calls run as the
  application user, or as the user named by ``MSCRMCallerID`` (impersonation): malformed -> 400,
  unknown -> 404, disabled -> 400, and 403 when the application user lacks
  ``prvActOnBehalfOfAnotherUser`` (``impersonation_allowed = False``).
- **CCaaS_ModifyAgentPresence** (POST ``{"ApiVersion": "1.0", "AgentId", "PresenceId"}``) and
  **CCaaS_GetPresence** (GET): both need ``MSCRMCallerID`` (missing -> 400); ``AgentId`` must be the
  impersonated caller (else 400); ``ApiVersion`` must be ``1.0`` (else 400); an unknown presence -> 404;
  a caller without an ``msdyn_agentstatus`` row (not an agent) -> 405 "API not allowed". A change is
  written as the agent (``msdyn_presencemodifiedby`` ``AGENT``, ``modifiedby`` the agent,
  ``modifiedonbehalfby`` the application user), even when the presence does not change: Dataverse
  runs Update steps for any update that sets a filtering attribute.
- **Service protection**: per user (the impersonated one, or the app), 6,000 requests per 300 s and 52
  concurrent; 429 with ``Retry-After`` and Dataverse's error code and message.
- **Webhook emission**: whenever an ``msdyn_agentstatus`` row is created or its presence set, each
  active step registered for that message on ``msdyn_agentstatus`` (Update: only when the change
  touches its ``filteringattributes``) is sent to its webhook endpoint: WebhookKey (``?code=``),
  HttpHeader or HttpQueryString auth from ``authvalue``, the headers Dataverse sends
  (``x-ms-dynamics-request-name``...), and a ``RemoteExecutionContext`` in the exact shape of the seed
  payloads (same keys, same order; ``/Date(ms)/`` dates with the ``\\/`` escapes of
  ``DataContractJsonSerializer``; ``RowVersion`` rising; a ``ParentContext`` at stage 30;
  ``AsynchronousStepPrimaryName`` post-image for asynchronous steps). An Update's Target (and the
  parent's) holds only the columns the update request included, as Dataverse's does: a presence
  write (the CCaaS API, ``set_presence``) sends the presence columns and the platform adds who and
  when, so there is no ``msdyn_agentid``; ``set_presence(..., whole_row=True)`` sends every column,
  as the seed's writer did. ``PostEntityImages`` holds, under each registered post-image's
  ``entityalias``, the columns it names (all when it names none) of the row as the change left it,
  and nothing for a step without an image. Emission runs after the change
  is committed, in order, on a background task; every result is recorded in ``emissions``.
- **Control API** for tests and the demo: ``add_agent``, ``add_user``, ``set_presence`` (the agent or
  routing changed it: emits), ``presence_of``, ``agent_status``, ``images_of``, ``calls``, ``emissions``,
  ``fail_next(n, status, retry_after=None, path=None)``, ``latency(seconds)``, ``wait_emissions()``,
  ``start()`` / ``stop()`` and ``url``.

Not modelled: the rest of the Web API (``$expand``, ``$orderby``, ``$count``, ``$apply``, ``$batch``,
FetchXML, ``$metadata``, alternate keys, ``CallerObjectId`` impersonation, annotations), writes to the
data tables through the API (their rows change through the control API and the CCaaS API only),
security roles (any agent may set any active presence, ``msdyn_canuserset`` included), the 20-minute
execution-time limit, pre-images in contexts, the rollback of an
operation whose synchronous step fails (emission happens after the commit, its result is recorded
only), Dataverse's retries of failed asynchronous webhooks, the 256 KB context trimming
(``x-ms-dynamics-msg-size-exceeded``), and port restrictions on endpoint URLs (loopback is allowed).
``CCaaS_GetPresence``'s ``Timestamp`` is the row's last presence change while the agent is logged in
(0 otherwise), not a separate login time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from emulators.serving import serve_app

__all__ = [
    "APP_USER_ID",
    "AVAILABLE",
    "AWAY",
    "BUSY",
    "DND",
    "LUNCH",
    "OFFLINE",
    "TRAINING",
    "CallRecord",
    "DataverseEmulator",
    "Emission",
]

log = logging.getLogger("presence_sync.emulators.dataverse")

API = "/api/data/v9.2"
NS = "http://schemas.microsoft.com/xrm/2011/Contracts"
AGENT_STATUS = "msdyn_agentstatus"
AVAILABLE = "f523f628-c07a-e811-8162-000d3aa11f50"
BUSY = "efdeb843-c07a-e811-8162-000d3aa11f50"
DND = "08971864-c07a-e811-8162-000d3aa11f50"
OFFLINE = "70139190-c07a-e811-8162-000d3aa11f50"
AWAY = "3dacae76-c07a-e811-8162-000d3aa11f50"
TRAINING = "9e3f0c1a-0000-4000-8000-00000000aa01"
LUNCH = "9e3f0c1a-0000-4000-8000-00000000aa02"
RETIRED = "9e3f0c1a-0000-4000-8000-00000000aa03"
APP_USER_ID = "5a5a5a5a-0000-4000-8000-00000000a991"
"""The application user the bridge's token maps to (it has an Entra object id but is no agent)."""
ENGINE_USER_ID = "d89254ff-9438-ef11-a315-000d3a5a54dc"
"""The service user of the assignment engine: who writes routing and UI presence changes (seed)."""
SYSTEM_USER_ID = "09eb2446-db10-ef11-9f8a-6045bdd4c6be"
"""Who creates agent status rows (seed Create)."""
ENGINE_AGENT = "Microsoft.CCaaS.AssignmentEngineVNext.AssignmentEngineVNext (DataverseSvcClient:1.1.0.11)"
_ZERO = "00000000-0000-0000-0000-000000000000"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SEGMENT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_.]*)(?:\((?P<args>[^)]*)\))?$")
_MAX_PAGE = 5000
_JSON_BODY: web.RequestKey[Any] = web.RequestKey("json_body")
_CALLER: web.RequestKey[str | None] = web.RequestKey("caller")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _guid(value: str) -> str | None:
    value = value.strip().strip("'")
    return value.lower() if _GUID.match(value) else None


class ApiError(Exception):
    """An answer in Dataverse's error shape ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(
            {"error": {"code": self.code, "message": self.message}}, status=self.status, headers=self.headers
        )


def _not_found(logical: str, row_id: str) -> ApiError:
    return ApiError(404, "0x80040217", f"{logical} With Id = {row_id} Does Not Exist")


def _no_property(logical: str, name: str) -> ApiError:
    return ApiError(
        400, "0x80060888", f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{logical}'."
    )


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class _Table:
    entity_set: str
    logical: str
    key: str
    columns: frozenset[str]
    writable: frozenset[str] = frozenset()
    binds: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Navigation property -> (lookup column, target entity set)."""
    hidden: frozenset[str] = frozenset()
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def column(self, name: str) -> str:
        if name in self.columns and name not in self.hidden:
            return name
        lookup = f"_{name}_value"
        if lookup in self.columns:
            return lookup
        raise _no_property(self.logical, name)

    def view(self, row: Mapping[str, Any], select: list[str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": f'W/"{row.get("versionnumber", 0)}"'}
        names = select if select is not None else sorted(self.columns - self.hidden)
        for name in [self.key, *names]:
            out[name] = row.get(name)
        return out


def _tables() -> dict[str, _Table]:
    def t(entity_set: str, logical: str, key: str, columns: str, **kw: Any) -> _Table:
        cols = frozenset({key, "versionnumber", *columns.split()})
        return _Table(entity_set, logical, key, cols, **kw)

    endpoint_cols = "name description contract url authtype authvalue messageformat connectionmode userclaim path"
    step_cols = (
        "name description mode stage rank supporteddeployment filteringattributes statecode statuscode "
        "asyncautodelete configuration"
    )
    image_cols = "name description entityalias imagetype messagepropertyname attributes"
    return {
        x.entity_set: x
        for x in [
            t(
                "systemusers",
                "systemuser",
                "systemuserid",
                "fullname azureactivedirectoryobjectid isdisabled domainname applicationid",
            ),
            t(
                "msdyn_presences",
                "msdyn_presence",
                "msdyn_presenceid",
                "msdyn_name msdyn_presencestatustext msdyn_basepresencestatus msdyn_canuserset statecode statuscode",
            ),
            t(
                "msdyn_agentstatuses",
                AGENT_STATUS,
                "msdyn_agentstatusid",
                "_msdyn_agentid_value _msdyn_currentpresenceid_value msdyn_presencemodifiedon "
                "msdyn_presencemodifiedby msdyn_isagentloggedin msdyn_availableunitscapacity "
                "msdyn_capacitymodifiedon msdyn_isblockedbysomeprofile createdon modifiedon statecode",
            ),
            t(
                "serviceendpoints",
                "serviceendpoint",
                "serviceendpointid",
                endpoint_cols,
                writable=frozenset(endpoint_cols.split()),
                hidden=frozenset({"authvalue"}),
            ),
            t(
                "sdkmessageprocessingsteps",
                "sdkmessageprocessingstep",
                "sdkmessageprocessingstepid",
                step_cols + " _sdkmessageid_value _sdkmessagefilterid_value _eventhandler_value",
                writable=frozenset(step_cols.split()),
                binds={
                    "sdkmessageid": ("_sdkmessageid_value", "sdkmessages"),
                    "sdkmessagefilterid": ("_sdkmessagefilterid_value", "sdkmessagefilters"),
                    "eventhandler_serviceendpoint": ("_eventhandler_value", "serviceendpoints"),
                },
            ),
            t(
                "sdkmessageprocessingstepimages",
                "sdkmessageprocessingstepimage",
                "sdkmessageprocessingstepimageid",
                image_cols + " _sdkmessageprocessingstepid_value",
                writable=frozenset(image_cols.split()),
                binds={
                    "sdkmessageprocessingstepid": ("_sdkmessageprocessingstepid_value", "sdkmessageprocessingsteps")
                },
            ),
            t("sdkmessages", "sdkmessage", "sdkmessageid", "name"),
            t("customapis", "customapi", "customapiid", "uniquename name displayname bindingtype isfunction"),
            t(
                "sdkmessagefilters",
                "sdkmessagefilter",
                "sdkmessagefilterid",
                "_sdkmessageid_value primaryobjecttypecode secondaryobjecttypecode iscustomprocessingstepallowed",
            ),
        ]
    }


# ---------------------------------------------------------------------------------------------- $filter

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12})(?![\w-])|(?P<num>-?\d+(?:\.\d+)?)(?![\w-])|(?P<word>[A-Za-z_][A-Za-z0-9_.]*)|"
    r"(?P<punct>[()\[\],=]))"
)
Predicate = Callable[[Mapping[str, Any]], bool]


class _Filter:
    """A small recursive-descent parser for the ``$filter`` forms the bridge uses (see the module doc)."""

    def __init__(self, text: str, table: _Table) -> None:
        self.table = table
        self.tokens: list[tuple[str, Any]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise self._error(f"syntax error at position {pos} of the $filter")
            pos = m.end()
            kind = m.lastgroup or ""
            raw = m.group(kind)
            value: Any = raw
            if kind == "str":
                value = raw[1:-1].replace("''", "'")
            elif kind == "guid":
                value = raw.lower()
            elif kind == "num":
                value = float(raw) if "." in raw else int(raw)
            self.tokens.append((kind, value))
        self.i = 0

    def _error(self, why: str) -> ApiError:
        return ApiError(400, "0x80060888", f"Invalid $filter: {why}.")

    def _peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, kind: str | None = None, value: Any = None) -> Any:
        tok = self._peek()
        if tok is None or (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise self._error(f"expected {value or kind} but found {tok[1] if tok else 'the end'}")
        self.i += 1
        return tok[1]

    def _is(self, kind: str, value: Any) -> bool:
        tok = self._peek()
        return tok is not None and tok[0] == kind and tok[1] == value

    def parse(self) -> Predicate:
        pred = self._or()
        rest = self._peek()
        if rest is not None:
            raise self._error(f"unexpected {rest[1]!r}")
        return pred

    def _or(self) -> Predicate:
        parts = [self._and()]
        while self._is("word", "or"):
            self.i += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def _and(self) -> Predicate:
        parts = [self._unary()]
        while self._is("word", "and"):
            self.i += 1
            parts.append(self._unary())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def _unary(self) -> Predicate:
        if self._is("word", "not"):
            self.i += 1
            inner = self._unary()
            return lambda r: not inner(r)
        if self._is("punct", "("):
            self.i += 1
            inner = self._or()
            self._take("punct", ")")
            return inner
        name = self._take("word")
        if name == "Microsoft.Dynamics.CRM.In":
            return self._in()
        column = self.table.column(name)
        op = self._take("word")
        if op not in ("eq", "ne", "gt", "ge", "lt", "le"):
            raise self._error(f"operator {op!r} is not supported")
        literal = self._literal()
        return lambda r: _compare(r.get(column), op, literal)

    def _literal(self) -> Any:
        kind, value = self._peek() or ("", None)
        if kind in ("str", "guid", "num"):
            self.i += 1
            return value
        if kind == "word" and value in ("true", "false", "null"):
            self.i += 1
            return {"true": True, "false": False, "null": None}[value]
        raise self._error(f"expected a literal, found {value!r}")

    def _in(self) -> Predicate:
        self._take("punct", "(")
        self._take("word", "PropertyName")
        self._take("punct", "=")
        column = self.table.column(self._take("str"))
        self._take("punct", ",")
        self._take("word", "PropertyValues")
        self._take("punct", "=")
        self._take("punct", "[")
        values = [self._take("str")]
        while self._is("punct", ","):
            self.i += 1
            values.append(self._take("str"))
        self._take("punct", "]")
        self._take("punct", ")")
        wanted = {str(v).lower() for v in values}
        return lambda r: r.get(column) is not None and str(r.get(column)).lower() in wanted


def _compare(have: Any, op: str, want: Any) -> bool:
    if isinstance(have, str) and isinstance(want, str):
        have, want = have.lower(), want.lower()  # Dataverse compares strings case-insensitively
    if op == "eq":
        return bool(have == want)
    if op == "ne":
        return bool(have != want)
    if have is None or want is None:
        return False
    try:
        return bool({"gt": have > want, "ge": have >= want, "lt": have < want, "le": have <= want}[op])
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CallRecord:
    """One Web API request as the emulator saw it."""

    method: str
    path: str
    query: str
    caller: str | None
    status: int
    body: Any = None


@dataclass
class Emission:
    """One webhook POST: what was sent where, and what came back."""

    message: str
    agent_id: str
    url: str
    """The endpoint URL (without the key)."""
    body: dict[str, Any]
    status: int | None = None
    error: str | None = None
    seconds: float = 0.0
    response: str = ""


@dataclass
class _Fault:
    remaining: int
    status: int
    retry_after: float | None
    path: str | None


_FAULT_ERRORS = {
    400: ("0x80040203", "Invalid argument."),
    401: ("0x80072560", "The user is not a member of the organization."),
    403: ("0x80040220", "The user does not hold the necessary privileges."),
    404: ("0x80040217", "The requested record was not found or you do not have sufficient permissions to view it."),
    405: ("0x80060888", "API not allowed."),
    429: ("0x80072322", "Number of requests exceeded the limit of 6000 over time window of 300 seconds."),
    500: ("0x80040216", "An unexpected error occurred."),
    502: ("0x80040216", "Bad gateway."),
    503: ("0x80040216", "The service is temporarily unavailable."),
}


# ---------------------------------------------------------------------------------------------- the emulator


class DataverseEmulator:
    """Dataverse Web API + CCaaS presence APIs + webhooks on a loopback port (see the module docstring)."""

    def __init__(
        self,
        *,
        token: str = "dataverse-token",
        org_name: str = "unq6042beb1a93aef118e4b00224802c",
        requests_per_window: int = 6000,
        window_seconds: float = 300.0,
        concurrent: int = 52,
        webhook_timeout: float = 60.0,
        log_limit: int | None = 100_000,
        row_version_start: int = 5948260,
        webhook_senders: int = 8,
    ) -> None:
        """``webhook_senders``: how many webhooks may be on their way at once. Dataverse runs a
        synchronous step inside the operation that triggered it, and each agent's change is an
        operation of its own, so the steps of changes to different rows run concurrently; changes
        of one row run one after the other (the row's lock), which the emulator keeps."""
        self.token = token
        self.org_name = org_name
        self.org_id = "6042beb1-a93a-ef11-8e4b-00224802c699"
        self.business_unit = "a3c20b02-4e38-ef11-a315-000d3a5a54dc"
        self.requests_per_window = requests_per_window
        self.window_seconds = window_seconds
        self.concurrent = concurrent
        self.webhook_timeout = webhook_timeout
        self.impersonation_allowed = True
        self.tables = _tables()
        self.calls: deque[CallRecord] = deque(maxlen=log_limit)
        self.emissions: deque[Emission] = deque(maxlen=log_limit)
        self._version = row_version_start
        self._faults: list[_Fault] = []
        self._latency = 0.0
        self._windows: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}
        self._queue: asyncio.Queue[tuple[Emission, str, dict[str, str], bytes]] = asyncio.Queue()
        self.webhook_senders = max(1, webhook_senders)
        self._senders: list[asyncio.Task[None]] = []
        self._row_locks: dict[str, asyncio.Lock] = {}
        self._client: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._base = ""
        self._status_by_agent: dict[str, str] = {}
        self._seed()

    # ------------------------------------------------------------------------------------ seed data

    def _seed(self) -> None:
        presences = [
            (AVAILABLE, "Available", 192360000, True, 0),
            (BUSY, "Busy", 192360001, True, 0),
            (DND, "Busy - DND", 192360002, True, 0),
            (AWAY, "Away", 192360003, True, 0),
            (OFFLINE, "Offline", 192360004, True, 0),
            (TRAINING, "Training", 192360002, True, 0),
            (LUNCH, "Lunch", 192360003, True, 0),
            (RETIRED, "Retired custom presence", 192360001, True, 1),
        ]
        for pid, name, base, settable, state in presences:
            self._put(
                "msdyn_presences",
                pid,
                {
                    "msdyn_name": name,
                    "msdyn_presencestatustext": name,
                    "msdyn_basepresencestatus": base,
                    "msdyn_canuserset": settable,
                    "statecode": state,
                    "statuscode": state + 1,
                },
            )
        for uid, name, entra, app in [
            (SYSTEM_USER_ID, "SYSTEM", None, None),
            (ENGINE_USER_ID, "# Omnichannel assignment engine", None, None),
            (APP_USER_ID, "# teams-presence-sync", "5a5a5a5a-0000-4000-8000-0000000e0a11", str(uuid.uuid4())),
        ]:
            self._put(
                "systemusers",
                uid,
                {
                    "fullname": name,
                    "azureactivedirectoryobjectid": entra,
                    "isdisabled": False,
                    "domainname": "",
                    "applicationid": app,
                },
            )
        # The two presence APIs are custom APIs of Dynamics 365 Contact Center: a customapis row each
        # (what `doctor` looks for; it never calls the modifying one).
        for api, is_function in (("CCaaS_ModifyAgentPresence", False), ("CCaaS_GetPresence", True)):
            self._put(
                "customapis",
                str(uuid.uuid5(uuid.NAMESPACE_URL, api)),
                {
                    "uniquename": api,
                    "name": api,
                    "displayname": api,
                    "bindingtype": 0,
                    "isfunction": is_function,
                },
            )
        messages = {name: str(uuid.uuid4()) for name in ("Create", "Update", "Delete", "Retrieve", "Assign")}
        for name, mid in messages.items():
            self._put("sdkmessages", mid, {"name": name})
            for table in (AGENT_STATUS, "systemuser"):
                self._put(
                    "sdkmessagefilters",
                    str(uuid.uuid4()),
                    {
                        "_sdkmessageid_value": mid,
                        "primaryobjecttypecode": table,
                        "secondaryobjecttypecode": "none",
                        "iscustomprocessingstepallowed": True,
                    },
                )

    def _put(self, entity_set: str, row_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
        table = self.tables[entity_set]
        row = table.rows.setdefault(row_id.lower(), {table.key: row_id.lower()})
        row.update(values)
        self._version += 1
        row["versionnumber"] = self._version
        return row

    # ------------------------------------------------------------------------------------ control API

    @property
    def url(self) -> str:
        """The org URL (``PRESENCE_SYNC_DATAVERSE_URL``)."""
        return self._base

    @property
    def api(self) -> str:
        return self._base + API

    def add_user(self, systemuserid: str, entra_id: str | None, name: str, *, disabled: bool = False) -> None:
        """A systemuser that is not an agent (no ``msdyn_agentstatus`` row)."""
        self._put(
            "systemusers",
            systemuserid,
            {
                "fullname": name,
                "azureactivedirectoryobjectid": entra_id,
                "isdisabled": disabled,
                "domainname": "",
                "applicationid": None,
            },
        )

    def add_agent(
        self,
        systemuserid: str,
        entra_id: str | None,
        name: str,
        presence_id: str = OFFLINE,
        *,
        disabled: bool = False,
        logged_in: bool = False,
    ) -> str:
        """A systemuser and its ``msdyn_agentstatus`` row (created by SYSTEM, as Dynamics does); emits
        the Create webhook to registered steps. Returns the agent status id."""
        self.add_user(systemuserid, entra_id, name, disabled=disabled)
        status_id = str(uuid.uuid4())
        ms = _now_ms()
        self._put(
            "msdyn_agentstatuses",
            status_id,
            {
                "_msdyn_agentid_value": systemuserid.lower(),
                "_msdyn_currentpresenceid_value": presence_id.lower(),
                "msdyn_presencemodifiedon": _iso(ms),
                "msdyn_presencemodifiedby": "SYSTEM",
                "msdyn_isagentloggedin": logged_in,
                "msdyn_availableunitscapacity": 100,
                "msdyn_capacitymodifiedon": _iso(ms),
                "msdyn_isblockedbysomeprofile": False,
                "createdon": _iso(ms),
                "modifiedon": _iso(ms),
                "statecode": 0,
                "_ms": ms,
            },
        )
        self._status_by_agent[systemuserid.lower()] = status_id
        self._emit("Create", status_id, user=SYSTEM_USER_ID, initiating=SYSTEM_USER_ID, user_agent="", on_behalf=None)
        return status_id

    def set_presence(
        self, agent: str, presence_id: str, modified_by: str = "AGENT", *, whole_row: bool = False
    ) -> None:
        """The agent (in their UI) or routing (``SYSTEM``) changed the presence: the assignment engine
        writes it and the Update webhook is emitted. The Target carries the columns the write sent: by
        default only the presence columns (no ``msdyn_agentid``); ``whole_row`` sends every column as
        the seed payload's writer did."""
        row = self._status_row(agent)
        if row is None:
            raise KeyError(f"{agent} has no msdyn_agentstatus row (use add_agent)")
        self._write_presence(row, presence_id, modified_by)
        self._emit(
            "Update",
            row["msdyn_agentstatusid"],
            user=ENGINE_USER_ID,
            initiating=ENGINE_USER_ID,
            user_agent=ENGINE_AGENT,
            on_behalf=None,
            whole_row=whole_row,
        )

    def presence_of(self, agent: str) -> str | None:
        row = self._status_row(agent)
        return None if row is None else row["_msdyn_currentpresenceid_value"]

    def agent_status(self, agent: str) -> dict[str, Any] | None:
        row = self._status_row(agent)
        return None if row is None else {k: v for k, v in row.items() if not k.startswith("_ms")}

    def fail_next(self, n: int, status: int, retry_after: float | None = None, *, path: str | None = None) -> None:
        """The next ``n`` authenticated Web API requests (whose path contains ``path``, if given) fail
        with ``status`` and Dataverse's error body; 429/503 carry ``Retry-After`` when given."""
        self._faults.append(_Fault(n, status, retry_after, path))

    def clear_faults(self) -> None:
        """Drops every injected failure not yet used: the upstream is back (as Graph's emulator)."""
        self._faults.clear()

    def latency(self, seconds: float) -> None:
        """Every Web API request waits this long before it is handled."""
        self._latency = seconds

    def endpoints(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.tables["serviceendpoints"].rows.values()]

    def steps(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.tables["sdkmessageprocessingsteps"].rows.values()]

    async def wait_emissions(self, timeout: float = 10.0) -> list[Emission]:
        """Waits until every webhook emitted so far was sent (and answered or failed)."""
        async with asyncio.timeout(timeout):
            await self._queue.join()
        return list(self.emissions)

    # ------------------------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", API + "/{tail:.*}", self._dispatch)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listens on ``host:port`` (0: a free port); returns ``url``."""
        if self._runner is not None:
            raise RuntimeError("DataverseEmulator already started")
        self._runner, self._base = await serve_app(self.make_app(), host, port)
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.webhook_timeout))
        self._senders = [
            asyncio.create_task(self._send_loop(), name=f"dataverse-emulator-webhooks-{i}")
            for i in range(self.webhook_senders)
        ]
        return self.url

    async def stop(self) -> None:
        """Stops listening; webhooks not sent yet are dropped."""
        for sender in self._senders:
            sender.cancel()
        for sender in self._senders:
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        self._senders = []
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------------------------ HTTP plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        caller = request.headers.get("MSCRMCallerID")
        path = request.path.removeprefix(API + "/")
        body: Any = None
        response: web.StreamResponse
        user = "app"
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                response = web.Response(
                    status=401,
                    headers={
                        "WWW-Authenticate": f"Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/"
                        f"authorize, resource_id={self._base}"
                    },
                )
            else:
                if self._latency:
                    await asyncio.sleep(self._latency)
                if request.can_read_body:
                    raw = await request.read()
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        raise ApiError(400, "0x80060891", "The request body is not valid JSON.") from None
                request[_JSON_BODY] = body
                self._fault(path)
                request[_CALLER] = self._impersonate(caller)
                user = request[_CALLER] or "app"
                self._admit(user)
                try:
                    response = await handler(request)
                finally:
                    self._in_flight[user] -= 1
        except ApiError as e:
            response = e.response()
        self.calls.append(CallRecord(request.method, path, request.query_string, caller, response.status, body))
        return response

    def _fault(self, path: str) -> None:
        for fault in self._faults:
            if fault.remaining > 0 and (fault.path is None or fault.path in path):
                fault.remaining -= 1
                code, message = _FAULT_ERRORS.get(fault.status, ("0x80040216", "Injected failure."))
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                raise ApiError(fault.status, code, message, headers)
        self._faults = [f for f in self._faults if f.remaining > 0]

    def _impersonate(self, caller: str | None) -> str | None:
        if caller is None:
            return None
        uid = _guid(caller)
        if uid is None:
            raise ApiError(
                400, "0x80040203", f"Invalid MSCRMCallerID header value '{caller[:60]}': expected a systemuserid GUID."
            )
        if not self.impersonation_allowed:
            raise ApiError(
                403,
                "0x80040220",
                f"Principal user (Id={APP_USER_ID}, type=8, roleCount=1, "
                "privilegeCount=312) is missing prvActOnBehalfOfAnotherUser privilege "
                "(Id=2d1ad4ef-60ed-4e4b-a0c3-0a12f9b1a6c5) on OTC=8 for entity "
                "'systemuser'.",
            )
        user = self.tables["systemusers"].rows.get(uid)
        if user is None:
            raise _not_found("systemuser", uid)
        if user.get("isdisabled"):
            raise ApiError(
                400,
                "0x8004e00b",
                f"The user with SystemUserId={uid} is disabled. Disabled users cannot be impersonated.",
            )
        return uid

    def _admit(self, user: str) -> None:
        """Service protection: requests per window and concurrent requests, per user."""
        now = time.monotonic()
        window = self._windows.setdefault(user, deque())
        while window and now - window[0] >= self.window_seconds:
            window.popleft()
        if len(window) >= self.requests_per_window:
            wait = self.window_seconds - (now - window[0])
            raise ApiError(
                429,
                "0x80072322",
                f"Number of requests exceeded the limit of {self.requests_per_window} "
                f"over time window of {self.window_seconds:g} seconds.",
                {"Retry-After": str(max(1, round(wait)))},
            )
        if self._in_flight.get(user, 0) >= self.concurrent:
            raise ApiError(
                429,
                "0x80072326",
                f"Number of concurrent requests exceeded the limit of {self.concurrent}.",
                {"Retry-After": "1"},
            )
        window.append(now)
        self._in_flight[user] = self._in_flight.get(user, 0) + 1

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        m = _SEGMENT.match(tail)
        if m is None:
            raise ApiError(404, "0x80060888", f"Resource not found for the segment '{tail[:80]}'.")
        name, args = m.group("name"), m.group("args")
        if name == "CCaaS_ModifyAgentPresence" and request.method == "POST":
            return self._modify_presence(request)
        if name == "CCaaS_GetPresence" and request.method == "GET":
            return self._get_presence(request)
        table = self.tables.get(name)
        if table is None:
            raise ApiError(404, "0x80060888", f"Resource not found for the segment '{name}'.")
        row_id = None
        if args is not None:
            row_id = _guid(args)
            if row_id is None:
                raise ApiError(400, "0x80060888", f"Bad Request - Error in query syntax: '{args[:60]}' is not a key.")
        if request.method == "GET":
            return self._get(request, table, row_id)
        if not table.writable:
            raise ApiError(405, "0x80060888", f"The emulator does not model writes to {table.entity_set}.")
        if request.method == "POST" and row_id is None:
            return self._create(request, table)
        if request.method == "PATCH" and row_id is not None:
            return self._update(request, table, row_id)
        if request.method == "DELETE" and row_id is not None:
            return self._delete(table, row_id)
        raise ApiError(405, "0x80060888", f"{request.method} is not supported on this resource.")

    # ------------------------------------------------------------------------------------ reads

    def _get(self, request: web.Request, table: _Table, row_id: str | None) -> web.Response:
        q = request.query
        for option in q:
            if option.startswith("$") and option not in ("$select", "$filter", "$top", "$skiptoken"):
                raise ApiError(400, "0x80060888", f"The query option {option} is not implemented by the emulator.")
        select = None
        if "$select" in q:
            select = [table.column(c.strip()) for c in q["$select"].split(",") if c.strip()]
        context = f"{self.api}/$metadata#{table.entity_set}"
        if row_id is not None:
            row = table.rows.get(row_id)
            if row is None:
                raise _not_found(table.logical, row_id)
            return web.json_response({"@odata.context": context + "/$entity", **table.view(row, select)})
        rows: Iterable[dict[str, Any]] = table.rows.values()
        if "$filter" in q:
            pred = _Filter(q["$filter"], table).parse()
            rows = [r for r in rows if pred(r)]
        rows = list(rows)
        if "$top" in q:
            if not q["$top"].isdigit():
                raise ApiError(400, "0x80060888", "Invalid $top.")
            rows = rows[: int(q["$top"])]
        size = _MAX_PAGE
        prefer = request.headers.get("Prefer", "")
        pm = re.search(r"odata\.maxpagesize=(\d+)", prefer)
        headers = {}
        if pm:
            size = max(1, min(_MAX_PAGE, int(pm.group(1))))
            headers["Preference-Applied"] = f"odata.maxpagesize={size}"
        offset = _skiptoken_offset(q.get("$skiptoken"))
        page = rows[offset : offset + size]
        body: dict[str, Any] = {"@odata.context": context, "value": [table.view(r, select) for r in page]}
        if offset + size < len(rows):
            keep = {k: v for k, v in q.items() if k != "$skiptoken"}
            keep["$skiptoken"] = _skiptoken(offset + size, page[-1][table.key])
            query = urllib.parse.urlencode(keep, safe="$'(),=:@/", quote_via=urllib.parse.quote)
            body["@odata.nextLink"] = f"{self.api}/{table.entity_set}?{query}"
        return web.json_response(body, headers=headers)

    # ------------------------------------------------------------------------------------ writes

    def _values(self, request: web.Request, table: _Table) -> dict[str, Any]:
        body = request[_JSON_BODY]
        if not isinstance(body, dict):
            raise ApiError(400, "0x80060891", "The request body must be a JSON object.")
        values: dict[str, Any] = {}
        for name, value in body.items():
            if name.endswith("@odata.bind"):
                nav = name.removesuffix("@odata.bind")
                if nav not in table.binds:
                    raise ApiError(
                        400,
                        "0x80060891",
                        f"An undeclared property '{nav}' which only has property "
                        "annotations in the payload but no property value was found "
                        "in the payload.",
                    )
                column, target = table.binds[nav]
                m = re.match(rf"^/?{target}\(([^)]+)\)$", str(value))
                ref = _guid(m.group(1)) if m else None
                if ref is None:
                    raise ApiError(400, "0x80060891", f"{name}: expected /{target}(<guid>), got {value!r}.")
                if ref not in self.tables[target].rows:
                    raise _not_found(self.tables[target].logical, ref)
                values[column] = ref
            elif name in table.writable:
                values[name] = value
            elif name.startswith("@"):
                continue
            else:
                raise ApiError(
                    400,
                    "0x80060891",
                    f"The property '{name}' does not exist on type "
                    f"'Microsoft.Dynamics.CRM.{table.logical}'. Make sure to only use "
                    "property names that are defined by the type.",
                )
        return values

    def _create(self, request: web.Request, table: _Table) -> web.Response:
        values = self._values(request, table)
        row_id = str(uuid.uuid4())
        row = {table.key: row_id, **values}
        self._validate(table, row, values, creating=True)
        if table.entity_set == "sdkmessageprocessingsteps":
            row.setdefault("statecode", 0)
            row.setdefault("statuscode", 1)
        stored = self._put(table.entity_set, row_id, row)
        entity = f"{self.api}/{table.entity_set}({row_id})"
        if "return=representation" in request.headers.get("Prefer", ""):
            return web.json_response(table.view(stored, None), status=201, headers={"OData-EntityId": entity})
        return web.Response(status=204, headers={"OData-EntityId": entity})

    def _update(self, request: web.Request, table: _Table, row_id: str) -> web.Response:
        values = self._values(request, table)
        existing = table.rows.get(row_id)
        if existing is None:
            if request.headers.get("If-Match") == "*":
                raise _not_found(table.logical, row_id)
            row = {table.key: row_id, **values}
            self._validate(table, row, values, creating=True)
        else:
            self._validate(table, {**existing, **values}, values, creating=False)
        self._put(table.entity_set, row_id, values)
        return web.Response(status=204, headers={"OData-EntityId": f"{self.api}/{table.entity_set}({row_id})"})

    def _delete(self, table: _Table, row_id: str) -> web.Response:
        if row_id not in table.rows:
            raise _not_found(table.logical, row_id)
        if table.entity_set == "serviceendpoints" and any(
            s.get("_eventhandler_value") == row_id for s in self.tables["sdkmessageprocessingsteps"].rows.values()
        ):
            raise ApiError(
                400,
                "0x8004f01f",
                "The object you tried to delete is associated with another object and cannot be deleted.",
            )
        del table.rows[row_id]
        if table.entity_set == "sdkmessageprocessingsteps":  # a step's images go with it (parental)
            images = self.tables["sdkmessageprocessingstepimages"].rows
            for image_id in [k for k, r in images.items() if r.get("_sdkmessageprocessingstepid_value") == row_id]:
                del images[image_id]
        return web.Response(status=204)

    def _validate(self, table: _Table, row: Mapping[str, Any], values: Mapping[str, Any], *, creating: bool) -> None:
        def bad(message: str) -> ApiError:
            return ApiError(400, "0x80040203", message)

        if table.entity_set == "serviceendpoints":
            if not row.get("name"):
                raise bad("Name is required.")
            if row.get("contract") == 8:
                if not row.get("url"):
                    raise bad("Url is required for a webhook (contract 8).")
                if row.get("authtype") not in (4, 5, 6):
                    raise bad("AuthType must be WebhookKey (4), HttpHeader (5) or HttpQueryString (6) for a webhook.")
                if creating and not row.get("authvalue"):
                    raise bad("AuthValue is required for a webhook.")
        elif table.entity_set == "sdkmessageprocessingsteps":
            for required in ("name", "mode", "stage", "_sdkmessageid_value", "_eventhandler_value"):
                if row.get(required) in (None, ""):
                    raise bad(f"{required.strip('_').removesuffix('_value')} is required.")
            if row["stage"] not in (10, 20, 40):
                raise bad(f"Invalid stage {row['stage']!r}: use 10, 20 or 40.")
            if row["mode"] not in (0, 1) or (row["mode"] == 1 and row["stage"] != 40):
                raise bad("Asynchronous steps (mode 1) are supported in the post-operation stage (40) only.")
            flt = self.tables["sdkmessagefilters"].rows.get(str(row.get("_sdkmessagefilterid_value")))
            if flt is not None and flt["_sdkmessageid_value"] != row["_sdkmessageid_value"]:
                raise bad("The SdkMessageFilter does not belong to the step's SdkMessage.")
        elif table.entity_set == "sdkmessageprocessingstepimages":
            self._validate_image(row, bad)

    def _validate_image(self, row: Mapping[str, Any], bad: Callable[[str], ApiError]) -> None:
        """What the platform checks of an entity image: its step, the message's property, a type the
        step's stage and message can give, and columns the table has."""
        for required in ("name", "entityalias", "messagepropertyname", "_sdkmessageprocessingstepid_value"):
            if row.get(required) in (None, ""):
                raise bad(f"{required.strip('_').removesuffix('_value')} is required.")
        if row.get("imagetype") not in (0, 1, 2):
            raise bad(f"Invalid imagetype {row.get('imagetype')!r}: use 0 (PreImage), 1 (PostImage) or 2 (Both).")
        step = self.tables["sdkmessageprocessingsteps"].rows[str(row["_sdkmessageprocessingstepid_value"])]
        message = self.tables["sdkmessages"].rows.get(str(step.get("_sdkmessageid_value")), {}).get("name")
        prop = {"Create": "Id"}.get(str(message), "Target")
        if row["messagepropertyname"] != prop:
            raise bad(f"The messagepropertyname of an image on a {message} step must be '{prop}'.")
        if message == "Create" and row["imagetype"] in (0, 2):
            raise bad("A Create step has no pre-image: the row does not exist before the operation.")
        if row["imagetype"] in (1, 2) and step.get("stage") != 40:
            raise bad("A post-image is available to post-operation (stage 40) steps only.")
        flt = self.tables["sdkmessagefilters"].rows.get(str(step.get("_sdkmessagefilterid_value")), {})
        if flt.get("primaryobjecttypecode") == AGENT_STATUS:
            unknown = [a for a in _columns(row.get("attributes")) if a not in _IMAGE_COLUMNS]
            if unknown:
                raise bad(f"The attributes {', '.join(unknown)} do not exist on {AGENT_STATUS}.")

    # ------------------------------------------------------------------------------------ CCaaS APIs

    def _agent_caller(self, request: web.Request, api: str) -> tuple[str, dict[str, Any]]:
        caller = request.get(_CALLER)
        if caller is None:
            raise ApiError(
                400,
                "0x80040203",
                f"{api} acts for an agent: send the agent's systemuserid in the MSCRMCallerID header.",
            )
        row = self._status_row(caller)
        if row is None:
            raise ApiError(
                405,
                "0x80060888",
                f"API not allowed: user {caller} is not a contact center agent "
                "(no msdyn_agentstatus; Omnichannel Agent role missing).",
            )
        return caller, row

    def _modify_presence(self, request: web.Request) -> web.Response:
        caller, row = self._agent_caller(request, "CCaaS_ModifyAgentPresence")
        body = request[_JSON_BODY]
        if not isinstance(body, dict):
            raise ApiError(
                400,
                "0x80040203",
                "Bad Request: the body must be a JSON object with ApiVersion, AgentId and PresenceId.",
            )
        if body.get("ApiVersion") != "1.0":
            raise ApiError(
                400, "0x80040203", f'Bad Request: unsupported ApiVersion {body.get("ApiVersion")!r}; use "1.0".'
            )
        agent = _guid(str(body.get("AgentId") or ""))
        presence = _guid(str(body.get("PresenceId") or ""))
        if agent is None or presence is None:
            raise ApiError(400, "0x80040203", "Bad Request: AgentId and PresenceId must be GUIDs.")
        if agent != caller:
            raise ApiError(
                400,
                "0x80040203",
                f"Bad Request: AgentId {agent} is not the impersonated caller {caller} (MSCRMCallerID).",
            )
        p = self.tables["msdyn_presences"].rows.get(presence)
        if p is None or p.get("statecode") != 0:
            raise _not_found("msdyn_presence", presence)
        self._write_presence(row, presence, "AGENT")
        self._emit(
            "Update",
            row["msdyn_agentstatusid"],
            user=caller,
            initiating=APP_USER_ID,
            user_agent=request.headers.get("User-Agent", ""),
            on_behalf=APP_USER_ID,
        )
        return web.Response(status=200)

    def _get_presence(self, request: web.Request) -> web.Response:
        caller, row = self._agent_caller(request, "CCaaS_GetPresence")
        presence = self.tables["msdyn_presences"].rows.get(row["_msdyn_currentpresenceid_value"], {})
        user = self.tables["systemusers"].rows[caller]
        logged_in = bool(row.get("msdyn_isagentloggedin"))
        return web.json_response(
            {
                "AgentId": caller,
                "AgentName": user.get("fullname"),
                "PresenceId": row["_msdyn_currentpresenceid_value"],
                "CurrentPresenceStatusInfo": presence.get("msdyn_name", ""),
                "Timestamp": int(row.get("_ms", 0) / 1000) if logged_in else 0,
                "ActiveBrowserSessions": 1 if logged_in else 0,
                "AllowedChannels": ["chat", "voice"] if logged_in else [],
                "DisabledChannels": [] if logged_in else ["chat", "voice"],
            }
        )

    # ------------------------------------------------------------------------------------ presence rows

    def _status_row(self, agent: str) -> dict[str, Any] | None:
        status_id = self._status_by_agent.get(agent.lower())
        return None if status_id is None else self.tables["msdyn_agentstatuses"].rows.get(status_id)

    def _write_presence(self, row: dict[str, Any], presence_id: str, modified_by: str) -> None:
        ms = _now_ms()
        self._put(
            "msdyn_agentstatuses",
            row["msdyn_agentstatusid"],
            {
                "_msdyn_currentpresenceid_value": presence_id.lower(),
                "msdyn_presencemodifiedby": modified_by,
                "msdyn_presencemodifiedon": _iso(ms),
                "modifiedon": _iso(ms),
                "_ms": ms,
                "msdyn_isagentloggedin": presence_id.lower() != OFFLINE,
            },
        )

    # ------------------------------------------------------------------------------------ webhooks

    def _steps_for(self, message: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Active steps for ``message`` on msdyn_agentstatus bound to a webhook endpoint, by stage and rank."""
        msg_ids = {k for k, r in self.tables["sdkmessages"].rows.items() if r["name"] == message}
        filters = self.tables["sdkmessagefilters"].rows
        endpoints = self.tables["serviceendpoints"].rows
        out = []
        for step in self.tables["sdkmessageprocessingsteps"].rows.values():
            flt = filters.get(str(step.get("_sdkmessagefilterid_value")))
            endpoint = endpoints.get(str(step.get("_eventhandler_value")))
            if (
                step.get("statecode") == 0
                and step.get("_sdkmessageid_value") in msg_ids
                and flt is not None
                and flt["primaryobjecttypecode"] == AGENT_STATUS
                and endpoint is not None
                and endpoint.get("contract") == 8
            ):
                attrs = {a.strip().lower() for a in str(step.get("filteringattributes") or "").split(",") if a.strip()}
                if message == "Update" and attrs and "msdyn_currentpresenceid" not in attrs:
                    continue
                out.append((step, endpoint))
        return sorted(out, key=lambda se: (se[0].get("stage", 40), se[0].get("rank", 1)))

    def images_of(self, step_id: str) -> list[dict[str, Any]]:
        """The ``sdkmessageprocessingstepimages`` registered on a step."""
        return [
            dict(r)
            for r in self.tables["sdkmessageprocessingstepimages"].rows.values()
            if r.get("_sdkmessageprocessingstepid_value") == step_id
        ]

    def _post_images(self, step: Mapping[str, Any], row: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """The step's registered post-images of the row as the change left it: the columns each asks
        for (all when it names none) that have a value, under its ``entityalias``."""
        out: list[tuple[str, Any]] = []
        for image in self.images_of(str(step.get("sdkmessageprocessingstepid"))):
            if image.get("imagetype") not in (1, 2):
                continue
            names = _columns(image.get("attributes")) or sorted(_IMAGE_COLUMNS)
            values = [(n, _image_value(row, n)) for n in names]
            attrs = [(n, v) for n, v in values if v is not None]
            out.append(
                (str(image["entityalias"]), _entity(row, attrs, row_version=str(row["versionnumber"]), typed=False))
            )
        return out

    def _emit(
        self,
        message: str,
        status_id: str,
        *,
        user: str,
        initiating: str,
        user_agent: str,
        on_behalf: str | None,
        whole_row: bool = False,
    ) -> None:
        row = self.tables["msdyn_agentstatuses"].rows[status_id]
        for step, endpoint in self._steps_for(message):
            ids = {"correlation": str(uuid.uuid4()), "operation": str(uuid.uuid4()), "request": str(uuid.uuid4())}
            who: dict[str, Any] = {
                "user": user,
                "initiating": initiating,
                "user_agent": user_agent,
                "on_behalf": on_behalf,
            }
            if message == "Update":
                ctx = _update_context(self, row, step, ids, whole_row=whole_row, **who)
            else:
                ctx = _create_context(self, row, step, ids, **who)
            url, headers = _target(endpoint)
            headers.update(
                {
                    "Content-Type": "application/json",
                    "x-request-id": ids["request"],
                    "x-ms-correlation-request-id": ids["correlation"],
                    "x-ms-dynamics-organization": urllib.parse.urlsplit(self._base).netloc or "localhost",
                    "x-ms-dynamics-entity-name": AGENT_STATUS,
                    "x-ms-dynamics-request-name": message,
                }
            )
            # DataContractJsonSerializer escapes every "/" as "\/" (the seed payloads show it).
            raw = json.dumps(ctx, separators=(",", ":")).replace("/", "\\/").encode()
            emission = Emission(message, row["_msdyn_agentid_value"], str(endpoint.get("url")), ctx)
            self._queue.put_nowait((emission, url, headers, raw))

    async def _send_loop(self) -> None:
        """One of ``webhook_senders``. A row's lock is taken right after its emission is dequeued,
        with no await in between, so a row's emissions are sent in the order they were made."""
        while True:
            emission, url, headers, raw = await self._queue.get()
            lock = self._row_locks.setdefault(emission.agent_id, asyncio.Lock())
            try:
                async with lock:
                    started = time.monotonic()
                    try:
                        assert self._client is not None
                        async with self._client.post(url, data=raw, headers=headers) as resp:
                            emission.status = resp.status
                            emission.response = (await resp.text())[:500]
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        emission.error = f"{type(e).__name__}: {e}"
                    finally:
                        emission.seconds = time.monotonic() - started
                        self.emissions.append(emission)
            finally:
                self._queue.task_done()
            if emission.error or (emission.status or 0) >= 300:
                log.info(
                    "webhook not accepted",
                    extra={"fields": {"url": emission.url, "status": emission.status, "error": emission.error}},
                )


_PRESENCE_WRITE = frozenset(
    {
        "modifiedby",
        "msdyn_isagentloggedin",
        "msdyn_currentpresenceid",
        "modifiedon",
        "modifiedonbehalfby",
        "msdyn_agentstatusid",
        "msdyn_presencemodifiedon",
        "msdyn_presencemodifiedby",
    }
)
"""The Target of a presence write (the CCaaS API, or the engine without ``whole_row``)."""
_IMAGE_COLUMNS = frozenset(
    {
        "msdyn_agentstatusid",
        "msdyn_agentid",
        "msdyn_currentpresenceid",
        "msdyn_presencemodifiedon",
        "msdyn_presencemodifiedby",
        "msdyn_isagentloggedin",
        "msdyn_availableunitscapacity",
        "msdyn_capacitymodifiedon",
        "msdyn_isblockedbysomeprofile",
        "createdon",
        "modifiedon",
        "statecode",
    }
)
"""The ``msdyn_agentstatus`` columns an entity image can hold (logical names)."""


def _columns(value: Any) -> list[str]:
    """An image's ``attributes``: comma-separated logical names; empty means every column."""
    return [a.strip().lower() for a in str(value or "").split(",") if a.strip()]


def _image_value(row: Mapping[str, Any], name: str) -> Any:
    """One column of the row as a context carries it (references, ``/Date(ms)/``, option sets)."""
    if name == "msdyn_agentid":
        return _ref("systemuser", row.get("_msdyn_agentid_value"))
    if name == "msdyn_currentpresenceid":
        return _ref("msdyn_presence", row.get("_msdyn_currentpresenceid_value"))
    if name == "statecode":
        return None if row.get("statecode") is None else {"__type": f"OptionSetValue:{NS}", "Value": row["statecode"]}
    value = row.get(name)
    if name in ("msdyn_presencemodifiedon", "msdyn_capacitymodifiedon", "createdon", "modifiedon") and value:
        when = datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return _date(int(when.timestamp() * 1000))
    return value


def _skiptoken(offset: int, last_id: str) -> str:
    cookie = base64.urlsafe_b64encode(json.dumps({"o": offset, "last": last_id}).encode()).decode()
    return f'<cookie pagenumber="{offset}" pagingcookie="{cookie}" istracking="False" />'


def _skiptoken_offset(token: str | None) -> int:
    if not token:
        return 0
    m = re.search(r'pagingcookie="([^"]+)"', token)
    try:
        return int(json.loads(base64.urlsafe_b64decode(m.group(1)))["o"]) if m else 0
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "0x80060888", "Invalid $skiptoken.") from None


def _target(endpoint: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """The URL and headers of a webhook call from the endpoint's auth settings."""
    url = str(endpoint["url"])
    value = str(endpoint.get("authvalue") or "")
    auth = endpoint.get("authtype")
    headers: dict[str, str] = {}
    if auth == 4:
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"code": value})
    elif auth in (5, 6):
        pairs = {s.get("name", ""): s.get("value", "") for s in ET.fromstring(value).iter("setting")} if value else {}
        if auth == 5:
            headers.update(pairs)
        else:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(pairs)
    return url, headers


# ---------------------------------------------------------------------------------------------- payloads


def _ref(logical: str, ref_id: str | None, name: str | None = None) -> dict[str, Any] | None:
    if ref_id is None:
        return None
    return {
        "__type": f"EntityReference:{NS}",
        "Id": ref_id,
        "KeyAttributes": [],
        "LogicalName": logical,
        "Name": name,
        "RowVersion": None,
    }


def _date(ms: int, offset: bool = False) -> str:
    return f"/Date({ms}{'+0000' if offset else ''})/"


def _kv(pairs: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"key": k, "value": v} for k, v in pairs]


def _entity(
    row: Mapping[str, Any],
    attributes: list[tuple[str, Any]],
    *,
    row_version: str | None,
    formatted: list[tuple[str, Any]] | None = None,
    typed: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {"__type": f"Entity:{NS}"} if typed else {}
    out.update(
        {
            "Attributes": _kv(attributes),
            "EntityState": None,
            "FormattedValues": _kv(formatted or []),
            "Id": row["msdyn_agentstatusid"],
            "KeyAttributes": [],
            "LogicalName": AGENT_STATUS,
            "RelatedEntities": [],
            "RowVersion": row_version,
        }
    )
    return out


def _context(
    emu: DataverseEmulator,
    row: Mapping[str, Any],
    step: Mapping[str, Any],
    ids: Mapping[str, str],
    *,
    message: str,
    stage: int,
    target: dict[str, Any],
    parent: dict[str, Any] | None,
    user: str,
    initiating: str,
    user_agent: str,
    created_on: str,
    output: list[tuple[str, Any]],
    owning: dict[str, Any],
    images: list[tuple[str, Any]],
    shared: list[tuple[str, Any]],
) -> dict[str, Any]:
    """One RemoteExecutionContext, keys in the order of the seed payloads."""
    mode = int(step.get("mode", 0))
    return {
        "BusinessUnitId": emu.business_unit,
        "CorrelationId": ids["correlation"],
        "Depth": 1,
        "InitiatingUserAgent": user_agent,
        "InitiatingUserAzureActiveDirectoryObjectId": _ZERO,
        "InitiatingUserId": initiating,
        "InputParameters": _kv([("Target", target)]),
        "IsExecutingOffline": False,
        "IsInTransaction": mode == 0,
        "IsOfflinePlayback": False,
        "IsolationMode": 1,
        "MessageName": message,
        "Mode": mode,
        "OperationCreatedOn": created_on,
        "OperationId": ids["operation"],
        "OrganizationId": emu.org_id,
        "OrganizationName": emu.org_name,
        "OutputParameters": _kv(output),
        "OwningExtension": owning,
        "ParentContext": parent,
        "PostEntityImages": _kv(images),
        "PreEntityImages": [],
        "PrimaryEntityId": row["msdyn_agentstatusid"],
        "PrimaryEntityName": AGENT_STATUS,
        "RequestId": ids["request"],
        "SecondaryEntityName": "none",
        "SharedVariables": _kv(shared),
        "Stage": stage,
        "UserAzureActiveDirectoryObjectId": _ZERO,
        "UserId": user,
    }


def _owning(step: Mapping[str, Any], name: Any) -> dict[str, Any]:
    return {
        "Id": step["sdkmessageprocessingstepid"],
        "KeyAttributes": [],
        "LogicalName": "sdkmessageprocessingstep",
        "Name": name,
        "RowVersion": None,
    }


def _update_context(
    emu: DataverseEmulator,
    row: Mapping[str, Any],
    step: Mapping[str, Any],
    ids: Mapping[str, str],
    *,
    user: str,
    initiating: str,
    user_agent: str,
    on_behalf: str | None,
    whole_row: bool = False,
) -> dict[str, Any]:
    ms = int(row["_ms"])
    sec = ms // 1000 * 1000  # Dataverse stores datetimes to the second
    version = str(row["versionnumber"])

    def sent(attributes: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """A Target holds the columns the update request included: a presence write sends the
        presence columns, and the platform adds who and when (and the row's key)."""
        return attributes if whole_row else [(k, v) for k, v in attributes if k in _PRESENCE_WRITE]

    presence = _ref("msdyn_presence", row["_msdyn_currentpresenceid_value"])
    agent = _ref("systemuser", row["_msdyn_agentid_value"])
    capacity_ms = int(
        datetime.strptime(row["msdyn_capacitymodifiedon"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() * 1000
    )
    common: dict[str, Any] = {
        "user": user,
        "initiating": initiating,
        "user_agent": user_agent,
        "created_on": _date(ms // 1000 * 1000 + 1000, offset=True),
        "output": [],
    }
    target = _entity(
        row,
        sent(
            [
                ("modifiedby", _ref("systemuser", user)),
                ("msdyn_isagentloggedin", bool(row["msdyn_isagentloggedin"])),
                ("msdyn_currentpresenceid", presence),
                ("modifiedon", _date(sec + 1000)),
                ("modifiedonbehalfby", _ref("systemuser", on_behalf)),
                ("msdyn_availableunitscapacity", row["msdyn_availableunitscapacity"]),
                ("msdyn_agentstatusid", row["msdyn_agentstatusid"]),
                ("msdyn_capacitymodifiedon", _date(capacity_ms)),
                ("msdyn_presencemodifiedon", _date(sec)),
                ("msdyn_isblockedbysomeprofile", bool(row["msdyn_isblockedbysomeprofile"])),
                ("msdyn_presencemodifiedby", row["msdyn_presencemodifiedby"]),
                ("msdyn_agentid", agent),
                ("timezoneruleversionnumber", 4),
            ]
        ),
        row_version=version,
    )
    parent_target = _entity(
        row,
        sent(
            [
                ("msdyn_agentstatusid", row["msdyn_agentstatusid"]),
                ("msdyn_availableunitscapacity", row["msdyn_availableunitscapacity"]),
                ("msdyn_currentpresenceid", presence),
                ("msdyn_capacitymodifiedon", _date(capacity_ms)),
                ("msdyn_presencemodifiedby", row["msdyn_presencemodifiedby"]),
                ("msdyn_presencemodifiedon", _date(sec)),
                ("msdyn_isblockedbysomeprofile", bool(row["msdyn_isblockedbysomeprofile"])),
                ("msdyn_isagentloggedin", bool(row["msdyn_isagentloggedin"])),
                ("msdyn_agentid", agent),
            ]
        ),
        row_version=version,
    )
    owning = _owning(step, None)
    shared = [("IsAutoTransact", True), ("AcceptLang", "")]
    parent = _context(
        emu,
        row,
        step,
        ids,
        message="Update",
        stage=30,
        target=parent_target,
        parent=None,
        owning=owning,
        images=[],
        shared=shared,
        **common,
    )
    images = []
    if int(step.get("mode", 0)) == 1:  # asynchronous steps get the primary-name image (seed)
        images = [
            (
                "AsynchronousStepPrimaryName",
                _entity(row, [("msdyn_agentstatusid", row["msdyn_agentstatusid"])], row_version=None, typed=False),
            )
        ]
    images += emu._post_images(step, row)
    return _context(
        emu,
        row,
        step,
        ids,
        message="Update",
        stage=40,
        target=target,
        parent=parent,
        owning=owning,
        images=images,
        shared=shared,
        **common,
    )


def _create_context(
    emu: DataverseEmulator,
    row: Mapping[str, Any],
    step: Mapping[str, Any],
    ids: Mapping[str, str],
    *,
    user: str,
    initiating: str,
    user_agent: str,
    on_behalf: str | None,
) -> dict[str, Any]:
    ms = int(row["_ms"])
    sec = ms // 1000 * 1000
    presence = _ref("msdyn_presence", row["_msdyn_currentpresenceid_value"])
    agent = _ref("systemuser", row["_msdyn_agentid_value"])
    logged = bool(row["msdyn_isagentloggedin"])

    def shown(when: int) -> str:
        return datetime.fromtimestamp(when / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S-00:00")

    target = _entity(
        row,
        [
            ("msdyn_capacitymodifiedon", _date(sec)),
            ("msdyn_agentstatusid", row["msdyn_agentstatusid"]),
            ("owningbusinessunit", _ref("businessunit", emu.business_unit)),
            ("modifiedon", _date(sec + 1000)),
            ("modifiedonbehalfby", _ref("systemuser", on_behalf)),
            ("msdyn_presencemodifiedby", row["msdyn_presencemodifiedby"]),
            ("msdyn_currentpresenceid", presence),
            ("msdyn_presencemodifiedon", _date(sec)),
            ("statecode", {"__type": f"OptionSetValue:{NS}", "Value": 0}),
            ("statuscode", {"__type": f"OptionSetValue:{NS}", "Value": 1}),
            ("msdyn_isagentloggedin", logged),
            ("createdby", _ref("systemuser", user)),
            ("timezoneruleversionnumber", 4),
            ("msdyn_agentid", agent),
            ("ownerid", _ref("systemuser", user)),
            ("msdyn_availableunitscapacity", row["msdyn_availableunitscapacity"]),
            ("msdyn_isblockedbysomeprofile", bool(row["msdyn_isblockedbysomeprofile"])),
            ("owninguser", _ref("systemuser", user)),
            ("modifiedby", _ref("systemuser", user)),
            ("createdon", _date(sec + 1000)),
        ],
        row_version=None,
        formatted=[
            ("msdyn_capacitymodifiedon", shown(sec)),
            ("modifiedon", shown(sec + 1000)),
            ("msdyn_presencemodifiedon", shown(sec)),
            ("statecode", "Active"),
            ("statuscode", "Active"),
            ("msdyn_isagentloggedin", "Yes" if logged else "No"),
            ("timezoneruleversionnumber", "4"),
            ("msdyn_availableunitscapacity", str(row["msdyn_availableunitscapacity"])),
            ("msdyn_isblockedbysomeprofile", "Yes" if row["msdyn_isblockedbysomeprofile"] else "No"),
            ("createdon", shown(sec + 1000)),
        ],
    )
    parent_target = _entity(
        row,
        [
            ("msdyn_agentid", agent),
            ("msdyn_currentpresenceid", presence),
            ("msdyn_availableunitscapacity", row["msdyn_availableunitscapacity"]),
            ("msdyn_capacitymodifiedon", _date(ms, offset=True)),
            ("msdyn_presencemodifiedby", row["msdyn_presencemodifiedby"]),
            ("msdyn_presencemodifiedon", _date(ms)),
            ("msdyn_isblockedbysomeprofile", bool(row["msdyn_isblockedbysomeprofile"])),
            ("msdyn_isagentloggedin", logged),
            ("msdyn_agentstatusid", row["msdyn_agentstatusid"]),
        ],
        row_version=None,
    )
    shared = [("IsAutoTransact", True), ("AcceptLang", ""), ("DefaultsAddedFlag", True)]
    common: dict[str, Any] = {"user": user, "initiating": initiating, "user_agent": user_agent}
    parent = _context(
        emu,
        row,
        {"mode": 0},
        ids,
        message="Create",
        stage=30,
        target=parent_target,
        parent=None,
        created_on=_date(ms + 1061),
        output=[],
        owning={
            "Id": "b7a297bf-d810-ef11-9f8a-6045bdd4c6be",
            "KeyAttributes": [],
            "LogicalName": "sdkmessageprocessingstep",
            "Name": "ObjectModel Implementation",
            "RowVersion": None,
        },
        images=[],
        shared=shared,
        **common,
    )
    return _context(
        emu,
        row,
        step,
        ids,
        message="Create",
        stage=40,
        target=target,
        parent=parent,
        created_on=_date(ms + 1108),
        output=[("id", row["msdyn_agentstatusid"])],
        owning=_owning(step, step.get("name")),
        images=emu._post_images(step, row),
        shared=shared,
        **common,
    )
