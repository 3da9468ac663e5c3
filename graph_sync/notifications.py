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
from graph_sync.coverage import agents_for
from graph_sync.crypto import DecryptionError, Decryptor
from graph_sync.subscriptions import SubscriptionManager
from graph_sync.teams import MAX_IDS
from mapping.api import CoreApi
from mapping.engine import BATCH
from mapping.model import PresenceObserved, System
from mapping.ports import PresenceReader
from mapping.rounds import Rounds

log = logging.getLogger("presence_sync.graph")

GRAPH_CHANGE_TRACKING_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"
"""``azp`` of every genuine validation token: Microsoft Graph's change-tracking application."""
MAX_BODY = 1024 * 1024
PENDING_KIND = "graph.pending_read"
ROUTE = "graph_notifications"
LIFECYCLE_ROUTE = "graph_lifecycle"
INTAKE = "graph_notification"
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


_GUID = re.compile(r"^[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}$")
ENTRA_V2 = "https://login.microsoftonline.com/"


class TokenValidator:
    """Checks Graph's ``validationTokens``: RS256, signed by a key of the JWKS, ``aud`` = our client id,
    ``azp`` (v2) or ``appid`` (v1) = Graph's change-tracking app, inside ``nbf``/``exp`` (with
    ``leeway`` seconds of clock skew), ``iss`` = the identity platform of the token's own ``tid``, and
    ``tid`` = our tenant when ``TENANT_ID`` is a GUID (compared as GUIDs, whatever the case). Tokens already
    verified are remembered until they expire: Graph sends the same token on many batches."""

    def __init__(
        self, jwks: JwksCache, *, client_id: str, tenant_id: str | None = None, leeway: float = 60.0, memory: int = 256
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
        self._verified: dict[str, float] = {}

    async def check(self, token: str) -> None:
        """Returns when the token is valid; raises ``ValueError`` (why) or ``KeysUnavailable``."""
        exp = self._verified.get(token)
        if exp is not None and exp + self.leeway > time.time():
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
            now = time.time()
            self._verified = {t: e for t, e in self._verified.items() if e > now}
            if len(self._verified) >= self.memory:
                self._verified.clear()
        self._verified[token] = float(claims["exp"])


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
        return [m.lower() for m in _FILTER_IDS.findall(resource)]
    match = re.search(r"presences(?:\('([^']+)'\)|/([^/?]+))", resource)
    return [(match.group(1) or match.group(2)).lower()] if match else []


class GraphIntake:
    """The two Graph routes plus the background batcher for basic notifications (see module doc).

    ``ack_budget``: seconds a request may spend observing before the rest of its batch is deferred
    to pending reads (Graph's deadline is 3 s). ``read_interval``: how often the batcher looks for
    pending reads when nothing wakes it."""

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
    ) -> None:
        self.bridge = bridge
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
        self._tasks: set[asyncio.Task[Any]] = set()
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
        for item in body["value"]:
            if not self._client_state_ok(item):
                self.bridge.telemetry.rejected(ROUTE, "client_state")
                log.warning(
                    "notification with a wrong clientState dropped",
                    extra={"fields": {"subscription": item.get("subscriptionId")}},
                )
                continue
            if "lifecycleEvent" in item:  # a subscription without a lifecycle URL gets them here
                to_read.extend(await self._lifecycle_item(item))
                accepted += 1
                continue
            user_id = _user_id(item)
            if user_id is None:
                self.bridge.telemetry.rejected(ROUTE, "malformed_item")
                continue
            accepted += 1
            if "encryptedContent" not in item or time.monotonic() - started > self.ack_budget:
                to_read.append(user_id)  # basic, or past the budget: read it after answering
                continue
            rich = await self._rich_item(item, user_id)
            if rich is False:
                to_read.append(user_id)
            elif isinstance(rich, PresenceObserved):
                observed.append((user_id, rich))
        to_read.extend(await self._observe_within_budget(observed, started))
        await self._queue_reads(to_read, "notification")
        return web.json_response({"accepted": accepted}, status=202)

    async def _observe_within_budget(
        self, observed: Sequence[tuple[str, PresenceObserved]], started: float
    ) -> list[str]:
        """Observes the decrypted items in their order, one transaction per ``BATCH`` (Graph batches
        notifications under load, exactly when a commit per item would eat the budget). Returns the
        users left when the ack budget is spent: they are read after answering instead."""
        for start in range(0, len(observed), BATCH):
            if time.monotonic() - started > self.ack_budget:
                return [user_id for user_id, _ in observed[start:]]
            chunk = [obs for _, obs in observed[start : start + BATCH]]
            await self.bridge.observe_many(chunk, intake=INTAKE)
        return []

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
        agent = await self.bridge.agent_for(System.TEAMS, user_id)
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
        accepted = 0
        to_read: list[str] = []
        for item in body["value"]:
            if not self._client_state_ok(item):
                self.bridge.telemetry.rejected(LIFECYCLE_ROUTE, "client_state")
                continue
            if not isinstance(item.get("lifecycleEvent"), str) or not isinstance(item.get("subscriptionId"), str):
                self.bridge.telemetry.rejected(LIFECYCLE_ROUTE, "malformed_item")
                continue
            to_read.extend(await self._lifecycle_item(item))
            accepted += 1
        await self._queue_reads(to_read, "missed")
        return web.json_response({"accepted": accepted}, status=202)

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
        """Durably notes users to read: one small document per request, whatever its size (one store
        write, not one per user), under a key of its own, so no request overwrites another's note."""
        ids = list(dict.fromkeys(u.lower() for u in user_ids))
        if not ids:
            return
        now = self.bridge.clock()
        key = f"{now.strftime('%Y%m%dT%H%M%S.%f')}-{uuid.uuid4().hex[:12]}"
        await self.bridge.records.put_doc(PENDING_KIND, key, {"ids": ids, "why": why, "at": now.isoformat()})
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
        round). A failed read leaves every note in place to be read again. Returns how many users
        were observed."""
        notes = await self.bridge.records.list_docs(PENDING_KIND)
        if not notes:
            return 0
        wanted: dict[str, datetime | None] = {}
        for note in notes.values():
            noted = _note_time(note)
            for uid in note.get("ids", []):
                if isinstance(uid, str):
                    known_at = wanted.get(uid.lower())
                    wanted[uid.lower()] = noted if known_at is None or (noted and noted > known_at) else known_at
        agents = await agents_for(self.bridge.directory, list(wanted))
        known = {a.entra_object_id.lower() for a in agents}
        for uid in wanted:
            if uid not in known and await self.bridge.agent_for(System.TEAMS, uid) is None:
                self.bridge.telemetry.event(INTAKE, "unknown_agent")  # recorded for `agents list --unknown`
        observed = 0
        entra = {a.dynamics_user_id: a.entra_object_id.lower() for a in agents}
        for start in range(0, len(agents), MAX_IDS):
            results = await self.reader.read(agents[start : start + MAX_IDS])
            for obs in results:  # one short transaction each: acks of new notifications interleave
                # What is read has shown since the (latest) notification that prompted the read.
                obs = dataclasses.replace(obs, since=wanted.get(entra.get(obs.agent_id, "")))
                await self.bridge.observe(obs, intake=INTAKE)
            observed += len(results)
        for key in notes:
            await self.bridge.records.delete_doc(PENDING_KIND, key)
        return observed


def _note_time(note: Mapping[str, Any]) -> datetime | None:
    """When the request behind a pending-read note arrived (the note's ``at``), if it says."""
    try:
        return datetime.fromisoformat(str(note["at"]))
    except (KeyError, ValueError):
        return None


def _user_id(item: Mapping[str, Any]) -> str | None:
    data = item.get("resourceData")
    if isinstance(data, Mapping) and isinstance(data.get("id"), str) and data["id"].strip():
        return str(data["id"]).strip().lower()
    ids = ids_from_resource(item.get("resource"))
    return ids[0] if len(ids) == 1 else None
