"""A faithful local fake of the Microsoft Graph parts the bridge uses: Teams presence and its change
notifications. It powers ``presence-sync demo`` and the Graph adapter's tests, so it must fail the way
Graph fails, not only succeed the way Graph succeeds.

What it models (facts: ``docs/DESIGN.md`` and Graph's public documentation):

- **Presence per user** (Entra object id, compared case-insensitively): the person's *own* state (what
  their Teams clients say; ``set_user_state``), application *sessions* keyed by ``sessionId``
  (``setPresence``/``clearPresence``) and an optional *preferred* presence
  (``setUserPreferredPresence``). Aggregation, as Graph documents it:

  1. A preferred presence overrides every session, but only while the person has at least one session
     (own client online or an app session); otherwise they show as their own offline state.
  2. Else the strongest session wins by availability rank::

        DoNotDisturb 7 > Busy 6 > BusyIdle 5 > Available 4 > AvailableIdle 3 > Away 2 = BeRightBack 2
        > Offline 0 = PresenceUnknown 0

     An own state of Offline/PresenceUnknown is *no session* (no client signed in).
     Ties (Graph documents none, so this is the emulator's choice, stated here so tests can rely on
     it): the person's own client beats an app session (it carries their real activity, e.g.
     InAMeeting); between app sessions, the one whose state changed last wins. A refresh that does
     not change a session's state does not make it "last", so keep-alive calls never flip what
     Teams shows.
  3. Nobody online: the own state (Offline/Offline by default for ``add_user(..., own=OFFLINE)``).

- **Session lifetime**: ``expirationDuration`` (ISO 8601, 5 minutes to 4 hours, default 5 minutes)
  ends a session. An app session set to Available fades as Graph documents: Available/AvailableInactive
  after 5 minutes without a refresh, Away/Away after 10. Preferred presence expires after its
  ``expirationDuration`` or, without one, after 1 day (Busy, DoNotDisturb) or 7 days (others).
- **Subscriptions**: delegated subscriber accounts only (the app token gets 403), one per account,
  at most 650 ids, at most 60 minutes, ``changeType`` ``updated``; the notification URL (and the
  lifecycle URL) must pass the ``validationToken`` handshake (200, ``text/plain``, the token, within
  10 s) before 201; PATCH renews, DELETE removes, expiry makes them vanish (404 afterwards).
  A creation completes even when its client gave up waiting (``validation_delay`` makes Graph slow
  to validate): the subscription exists and the next create gets 409. ``GET /subscriptions`` lists,
  for a delegated token, this app's subscriptions for the signed-in user only (all of the app's for
  the app token), paged with ``@odata.nextLink``, ``clientState`` withheld (null) as Graph does.
- **Notifications**: every change of a user's *aggregated* presence, whatever caused it (the bridge's
  own ``setPresence`` included: that echo is what the bridge must recognise), is posted to each
  covering subscription, batched per subscription, on background tasks. Basic subscriptions get
  ``resourceData`` only; rich ones get ``encryptedContent`` and ``validationTokens``
  (see ``emulators/graph_crypto.py`` for the exact cryptography). Failed deliveries are retried a few
  times and then dropped (Graph retries for hours; the emulator compresses that).
- **Lifecycle** events on demand (``send_lifecycle``), **throttling** (1,500 presence calls per 30 s,
  429 with ``Retry-After``), and fault injection (``fail_next``, ``latency``, ``throttle_for``,
  ``drop_notifications``, ``tamper_notifications``).

Clocks: presence, sessions and subscriptions run on ``emulator.now()`` = ``clock()`` plus the offset
added by ``advance(seconds)``; a background tick (``tick_interval``) applies expiries and fading, and
``advance`` applies them at once. The JWTs in ``validationTokens`` are stamped with wall-clock time
(``token_clock``), because JWT libraries verify ``exp``/``nbf`` against the wall clock.

Wire details worth knowing: ``expirationDuration`` must be ISO 8601 (``PT1H``); ``str(timedelta)``
(``1:00:00``, what kiota's Python JSON writer emits for a timedelta) is refused with 400, as Graph refuses
it. A notification item's ``resource`` is ``communications/presences('<id>')`` and its
``resourceData["@odata.id"]`` is ``users/<id>/presence``; real Graph has also been seen to echo the
subscription's ``$filter`` form in ``resource``, so subscribers should key on ``resourceData.id``.

Not modelled: statusMessage and out-of-office settings (always empty), ``/me`` routes, delegated
``setPresence`` on one's own presence (writes need the app token), notification URL validation on
renewal, Graph's multi-hour retry schedule and its throttling of slow endpoints (here: 3 attempts,
then dropped), more than one application per tenant, resources other than presence, the
subscription's ``notificationQueryOptions``, removal of subscriptions whose reauthorization is
ignored, Teams clients' minutes of display lag (the emulator, like Graph, reports changes at once),
and any check that ``sessionId`` equals the calling app's id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import itertools
import json
import logging
import math
import re
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from emulators.graph_crypto import (
    GRAPH_CHANGE_TRACKING_APP_ID,
    SigningKey,
    encrypt_for_certificate,
    load_certificate,
    sign_validation_token,
)
from emulators.serving import serve_app

__all__ = [
    "ACTIVITIES",
    "AVAILABILITIES",
    "AVAILABILITY_RANK",
    "GRAPH_CHANGE_TRACKING_APP_ID",
    "MAX_IDS",
    "PREFERRED_PAIRS",
    "SESSION_PAIRS",
    "Delivery",
    "GraphEmulator",
    "GraphError",
    "RequestRecord",
    "SessionInfo",
    "SubscriptionInfo",
    "encrypt_for_certificate",
    "parse_iso_duration",
    "sign_validation_token",
]

log = logging.getLogger("presence_sync.emulators.graph")

State = tuple[str, str]

AVAILABILITIES = frozenset(
    {
        "Available",
        "AvailableIdle",
        "Away",
        "BeRightBack",
        "Busy",
        "BusyIdle",
        "DoNotDisturb",
        "Offline",
        "PresenceUnknown",
    }
)
ACTIVITIES = frozenset(
    {
        "Available",
        "Away",
        "BeRightBack",
        "Busy",
        "DoNotDisturb",
        "InACall",
        "InAConferenceCall",
        "Inactive",
        "InAMeeting",
        "Offline",
        "OffWork",
        "OutOfOffice",
        "PresenceUnknown",
        "Presenting",
        "UrgentInterruptionsOnly",
        "AvailableInactive",
    }
)
SESSION_PAIRS: frozenset[State] = frozenset(
    {
        ("Available", "Available"),
        ("Busy", "InACall"),
        ("Busy", "InAConferenceCall"),
        ("Away", "Away"),
        ("DoNotDisturb", "Presenting"),
    }
)
"""The only availability/activity pairs ``setPresence`` accepts."""
PREFERRED_PAIRS: frozenset[State] = frozenset(
    {
        ("Available", "Available"),
        ("Busy", "Busy"),
        ("DoNotDisturb", "DoNotDisturb"),
        ("BeRightBack", "BeRightBack"),
        ("Away", "Away"),
        ("Offline", "OffWork"),
    }
)
"""The only pairs ``setUserPreferredPresence`` accepts."""
AVAILABILITY_RANK: Mapping[str, int] = {
    "DoNotDisturb": 7,
    "Busy": 6,
    "BusyIdle": 5,
    "Available": 4,
    "AvailableIdle": 3,
    "Away": 2,
    "BeRightBack": 2,
    "Offline": 0,
    "PresenceUnknown": 0,
}
NO_SESSION = frozenset({"Offline", "PresenceUnknown"})
OFFLINE: State = ("Offline", "Offline")
AVAILABLE: State = ("Available", "Available")

MAX_IDS = 650
MAX_SUBSCRIPTION_LIFETIME = timedelta(minutes=60)
SESSION_MIN = timedelta(minutes=5)
SESSION_MAX = timedelta(hours=4)
SESSION_DEFAULT = timedelta(minutes=5)
FADE_STEP = timedelta(minutes=5)
MAX_CLIENT_STATE = 128
LIFECYCLE_EVENTS = frozenset({"reauthorizationRequired", "subscriptionRemoved", "missed"})

_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_SINGLE_RESOURCE = re.compile(r"^/?communications/presences/(?P<id>[^/?'()\s,]+)$", re.IGNORECASE)
_BULK_RESOURCE = re.compile(
    r"^/?communications/presences\?\$filter=\s*id\s+in\s*\((?P<ids>.*)\)\s*$", re.IGNORECASE | re.DOTALL
)
_QUOTED_ID = re.compile(r"""^\s*(?:'(?P<a>[^']*)'|"(?P<b>[^"]*)")\s*$""")


def parse_iso_duration(text: str) -> timedelta:
    """``PT1H``, ``PT30M``, ``P0DT4H``, ``PT300S``... as a timedelta; ``ValueError`` otherwise.

    Only days and time parts: years and months have no fixed length and Graph's presence durations
    never need them."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None or text.strip() in ("P", "PT") or text.strip().endswith("T"):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    return timedelta(days=parts["d"], hours=parts["h"], minutes=parts["m"], seconds=parts["s"])


def format_datetime(dt: datetime) -> str:
    """Graph's timestamp form: UTC, seven fractional digits, ``Z``."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def _parse_datetime(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("expected an ISO 8601 date-time string")
    dt = datetime.fromisoformat(value.strip())
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _wall_now() -> datetime:
    return datetime.now(UTC)


class GraphError(Exception):
    """An error answer in Graph's shape: ``{"error": {"code", "message", "innerError"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _extension_error(status: HTTPStatus, reason: str, operation: str = "Create") -> GraphError:
    """Presence subscription errors come from the Teams extension behind Graph, wrapped this way."""
    name = "".join(word.capitalize() for word in status.name.split("_"))
    return GraphError(
        int(status), "ExtensionError", f"Operation: {operation}; Exception: [Status Code: {name}; Reason: {reason}]"
    )


def _status_name(status: int) -> str:
    """.NET's HttpStatusCode name, as Graph quotes it in validation errors (``NotFound``...)."""
    try:
        return "".join(word.capitalize() for word in HTTPStatus(status).name.split("_"))
    except ValueError:
        return str(status)


# --------------------------------------------------------------------------------------------------
# State


@dataclass
class _Session:
    session_id: str
    state: State
    set_at: datetime  # last setPresence, refreshes included: the fade timer
    expires_at: datetime
    seq: int  # when its effective state last changed: the tie-break

    def effective(self, now: datetime) -> State:
        if self.state[0] != "Available":
            return self.state
        idle = now - self.set_at
        if idle >= 2 * FADE_STEP:
            return ("Away", "Away")
        if idle >= FADE_STEP:
            return ("Available", "AvailableInactive")
        return self.state

    def next_change(self, now: datetime) -> datetime:
        """When this session's effective state next changes by itself (fade or expiry), after ``now``."""
        times = [self.expires_at]
        if self.state[0] == "Available":
            times += [self.set_at + FADE_STEP, self.set_at + 2 * FADE_STEP]
        return min(t for t in times if t > now) if any(t > now for t in times) else self.expires_at


@dataclass
class _Preferred:
    state: State
    expires_at: datetime


@dataclass
class _User:
    id: str
    own: State
    own_seq: int
    sessions: dict[str, _Session] = field(default_factory=dict)
    preferred: _Preferred | None = None
    shown: State = OFFLINE
    scheduled: datetime | None = None  # earliest timeline entry pending for this user


@dataclass
class _Subscription:
    id: str
    account: str
    creator_id: str
    resource: str
    user_ids: frozenset[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expires_at: datetime
    created_at: datetime
    include_resource_data: bool
    certificate: x509.Certificate | None
    certificate_b64: str | None
    certificate_id: str | None
    latest_tls: str
    needs_reauthorization: bool = False


@dataclass(frozen=True)
class SubscriptionInfo:
    """A snapshot of one live subscription, for tests and the demo."""

    id: str
    account: str
    resource: str
    user_ids: frozenset[str]
    expires_at: datetime
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    include_resource_data: bool
    certificate_id: str | None
    needs_reauthorization: bool


@dataclass(frozen=True)
class SessionInfo:
    """One app presence session as Graph holds it (``state`` already faded if it has)."""

    session_id: str
    availability: str
    activity: str
    set_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class RequestRecord:
    """One API call answered by the emulator."""

    method: str
    path: str
    query: str
    status: int
    at: datetime
    account: str | None
    body: Any
    duration: float


@dataclass
class Delivery:
    """One HTTP call the emulator made to the subscriber: ``kind`` = notification, lifecycle or
    validation. ``status`` None: no HTTP answer (``error`` says why). ``latency`` in seconds."""

    kind: str
    subscription_id: str | None
    url: str
    body: Any
    status: int | None
    latency: float
    attempt: int
    error: str | None
    at: datetime

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Caller:
    token: str
    is_app: bool
    account: str | None  # delegated subscriber account, if the token is one


@dataclass
class _Fault:
    remaining: int
    status: int
    retry_after: float | None
    paths: tuple[str, ...] | None
    method: str | None = None

    def matches(self, path: str, method: str) -> bool:
        if self.method is not None and method.upper() != self.method:
            return False
        return self.paths is None or any(p in path for p in self.paths)


# Typed request-storage keys where aiohttp has them (3.12+), plain strings before.
_CALLER_KEY: Any = web.RequestKey("graph_caller", object) if hasattr(web, "RequestKey") else "graph_caller"
_JSON_KEY: Any = web.RequestKey("graph_json", object) if hasattr(web, "RequestKey") else "graph_json"

_ERROR_CODES = {
    400: "BadRequest",
    401: "InvalidAuthenticationToken",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


# --------------------------------------------------------------------------------------------------
# The emulator


class GraphEmulator:
    """Microsoft Graph presence + change notifications on a loopback port. See the module docstring."""

    def __init__(
        self,
        *,
        token: str = "graph-token",
        subscriber_tokens: Mapping[str, str] | None = None,
        client_id: str = "00000000-0000-0000-0000-00000000b0b0",
        tenant_id: str = "00000000-0000-0000-0000-0000000070e7",
        clock: Callable[[], datetime] | None = None,
        token_clock: Callable[[], datetime] | None = None,
        presence_rate_limit: tuple[int, float] | None = (1500, 30.0),
        tick_interval: float = 1.0,
        batch_window: float = 0.01,
        max_batch: int = 1000,
        notification_timeout: float = 3.0,
        validation_timeout: float = 10.0,
        delivery_attempts: int = 3,
        retry_delay: float = 0.2,
        allow_http_loopback: bool = True,
        log_limit: int | None = 100_000,
        list_page_size: int = 100,
    ) -> None:
        """``subscriber_tokens``: bearer token -> account name of the delegated subscriber accounts
        (default: one account, token ``subscriber-token``). ``token`` is the application's token:
        it reads and writes presence but cannot subscribe. ``presence_rate_limit``: (requests, seconds)
        per app, Graph's 1,500 per 30 s by default; None disables it. ``log_limit``: how many entries
        ``requests`` and ``deliveries`` keep (the newest), so that a benchmark run cannot grow them
        without bound. ``list_page_size``: subscriptions per page of ``GET /subscriptions`` (the rest
        behind ``@odata.nextLink``)."""
        self.token = token
        self.subscriber_tokens: dict[str, str] = dict(
            subscriber_tokens if subscriber_tokens is not None else {"subscriber-token": "subscriber@contoso.example"}
        )
        self.client_id = client_id
        self.tenant_id = tenant_id
        self.clock: Callable[[], datetime] = clock or _wall_now
        self.token_clock: Callable[[], datetime] = token_clock or _wall_now
        self.presence_rate_limit = presence_rate_limit
        self.tick_interval = tick_interval
        self.batch_window = batch_window
        self.max_batch = max_batch
        self.notification_timeout = notification_timeout
        self.validation_timeout = validation_timeout
        self.delivery_attempts = delivery_attempts
        self.retry_delay = retry_delay
        self.allow_http_loopback = allow_http_loopback
        self.list_page_size = max(1, list_page_size)
        self.signing_key = SigningKey()

        self._offset = timedelta(0)
        self._seq = itertools.count(1)
        self._users: dict[str, _User] = {}
        # (due, seq, user id): when a user's presence changes by time alone (fading, expiry). A heap,
        # so that the tick costs nothing for the many users whose sessions are not due.
        self._timeline: list[tuple[datetime, int, str]] = []
        self._subs: dict[str, _Subscription] = {}
        self._subs_by_user: dict[str, set[str]] = {}
        self._account_ids: dict[str, str] = {}
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._faults: list[_Fault] = []
        self._latency = 0.0
        self._validation_delay = 0.0
        self._throttle_until: datetime | None = None
        self._throttle_retry_after: float | None = None
        self._drop_remaining = 0
        self._tamper: list[Callable[[dict[str, Any]], None]] = []
        self._rate_window: deque[float] = deque()

        self.requests: deque[RequestRecord] = deque(maxlen=log_limit)
        self.deliveries: deque[Delivery] = deque(maxlen=log_limit)
        self.notifications_dropped: list[dict[str, Any]] = []

        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._base = ""

    # ---------------------------------------------------------------- lifecycle of the server

    def make_app(self) -> web.Application:
        """The aiohttp application (routes + the auth/fault/logging middleware)."""
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/v1.0/users/{user_id}/presence", self._h_get_presence)
        r.add_post("/v1.0/users/{user_id}/presence/setPresence", self._h_set_presence)
        r.add_post("/v1.0/users/{user_id}/presence/clearPresence", self._h_clear_presence)
        r.add_post("/v1.0/users/{user_id}/presence/setUserPreferredPresence", self._h_set_preferred)
        r.add_post("/v1.0/users/{user_id}/presence/clearUserPreferredPresence", self._h_clear_preferred)
        r.add_get("/v1.0/communications/presences/{user_id}", self._h_get_presence)
        r.add_post("/v1.0/communications/getPresencesByUserId", self._h_get_presences)
        r.add_post("/v1.0/subscriptions", self._h_create_subscription)
        r.add_get("/v1.0/subscriptions", self._h_list_subscriptions)
        r.add_get("/v1.0/subscriptions/{sub_id}", self._h_get_subscription)
        r.add_patch("/v1.0/subscriptions/{sub_id}", self._h_patch_subscription)
        r.add_delete("/v1.0/subscriptions/{sub_id}", self._h_delete_subscription)
        r.add_post("/v1.0/subscriptions/{sub_id}/reauthorize", self._h_reauthorize)
        r.add_get("/{tenant}/discovery/v2.0/keys", self._h_jwks)
        r.add_get("/{tenant}/discovery/keys", self._h_jwks)
        r.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._h_openid)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: a free port); returns ``url``."""
        if self._runner is not None:
            raise RuntimeError("GraphEmulator already started")
        self._runner, self._base = await serve_app(self.make_app(), host, port)
        self._client = aiohttp.ClientSession()
        if self.tick_interval > 0:
            self._ticker = asyncio.create_task(self._tick_loop(), name="graph-emulator-tick")
        return self.url

    async def stop(self) -> None:
        """Stop listening; undelivered notifications are abandoned."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._workers.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> GraphEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no version segment)."""
        if not self._base:
            raise RuntimeError("GraphEmulator not started")
        return self._base

    @property
    def url(self) -> str:
        """Graph base URL: ``http://127.0.0.1:PORT/v1.0``."""
        return f"{self.base_url}/v1.0"

    @property
    def jwks_url(self) -> str:
        """The keys that sign ``validationTokens`` (like ``login.microsoftonline.com/common/...``)."""
        return f"{self.base_url}/common/discovery/v2.0/keys"

    @property
    def openid_configuration_url(self) -> str:
        return f"{self.base_url}/{self.tenant_id}/v2.0/.well-known/openid-configuration"

    # ---------------------------------------------------------------- time

    def now(self) -> datetime:
        """The emulated present: ``clock()`` plus everything ``advance`` added."""
        return self.clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move emulated time forward and apply what that causes at once (session expiry and fading,
        preferred presence expiry, subscription expiry); notifications go out on background tasks."""
        self._offset += timedelta(seconds=seconds)
        self.tick()

    def tick(self) -> None:
        """Apply time-driven changes now (the background tick calls this every ``tick_interval``)."""
        self._purge_subscriptions()
        now = self.now()
        while self._timeline and self._timeline[0][0] <= now:
            due, _, uid = heapq.heappop(self._timeline)
            user = self._users.get(uid)
            if user is None:
                continue
            if user.scheduled == due:
                user.scheduled = None
            self._refresh(user)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self.tick()
            except Exception:  # the tick must survive anything a test did to the state
                log.exception("graph emulator tick failed")

    # ---------------------------------------------------------------- users and presence (control API)

    def add_user(self, user_id: str, own: State = AVAILABLE) -> None:
        """A user whose Teams clients say ``own`` (use ``("Offline", "Offline")`` for nobody signed in).
        Adding an existing user resets nothing but their own state."""
        self._check_state(own)
        uid = user_id.lower()
        user = self._users.get(uid)
        if user is None:
            user = _User(uid, own, next(self._seq))
            self._users[uid] = user
            user.shown = self._aggregate(user, self.now())
        else:
            self.set_user_state(uid, *own)

    def add_users(self, user_ids: Iterable[str], own: State = AVAILABLE) -> None:
        for uid in user_ids:
            self.add_user(uid, own)

    @property
    def users(self) -> list[str]:
        return list(self._users)

    def set_user_state(self, user_id: str, availability: str, activity: str) -> None:
        """What the person's own Teams client now says (a call starts, they go offline...)."""
        self._check_state((availability, activity))
        user = self._user_or_key_error(user_id)
        if user.own != (availability, activity):
            user.own = (availability, activity)
            user.own_seq = next(self._seq)
        self._refresh(user)

    def set_user_preferred(
        self, user_id: str, availability: str, activity: str, expires_in: float | None = None
    ) -> None:
        """The person picks a status in Teams (a user-preferred presence; same pairs as the API)."""
        if (availability, activity) not in PREFERRED_PAIRS:
            raise ValueError(f"not a preferred-presence pair: {availability}/{activity}")
        user = self._user_or_key_error(user_id)
        duration = timedelta(seconds=expires_in) if expires_in is not None else _preferred_default(availability)
        user.preferred = _Preferred((availability, activity), self.now() + duration)
        self._refresh(user)

    def clear_user_preferred(self, user_id: str) -> None:
        user = self._user_or_key_error(user_id)
        user.preferred = None
        self._refresh(user)

    def presence_of(self, user_id: str) -> State:
        """The aggregated ``(availability, activity)`` Graph reports now."""
        user = self._user_or_key_error(user_id)
        self._refresh(user)
        return user.shown

    def sessions_of(self, user_id: str) -> dict[str, SessionInfo]:
        """Live app sessions by sessionId, faded states applied."""
        user = self._user_or_key_error(user_id)
        now = self.now()
        self._refresh(user)
        return {
            s.session_id: SessionInfo(s.session_id, *s.effective(now), s.set_at, s.expires_at)
            for s in user.sessions.values()
        }

    def preferred_of(self, user_id: str) -> State | None:
        user = self._user_or_key_error(user_id)
        self._refresh(user)
        return user.preferred.state if user.preferred else None

    def own_state_of(self, user_id: str) -> State:
        return self._user_or_key_error(user_id).own

    # ---------------------------------------------------------------- subscriptions (control API)

    def add_subscriber(self, token: str, account: str) -> None:
        """Another delegated account (as if someone ran ``presence-sync graph login``)."""
        self.subscriber_tokens[token] = account

    @property
    def subscriptions(self) -> list[SubscriptionInfo]:
        self._purge_subscriptions()
        return [self._info(s) for s in self._subs.values()]

    def subscription(self, subscription_id: str) -> SubscriptionInfo | None:
        self._purge_subscriptions()
        sub = self._subs.get(subscription_id)
        return self._info(sub) if sub else None

    def expire_subscription(self, subscription_id: str) -> None:
        """Let a subscription run out now (no lifecycle event, as when renewal was missed)."""
        sub = self._subs.get(subscription_id)
        if sub is None:
            raise KeyError(f"no live subscription {subscription_id}")
        sub.expires_at = self.now()
        self._purge_subscriptions()

    async def send_lifecycle(self, subscription_id: str, event: str) -> Delivery | None:
        """Post a lifecycle notification (``reauthorizationRequired``, ``subscriptionRemoved``,
        ``missed``) to the subscription's lifecycleNotificationUrl and return its final delivery.

        ``subscriptionRemoved`` removes the subscription first (later calls on it get 404).
        ``reauthorizationRequired`` flags it until a PATCH or ``/reauthorize``. A subscription
        without a lifecycle URL gets nothing (None), as with Graph."""
        if event not in LIFECYCLE_EVENTS:
            raise ValueError(f"unknown lifecycle event {event!r}; one of {sorted(LIFECYCLE_EVENTS)}")
        self._purge_subscriptions()
        sub = self._subs.get(subscription_id)
        if sub is None:
            raise KeyError(f"no live subscription {subscription_id}")
        if event == "subscriptionRemoved":
            self._remove_subscription(sub.id)
        elif event == "reauthorizationRequired":
            sub.needs_reauthorization = True
        if not sub.lifecycle_url:
            return None
        item = {
            "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": format_datetime(sub.expires_at),
            "tenantId": self.tenant_id,
            "organizationId": self.tenant_id,
            "clientState": sub.client_state,
            "lifecycleEvent": event,
            "resource": sub.resource,
        }
        body: dict[str, Any] = {"value": [item]}
        if sub.include_resource_data:
            body["validationTokens"] = [self._validation_token()]
        task = self._spawn(self._post("lifecycle", sub.id, sub.lifecycle_url, body))
        return await task

    # ---------------------------------------------------------------- fault injection (control API)

    def fail_next(
        self,
        n: int = 1,
        status: int = 429,
        retry_after: float | None = 2,
        paths: Iterable[str] | str | None = None,
        method: str | None = None,
    ) -> None:
        """The next ``n`` API calls (whose path contains one of ``paths``, if given, made with
        ``method``, if given) fail with ``status`` and a Graph error body; 429 and 503 carry
        ``Retry-After: retry_after``."""
        chosen = (paths,) if isinstance(paths, str) else (tuple(paths) if paths is not None else None)
        self._faults.append(_Fault(n, status, retry_after, chosen, method.upper() if method else None))

    def latency(self, seconds: float) -> None:
        """Every API call answers ``seconds`` later (0 to stop)."""
        self._latency = max(0.0, seconds)

    def validation_delay(self, seconds: float) -> None:
        """Graph takes ``seconds`` before sending each validation request of a ``POST /subscriptions``
        (0 to stop): with a lifecycle URL, creation answers 2x that later. Graph allows the endpoint
        10 s per validation, so a real creation may take 20 s; a client that gives up sooner leaves a
        subscription it never heard of, since the creation goes on without it."""
        self._validation_delay = max(0.0, seconds)

    def throttle_for(self, seconds: float, retry_after: float | None = None) -> None:
        """Every presence call answers 429 for ``seconds`` of emulated time, with ``Retry-After``
        (default: the time left, rounded up)."""
        self._throttle_until = self.now() + timedelta(seconds=seconds)
        self._throttle_retry_after = retry_after

    def drop_notifications(self, n: int) -> None:
        """Silently lose the next ``n`` change notifications (items, not batches): the subscription
        stays active and says nothing, as presence subscriptions have been seen to do."""
        self._drop_remaining += n

    def tamper_notifications(self, fn: Callable[[dict[str, Any]], None], n: int = 1) -> None:
        """Let ``fn`` mutate the body of each of the next ``n`` notification batches before they are
        posted (a wrong clientState, a forged validation token, a flipped signature bit...)."""
        self._tamper.extend([fn] * n)

    def clear_faults(self) -> None:
        self._faults.clear()
        self._latency = 0.0
        self._validation_delay = 0.0
        self._throttle_until = None
        self._drop_remaining = 0
        self._tamper.clear()

    # ---------------------------------------------------------------- logs (control API)

    @property
    def notifications_sent(self) -> list[Delivery]:
        """Change-notification POSTs (every attempt), oldest first."""
        return [d for d in self.deliveries if d.kind == "notification"]

    @property
    def lifecycle_sent(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.kind == "lifecycle"]

    @property
    def validations(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.kind == "validation"]

    def calls(self, method: str | None = None, contains: str | None = None) -> list[RequestRecord]:
        """The request log filtered by method and a path fragment (``calls("POST", "setPresence")``)."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and (contains is None or contains in r.path)
        ]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every pending notification, retry and lifecycle post has finished."""
        async with asyncio.timeout(timeout):
            await asyncio.sleep(0)
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---------------------------------------------------------------- presence internals

    @staticmethod
    def _check_state(state: State) -> None:
        availability, activity = state
        if availability not in AVAILABILITIES:
            raise ValueError(f"unknown availability {availability!r}")
        if activity not in ACTIVITIES:
            raise ValueError(f"unknown activity {activity!r}")

    def _user_or_key_error(self, user_id: str) -> _User:
        user = self._users.get(user_id.lower())
        if user is None:
            raise KeyError(f"unknown user {user_id}; add_user() first")
        return user

    def _aggregate(self, user: _User, now: datetime) -> State:
        for sid in [sid for sid, s in user.sessions.items() if s.expires_at <= now]:
            del user.sessions[sid]
        if user.preferred is not None and user.preferred.expires_at <= now:
            user.preferred = None
        # (rank, own client first on ties, most recent change) -> state
        candidates: list[tuple[int, int, int, State]] = []
        if user.own[0] not in NO_SESSION:
            candidates.append((AVAILABILITY_RANK[user.own[0]], 1, user.own_seq, user.own))
        for s in user.sessions.values():
            state = s.effective(now)
            candidates.append((AVAILABILITY_RANK.get(state[0], 0), 0, s.seq, state))
        if not candidates:
            return user.own
        if user.preferred is not None:
            return user.preferred.state
        return max(candidates)[3]

    def _refresh(self, user: _User) -> None:
        """Recompute what Graph shows for ``user``; a change is notified to every covering subscription."""
        now = self.now()
        state = self._aggregate(user, now)
        if state != user.shown:
            user.shown = state
            self._publish(user.id, state)
        self._schedule(user, now)

    def _schedule(self, user: _User, now: datetime) -> None:
        times = [s.next_change(now) for s in user.sessions.values()]
        if user.preferred is not None:
            times.append(user.preferred.expires_at)
        if not times:
            return
        due = min(times)
        if user.scheduled is None or due < user.scheduled:
            user.scheduled = due
            heapq.heappush(self._timeline, (due, next(self._seq), user.id))

    def _set_session(self, user: _User, session_id: str, state: State, duration: timedelta) -> None:
        now = self.now()
        existing = user.sessions.get(session_id)
        if existing is not None and existing.effective(now) == state:
            seq = existing.seq  # a keep-alive: Teams shows nothing new
        else:
            seq = next(self._seq)
        user.sessions[session_id] = _Session(session_id, state, now, now + duration, seq)
        self._refresh(user)

    # ---------------------------------------------------------------- subscriptions internals

    def _info(self, sub: _Subscription) -> SubscriptionInfo:
        return SubscriptionInfo(
            sub.id,
            sub.account,
            sub.resource,
            sub.user_ids,
            sub.expires_at,
            sub.notification_url,
            sub.lifecycle_url,
            sub.client_state,
            sub.include_resource_data,
            sub.certificate_id,
            sub.needs_reauthorization,
        )

    def _purge_subscriptions(self) -> None:
        now = self.now()
        for sub in [s for s in self._subs.values() if s.expires_at <= now]:
            log.info("subscription expired", extra={"fields": {"subscription": sub.id, "account": sub.account}})
            self._remove_subscription(sub.id)

    def _remove_subscription(self, sub_id: str) -> None:
        sub = self._subs.pop(sub_id, None)
        if sub is None:
            return
        for uid in sub.user_ids:
            subs = self._subs_by_user.get(uid)
            if subs is not None:
                subs.discard(sub_id)
                if not subs:
                    del self._subs_by_user[uid]

    def _subscription_json(self, sub: _Subscription, *, listed: bool = False) -> dict[str, Any]:
        """``listed``: as ``GET /subscriptions`` shows it, without ``clientState`` (Graph: "the
        clientState property value is not returned for security purposes")."""
        return {
            "@odata.context": f"{self.url}/$metadata#subscriptions/$entity",
            "id": sub.id,
            "resource": sub.resource,
            "applicationId": self.client_id,
            "changeType": "updated",
            "clientState": None if listed else sub.client_state,
            "notificationUrl": sub.notification_url,
            "notificationQueryOptions": None,
            "lifecycleNotificationUrl": sub.lifecycle_url,
            "expirationDateTime": format_datetime(sub.expires_at),
            "creatorId": sub.creator_id,
            "includeResourceData": sub.include_resource_data,
            "latestSupportedTlsVersion": sub.latest_tls,
            "encryptionCertificate": sub.certificate_b64,
            "encryptionCertificateId": sub.certificate_id,
            "notificationUrlAppId": None,
        }

    def _owned_subscription(self, request: web.Request) -> _Subscription:
        self._purge_subscriptions()
        caller: _Caller = request[_CALLER_KEY]
        sub = self._subs.get(request.match_info["sub_id"])
        if sub is None or not (caller.is_app or caller.account == sub.account):
            raise GraphError(
                404, "ResourceNotFound", f"The object was not found: subscription '{request.match_info['sub_id']}'."
            )
        return sub

    # ---------------------------------------------------------------- notifications internals

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _publish(self, uid: str, state: State) -> None:
        sub_ids = self._subs_by_user.get(uid)
        if not sub_ids:
            return
        now = self.now()
        for sub_id in list(sub_ids):
            sub = self._subs.get(sub_id)
            if sub is None or sub.expires_at <= now:
                continue
            item = self._notification_item(sub, uid, state)
            if self._drop_remaining > 0:
                self._drop_remaining -= 1
                self.notifications_dropped.append(item)
                continue
            if self._client is None:  # not serving: nobody to tell
                continue
            self._pending.setdefault(sub.id, []).append(item)
            if sub.id not in self._workers:
                self._workers[sub.id] = self._spawn(self._deliver(sub.id))

    def _notification_item(self, sub: _Subscription, uid: str, state: State) -> dict[str, Any]:
        resource = f"communications/presences('{uid}')"
        item: dict[str, Any] = {
            "subscriptionId": sub.id,
            "clientState": sub.client_state,
            "changeType": "updated",
            "resource": resource,
            "resourceData": {
                "@odata.type": "#Microsoft.Graph.presence",
                "@odata.id": f"users/{uid}/presence",
                "id": uid,
            },
            "subscriptionExpirationDateTime": format_datetime(sub.expires_at),
            "tenantId": self.tenant_id,
        }
        if sub.include_resource_data and sub.certificate is not None:
            payload = {
                "@odata.type": "#Microsoft.Graph.presence",
                "@odata.id": f"users/{uid}/presence",
                "id": uid,
                "availability": state[0],
                "activity": state[1],
            }
            item["encryptedContent"] = encrypt_for_certificate(
                sub.certificate, payload, certificate_id=sub.certificate_id or ""
            )
        return item

    def _validation_token(self) -> str:
        return sign_validation_token(
            self.signing_key, client_id=self.client_id, tenant_id=self.tenant_id, now=self.token_clock()
        )

    async def _deliver(self, sub_id: str) -> None:
        """One worker per subscription with pending items: batches them, posts in order."""
        try:
            if self.batch_window > 0:
                await asyncio.sleep(self.batch_window)
            while self._pending.get(sub_id):
                queue = self._pending[sub_id]
                items, queue[:] = queue[: self.max_batch], queue[self.max_batch :]
                sub = self._subs.get(sub_id)
                if sub is None or sub.expires_at <= self.now():
                    continue  # removed or expired while queued: Graph sends nothing more
                body: dict[str, Any] = {"value": items}
                if any("encryptedContent" in i for i in items):
                    body["validationTokens"] = [self._validation_token()]
                if self._tamper:
                    self._tamper.pop(0)(body)
                await self._post("notification", sub_id, sub.notification_url, body)
        finally:
            # No await between the emptiness check and this: a publish either sees this worker
            # still registered (and its item is taken by the loop) or sees none and starts one.
            if not self._pending.get(sub_id):
                self._pending.pop(sub_id, None)
            self._workers.pop(sub_id, None)

    async def _post(self, kind: str, sub_id: str, url: str, body: dict[str, Any]) -> Delivery:
        """POST with Graph's patience: ``notification_timeout`` per attempt, a few retries, then drop."""
        assert self._client is not None
        data = json.dumps(body).encode()
        timeout = aiohttp.ClientTimeout(total=self.notification_timeout)
        delivery: Delivery | None = None
        for attempt in range(1, max(1, self.delivery_attempts) + 1):
            started = time.monotonic()
            status: int | None = None
            error: str | None = None
            try:
                async with self._client.post(
                    url,
                    data=data,
                    timeout=timeout,
                    allow_redirects=False,
                    headers={"Content-Type": "application/json; charset=utf-8"},
                ) as resp:
                    await resp.read()
                    status = resp.status
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
            except TimeoutError:
                error = f"no answer within {self.notification_timeout:g} s"
            except aiohttp.ClientError as e:
                error = f"{type(e).__name__}: {e}"
            delivery = Delivery(kind, sub_id, url, body, status, time.monotonic() - started, attempt, error, self.now())
            self.deliveries.append(delivery)
            if error is None:
                return delivery
            log.info(
                "delivery failed", extra={"fields": {"kind": kind, "url": url, "attempt": attempt, "error": error}}
            )
            if attempt < self.delivery_attempts:
                await asyncio.sleep(self.retry_delay * 2 ** (attempt - 1))
        assert delivery is not None
        return delivery

    async def _validate_endpoint(self, url: str) -> None:
        """Graph's handshake: POST ``?validationToken=`` (URL-encoded), expect 200 text/plain echo in 10 s."""
        assert self._client is not None
        if self._validation_delay:
            await asyncio.sleep(self._validation_delay)
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        separator = "&" if "?" in url else "?"
        target = URL(f"{url}{separator}validationToken={urllib.parse.quote(token, safe='')}", encoded=True)
        started = time.monotonic()
        status: int | None = None
        problem: str | None = None
        try:
            async with self._client.post(
                target,
                data=b"",
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.validation_timeout),
                headers={"Content-Type": "text/plain; charset=utf-8"},
            ) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
                if status != 200:
                    problem = (
                        f"Subscription validation request failed. HTTP status code is '{_status_name(status)}'. "
                        "Notification endpoint must respond with 200 OK to validation request."
                    )
                elif resp.content_type != "text/plain":
                    problem = (
                        "Subscription validation request failed. Notification endpoint must respond with "
                        f"content type 'text/plain', not '{resp.content_type}'."
                    )
                elif text != token:
                    problem = (
                        "Subscription validation request failed. Response must exactly match "
                        "validationToken query parameter."
                    )
        except TimeoutError:
            problem = "Subscription validation request timed out."
        except aiohttp.ClientError as e:
            problem = (
                "Subscription validation request failed. Notification endpoint must respond with 200 OK "
                f"to validation request. ({type(e).__name__})"
            )
        self.deliveries.append(
            Delivery(
                "validation",
                None,
                url,
                {"validationToken": token},
                status,
                time.monotonic() - started,
                1,
                problem,
                self.now(),
            )
        )
        if problem:
            raise GraphError(400, "ValidationError", problem)

    # ---------------------------------------------------------------- HTTP plumbing

    def _authenticate(self, request: web.Request) -> _Caller:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header or scheme.lower() != "bearer" or not token:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        is_app = token == self.token
        account = self.subscriber_tokens.get(token)
        if not is_app and account is None:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.")
        return _Caller(token, is_app, account)

    def _inject_fault(self, path: str, method: str) -> None:
        for fault in self._faults:
            if fault.remaining > 0 and fault.matches(path, method):
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                headers = {}
                if fault.retry_after is not None and fault.status in (429, 503):
                    headers["Retry-After"] = str(math.ceil(fault.retry_after))
                code = _ERROR_CODES.get(fault.status, "UnknownError")
                raise GraphError(fault.status, code, f"Injected failure ({fault.status}).", headers)

    def _check_throttle(self) -> None:
        now = self.now()
        if self._throttle_until is not None:
            if now < self._throttle_until:
                left = (self._throttle_until - now).total_seconds()
                retry = self._throttle_retry_after if self._throttle_retry_after is not None else left
                raise GraphError(
                    429,
                    "TooManyRequests",
                    "Too many requests: the application is being throttled.",
                    {"Retry-After": str(max(1, math.ceil(retry)))},
                )
            self._throttle_until = None
        if self.presence_rate_limit is not None:
            limit, window = self.presence_rate_limit
            mono = time.monotonic()
            while self._rate_window and self._rate_window[0] <= mono - window:
                self._rate_window.popleft()
            if len(self._rate_window) >= limit:
                retry = self._rate_window[0] + window - mono
                raise GraphError(
                    429,
                    "TooManyRequests",
                    f"Too many requests: presence is limited to {limit} requests per {window:g} s.",
                    {"Retry-After": str(max(1, math.ceil(retry)))},
                )
            self._rate_window.append(mono)

    def _error_response(self, error: GraphError, request_id: str) -> web.Response:
        body = {
            "error": {
                "code": error.code,
                "message": error.message,
                "innerError": {
                    "date": self.now().strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": request_id,
                    "client-request-id": request_id,
                },
            }
        }
        return web.json_response(body, status=error.status, headers={**error.headers, "request-id": request_id})

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if not request.path.startswith("/v1.0/"):
            response: web.StreamResponse = await handler(request)
            return response
        started = time.monotonic()
        request_id = request.headers.get("client-request-id") or str(uuid.uuid4())
        caller: _Caller | None = None
        body: Any = None
        try:
            if self._latency:
                await asyncio.sleep(self._latency)
            if request.can_read_body:
                raw = await request.read()
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
            caller = self._authenticate(request)
            request[_CALLER_KEY] = caller
            request[_JSON_KEY] = body
            self._inject_fault(request.path, request.method)
            if "/presence" in request.path or request.path.startswith("/v1.0/communications/"):
                self._check_throttle()
            response = await handler(request)
        except GraphError as e:
            response = self._error_response(e, request_id)
        except web.HTTPNotFound:
            segment = request.path.rsplit("/", 1)[-1]
            response = self._error_response(
                GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'."), request_id
            )
        except web.HTTPMethodNotAllowed:
            response = self._error_response(
                GraphError(405, "Request_BadRequest", f"Method {request.method} is not allowed here."), request_id
            )
        except Exception:
            log.exception("graph emulator handler failed")
            response = self._error_response(
                GraphError(500, "InternalServerError", "The emulator failed; see its log."), request_id
            )
        self.requests.append(
            RequestRecord(
                request.method,
                request.path,
                request.query_string,
                response.status,
                self.now(),
                caller.account if caller else None,
                body,
                time.monotonic() - started,
            )
        )
        return response

    @staticmethod
    def _json_body(request: web.Request) -> dict[str, Any]:
        body = request.get(_JSON_KEY)
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        return body

    @staticmethod
    def _require_app(request: web.Request) -> None:
        caller: _Caller = request[_CALLER_KEY]
        if not caller.is_app:
            raise GraphError(
                403,
                "Forbidden",
                "Insufficient privileges to complete the operation: Presence.ReadWrite.All (application) "
                "is required to write another user's presence.",
            )

    def _user_from_path(self, request: web.Request) -> _User:
        user_id = request.match_info["user_id"]
        user = self._users.get(user_id.lower())
        if user is None:
            raise GraphError(404, "NotFound", f"User '{user_id}' was not found.")
        return user

    def _presence_json(self, user: _User, context: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": user.id,
            "availability": user.shown[0],
            "activity": user.shown[1],
            "statusMessage": None,
            "outOfOfficeSettings": {"message": None, "isOutOfOffice": False},
        }
        if context:
            data = {"@odata.context": f"{self.url}/$metadata#users('{user.id}')/presence/$entity", **data}
        return data

    @staticmethod
    def _duration(
        body: Mapping[str, Any], default: timedelta | None, bounds: tuple[timedelta, timedelta] | None
    ) -> timedelta | None:
        raw = body.get("expirationDuration")
        if raw is None:
            return default
        try:
            duration = parse_iso_duration(raw)
        except ValueError as e:
            raise GraphError(400, "BadRequest", f"expirationDuration: {e}") from e
        if bounds is not None and not bounds[0] <= duration <= bounds[1]:
            raise GraphError(
                400, "BadRequest", "expirationDuration must be between PT5M (5 minutes) and PT4H (4 hours)."
            )
        if duration <= timedelta(0):
            raise GraphError(400, "BadRequest", "expirationDuration must be positive.")
        return duration

    @staticmethod
    def _pair(body: Mapping[str, Any], allowed: frozenset[State], api: str) -> State:
        availability, activity = body.get("availability"), body.get("activity")
        if not isinstance(availability, str) or not isinstance(activity, str):
            raise GraphError(400, "BadRequest", "availability and activity are required strings.")
        if (availability, activity) not in allowed:
            pairs = ", ".join(f"{a}/{b}" for a, b in sorted(allowed))
            raise GraphError(
                400,
                "BadRequest",
                f"{api}: '{availability}/{activity}' is not a supported combination; use one of {pairs}.",
            )
        return availability, activity

    # ---------------------------------------------------------------- presence handlers

    async def _h_get_presence(self, request: web.Request) -> web.Response:
        user = self._user_from_path(request)
        self._refresh(user)
        return web.json_response(self._presence_json(user))

    async def _h_get_presences(self, request: web.Request) -> web.Response:
        body = self._json_body(request)
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise GraphError(400, "BadRequest", "ids must be an array of user id strings.")
        if len(ids) > MAX_IDS:
            raise GraphError(
                400, "BadRequest", f"Too many ids: {len(ids)}; getPresencesByUserId accepts at most {MAX_IDS}."
            )
        value = []
        seen: set[str] = set()
        for raw in ids:
            user = self._users.get(raw.lower())
            if user is None or user.id in seen:
                continue
            seen.add(user.id)
            self._refresh(user)
            value.append(self._presence_json(user, context=False))
        return web.json_response(
            {"@odata.context": f"{self.url}/$metadata#Collection(microsoft.graph.presence)", "value": value}
        )

    async def _h_set_presence(self, request: web.Request) -> web.Response:
        self._require_app(request)
        user = self._user_from_path(request)
        body = self._json_body(request)
        session_id = body.get("sessionId")
        if not isinstance(session_id, str) or not session_id.strip():
            raise GraphError(400, "BadRequest", "sessionId is required (the application's client id).")
        state = self._pair(body, SESSION_PAIRS, "setPresence")
        duration = self._duration(body, SESSION_DEFAULT, (SESSION_MIN, SESSION_MAX))
        assert duration is not None
        self._set_session(user, session_id.strip().lower(), state, duration)
        return web.Response(status=200)

    async def _h_clear_presence(self, request: web.Request) -> web.Response:
        self._require_app(request)
        user = self._user_from_path(request)
        body = self._json_body(request)
        session_id = body.get("sessionId")
        if not isinstance(session_id, str) or not session_id.strip():
            raise GraphError(400, "BadRequest", "sessionId is required.")
        user.sessions.pop(session_id.strip().lower(), None)  # idempotent: no session is not an error
        self._refresh(user)
        return web.Response(status=200)

    async def _h_set_preferred(self, request: web.Request) -> web.Response:
        self._require_app(request)
        user = self._user_from_path(request)
        body = self._json_body(request)
        state = self._pair(body, PREFERRED_PAIRS, "setUserPreferredPresence")
        duration = self._duration(body, _preferred_default(state[0]), None)
        assert duration is not None
        user.preferred = _Preferred(state, self.now() + duration)
        self._refresh(user)
        return web.Response(status=200)

    async def _h_clear_preferred(self, request: web.Request) -> web.Response:
        self._require_app(request)
        user = self._user_from_path(request)
        user.preferred = None
        self._refresh(user)
        return web.Response(status=200)

    # ---------------------------------------------------------------- subscription handlers

    def _parse_resource(self, resource: Any) -> frozenset[str]:
        if not isinstance(resource, str) or not resource.strip():
            raise GraphError(400, "InvalidRequest", "resource is required.")
        text = urllib.parse.unquote(resource.strip()).replace("+", " ")
        single = _SINGLE_RESOURCE.match(text)
        if single:
            return frozenset({single.group("id").lower()})
        bulk = _BULK_RESOURCE.match(text)
        if bulk is None:
            raise _extension_error(
                HTTPStatus.BAD_REQUEST,
                "Unsupported resource; use /communications/presences/{id} or "
                "/communications/presences?$filter=id in ('id1','id2',...)",
            )
        ids: list[str] = []
        for part in bulk.group("ids").split(","):
            quoted = _QUOTED_ID.match(part)
            if quoted is None or not (quoted.group("a") or quoted.group("b") or "").strip():
                raise _extension_error(HTTPStatus.BAD_REQUEST, f"Invalid id in $filter: {part.strip()!r}")
            ids.append((quoted.group("a") or quoted.group("b") or "").strip().lower())
        if len(ids) > MAX_IDS:
            raise _extension_error(
                HTTPStatus.BAD_REQUEST, f"The number of ids in the filter ({len(ids)}) exceeds the maximum of {MAX_IDS}"
            )
        return frozenset(ids)

    def _check_url(self, field_name: str, value: Any, required: bool) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise GraphError(400, "InvalidRequest", f"{field_name} is required.")
        try:
            url = URL(value.strip())
        except ValueError as e:
            raise GraphError(400, "InvalidRequest", f"{field_name} is not a URL.") from e
        loopback = url.host in ("127.0.0.1", "localhost", "::1") or (url.host or "").startswith("127.")
        if url.scheme == "https" and url.host:
            return str(value).strip()
        if url.scheme == "http" and loopback and self.allow_http_loopback:
            return str(value).strip()
        raise GraphError(
            400,
            "InvalidRequest",
            f"{field_name} must be an https URL (http is accepted for loopback only by the emulator).",
        )

    def _expiration(self, value: Any, operation: str) -> datetime:
        try:
            expires = _parse_datetime(value)
        except ValueError as e:
            raise GraphError(400, "InvalidRequest", f"expirationDateTime is invalid: {e}") from e
        now = self.now()
        if expires <= now:
            raise _extension_error(
                HTTPStatus.BAD_REQUEST, "Subscription expiration date must be in the future.", operation
            )
        if expires - now > MAX_SUBSCRIPTION_LIFETIME:
            raise GraphError(400, "ExtensionError", "Subscription expiration can only be 60 minutes in the future.")
        return expires

    def _live_subscription_of(self, account: str) -> _Subscription | None:
        self._purge_subscriptions()
        return next((s for s in self._subs.values() if s.account == account), None)

    async def _h_create_subscription(self, request: web.Request) -> web.Response:
        body = self._json_body(request)
        caller: _Caller = request[_CALLER_KEY]
        if body.get("changeType") != "updated":
            raise GraphError(
                400,
                "InvalidRequest",
                f"changeType '{body.get('changeType')}' is not supported for presence; use 'updated'.",
            )
        user_ids = self._parse_resource(body.get("resource"))
        if caller.account is None:
            raise _extension_error(
                HTTPStatus.FORBIDDEN,
                "The request is not authorized for this user or application. "
                "Presence subscriptions need a delegated token (Presence.Read.All); "
                "application permissions are not supported.",
            )
        notification_url = self._check_url("notificationUrl", body.get("notificationUrl"), required=True)
        assert notification_url is not None
        lifecycle_url = self._check_url(
            "lifecycleNotificationUrl", body.get("lifecycleNotificationUrl"), required=False
        )
        expires = self._expiration(body.get("expirationDateTime"), "Create")
        client_state = body.get("clientState")
        if client_state is not None and (not isinstance(client_state, str) or len(client_state) > MAX_CLIENT_STATE):
            raise GraphError(
                400, "InvalidRequest", f"clientState must be a string of at most {MAX_CLIENT_STATE} characters."
            )
        rich = body.get("includeResourceData", False)
        if not isinstance(rich, bool):
            raise GraphError(400, "InvalidRequest", "includeResourceData must be a boolean.")
        certificate: x509.Certificate | None = None
        cert_b64 = cert_id = None
        if rich:
            cert_b64, cert_id = body.get("encryptionCertificate"), body.get("encryptionCertificateId")
            if not isinstance(cert_b64, str) or not cert_b64.strip():
                raise GraphError(
                    400, "InvalidRequest", "encryptionCertificate is required when includeResourceData is true."
                )
            if not isinstance(cert_id, str) or not cert_id.strip():
                raise GraphError(
                    400, "InvalidRequest", "encryptionCertificateId is required when includeResourceData is true."
                )
            try:
                certificate = load_certificate(cert_b64)
            except ValueError as e:
                raise GraphError(400, "InvalidRequest", f"encryptionCertificate is not a certificate: {e}") from e
            if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
                raise GraphError(400, "InvalidRequest", "encryptionCertificate must carry an RSA public key.")
        if self._live_subscription_of(caller.account) is not None:
            raise _conflict()
        # As in Graph, a creation whose client gave up (a timeout, a reset connection) still
        # completes: the subscription exists afterwards and the client never heard of it.
        task = self._spawn(
            self._complete_creation(
                caller.account,
                body,
                user_ids,
                notification_url,
                lifecycle_url,
                expires,
                client_state,
                rich,
                certificate,
                cert_b64,
                cert_id,
            )
        )
        sub = await asyncio.shield(task)
        return web.json_response(self._subscription_json(sub), status=201)

    async def _complete_creation(
        self,
        account: str,
        body: dict[str, Any],
        user_ids: frozenset[str],
        notification_url: str,
        lifecycle_url: str | None,
        expires: datetime,
        client_state: Any,
        rich: bool,
        certificate: x509.Certificate | None,
        cert_b64: Any,
        cert_id: Any,
    ) -> _Subscription:
        """The validation handshakes and the new subscription, whether or not its client still waits."""
        await self._validate_endpoint(notification_url)
        if lifecycle_url:
            await self._validate_endpoint(lifecycle_url)
        if self._live_subscription_of(account) is not None:  # another create won the race meanwhile
            raise _conflict()
        now = self.now()
        sub = _Subscription(
            id=str(uuid.uuid4()),
            account=account,
            creator_id=self._account_ids.setdefault(account, str(uuid.uuid5(uuid.NAMESPACE_URL, account))),
            resource=str(body["resource"]),
            user_ids=user_ids,
            notification_url=notification_url,
            lifecycle_url=lifecycle_url,
            client_state=client_state,
            expires_at=expires,
            created_at=now,
            include_resource_data=rich,
            certificate=certificate,
            certificate_b64=cert_b64 if rich else None,
            certificate_id=cert_id if rich else None,
            latest_tls=str(body.get("latestSupportedTlsVersion") or "v1_2"),
        )
        self._subs[sub.id] = sub
        for uid in user_ids:
            self._subs_by_user.setdefault(uid, set()).add(sub.id)
        log.info(
            "subscription created",
            extra={"fields": {"subscription": sub.id, "account": sub.account, "ids": len(user_ids), "rich": rich}},
        )
        return sub

    async def _h_list_subscriptions(self, request: web.Request) -> web.Response:
        """What Graph lists for the caller: with a delegated token the subscriptions this app made for
        the signed-in user only, with the app's token all of the app's; ``list_page_size`` a page, the
        next page behind ``@odata.nextLink`` (an opaque ``$skiptoken``), ``clientState`` withheld."""
        self._purge_subscriptions()
        caller: _Caller = request[_CALLER_KEY]
        subs = [s for s in self._subs.values() if caller.is_app or s.account == caller.account]
        start = 0
        skip = request.query.get("$skiptoken")
        if skip is not None:
            try:
                start = int(base64.urlsafe_b64decode(skip.encode()).decode())
            except ValueError:
                raise GraphError(400, "BadRequest", "The $skiptoken is invalid.") from None
        page = subs[start : start + self.list_page_size]
        out: dict[str, Any] = {
            "@odata.context": f"{self.url}/$metadata#subscriptions",
            "value": [self._subscription_json(s, listed=True) for s in page],
        }
        if start + self.list_page_size < len(subs):
            token = base64.urlsafe_b64encode(str(start + self.list_page_size).encode()).decode()
            out["@odata.nextLink"] = f"{self.url}/subscriptions?$skiptoken={urllib.parse.quote(token)}"
        return web.json_response(out)

    async def _h_get_subscription(self, request: web.Request) -> web.Response:
        return web.json_response(self._subscription_json(self._owned_subscription(request)))

    async def _h_patch_subscription(self, request: web.Request) -> web.Response:
        sub = self._owned_subscription(request)
        body = self._json_body(request)
        if "expirationDateTime" not in body:
            raise GraphError(400, "InvalidRequest", "expirationDateTime is required to renew a subscription.")
        sub.expires_at = self._expiration(body["expirationDateTime"], "Update")
        sub.needs_reauthorization = False
        return web.json_response(self._subscription_json(sub))

    async def _h_delete_subscription(self, request: web.Request) -> web.Response:
        sub = self._owned_subscription(request)
        self._remove_subscription(sub.id)
        return web.Response(status=204)

    async def _h_reauthorize(self, request: web.Request) -> web.Response:
        sub = self._owned_subscription(request)
        sub.needs_reauthorization = False
        return web.Response(status=204)

    # ---------------------------------------------------------------- identity platform handlers

    async def _h_jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.signing_key.jwks())

    async def _h_openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        return web.json_response(
            {
                "issuer": f"https://sts.windows.net/{tenant}/",
                "jwks_uri": f"{self.base_url}/{tenant}/discovery/v2.0/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )


def _preferred_default(availability: str) -> timedelta:
    """Graph: a preferred presence without expirationDuration lasts 1 day (Busy, DoNotDisturb) or 7 days."""
    return timedelta(days=1) if availability in ("Busy", "DoNotDisturb") else timedelta(days=7)


def _conflict() -> GraphError:
    # Graph's own wording (typos included), so that logs read the same as production ones.
    return _extension_error(
        HTTPStatus.CONFLICT, "A subscripton already exists. It must be deleted before a another can be made"
    )
