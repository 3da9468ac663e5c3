"""``msdyn_agentstatusid`` -> the agent's ``systemuserid``, for Updates whose context does not say.

A Dataverse Update's Target carries only the columns the writer sent, so a presence change can
arrive without ``msdyn_agentid``; the post-image ``register-webhook`` registers brings it, but a step
registered by hand may have none. The mapping never changes for a row (Dynamics 365 Contact Center
keeps one ``msdyn_agentstatus`` row per agent), so what was learnt once is kept without expiry:

- in memory, and durably in the store's adapter records (kind ``dataverse.agent_status``, key = the
  agentstatusid, doc ``{"agent_id": ...}``), so every instance and the next start share it;
- filled from every context that carries both ids (Creates always do), from the sweep's reads of
  ``msdyn_agentstatuses`` (the client hands each page's pairs to ``remember_many``), and, on a miss, by
  one bounded read of the row. The webhook waits for that read (the step is synchronous), so it has a
  short deadline; on any failure the answer is ``None`` and the caller decides. A row Dataverse says
  does not exist is not remembered: a later Create may still bring it.

Concurrent misses for the same row share one read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Protocol

from mapping.errors import UpstreamError
from mapping.ports import AdapterRecords
from mapping.retry import RetryPolicy

log = logging.getLogger("presence_sync.dataverse")

KIND = "dataverse.agent_status"
LOOKUP_SECONDS = 2.0
"""Deadline of a miss's read: Dataverse waits for the webhook's answer (up to 60 s, but the agent's
presence change waits with it), so the read must be short."""
LOOKUP_ATTEMPTS = 2
PERSIST_CHUNK = 500
"""Pairs per store transaction when ``remember_many``'s pairs are written."""


class AgentStatusReader(Protocol):
    async def agent_of_status(self, agent_status_id: str) -> str | None: ...


class AgentStatusLookup:
    """The cache; see the module docstring. ``reader`` is ``None`` when Dataverse is not configured
    (then only what contexts and reads taught it is known)."""

    def __init__(
        self,
        records: AdapterRecords,
        reader: AgentStatusReader | None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = LOOKUP_SECONDS,
        attempts: int = LOOKUP_ATTEMPTS,
    ) -> None:
        self.records = records
        self.reader = reader
        self.retry = retry or RetryPolicy(base_seconds=0.1, max_delay_seconds=1.0)
        self.timeout = timeout
        self.attempts = attempts
        self._known: dict[str, str] = {}
        self._reads: dict[str, asyncio.Future[str | None]] = {}
        self._persisting: list[dict[str, str]] = []
        self._persister: asyncio.Future[None] | None = None

    async def remember(self, agent_status_id: str, agent_id: str) -> None:
        """A pair seen somewhere (a context, a read). Kept durably once per process and row; a store
        failure is logged, not raised: the pair is still known in memory, and a webhook must not fail
        for a cache."""
        status, agent = agent_status_id.lower(), agent_id.lower()
        if self._known.get(status) == agent:
            return
        self._known[status] = agent
        try:
            await self.records.put_doc(KIND, status, {"agent_id": agent})
        except Exception as e:  # the store down: memory still has it, the next start re-learns it
            log.warning(
                "agent status mapping kept in memory only",
                extra={"fields": {"agent_status": status, "systemuser": agent, "error": f"{type(e).__name__}: {e}"}},
            )

    async def remember_many(self, pairs: Mapping[str, str]) -> None:
        """A page of a read: known in memory at once, kept durably in the background (``_persist``):
        only a restart's first webhooks before its own sweep need them (and a miss then costs one
        bounded read), so neither discovery nor the sweep waits for these writes."""
        fresh = {}
        for status, agent in pairs.items():
            s, a = status.lower(), agent.lower()
            if self._known.get(s) != a:
                self._known[s] = a
                fresh[s] = a
        if fresh:
            self._persisting.append(fresh)
            if self._persister is None or self._persister.done():
                self._persister = asyncio.ensure_future(self._persist())

    async def _persist(self) -> None:
        """Writes what ``remember_many`` learnt, ``PERSIST_CHUNK`` pairs a transaction: one write each
        was 50,000 write transactions after a first sweep, queueing ahead of the webhooks' commits
        for the store's one writer (SQLite) for minutes."""
        while self._persisting:
            batch = list(self._persisting.pop(0).items())
            for start in range(0, len(batch), PERSIST_CHUNK):
                part = batch[start : start + PERSIST_CHUNK]
                try:
                    await self.records.put_docs(KIND, {status: {"agent_id": agent} for status, agent in part})
                except Exception as e:  # the store down: memory still has it, the next start re-learns it
                    log.warning(
                        "agent status mappings kept in memory only",
                        extra={"fields": {"pairs": len(part), "error": f"{type(e).__name__}: {e}"}},
                    )

    async def close(self) -> None:
        """Stops keeping pairs durably (at shutdown): what is left is re-learnt by the next sweep."""
        if self._persister is not None and not self._persister.done():
            self._persister.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._persister

    async def wait_persisted(self) -> None:
        """Until what ``remember_many`` learnt is in the store (tests, shutdown)."""
        while self._persister is not None and not self._persister.done():
            await asyncio.shield(self._persister)

    async def agent_of(self, agent_status_id: str) -> str | None:
        """The agent of the row: memory, then the store, then one bounded read; ``None`` when none of
        them knows (the row does not exist, Dataverse is not configured, or the read failed)."""
        status = agent_status_id.lower()
        known = self._known.get(status)
        if known is not None:
            return known
        doc = await self._stored(status)
        if doc is not None:
            self._known[status] = doc
            return doc
        pending = self._reads.get(status)
        if pending is None:
            pending = asyncio.ensure_future(self._read(status))
            self._reads[status] = pending
            pending.add_done_callback(lambda _: self._reads.pop(status, None))
        return await asyncio.shield(pending)

    async def _stored(self, status: str) -> str | None:
        try:
            doc = await self.records.get_doc(KIND, status)
        except Exception as e:
            log.warning(
                "agent status mapping not readable from the store",
                extra={"fields": {"agent_status": status, "error": f"{type(e).__name__}: {e}"}},
            )
            return None
        agent = doc.get("agent_id") if doc else None
        return agent if isinstance(agent, str) and agent else None

    async def _read(self, status: str) -> str | None:
        reader = self.reader
        if reader is None:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                agent = await self.retry.run(lambda: reader.agent_of_status(status), max_attempts=self.attempts)
        except TimeoutError:
            log.warning(
                "agent of an msdyn_agentstatus not read in time",
                extra={"fields": {"agent_status": status, "seconds": self.timeout}},
            )
            return None
        except UpstreamError as e:
            log.warning(
                "agent of an msdyn_agentstatus not read",
                extra={"fields": {"agent_status": status, "error": e.message}},
            )
            return None
        except Exception as e:  # whatever went wrong, the webhook must still answer 2xx
            log.warning(
                "agent of an msdyn_agentstatus not read",
                extra={"fields": {"agent_status": status, "error": f"{type(e).__name__}: {e}"}},
            )
            return None
        if agent is None:
            log.warning("msdyn_agentstatus does not exist in Dataverse", extra={"fields": {"agent_status": status}})
            return None
        await self.remember(status, agent)
        return agent.lower()


__all__ = ["KIND", "AgentStatusLookup", "AgentStatusReader"]
