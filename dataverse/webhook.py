"""``POST /api/dataverse/webhook``: ``msdyn_agentstatus`` Create and Update steps in.

The step is registered **synchronous**: the agent's own presence change in Dynamics 365 waits for this
answer, and a non-2xx answer fails (rolls back) that change. So a request does only what must be
durable and nothing that waits on another system:

- **Update** with a presence: resolve the agent, ``engine.observe`` (its return means the observation
  and the outbox commands it caused are committed), answer 200.
- **Create** (a new agent): a known agent's presence is observed as above. An unknown one is noted
  durably (store doc kind ``dataverse.pending_agent``, key = systemuserid) and answered 202 at once; a
  background task then reads the ``systemuser`` (its ``azureactivedirectoryobjectid``) through the
  client with ``bridge.retry``, adds the agent and observes its presence. Notes left by a stopped
  process are processed by the next ``start()``. An Update for an agent still pending refreshes its
  note, so the presence recorded once the agent is added is the latest one.
- A body the bridge cannot use, with the right key (not JSON, invalid JSON, nested too deeply, not a
  context, a message, shape or date it does not know, no agent): answered **202** ``quarantined``
  with the item's id and reason, and kept in the bounded quarantine (``CoreApi.quarantine``,
  ``presence-sync quarantine list|show|drop``). Nothing else is to be done for it: the periodic
  reconcile reads Dataverse, so the presence it may have carried is picked up by the sweep.
  401 (key) and 413 (over ``max_body``) stay refusals: they are not "the right key, up to 1 MiB".
- The store not committing within ``commit_timeout`` (about a second: an exclusive lock on the
  SQLite file, PostgreSQL failing over), or failing: the authenticated body is appended to the local
  spool (``edge.spool``, ``fsync``'d) and answered **202** ``spooled``; a background replayer hands
  it back through the same path, in order, with its original arrival time, once the store answers.
  While the spool holds records, new requests go behind them (so an agent's changes keep their
  order). Only when the spool cannot be written either is the answer 503 (Dataverse retries once).
  An unknown or disabled agent: 202 (counted, logged with the systemuserid). Never a 500.

Ordering versions (rule 4): the core gets ``RowVersion`` when the context has one and ``None``
otherwise, *not* the contract's fallback to ``msdyn_presencemodifiedon`` in epoch ms: a Create carries
no ``RowVersion`` (see the seed payload), and a timestamp (~1.7e12) handed in as its version would
make every later Update (``RowVersion`` ~6e6) look stale forever. With ``None`` the core orders that
one event by ``observed_at`` (the arrival time; webhooks of a synchronous step arrive in commit order).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from dataverse.agent_lookup import AgentStatusLookup
from dataverse.client import DataverseClient
from dataverse.context import AgentStatusChange, ContextError, Message, parse_context
from edge.body import JSON_TYPES, JsonError, is_json_type, parse_json, read_body, shown_type
from edge.intake import Rejected, answer
from edge.poison import PoisonHook, encode_item, hand_off, log_poison
from edge.spool import Spool, SpoolRecord, SpoolUnavailable
from edge.upstream import is_loopback
from mapping.api import CoreApi
from mapping.errors import RetryableError, UpstreamError
from mapping.model import Agent, PresenceObserved, System
from mapping.redact import redact
from mapping.retry import RetryPolicy
from mapping.rounds import Rounds
from mapping.rules import Result

log = logging.getLogger("presence_sync.dataverse")

ROUTE = "dataverse_webhook"
INTAKE = "dataverse_webhook"
PATH = "/api/dataverse/webhook"
PENDING_KIND = "dataverse.pending_agent"
PENDING_ROUTE = "dataverse_pending_agents"
"""The queue's name where a poison note is handed off (a fixed metric label)."""
KEY_HEADER = "x-presence-sync-key"
KEY_SETTING = "PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY"
MAX_BODY = 1024 * 1024
COMMIT_TIMEOUT = 1.0
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
WHAT = "a RemoteExecutionContext JSON object"

QUARANTINE_REASONS = (
    "not_json",  # content type not JSON, or an empty body
    "invalid_json",  # does not parse (or is not UTF-8, or holds an unpaired surrogate)
    "too_deep",  # nested past the JSON parser or past MAX_NESTING ParentContexts
    "not_context",  # JSON, but not a RemoteExecutionContext object
    "unknown_message",  # a message or entity this route does not handle
    "bad_date",  # a date that is not a WCF /Date(ms)/
    "no_agent",  # a presence change or Create whose agent cannot be known
    "unknown_shape",  # any other field of the wrong shape or type
    "replay_failed",  # a spooled change the store kept refusing while it took other writes
)
"""The quarantine reasons of this route: a fixed set (metric labels), never caller text."""
SWEEP = "left to the sweep: the periodic reconcile reads Dataverse, so nothing else is to be done"
REPLAY_BACKOFF = RetryPolicy(base_seconds=0.2, max_delay_seconds=2.0)
"""The replayer tries again soon: a store that answers again should get its spool back within
seconds (each try waits on the store itself, up to its own busy/connect timeout)."""
STOP_GRACE = 2.0
"""Seconds ``stop`` lets store work of spooled requests finish (the spool has those changes anyway)."""
POISON_AFTER = 3
"""A spooled record whose replay failed this many times in a row is quarantined, if the store takes
that write: then the store works and the record is what fails, and it must not hold up the rest."""
_JSON_REASONS = {"empty": "not_json", "invalid": "invalid_json", "too_deep": "too_deep", "bad_unicode": "invalid_json"}


def quarantine_reason(error: ContextError) -> str:
    """The fixed reason for a parser refusal (its words stay in the detail)."""
    text = error.reason
    if "nested deeper" in text:
        return "too_deep"
    if "a date like" in text or "valid UTC offset" in text or "out of range" in text:
        return "bad_date"
    if "no msdyn_agentid" in text:
        return "no_agent"
    if "is not handled" in text or "this route handles" in text:
        return "unknown_message"
    if text.startswith("body is ") or text.startswith("MessageName: "):
        return "not_context"
    return "unknown_shape"


def _json_type(content_type: str) -> bool:
    return content_type in JSON_TYPES or content_type.endswith("+json")


class DataverseIntake:
    """The webhook route and the background worker for new agents (see the module docstring).

    ``webhook_key``: the shared secret (``?code=`` or header ``x-presence-sync-key``); empty means
    loopback callers only. ``client``: for reading new agents' systemusers; ``None`` (Dataverse not
    configured) leaves new agents unknown, reported. ``poll_interval``: how often pending agents are
    looked at when nothing wakes the worker. ``on_agent_added``: called after a Create added an agent
    (the runtime points it at the subscription upkeep). ``spool``: where a change goes when the store
    does not commit within ``commit_timeout`` seconds (``None``: no spool, such a request waits for
    the store and a failure answers 503)."""

    def __init__(
        self,
        bridge: CoreApi,
        *,
        webhook_key: str,
        client: DataverseClient | None,
        max_body: int = MAX_BODY,
        poll_interval: float = 30.0,
        on_agent_added: Callable[[], None] | None = None,
        lookup: AgentStatusLookup | None = None,
        spool: Spool | None = None,
        on_poison: PoisonHook | None = None,
        commit_timeout: float = COMMIT_TIMEOUT,
    ) -> None:
        self.bridge = bridge
        self.lookup = lookup  # the agent of an Update whose context does not carry it (agent_lookup)
        self.on_poison = log_poison(bridge.telemetry) if on_poison is None else on_poison
        self.spool = spool
        self.commit_timeout = commit_timeout
        self.on_agent_added = on_agent_added
        self.key = webhook_key.encode()
        self.client = client
        self.max_body = max_body
        self._worker = Rounds(
            self.process_pending,
            interval=poll_interval,
            retry=bridge.retry,
            what="pending agents",
            name="dataverse-pending-agents",
        )
        self._busy = False
        self._replayer = Rounds(
            self.replay_spool,
            interval=5.0,
            retry=REPLAY_BACKOFF,
            what="spool replay",
            name="dataverse-spool-replay",
        )
        self._attempts: set[asyncio.Task[Any]] = set()
        self._replay_failures = 0
        self._store_suspect_until = 0.0
        """``time.monotonic()`` until which the store counts as not answering (``_suspect_store``)."""
        self._known_agents: dict[str, Agent] = {}

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Starts the pending-agent worker and the spool replayer; notes and spooled changes left by
        an earlier process are processed at once (new requests meanwhile go to the store: rule 4
        orders them)."""
        if not self.key:
            log.warning(f"{KEY_SETTING} is not set: the Dataverse webhook accepts loopback callers only")
        if self.spool is not None:
            try:
                self.spool.open()
            except SpoolUnavailable as e:
                log.error(
                    "webhook spool unavailable: a store outage would be answered 503",
                    extra={"fields": {"detail": e.reason}},
                )
            self._replayer.start(at_once=True)
        self._worker.start(at_once=True)

    async def stop(self) -> None:
        await self._worker.stop()
        await self._replayer.stop()
        if self._attempts:  # store work of spooled requests still under way: let it end, bounded
            _, late = await asyncio.wait(self._attempts, timeout=STOP_GRACE)
            for task in late:
                task.cancel()
        if self.spool is not None:
            await self.spool.close()

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATH, self.handle)]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until no new agent is pending and the spool is replayed (tests, demo)."""
        async with asyncio.timeout(timeout):
            while (
                self._busy
                or (self.spool is not None and self.spool.records)
                or await self.bridge.records.list_docs(PENDING_KIND)
            ):
                self._worker.wake()
                self._replayer.wake()
                await asyncio.sleep(0.02)

    # ------------------------------------------------------------------------------------ the route

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await answer(
            ROUTE,
            self.bridge.telemetry,
            lambda: self._handle(request),
            unavailable="temporarily unable to record the change; nothing was acknowledged, send it again",
            remote=request.remote,
        )

    async def _handle(self, request: web.Request) -> web.Response:
        self._authorize(request)
        received = self.bridge.clock()
        raw = await read_body(request, max_body=self.max_body)
        ctype = request.content_type if is_json_type(request) else shown_type(request)
        if self.spool is None:
            status, payload = await self._process(raw, ctype, received)
            return web.json_response(payload, status=status)
        if self.spool.records and time.monotonic() < self._store_suspect_until:
            return await self._spool(raw, ctype, received, "the store did not answer the last request in time")
        try:
            status, payload = await self._attempt(self._process(raw, ctype, received))
        except TimeoutError:
            self._suspect_store()
            return await self._spool(raw, ctype, received, f"the store did not commit within {self.commit_timeout:g} s")
        except Exception as e:  # the store failing (a failover, the disk): the spool keeps the change
            self._suspect_store()
            return await self._spool(raw, ctype, received, redact(f"the store failed: {type(e).__name__}: {e}"))
        self._store_suspect_until = 0.0
        return web.json_response(payload, status=status)

    def _suspect_store(self) -> None:
        """For one commit timeout after the store failed a request, the next ones go straight to the
        spool (each answered in milliseconds, not after another timeout); after that a request tries
        the store again even while older changes wait in the spool. Safe in any order: rule 4 orders
        by RowVersion (or, without one, by the arrival time the spool keeps), so a spooled change
        replayed after a newer live one is stale and changes nothing. Going behind the spool for good
        instead would keep every change behind a sequential replay that may never catch up with the
        arrivals (seen under load: 498 of 500 webhooks spooled after one slow commit)."""
        self._store_suspect_until = time.monotonic() + self.commit_timeout

    async def _attempt(self, work: Awaitable[tuple[int, dict[str, Any]]]) -> tuple[int, dict[str, Any]]:
        """``work`` (everything this request does with the store: agent lookup, observe, pending-agent
        note, quarantine) within ``commit_timeout``; ``TimeoutError`` when it takes longer.

        Why a late commit is safe: the work runs as a task of its own behind ``asyncio.shield``, so the
        timeout never cancels it half-way inside a driver (no connection left in an unknown state); it
        goes on and may still commit after the request was spooled and answered. The spooled copy is
        then replayed too, with the same arrival time and ``RowVersion``: rule 4 takes an equal version
        (or, without one, the same time and value) as a duplicate and an older one as stale, so the
        second arrival changes nothing and enqueues nothing. At worst a body that was quarantined is
        kept twice. Tasks still running at ``stop`` get a bounded wait."""
        task = asyncio.ensure_future(work)
        self._attempts.add(task)
        task.add_done_callback(self._attempt_done)
        # What ``asyncio.wait_for(asyncio.shield(task), timeout)`` does, with one future and one timer
        # instead of their extra futures and callbacks: this runs on every webhook, and they cost 2.5%
        # of its instructions (36,000 of 1.43 million, callgrind, store and engine included).
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = loop.call_later(self.commit_timeout, wake)
        task.add_done_callback(wake)
        try:
            await waiter  # cancelling this request leaves the task running, as shield does
        finally:
            timer.cancel()
            task.remove_done_callback(wake)
        if not task.done():
            raise TimeoutError
        return task.result()

    def _attempt_done(self, task: asyncio.Task[Any]) -> None:
        self._attempts.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("store work of a webhook failed", extra={"fields": {"error": repr(task.exception())}})

    async def _spool(self, raw: bytes, ctype: str, received: datetime, why: str) -> web.Response:
        assert self.spool is not None
        try:
            await self.spool.append(SpoolRecord(ROUTE, received, ctype, raw))
        except SpoolUnavailable as e:
            log.error(
                "webhook change not recorded: the store is not answering and the spool cannot be written",
                extra={"fields": {"why": why, "spool": e.reason}},
            )
            raise Rejected(
                503,
                "unavailable",
                "temporarily unable to record the change (the store is not answering and the spool cannot "
                "be written); nothing was acknowledged, send it again",
            ) from None
        self._replayer.wake()
        self.bridge.telemetry.event(INTAKE, "spooled")
        log.warning(
            "webhook change spooled; replayed in order once the store answers",
            extra={"fields": {"why": why, "records": self.spool.records}},
        )
        return web.json_response(
            {"status": "spooled", "detail": f"{why}: kept in the local spool, replayed in order once it answers"},
            status=202,
        )

    async def _process(self, raw: bytes, ctype: str, received: datetime) -> tuple[int, dict[str, Any]]:
        """One authenticated body, live or replayed from the spool: quarantined when unusable, else
        accepted. Raises only when the store fails."""
        if not _json_type(ctype):
            detail = f"content type {ctype!r}; expected application/json"
            return await self._quarantine("not_json", raw, detail, received)
        try:
            body = parse_json(raw, what=WHAT)
        except JsonError as e:
            return await self._quarantine(_JSON_REASONS[e.kind], raw, e.message, received)
        try:
            change = parse_context(body)
        except ContextError as e:
            detail = f"not a usable msdyn_agentstatus context: {e.reason}"
            return await self._quarantine(quarantine_reason(e), raw, detail, received)
        return await self._accept(change, received, raw)

    async def _quarantine(self, reason: str, raw: bytes, detail: str, at: datetime) -> tuple[int, dict[str, Any]]:
        # The store scrubs too, but cannot know a key shorter than the scrubber's minimum; masked at
        # its own length, so the size kept is the size received.
        body = raw.replace(self.key, b"*" * len(self.key)) if self.key else raw
        detail = redact(detail)
        item_id = await self.bridge.quarantine.quarantine(ROUTE, reason, body, detail, at)
        self.bridge.telemetry.quarantined(ROUTE, reason)
        log.warning(
            "webhook body quarantined: " + SWEEP,
            extra={"fields": {"id": item_id, "reason": reason, "detail": detail, "size": len(raw)}},
        )
        return 202, {"status": "quarantined", "id": item_id, "reason": reason, "detail": detail, "next": SWEEP}

    def _authorize(self, request: web.Request) -> None:
        if not self.key:
            if is_loopback(request.remote) and not any(h in request.headers for h in _PROXY_HEADERS):
                return
            raise Rejected(
                401,
                "unauthenticated",
                f"{KEY_SETTING} is not set: webhooks are accepted from loopback only until it is",
            )
        given = [v for v in (request.query.get("code"), request.headers.get(KEY_HEADER)) if v]
        if not given:
            raise Rejected(401, "unauthenticated", f"missing webhook key: send ?code=<key> or header {KEY_HEADER}")
        if not any(hmac.compare_digest(v.encode(), self.key) for v in given):
            raise Rejected(401, "unauthenticated", "wrong webhook key")

    # ------------------------------------------------------------------------------------ processing

    async def _accept(self, change: AgentStatusChange, now: datetime, raw: bytes) -> tuple[int, dict[str, Any]]:
        """``now``: when the request arrived (a spooled one keeps its original arrival time); ``raw``:
        the body, kept in the quarantine when the change cannot be used."""
        if change.message is Message.UPDATE and not change.is_presence_change:
            self.bridge.telemetry.event(INTAKE, "not_presence_change")
            return 200, {"status": "ignored", "reason": change.ignored_reason}
        agent_id = change.agent_id
        if agent_id is None:  # a partial Target and no post-image: by the row's id
            agent_id = None if self.lookup is None else await self.lookup.agent_of(change.agent_status_id)
            if agent_id is None:  # 2xx all the same: a non-2xx would fail the agent's own change
                self.bridge.telemetry.event(INTAKE, "agent_unresolved")
                detail = (
                    f"the context names no msdyn_agentid and msdyn_agentstatus {change.agent_status_id} could "
                    "not be looked up now. Run `presence-sync dataverse register-webhook` so the Update step "
                    "carries the post-image with msdyn_agentid"
                )
                return await self._quarantine("no_agent", raw, detail, now)
            change = dataclasses.replace(change, agent_id=agent_id)
        elif self.lookup is not None:
            await self.lookup.remember(change.agent_status_id, agent_id)
        agent = await self._directory_entry(agent_id)
        if agent is None:
            return await self._unknown(change, now)
        if not change.is_presence_change:
            return 200, {"status": "known_agent", "reason": change.ignored_reason}
        return await self._observe(
            agent, change.presence_id or "", change.row_version, change.presence_modified_by, now
        )

    async def _directory_entry(self, agent_id: str) -> Agent | None:
        """The agent as the directory had it when first seen here. An agent is never removed from the
        directory (only disabled, which the engine reads in its own transaction), so a known one is
        kept in memory and each later change of that agent saves a store round trip; an unknown one
        is asked again every time (it may be added any moment)."""
        key = agent_id.strip().lower()
        agent = self._known_agents.get(key)
        if agent is None:
            agent = await self.bridge.directory.get_agent(key)
            if agent is not None:
                self._known_agents[key] = agent
        return agent

    async def _observe(
        self, agent: Agent, presence_id: str, version: int | None, modified_by: str | None, at: datetime
    ) -> tuple[int, dict[str, Any]]:
        event = PresenceObserved(
            agent.dynamics_user_id, System.DYNAMICS, presence_id, at, version, modified_by, "webhook"
        )
        outcome = await self.bridge.observe(event, intake=INTAKE)
        if outcome.result is Result.UNKNOWN_AGENT:
            log.warning(
                "dataverse webhook for a disabled agent",
                extra={"fields": {"systemuser": agent.dynamics_user_id, "detail": outcome.detail}},
            )
            return 202, {"status": "unknown_agent", "detail": outcome.detail}
        return 200, {"status": "recorded", "result": str(outcome.result), "commands": len(outcome.commands)}

    async def _unknown(self, change: AgentStatusChange, now: datetime) -> tuple[int, dict[str, Any]]:
        agent_id = change.agent_id or ""
        pending = await self.bridge.records.get_doc(PENDING_KIND, agent_id)
        if pending is not None or (change.message is Message.CREATE and self.client is not None):
            await self.bridge.records.put_doc(PENDING_KIND, agent_id, _note(pending, change, now))
            self._worker.wake()
            self.bridge.telemetry.event(INTAKE, "pending_agent")
            log.info(
                "new agent noted; its Entra object id is looked up in the background",
                extra={"fields": {"systemuser": agent_id, "message": str(change.message)}},
            )
            return 202, {"status": "pending_agent", "agent": agent_id}
        await self.bridge.agent_for(System.DYNAMICS, agent_id)  # recorded for `agents list --unknown`
        self.bridge.telemetry.event(INTAKE, "unknown_agent")
        why = "not in the agent directory"
        if change.message is Message.CREATE:
            why += " (Dataverse is not configured, so the new agent's Entra object id cannot be looked up)"
        log.warning(
            "dataverse webhook for an unknown agent",
            extra={"fields": {"systemuser": agent_id, "message": str(change.message), "detail": why}},
        )
        return 202, {"status": "unknown_agent", "agent": agent_id, "detail": why}

    # ------------------------------------------------------------------------------------ the spool

    async def replay_spool(self) -> int:
        """One round of the replayer: the spooled changes, oldest first, through the same path as a
        live request (no timeout: this is the background, and it waits on the store itself). Stops at
        the first the store does not take, for the next round (``REPLAY_BACKOFF``)."""
        if self.spool is None:
            return 0
        if self.spool.problem is not None and not self.spool.records:
            try:
                self.spool.open()  # the folder may have become writable again
            except SpoolUnavailable:
                return 0
        replayed = await self.spool.replay(self._replay_one)
        if replayed:
            log.info("spooled webhook changes replayed", extra={"fields": {"records": replayed}})
        return replayed

    async def _replay_one(self, record: SpoolRecord) -> None:
        try:
            status, payload = await self._process(record.body, record.content_type, record.received_at)
        except Exception as e:
            self._replay_failures += 1
            error = f"{type(e).__name__}: {e}"
            if self._replay_failures >= POISON_AFTER:
                detail = f"replaying this spooled change failed {self._replay_failures} times: {error}"
                try:
                    await self._quarantine("replay_failed", record.body, detail, record.received_at)
                except Exception:
                    pass  # the store is down: keep the record, try again later
                else:
                    self._replay_failures = 0
                    return
            waiting = self.spool.records if self.spool is not None else 0
            log.warning(
                "spool replay waits for the store",
                extra={"fields": {"error": redact(error), "records": waiting}},
            )
            raise RetryableError(f"the store did not take a spooled webhook change: {error}") from e
        self._replay_failures = 0
        self.bridge.telemetry.event(INTAKE, "replayed")
        log.debug("spooled change replayed", extra={"fields": {"status": status, "answer": payload.get("status")}})

    # ------------------------------------------------------------------------------------ new agents

    async def process_pending(self) -> int:
        """One round over the pending new agents; returns how many were settled (added or given up).
        An upstream failure leaves that note for the next round and is raised after the others ran.
        A note that fails otherwise while the store answers is a poison note (a date or id the store
        cannot hold): it goes to ``on_poison`` and out of the queue, so it cannot stop the notes after
        it round after round. With the store not answering, every note stays."""
        self._busy = True
        try:
            notes = await self.bridge.records.list_docs(PENDING_KIND)
            settled = 0
            failure: Exception | None = None
            for key, note in notes.items():
                try:
                    await self._settle(key)
                    settled += 1
                except UpstreamError as e:
                    failure = e
                    log.warning(
                        "new agent not added yet; will try again",
                        extra={"fields": {"systemuser": key, "error": e.message}},
                    )
                except Exception as e:
                    if not await self._poisoned(key, note, e):
                        failure = e
            if failure is not None:
                raise failure
            return settled
        finally:
            self._busy = False

    async def _poisoned(self, key: str, note: dict[str, Any], error: Exception) -> bool:
        """True when ``key``'s note was handed off and removed; False when the store is not answering
        (then the failure was the store's, and the note stays for the next round)."""
        detail = redact(f"pending-agent note failed: {type(error).__name__}: {error}")
        try:
            await self.bridge.records.get_doc(PENDING_KIND, key)  # does the store answer at all?
        except Exception:
            log.warning("new agent not added yet: the store is not answering", extra={"fields": {"detail": detail}})
            return False
        await hand_off(self.on_poison, PENDING_ROUTE, "note_failed", encode_item({"key": key, "note": note}), detail)
        try:
            await self.bridge.records.delete_doc(PENDING_KIND, key)
        except Exception:
            return False
        return True

    async def _settle(self, agent_id: str) -> None:
        records = self.bridge.records
        if self.client is None:
            await self._give_up(agent_id, "Dataverse is not configured, so its Entra object id cannot be looked up")
            return
        client = self.client
        user = await self.bridge.retry.run(lambda: client.get_systemuser(agent_id), max_attempts=3)
        problem = None
        if user is None:
            problem = "systemuser does not exist in Dataverse"
        elif user.entra_object_id is None:
            problem = "systemuser has no azureactivedirectoryobjectid (Entra object id)"
        elif user.disabled:
            problem = "systemuser is disabled"
        if problem is not None or user is None or user.entra_object_id is None:
            await self._give_up(agent_id, problem or "")
            return
        added = await self.bridge.add_agent(Agent(agent_id, user.entra_object_id, user.fullname, True))
        if added.agent is None:
            await self._give_up(agent_id, added.problem or added.outcome)
            return
        agent, outcome = added.agent, "unchanged" if added.outcome == "kept" else added.outcome
        log.info(
            "agent added from a Dataverse Create",
            extra={"fields": {"systemuser": agent_id, "agent_name": user.fullname, "directory": outcome}},
        )
        self.bridge.telemetry.event(INTAKE, "agent_added")
        if self.on_agent_added is not None:  # e.g. cover it by a Graph subscription now
            self.on_agent_added()
        note = await records.get_doc(PENDING_KIND, agent_id)  # re-read: an Update may have refreshed it
        if note is not None and note.get("presence_id"):
            at = datetime.fromisoformat(str(note.get("observed_at") or self.bridge.clock().isoformat()))
            await self._observe(agent, str(note["presence_id"]), note.get("row_version"), note.get("modified_by"), at)
        await records.delete_doc(PENDING_KIND, agent_id)

    async def _give_up(self, agent_id: str, why: str) -> None:
        await self.bridge.agent_for(System.DYNAMICS, agent_id)  # recorded for `agents list --unknown`
        await self.bridge.records.delete_doc(PENDING_KIND, agent_id)
        self.bridge.telemetry.event(INTAKE, "unknown_agent")
        log.warning("new agent not added: " + why, extra={"fields": {"systemuser": agent_id}})


def _note(pending: dict[str, Any] | None, change: AgentStatusChange, now: datetime) -> dict[str, Any]:
    """The pending-agent note; a later change replaces the presence unless its RowVersion is older."""
    note = dict(pending or {"agent_id": change.agent_id, "first_seen": now.isoformat()})
    older = (
        change.row_version is not None
        and isinstance(note.get("row_version"), int)
        and change.row_version < note["row_version"]
    )
    if change.presence_id is not None and not older:
        note.update(
            presence_id=change.presence_id,
            row_version=change.row_version,
            modified_by=change.presence_modified_by,
            observed_at=now.isoformat(),
        )
    note.setdefault("presence_id", None)
    note["agent_status_id"] = change.agent_status_id
    return note
