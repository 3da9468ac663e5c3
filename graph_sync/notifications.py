"""``POST /api/graph/notifications`` and ``POST /api/graph/lifecycle``: Graph's change notifications in.

Graph wants a 202 within 3 seconds or it delays and then drops notifications, so a request does
only what must be durable before answering (DESIGN rule 7), and nothing that waits on Graph:

- **rich** items (``encryptedContent``): verify the batch's ``validationTokens``, decrypt, resolve
  the Entra id, ``engine.observe`` (its return means the observation and the commands it caused are
  committed), then answer;
- **basic** items (no content): store the request's user ids as one pending-read note (docs kind
  ``graph.pending_read``), answer, and let a background batcher read those users with
  ``getPresencesByUserId`` (up to 650 a call) and observe what Teams shows;
- if a batch is so large that observing it would approach Graph's deadline, what is left goes to
  the pending reads too: answered in time, nothing lost, only read a little later.

Checks, in order: ``validationToken`` handshake (both routes: Graph validates the lifecycle URL too);
body size (413); content type (415) and JSON shape (400, with the reason); ``validationTokens``
(RS256 against the tenant's JWKS, ``aud`` = our client id, ``azp`` = Graph's change-tracking app,
not expired; any failure rejects the whole batch with 400, and a batch with ``encryptedContent``
but no tokens is rejected the same way: nothing of a batch that fails authentication is trusted,
and Graph redelivers what it did send); then per item ``clientState`` (constant-time; a mismatch
drops that item and is counted). Decryption failures drop the content but not the change: the user
is queued for a read instead. Never a 500: when the keys cannot be fetched, or anything unexpected
fails before the batch is safely stored (the store down, a bug), the answer is 503 with a JSON
error, so Graph delivers the batch again instead of it being lost behind a 202.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import jwt
from aiohttp import web

from edge.body import read_json
from edge.intake import Rejected, answer
from edge.poison import PoisonHook, encode_item, hand_off, log_poison
from graph_sync.crypto import DecryptionError, Decryptor
from graph_sync.subscriptions import SubscriptionManager
from graph_sync.teams import MAX_IDS
from mapping.api import CoreApi
from mapping.engine import BATCH, MANY
from mapping.model import Agent, PresenceObserved, System
from mapping.ports import AdapterRecords, PresenceReader
from mapping.rounds import Rounds
from mapping.waiters import reject, resolve

log = logging.getLogger("presence_sync.graph")

GRAPH_CHANGE_TRACKING_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"
"""``azp`` of every genuine validation token: Microsoft Graph's change-tracking application."""
MAX_BODY = 1024 * 1024
PENDING_KIND = "graph.pending_read"
ROUTE = "graph_notifications"
LIFECYCLE_ROUTE = "graph_lifecycle"
PENDING_ROUTE = "graph_pending_reads"
"""The pending-read queue, as a route label for its poison items."""
INTAKE = "graph_notification"
MAX_ID = 128
"""Longest user or subscription id taken in: the store keeps unknown ids in a 128-character column
(Entra object ids and subscription ids are 36-character GUIDs)."""
NOTIFIED_KIND = "graph.notified"
"""Adapter records: when each subscription last delivered a notification (key: subscription id,
doc ``{"at": iso}``), so the console shows a subscription that went silent while still "active"."""
NOTIFIED_EVERY = 60.0
"""Seconds between two writes of one subscription's time (an instance notes it at most this often)."""
PROBE_ID = "00000000-0000-0000-0000-000000000000"
"""Looked up when every lookup of a round failed: if this one works, the ids are to blame, not the store."""
AGENT_TTL = 60.0
"""Seconds an agent found by Entra object id is reused before the directory is asked again (see
``EntraAgents``): as long as the subscription upkeep takes to follow a directory change."""
LIST_AFTER = 32
"""Ids asked about within one ``AGENT_TTL`` after which ``EntraAgents`` lists the directory instead."""
MAX_HELD = 200_000
"""Most agents ``EntraAgents`` holds (four times the largest directory the bridge is sized for)."""
NOTES_PER_WRITE = 256
"""Most pending-read notes written in one transaction (``NoteWriter``)."""
DELETES_AT_ONCE = 8
"""Pending-read notes deleted at once after a round (fewer than a PostgreSQL pool's connections)."""
_FILTER_IDS = re.compile(r"'([^']+)'")


class KeysUnavailable(Exception):
    """The JWKS could not be fetched: tokens cannot be checked now (Graph should retry)."""


class JwksCache:
    """The identity platform's signing keys, fetched over HTTP and cached.

    Keys rotate rarely, so they are kept for ``ttl`` seconds; a token naming an unknown ``kid``
    triggers one refetch (at most every ``refetch_after`` seconds, so a stream of forged kids cannot
    turn the bridge into a JWKS hammer)."""

    def __init__(self, url: str, *, ttl: float = 24 * 3600, refetch_after: float = 60.0) -> None:
        self.url = url
        self.ttl = ttl
        self.refetch_after = refetch_after
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key(self, kid: str) -> Any | None:
        now = time.monotonic()
        if kid in self._keys and now - self._fetched < self.ttl:
            return self._keys[kid]
        async with self._lock:
            now = time.monotonic()
            stale = not self._keys or now - self._fetched >= self.ttl
            if kid not in self._keys and (stale or now - self._fetched >= self.refetch_after):
                await self._fetch()
            elif stale:
                await self._fetch()
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.get(self.url) as resp:
                if resp.status != 200:
                    raise KeysUnavailable(f"JWKS {self.url} answered {resp.status}")
                data = await resp.json(content_type=None)
            keyset = jwt.PyJWKSet.from_dict(data)
        except KeysUnavailable:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as e:
            raise KeysUnavailable(f"JWKS {self.url} unavailable: {type(e).__name__}: {e}") from None
        self._keys = {k.key_id: k.key for k in keyset.keys if k.key_id}
        self._fetched = time.monotonic()


class EntraAgents:
    """The agent each Entra object id belongs to, as the directory last said, for ``ttl`` seconds.

    Why: a rich notification names its user by Entra id, and asking the store costs a connection and
    a query each time (about 1 ms of CPU on SQLite, more than the item's RSA unwrap), while a burst
    notifies the same people again and again. Only agents found are kept: an unknown id is asked, and
    recorded for ``agents list --unknown`` (rule 1), every time, as it may be added any moment.

    A burst of first sightings (a shift starting: everyone's presence changes once) would still ask
    the store per item; so once ``list_after`` ids were asked about within one ``ttl``, the enabled
    agents are listed in one read, in the background (the lookups meanwhile go on one by one), at
    most once per ``ttl``: a listing costs what a few dozen lookups cost (about 6 us per agent).

    Unlike the Dataverse webhook's cache (keyed by the systemuserid, an agent's own key, kept for
    good), an Entra id is an attribute that ``agents import`` or discovery may correct or give to
    another agent, maybe in another process. So an entry lives ``ttl`` seconds from when the
    directory was read, then the directory is asked again: such a change takes effect here within
    ``ttl``, as it reaches the subscriptions within their upkeep interval. Whether the agent is
    enabled is not decided here: the engine reads that in the observation's own transaction."""

    def __init__(
        self,
        bridge: CoreApi,
        *,
        ttl: float = AGENT_TTL,
        list_after: int = LIST_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bridge = bridge
        self.ttl = ttl
        self.list_after = list_after
        self.clock = clock
        self._known: dict[str, tuple[Agent, float]] = {}
        """Entra id (as ``usable_id`` gives it) -> (agent, ``clock()`` when the directory said so)."""
        self._asked = 0
        """Ids asked about since ``_asked_since``."""
        self._asked_since = -math.inf
        self._listed_at = -math.inf
        """When the last listing started (read, or handed in through ``remember``)."""
        self._listing: asyncio.Task[None] | None = None

    async def get(self, entra_id: str) -> Agent | None:
        """``CoreApi.agent_for(System.TEAMS, entra_id)``, from memory when it was asked lately."""
        agent = self.held(entra_id)
        if agent is not None:
            return agent
        self._count_asked()
        agent = await self.bridge.agent_for(System.TEAMS, entra_id)
        if agent is None:
            self._known.pop(entra_id, None)
        else:
            self.remember([agent])
        return agent

    def held(self, entra_id: str) -> Agent | None:
        """The agent the directory gave for ``entra_id`` less than ``ttl`` seconds ago, else None."""
        held = self._known.get(entra_id)
        return held[0] if held is not None and self.clock() - held[1] < self.ttl else None

    def remember(self, agents: Sequence[Agent], *, at: float | None = None, listing: bool = False) -> None:
        """Keeps what the directory said of ``agents`` at ``at`` (default: now): a lookup, or a
        ``listing`` of every enabled agent (which also counts as this period's listing)."""
        now = self.clock() if at is None else at
        if listing:
            self._listed_at = max(self._listed_at, now)
        if len(self._known) + len(agents) > MAX_HELD:  # bounded: what has expired goes first
            cut = self.clock() - self.ttl
            self._known = {k: v for k, v in self._known.items() if v[1] > cut}
            if len(self._known) + len(agents) > MAX_HELD:
                self._known.clear()
        for agent in agents:
            self._known[agent.entra_object_id.lower()] = (agent, now)

    def forget(self) -> None:
        """Drops everything held, as if nothing had been asked yet (the bench's cold runs)."""
        self._known.clear()
        self._asked, self._asked_since, self._listed_at = 0, -math.inf, -math.inf

    async def listed(self) -> None:
        """Waits for a listing under way, if any (tests, the bench)."""
        if self._listing is not None:
            await asyncio.gather(self._listing, return_exceptions=True)

    async def stop(self) -> None:
        if self._listing is not None:
            self._listing.cancel()
            await asyncio.gather(self._listing, return_exceptions=True)
            self._listing = None

    def _count_asked(self) -> None:
        now = self.clock()
        if now - self._asked_since >= self.ttl:
            self._asked, self._asked_since = 0, now
        self._asked += 1
        if (
            self._asked >= self.list_after
            and now - self._listed_at >= self.ttl
            and (self._listing is None or self._listing.done())
        ):
            self._listed_at = now  # one listing per period, even if this one fails
            self._listing = asyncio.create_task(self._list(now), name="graph-directory-listing")

    async def _list(self, started: float) -> None:
        try:
            agents = await self.bridge.directory.list_agents(enabled_only=True)
        except Exception as e:  # the lookups one by one go on: slower, never wrong
            log.warning("directory listing failed; looking agents up one by one", extra={"fields": {"error": str(e)}})
            return
        self.remember(agents, at=started, listing=True)


class NoteWriter:
    """Pending-read notes written by group commit: a note arriving while an earlier group is being
    written waits for that write and goes with the others in the next one, up to ``most`` in one
    ``put_docs`` transaction. Nothing waits for company (a lone note is written at once), and each
    caller returns only once the write holding its note committed; when that write fails, every
    caller of the group gets its error (the route answers 503 and Graph sends the batch again).

    Why: a basic notification's only durable work is its note, one small row; written one by one,
    concurrent requests queue for the store's single writer (SQLite) or pay a transaction's round
    trips each (PostgreSQL), and that write is most of their CPU. Each note keeps its own key and
    shape, so the batcher reads them as before."""

    def __init__(self, records: AdapterRecords, kind: str, *, most: int = NOTES_PER_WRITE) -> None:
        self.records = records
        self.kind = kind
        self.most = most
        self._queue: list[tuple[str, dict[str, Any], asyncio.Future[None]]] = []
        self._writer: asyncio.Future[None] | None = None
        self.writes = 0
        """Transactions written so far (tests, the bench)."""

    @property
    def queued(self) -> int:
        """Notes waiting for the write in progress to finish (tests)."""
        return len(self._queue)

    async def put(self, key: str, doc: dict[str, Any]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((key, doc, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._flush())
        await future

    async def _flush(self) -> None:
        while self._queue:
            group = self._queue[: self.most]
            del self._queue[: self.most]
            try:
                self.writes += 1
                await self.records.put_docs(self.kind, {key: doc for key, doc, _ in group})
            except Exception as e:
                _settle_all(group, e)
                continue
            except BaseException as e:  # cancelled (shutdown): no caller may wait forever
                _settle_all(group + self._queue, e)
                self._queue.clear()
                raise
            _settle_all(group, None)


def _settle_all(group: Sequence[tuple[str, dict[str, Any], asyncio.Future[None]]], error: BaseException | None) -> None:
    """Answers the callers of ``group`` that still wait: done, or ``error`` (cancelled if that is)."""
    for _, _, future in group:
        if error is None:
            resolve(future, None)
        else:
            reject(future, error)


_GUID = re.compile(r"^[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}$")
ENTRA_V2 = "https://login.microsoftonline.com/"


class TokenValidator:
    """Checks Graph's ``validationTokens``: RS256, signed by a key of the JWKS, ``aud`` = our client id,
    ``azp`` (v2) or ``appid`` (v1) = Graph's change-tracking app, inside ``nbf``/``exp`` (with
    ``leeway`` seconds of clock skew), ``iss`` = the identity platform of the token's own ``tid``, and
    ``tid`` = our tenant when ``TENANT_ID`` is a GUID (compared as GUIDs, whatever the case). Tokens already
    verified are remembered, by their exact text, until they expire (``exp`` plus ``leeway``, as the
    check itself allows): Graph sends the same token on many batches, and the text is what the
    signature covers, so any other token (another signature, ``kid`` or claim) is checked in full.
    ``now``: the clock that expiry is measured by (seconds since the epoch)."""

    def __init__(
        self,
        jwks: JwksCache,
        *,
        client_id: str,
        tenant_id: str | None = None,
        leeway: float = 60.0,
        memory: int = 256,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.jwks = jwks
        self.client_id = client_id
        self.tenant_id = tenant_id
        # ``TENANT_ID`` may be a GUID in any case or a domain name; tokens carry the GUID. A domain
        # name cannot be compared without a look-up, so then only the issuer's consistency is checked.
        wanted = (tenant_id or "").strip().lower()
        self.tenant_guid = wanted if _GUID.match(wanted) else None
        self.leeway = leeway
        self.memory = memory
        self.now = now
        self._verified: dict[str, float] = {}

    async def check(self, token: str) -> None:
        """Returns when the token is valid; raises ``ValueError`` (why) or ``KeysUnavailable``."""
        exp = self._verified.get(token)
        if exp is not None and exp + self.leeway > self.now():
            return
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise ValueError(f"not a JWT ({e})") from None
        if header.get("alg") != "RS256":
            raise ValueError(f"algorithm {header.get('alg')!r}, expected RS256")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError("no key id (kid)")
        key = await self.jwks.key(kid)
        if key is None:
            raise ValueError(f"signed with unknown key {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=self.client_id,
                leeway=self.leeway,
                options={"require": ["exp", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise ValueError("expired") from None
        except jwt.InvalidAudienceError:
            raise ValueError("wrong audience") from None
        except jwt.InvalidSignatureError:
            raise ValueError("bad signature") from None
        except jwt.PyJWTError as e:
            raise ValueError(str(e) or type(e).__name__) from None
        azp = claims.get("azp") or claims.get("appid")
        if azp != GRAPH_CHANGE_TRACKING_APP_ID:
            raise ValueError(f"azp {azp!r} is not Microsoft Graph change tracking")
        tid = str(claims.get("tid") or "").lower()
        issuer = str(claims.get("iss") or "")
        if not tid or issuer.rstrip("/").lower() not in {f"https://sts.windows.net/{tid}", f"{ENTRA_V2}{tid}/v2.0"}:
            raise ValueError(f"issuer {issuer!r} is not the Microsoft identity platform of tenant {tid or '?'}")
        if self.tenant_guid is not None and tid != self.tenant_guid:
            raise ValueError("issued for another tenant")
        if len(self._verified) >= self.memory:
            now = self.now()
            self._verified = {t: e for t, e in self._verified.items() if e + self.leeway > now}
            if len(self._verified) >= self.memory:
                self._verified.clear()
        self._verified[token] = float(claims["exp"])


def usable_id(value: Any) -> str | None:
    """``value`` as an id the bridge can look up and store (stripped, lower case), or None: not a
    string, empty, longer than ``MAX_ID``, or holding control characters or invalid Unicode (a lone
    surrogate). Such an id names no user; let in, it fails every round that touches it."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if not text or len(text) > MAX_ID or not text.isprintable():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def _shown(value: Any) -> str:
    """An id for a log line or an error: ASCII-escaped and cut short."""
    return ascii(value[:40] if isinstance(value, str) else value)


def _handshake(request: web.Request) -> web.Response | None:
    token = request.query.get("validationToken")
    if token is None:
        return None
    return web.Response(text=token, content_type="text/plain", headers={"X-Content-Type-Options": "nosniff"})


def ids_from_resource(resource: Any) -> list[str]:
    """User ids named in a presence ``resource`` (single, or the ``$filter=id in (...)`` form)."""
    if not isinstance(resource, str):
        return []
    if "$filter" in resource:
        found = [usable_id(m) for m in _FILTER_IDS.findall(resource)]
        return [u for u in found if u is not None]
    match = re.search(r"presences(?:\('([^']+)'\)|/([^/?]+))", resource)
    one = usable_id(match.group(1) or match.group(2)) if match else None
    return [one] if one is not None else []


class GraphIntake:
    """The two Graph routes plus the background batcher for basic notifications (see module doc).

    ``ack_budget``: seconds a request may spend observing before the rest of its batch is deferred
    to pending reads (Graph's deadline is 3 s). ``read_interval``: how often the batcher looks for
    pending reads when nothing wakes it. ``on_poison``: where items that fail for a reason of their
    own go (``edge.poison``; default: logged and counted), once taken out of their queue."""

    def __init__(
        self,
        bridge: CoreApi,
        *,
        client_state: str,
        client_id: str,
        jwks_url: str,
        decryptor: Decryptor | None,
        reader: PresenceReader,
        subscriptions: SubscriptionManager | None,
        tenant_id: str | None = None,
        max_body: int = MAX_BODY,
        ack_budget: float = 1.5,
        read_interval: float = 2.0,
        on_poison: PoisonHook | None = None,
    ) -> None:
        self.bridge = bridge
        self.on_poison = log_poison(bridge.telemetry) if on_poison is None else on_poison
        self.client_state = client_state.encode()
        self.decryptor = decryptor
        self.reader = reader
        self.subscriptions = subscriptions
        self.max_body = max_body
        self.ack_budget = ack_budget
        self.jwks = JwksCache(jwks_url)
        self.tokens = TokenValidator(self.jwks, client_id=client_id, tenant_id=tenant_id)
        self._batcher = Rounds(
            self.read_pending,
            interval=read_interval,
            retry=bridge.retry,
            what="pending reads",
            name="graph-pending-reads",
        )
        self.agents = EntraAgents(bridge)
        self.notes = NoteWriter(bridge.records, PENDING_KIND)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._notified: dict[str, float] = {}
        """Subscription id -> ``time.monotonic()`` of its last ``NOTIFIED_KIND`` write."""
        bridge.serve_reads(System.TEAMS, self)

    # ------------------------------------------------------------------ lifecycle of the intake

    async def start(self) -> None:
        if not self.client_state:
            log.warning(
                "no Graph clientState configured: every notification will be dropped "
                "(set PRESENCE_SYNC_GRAPH_CLIENT_STATE)"
            )
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()
        await self.agents.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jwks.close()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/graph/notifications", self.notifications),
            web.post("/api/graph/lifecycle", self.lifecycle),
        ]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits for background lifecycle work and pending reads to finish (tests, demo)."""
        async with asyncio.timeout(timeout):
            while True:
                if self._tasks:
                    await asyncio.gather(*list(self._tasks), return_exceptions=True)
                    continue
                if not await self.bridge.records.list_docs(PENDING_KIND):
                    return
                self._batcher.wake()
                await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ routes

    async def notifications(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(ROUTE, request, self._notifications)

    async def lifecycle(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(LIFECYCLE_ROUTE, request, self._lifecycle)

    async def _guarded(
        self, route: str, request: web.Request, handle: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        async def run() -> web.StreamResponse:
            handshake = _handshake(request)
            return handshake if handshake is not None else await handle(request)

        # Nothing acknowledged on failure: the 503 makes Graph deliver again later instead of losing it.
        return await answer(
            route,
            self.bridge.telemetry,
            run,
            unavailable="temporarily unable to store the notification; retry later",
            remote=request.remote,
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        body = await read_json(request, max_body=self.max_body, what="a JSON object with 'value'", type_required=False)
        if not isinstance(body, dict):
            raise Rejected(400, "malformed", "body must be a JSON object with 'value'")
        items = body.get("value")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise Rejected(400, "malformed", "'value' must be an array of notification objects")
        tokens = body.get("validationTokens")
        if tokens is not None and (not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)):
            raise Rejected(400, "malformed", "'validationTokens' must be an array of strings")
        return body

    async def _check_tokens(self, body: Mapping[str, Any]) -> None:
        tokens: list[str] = body.get("validationTokens") or []
        rich = any("encryptedContent" in item for item in body["value"])
        if rich and not tokens:
            raise Rejected(400, "validation_token", "encryptedContent without validationTokens")
        for token in tokens:
            try:
                await self.tokens.check(token)
            except KeysUnavailable as e:
                raise Rejected(503, "keys_unavailable", f"cannot verify validationTokens now: {e}") from None
            except ValueError as e:
                raise Rejected(400, "validation_token", f"validationTokens rejected: {e}") from None

    def _client_state_ok(self, item: Mapping[str, Any]) -> bool:
        """Constant-time ``clientState`` check. Without a configured secret nothing matches: the
        bridge creates no subscription without one, so anything arriving is not ours."""
        given = item.get("clientState")
        if not isinstance(given, str) or not self.client_state:
            return False
        return hmac.compare_digest(given.encode(), self.client_state)

    async def _notifications(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        body = await self._body(request)
        await self._check_tokens(body)
        accepted = 0
        to_read: list[str] = []
        observed: list[tuple[str, PresenceObserved]] = []
        lifecycle: list[Mapping[str, Any]] = []
        rich_ok = 0
        rich_failed: list[tuple[str, Exception]] = []
        for item in body["value"]:
            if not self._client_state_ok(item):
                self.bridge.telemetry.rejected(ROUTE, "client_state")
                log.warning(
                    "notification with a wrong clientState dropped",
                    extra={"fields": {"subscription": _shown(item.get("subscriptionId"))}},
                )
                continue
            self._note_notified(item.get("subscriptionId"))
            if "lifecycleEvent" in item:  # a subscription without a lifecycle URL gets them here
                lifecycle.append(item)
                continue
            user_id = _user_id(item)
            if user_id is None:
                self.bridge.telemetry.rejected(ROUTE, "malformed_item")
                continue
            accepted += 1
            if "encryptedContent" not in item or time.monotonic() - started > self.ack_budget:
                to_read.append(user_id)  # basic, or past the budget: read it after answering
                continue
            try:
                rich = await self._rich_item(item, user_id)
            except Exception as e:
                rich_failed.append((user_id, e))
                continue
            rich_ok += 1
            if rich is False:
                to_read.append(user_id)
            elif isinstance(rich, PresenceObserved):
                observed.append((user_id, rich))
        if rich_failed and not rich_ok:
            raise rich_failed[0][1]  # nothing went through: the store, not the items (503, Graph resends)
        for user_id, error in rich_failed:  # these items only: their users are read instead
            self._item_failed(ROUTE, user_id, error)
            to_read.append(user_id)
        accepted_lifecycle, reads = await self._lifecycle_items(ROUTE, lifecycle)
        accepted += accepted_lifecycle
        to_read.extend(reads)
        to_read.extend(await self._observe_within_budget(observed, started))
        await self._queue_reads(to_read, "notification")
        return web.json_response({"accepted": accepted}, status=202)

    def _item_failed(self, route: str, user_id: str, error: Exception) -> None:
        self.bridge.telemetry.rejected(route, "item_failed")
        log.warning(
            "notification item not applied; reading the user instead",
            extra={"fields": {"user": _shown(user_id), "error": f"{type(error).__name__}: {error}"}},
        )

    async def _observe_within_budget(
        self, observed: Sequence[tuple[str, PresenceObserved]], started: float
    ) -> list[str]:
        """Observes the decrypted items in their order, one transaction per ``MANY`` (Graph batches
        notifications under load, exactly when a commit per item would eat the budget). Returns the
        users left when the ack budget is spent, and those whose observation failed on its own: they
        are read after answering instead."""
        left: list[str] = []
        for start in range(0, len(observed), MANY):
            if time.monotonic() - started > self.ack_budget:
                return left + [user_id for user_id, _ in observed[start:]]
            part = observed[start : start + MANY]
            try:
                await self.bridge.observe_many([obs for _, obs in part], intake=INTAKE)
            except Exception:
                left.extend(await self._observe_each(part))
        return left

    async def _observe_each(self, part: Sequence[tuple[str, PresenceObserved]]) -> list[str]:
        """A chunk whose one transaction failed, observed item by item, so that one bad observation
        does not cost the others; those that fail again are read instead (returned). When every one
        fails it is the store: raised, for a 503."""
        failed: list[tuple[str, Exception]] = []
        for user_id, obs in part:
            try:
                await self.bridge.observe(obs, intake=INTAKE)
            except Exception as e:
                failed.append((user_id, e))
        if failed and len(failed) == len(part):
            raise failed[0][1]
        for user_id, error in failed:
            self._item_failed(ROUTE, user_id, error)
        return [user_id for user_id, _ in failed]

    async def _rich_item(self, item: Mapping[str, Any], user_id: str) -> PresenceObserved | bool:
        """Decrypts one rich item into the observation to apply; True when there is nothing to apply
        (not an agent). False when its content cannot be used: the caller then reads the user from
        Graph instead, so a bad payload costs a read, never the change."""
        if self.decryptor is None:
            self.bridge.telemetry.rejected(ROUTE, "no_decryptor")
            return False
        try:
            resource = self.decryptor.decrypt(item["encryptedContent"])
        except DecryptionError as e:
            self.bridge.telemetry.rejected(ROUTE, "decryption")
            log.warning(
                "rich notification not decrypted; reading the user instead",
                extra={"fields": {"user": user_id, "error": str(e)}},
            )
            return False
        availability, activity = resource.get("availability"), resource.get("activity")
        rid = str(resource.get("id") or user_id).lower()
        if rid != user_id or not isinstance(availability, str) or not availability:
            self.bridge.telemetry.rejected(ROUTE, "malformed_item")
            return False
        agent = await self.agents.get(user_id)
        if agent is None:
            self.bridge.telemetry.event(INTAKE, "unknown_agent")
            return True
        value = f"{availability}/{activity if isinstance(activity, str) and activity else availability}"
        return PresenceObserved(
            agent.dynamics_user_id, System.TEAMS, value, self.bridge.clock(), None, None, "notification"
        )

    # ------------------------------------------------------------------ lifecycle

    async def _lifecycle(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        await self._check_tokens(body)
        items: list[Mapping[str, Any]] = []
        for item in body["value"]:
            if not self._client_state_ok(item):
                self.bridge.telemetry.rejected(LIFECYCLE_ROUTE, "client_state")
                continue
            items.append(item)
        accepted, to_read = await self._lifecycle_items(LIFECYCLE_ROUTE, items)
        await self._queue_reads(to_read, "missed")
        return web.json_response({"accepted": accepted}, status=202)

    async def _lifecycle_items(self, route: str, items: Sequence[Mapping[str, Any]]) -> tuple[int, list[str]]:
        """Each lifecycle item on its own: one that fails is handed to ``on_poison`` and the others go
        on; only when every one failed is it the store's failure, raised for a 503 (Graph resends).
        Returns how many were accepted and the users to read."""
        accepted = 0
        to_read: list[str] = []
        failed: list[tuple[Mapping[str, Any], Exception]] = []
        for item in items:
            if (
                not isinstance(item.get("lifecycleEvent"), str)
                or len(item["lifecycleEvent"]) > 64
                or usable_id(item.get("subscriptionId")) is None
            ):
                self.bridge.telemetry.rejected(route, "malformed_item")
                continue
            try:
                to_read.extend(await self._lifecycle_item(item))
            except Exception as e:
                failed.append((item, e))
                continue
            accepted += 1
        if failed and not accepted:
            raise failed[0][1]
        for item, error in failed:
            await hand_off(
                self.on_poison,
                route,
                "item_failed",
                encode_item(item),
                f"lifecycle event {_shown(item.get('lifecycleEvent'))} for subscription "
                f"{_shown(item.get('subscriptionId'))} failed ({type(error).__name__}: {error}); "
                "the other items were applied",
            )
        return accepted, to_read

    async def _lifecycle_item(self, item: Mapping[str, Any]) -> list[str]:
        """Durable part now, Graph calls after the answer (in a task). Returns the users to read
        (``missed``: everyone the subscription covers)."""
        event, sub_id = str(item.get("lifecycleEvent")), str(item.get("subscriptionId"))
        log.info("graph lifecycle event", extra={"fields": {"event": event, "subscription": sub_id}})
        if event == "missed":
            ids = await self.subscriptions.ids_of(sub_id) if self.subscriptions else []
            return ids or ids_from_resource(item.get("resource"))
        if self.subscriptions is not None and event in ("reauthorizationRequired", "subscriptionRemoved"):
            await self.subscriptions.record_lifecycle(event, sub_id)
            self._spawn(self.subscriptions.on_lifecycle(event, sub_id))
        return []

    def _note_notified(self, subscription_id: Any) -> None:
        """Records, off the answer's path and at most every ``NOTIFIED_EVERY`` seconds per
        subscription, that it delivered: Graph's presence subscriptions have gone silent for days while
        still "active", and a sweep's reads would hide that from anything watching Teams reports."""
        sub = usable_id(subscription_id)
        now = time.monotonic()
        if sub is None or now - self._notified.get(sub, -NOTIFIED_EVERY) < NOTIFIED_EVERY:
            return
        self._notified[sub] = now
        at = self.bridge.clock().isoformat()
        self._spawn(self.bridge.records.put_doc(NOTIFIED_KIND, sub, {"at": at}))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("lifecycle action failed")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ pending reads

    async def _queue_reads(self, user_ids: Sequence[str], why: str) -> None:
        """Durably notes users to read: one small document per request, whatever its size, under a key
        of its own, so no request overwrites another's note; concurrent requests' notes share one
        store write (``NoteWriter``), and this returns once the write holding this one committed."""
        ids = list(dict.fromkeys(u for u in map(usable_id, user_ids) if u is not None))
        if not ids:
            return
        now = self.bridge.clock()
        key = f"{now.strftime('%Y%m%dT%H%M%S.%f')}-{uuid.uuid4().hex[:12]}"
        await self.notes.put(key, {"ids": ids, "why": why, "at": now.isoformat()})
        self._batcher.wake()

    async def request_read(self, system: System, agent_id: str, why: str) -> None:
        """``ReadRequests``: the core wants an agent's present Teams state (its session write landed
        over what Teams showed, and Graph notifies nothing when the aggregate does not change)."""
        if system is not System.TEAMS:
            return
        agent = await self.bridge.directory.get_agent(agent_id)
        if agent is not None and agent.entra_object_id:
            await self._queue_reads([agent.entra_object_id], why)

    async def read_pending(self) -> int:
        """One batcher round: reads every user noted so far (650 per Graph call), observes what Teams
        shows, then removes exactly the notes it covered (notes written meanwhile stay for the next
        round). A failed read (Graph) or a store that is down leaves every note in place to be read
        again. An item that fails for a reason of its own (a malformed note, an id no lookup can
        take, an observation that fails while others succeed) is handed to ``on_poison`` and the
        rest go on: one bad item never stops the queue. Returns how many users were observed."""
        notes = await self.bridge.records.list_docs(PENDING_KIND)
        if not notes:
            return 0
        wanted: dict[str, datetime | None] = {}
        holder: dict[str, str] = {}  # user id -> the (first) note naming it, for poison reports
        for key, note in notes.items():
            ids = note.get("ids") if isinstance(note, Mapping) else None
            if not isinstance(ids, list):
                await self._poison_note(key, note, "malformed_note", f"pending-read note {key} holds no list of ids")
                continue
            bad = [uid for uid in ids if usable_id(uid) is None]
            if bad:
                await self._poison_note(
                    key,
                    note,
                    "bad_id",
                    f"pending-read note {key}: {len(bad)} unusable user id(s), e.g. {_shown(bad[0])} "
                    f"(not printable text of at most {MAX_ID} characters); the other ids are read",
                )
            noted = _note_time(note)
            for uid in filter(None, map(usable_id, ids)):
                holder.setdefault(uid, key)
                known_at = wanted.get(uid)
                wanted[uid] = noted if known_at is None or (noted and noted > known_at) else known_at
        agents = await self._agents_for(list(wanted), holder, notes)
        observed = 0
        entra = {a.dynamics_user_id: a.entra_object_id.lower() for a in agents}
        for start in range(0, len(agents), MAX_IDS):
            results = await self.reader.read(agents[start : start + MAX_IDS])  # Graph down: raised, all kept
            # What is read has shown since the (latest) notification that prompted the read.
            results = [dataclasses.replace(o, since=wanted.get(entra.get(o.agent_id, ""))) for o in results]
            failed: list[tuple[PresenceObserved, Exception]] = []
            for first in range(0, len(results), BATCH):
                # A slice at a time, all at once: the engine's group commit writes it in one short
                # transaction (acks of new notifications interleave between slices), and each
                # observation still gets its own outcome or its own error.
                part = results[first : first + BATCH]
                outcomes = await asyncio.gather(
                    *(self.bridge.observe(obs, intake=INTAKE) for obs in part), return_exceptions=True
                )
                for obs, outcome in zip(part, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        failed.append((obs, outcome))
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        observed += 1
            if failed and not observed:
                raise failed[0][1]  # nothing went through: the store, not the items
            for obs, error in failed:
                uid = entra.get(obs.agent_id, "")
                await self._poison_note(
                    holder.get(uid, "?"),
                    notes.get(holder.get(uid, "")),
                    "observe_failed",
                    f"what Teams shows for user {_shown(uid)} could not be applied ({type(error).__name__}: {error})",
                )
        await self._delete_notes(list(notes))
        return observed

    async def _delete_notes(self, keys: Sequence[str]) -> None:
        """Deletes the notes a round covered, a slice at a time, all of a slice at once: the store
        then commits them together (SQLite's group commit) instead of one transaction each, which
        cost a round more than its reads. A note not deleted (an error, raised after the slice) is
        read again next round: a second read, never a lost one."""
        for start in range(0, len(keys), DELETES_AT_ONCE):
            done = await asyncio.gather(
                *(self.bridge.records.delete_doc(PENDING_KIND, key) for key in keys[start : start + DELETES_AT_ONCE]),
                return_exceptions=True,
            )
            for result in done:
                if isinstance(result, BaseException):
                    raise result

    async def _agents_for(self, ids: Sequence[str], holder: Mapping[str, str], notes: Mapping[str, Any]) -> list[Agent]:
        """The enabled agents of ``ids``, in their order: those ``EntraAgents`` saw enabled lately from
        memory, the others each looked up on its own (one directory listing for many). A lookup
        failing for one id is that id's poison, unless every lookup failed and a probe of the store
        fails too (the store is down: raised, every note kept)."""
        directory = self.bridge.directory
        known: dict[str, Agent] = {}
        asked: list[str] = []
        for uid in ids:  # a disabled agent is asked again: it may be enabled by now
            agent = self.agents.held(uid)
            if agent is not None and agent.enabled:
                known[uid] = agent
            else:
                asked.append(uid)
        listed: dict[str, Agent] | None = None
        if len(asked) > 50:
            read_at = self.agents.clock()
            everyone = await directory.list_agents(enabled_only=True)
            self.agents.remember(everyone, at=read_at, listing=True)
            listed = {a.entra_object_id.lower(): a for a in everyone}
        failed: dict[str, Exception] = {}
        for uid in asked:
            try:
                agent = listed.get(uid) if listed is not None else await directory.get_agent_by_entra(uid)
                if agent is not None and agent.enabled:
                    known[uid] = agent
                    if listed is None:
                        self.agents.remember([agent])
                elif await self.bridge.agent_for(System.TEAMS, uid) is None:
                    self.bridge.telemetry.event(INTAKE, "unknown_agent")  # recorded for `agents list --unknown`
            except Exception as e:
                failed[uid] = e
        if failed and len(failed) == len(asked):
            try:
                await directory.get_agent_by_entra(PROBE_ID)
            except Exception:
                raise next(iter(failed.values())) from None
        for uid, error in failed.items():
            await self._poison_note(
                holder.get(uid, "?"),
                notes.get(holder.get(uid, "")),
                "lookup_failed",
                f"user id {_shown(uid)} could not be looked up ({type(error).__name__}: {error}); "
                "the other ids are read",
            )
        return [known[uid] for uid in ids if uid in known]

    async def _poison_note(self, key: str, note: Any, reason: str, detail: str) -> None:
        await hand_off(self.on_poison, PENDING_ROUTE, reason, encode_item({"key": key, "note": note}), detail)


def _note_time(note: Mapping[str, Any]) -> datetime | None:
    """When the request behind a pending-read note arrived (the note's ``at``), if it says."""
    try:
        return datetime.fromisoformat(str(note["at"]))
    except (KeyError, ValueError):
        return None


def _user_id(item: Mapping[str, Any]) -> str | None:
    data = item.get("resourceData")
    if isinstance(data, Mapping) and data.get("id") is not None:
        return usable_id(data.get("id"))
    ids = ids_from_resource(item.get("resource"))
    return ids[0] if len(ids) == 1 else None
