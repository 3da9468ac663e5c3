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
- Bad input: 401 (key), 413 (over ``max_body``, by ``Content-Length`` and while reading), 415 (not
  JSON), 400 (malformed JSON or context, with the parser's reason), 202 for an unknown or disabled
  agent (counted, logged with the systemuserid). Never a 500: an unexpected failure (the store down)
  answers 503 with a JSON error, so Dataverse fails the operation instead of the change being lost
  behind a 2xx.

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
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from dataverse.agent_lookup import AgentStatusLookup
from dataverse.client import DataverseClient
from dataverse.context import AgentStatusChange, ContextError, Message, parse_context
from edge.body import read_json
from edge.intake import Rejected, answer
from edge.upstream import is_loopback
from mapping.api import CoreApi
from mapping.errors import UpstreamError
from mapping.model import Agent, PresenceObserved, System
from mapping.rounds import Rounds
from mapping.rules import Result

log = logging.getLogger("presence_sync.dataverse")

ROUTE = "dataverse_webhook"
INTAKE = "dataverse_webhook"
PATH = "/api/dataverse/webhook"
PENDING_KIND = "dataverse.pending_agent"
KEY_HEADER = "x-presence-sync-key"
KEY_SETTING = "PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY"
MAX_BODY = 1024 * 1024
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


class DataverseIntake:
    """The webhook route and the background worker for new agents (see the module docstring).

    ``webhook_key``: the shared secret (``?code=`` or header ``x-presence-sync-key``); empty means
    loopback callers only. ``client``: for reading new agents' systemusers; ``None`` (Dataverse not
    configured) leaves new agents unknown, reported. ``poll_interval``: how often pending agents are
    looked at when nothing wakes the worker. ``on_agent_added``: called after a Create added an agent
    (the runtime points it at the subscription upkeep)."""

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
    ) -> None:
        self.bridge = bridge
        self.lookup = lookup  # the agent of an Update whose context does not carry it (agent_lookup)
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

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Starts the pending-agent worker; notes left by an earlier process are processed at once."""
        if not self.key:
            log.warning(f"{KEY_SETTING} is not set: the Dataverse webhook accepts loopback callers only")
        self._worker.start(at_once=True)

    async def stop(self) -> None:
        await self._worker.stop()

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATH, self.handle)]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until no new agent is pending (tests, demo)."""
        async with asyncio.timeout(timeout):
            while self._busy or await self.bridge.records.list_docs(PENDING_KIND):
                self._worker.wake()
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
        body = await read_json(request, max_body=self.max_body, what="a RemoteExecutionContext JSON object")
        try:
            change = parse_context(body)
        except ContextError as e:
            raise Rejected(400, "malformed_context", f"not a usable msdyn_agentstatus context: {e.reason}") from None
        status, payload = await self._accept(change)
        return web.json_response(payload, status=status)

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

    async def _accept(self, change: AgentStatusChange) -> tuple[int, dict[str, Any]]:
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
                    "not be looked up now; the reconciliation sweep will read it. Run `presence-sync dataverse "
                    "register-webhook` so the Update step carries the post-image with msdyn_agentid"
                )
                log.warning(
                    "dataverse webhook without an agent",
                    extra={"fields": {"agent_status": change.agent_status_id, "detail": detail}},
                )
                return 202, {"status": "agent_unresolved", "agent_status": change.agent_status_id, "detail": detail}
            change = dataclasses.replace(change, agent_id=agent_id)
        elif self.lookup is not None:
            await self.lookup.remember(change.agent_status_id, agent_id)
        now = self.bridge.clock()
        agent = await self.bridge.directory.get_agent(agent_id)
        if agent is None:
            return await self._unknown(change, now)
        if not change.is_presence_change:
            return 200, {"status": "known_agent", "reason": change.ignored_reason}
        return await self._observe(
            agent, change.presence_id or "", change.row_version, change.presence_modified_by, now
        )

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

    # ------------------------------------------------------------------------------------ new agents

    async def process_pending(self) -> int:
        """One round over the pending new agents; returns how many were settled (added or given up).
        An upstream failure leaves that note for the next round and is raised after the others ran."""
        self._busy = True
        try:
            notes = await self.bridge.records.list_docs(PENDING_KIND)
            settled = 0
            failure: UpstreamError | None = None
            for key in notes:
                try:
                    await self._settle(key)
                    settled += 1
                except UpstreamError as e:
                    failure = e
                    log.warning(
                        "new agent not added yet; will try again",
                        extra={"fields": {"systemuser": key, "error": e.message}},
                    )
            if failure is not None:
                raise failure
            return settled
        finally:
            self._busy = False

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
