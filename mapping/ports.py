"""Ports: what the core needs from the outside world, as Protocols the adapters implement.

The core never imports an adapter. ``service`` builds the adapters and hands them in:
- ``Store`` / ``Transaction``: persistence (SQL in ``service.store``; in memory in ``mapping.memory``).
- ``PresenceWriter``: one per system, used by the outbox workers to deliver commands.
- ``PresenceReader``: one per system, used by reconciliation to read the truth in batches.
- ``DeliveryListener``: told when a command finally lands or dies (the bot's follow-ups).
- ``ReadRequests``: asks an adapter to read an agent's present state (Teams, after a session write).
- ``Quarantine``: requests an intake could not use, kept (bounded) instead of refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from mapping.model import (
    Agent,
    AgentSyncState,
    Delivery,
    OutboxRow,
    OutboxStatus,
    Presence,
    PresenceObserved,
    QuarantinedItem,
    SetPresence,
    System,
)


class PresenceWriter(Protocol):
    """Delivers one command to one system. Raises ``mapping.errors`` types on failure, never others
    for upstream trouble (a bare exception is treated as retryable, but loses the upstream's words)."""

    system: System

    async def apply(self, agent: Agent, value: str) -> None: ...


class PresenceReader(Protocol):
    """Reads the current presence of many agents (batching is the adapter's business).
    Agents the upstream does not know are left out of the result."""

    system: System

    async def read(self, agents: Sequence[Agent]) -> list[PresenceObserved]: ...


class ReadRequests(Protocol):
    """Asks an adapter to read an agent's present state soon and hand it back as an observation
    (``current=True``): for what the core cannot be told, such as a person's own Teams state hidden
    behind the bridge's session until that session was cleared (Graph notifies only changes of what
    Teams shows)."""

    async def request_read(self, system: System, agent_id: str, why: str) -> None: ...


class DeliveryListener(Protocol):
    """``outcome`` is ``delivered`` or ``dead``; ``error`` is the last upstream message for ``dead``."""

    async def on_outcome(self, delivery: Delivery, outcome: str, error: str | None) -> None: ...


class Transaction(Protocol):
    """One atomic unit: everything written through it commits together or not at all."""

    async def load_state(self, agent_id: str) -> AgentSyncState:
        """Loads (and on PostgreSQL locks, until commit) the agent's sync state; a blank state if new."""
        ...

    async def save_state(self, state: AgentSyncState) -> None: ...

    async def load_states(self, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
        """``load_state`` of each agent (a blank state if new), in as few statements as the store can:
        a group of observations then costs one read, not one per agent. PostgreSQL locks the rows in
        the order given; callers sort the ids so that two groups cannot deadlock."""
        ...

    async def save_states(self, states: Sequence[AgentSyncState], *, handed_over: bool = False) -> None:
        """``save_state`` of each, in one statement (executemany) where the store can.
        ``handed_over``: the caller gives these objects up (it neither reads nor changes them
        afterwards), so a store that keeps what it saved (a cache) may keep them as they are instead
        of a copy of each."""
        ...

    async def enqueue(self, command: SetPresence, now: datetime, hold: float = 0.0, max_hold: float = 0.0) -> int:
        """Coalescing upsert: one outbox row per (agent, system). A new value replaces the pending
        one and bumps ``generation``; a row in flight keeps its lease and is redelivered with the new
        value after the current attempt. Returns the row id.

        ``hold`` (seconds, rule 6): the row is due once no new value came for ``hold`` seconds, but
        never later than ``max_hold`` after the first change of the run (``held_since``), so a burst
        folds into one upstream call and a steady stream cannot postpone delivery forever. A row
        waiting out a retry backoff starts a new run for its new value."""
        ...

    async def enqueue_many(self, items: Sequence[tuple[SetPresence, float, float]], now: datetime) -> None:
        """``enqueue(command, now, hold, max_hold)`` of each item in order, in one statement where the
        store can (a group of observations' commands)."""
        ...

    async def outbox_rows(self, agent_ids: Sequence[str]) -> dict[tuple[str, System], tuple[str, OutboxStatus]]:
        """The value and status of every outbox row of these agents, by (agent, system), in one read:
        what the engine asks of the outbox for a group of observations (``mapping.engine.OutboxView``)."""
        ...

    async def unsent_value(self, agent_id: str, system: System) -> str | None:
        """The value of the (agent, system) row while it is pending (queued or waiting out a retry):
        no attempt is under way and none succeeded, so the upstream does not show it and will not echo
        it, and a new ``enqueue`` replaces it for good. (An attempt that failed is taken as not landed;
        a timeout that did land is then seen as a change of the system's own.)"""
        ...

    async def cancel_pending(self, agent_id: str, system: System, now: datetime) -> OutboxStatus | None:
        """Withdraws a not-yet-delivered command (the system already shows what it should). Returns
        the status the row had: ``PENDING`` (it will never reach the upstream), ``IN_FLIGHT`` (an
        attempt is running; it may land, but its ack is refused and nothing is redelivered after it),
        or None when nothing was live."""
        ...

    async def get_agent(self, dynamics_user_id: str) -> Agent | None: ...

    async def get_agents(self, dynamics_user_ids: Sequence[str]) -> dict[str, Agent]:
        """The directory entries of these Dynamics ids (lower case, as the directory keeps them) in one
        read; ids not in the directory are left out."""
        ...

    async def agents_with_states(
        self, dynamics_user_ids: Sequence[str]
    ) -> tuple[dict[str, Agent], dict[str, AgentSyncState]]:
        """``get_agents`` of these ids, and ``load_states`` of the enabled ones among them (locked on
        PostgreSQL, in sorted order): what the engine reads first in every transaction, in one round
        trip where the store can (PostgreSQL) instead of two."""
        ...

    async def upsert_agent(self, agent: Agent) -> str:
        """Returns ``added``, ``updated`` or ``unchanged``."""
        ...

    async def record_unknown(self, system: System, external_id: str, now: datetime) -> None: ...


class AgentDirectory(Protocol):
    """The agent directory (rule 1): who is synced, by Dynamics systemuser id and Entra object id."""

    async def get_agent(self, dynamics_user_id: str) -> Agent | None: ...
    async def get_agent_by_entra(self, entra_object_id: str) -> Agent | None: ...
    async def list_agents(self, *, enabled_only: bool = False) -> list[Agent]: ...
    async def count_agents(self, *, enabled_only: bool = False) -> int:
        """``len(list_agents(...))`` without reading them (``/readyz``, polled by load balancers)."""
        ...

    async def upsert_agents(self, agents: Sequence[Agent]) -> dict[str, str]:
        """All or nothing; returns ``{dynamics_user_id: added|updated|unchanged}``."""
        ...

    async def set_agent_enabled(self, dynamics_user_id: str, enabled: bool) -> bool: ...
    async def list_unknown(self) -> list[dict[str, Any]]: ...


class AdapterRecords(Protocol):
    """What adapters keep in the bridge's store for themselves (subscriptions, conversation
    references, pending notes, tokens, leases), so that it survives restarts and is shared by every
    instance. The sync state, the outbox and the directory are not reachable through it."""

    async def get_doc(self, kind: str, key: str) -> dict[str, Any] | None: ...
    async def put_doc(self, kind: str, key: str, doc: dict[str, Any]) -> None: ...
    async def put_docs(self, kind: str, items: Mapping[str, dict[str, Any]]) -> None:
        """``put_doc`` of each item, in one transaction: a sweep's page learns thousands at once."""
        ...

    async def delete_doc(self, kind: str, key: str) -> None: ...
    async def list_docs(self, kind: str) -> dict[str, dict[str, Any]]: ...
    async def get_secret(self, name: str) -> bytes | None: ...
    async def put_secret(self, name: str, value: bytes) -> None: ...
    async def try_lead(self, name: str, owner: str) -> bool:
        """True while ``owner`` holds the leadership called ``name`` (acquires it when free). For work
        only one instance may do (subscription upkeep, reconciliation). PostgreSQL: an advisory lock
        on a connection the store keeps; SQLite (one process): always True."""
        ...


class Quarantine(Protocol):
    """Bodies an intake could not use but had to answer 2xx (the Dataverse webhook's step is
    synchronous: a refusal fails the agent's own change). Bounded: the store keeps its newest
    ``quarantine_max_items``, dropping the oldest first and counting what it dropped. Body and detail
    are stored through the scrubber (``mapping.redact``): no key or token is ever kept."""

    async def quarantine(self, route: str, reason: str, body: bytes, detail: str, at: datetime) -> int:
        """Keeps one item; returns its id (ids grow: a higher id was quarantined later)."""
        ...

    async def list_quarantined(self, limit: int = 100) -> list[QuarantinedItem]:
        """The newest ``limit`` items, newest first."""
        ...

    async def get_quarantined(self, item_id: int) -> QuarantinedItem | None: ...
    async def drop_quarantined(self, item_id: int) -> bool:
        """False when there is no such item."""
        ...

    async def quarantine_count(self) -> int: ...
    async def quarantine_dropped(self) -> int:
        """How many items were dropped for room (oldest first) since the store was created."""
        ...


class Store(AgentDirectory, AdapterRecords, Quarantine, Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Commits on normal exit, rolls back on exception."""
        ...

    # Presence catalogue
    async def replace_presences(self, presences: Sequence[Presence]) -> None: ...
    async def list_presences(self) -> list[Presence]: ...

    # Sync state (read-only views; writes go through a Transaction)
    async def load_states(self, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]: ...

    async def seen_values(self, agent_ids: Sequence[str], system: System) -> dict[str, str | None]:
        """``load_states(...)[id].<system>_seen.value`` without decoding whole states (the poller
        compares 1,650 agents a second at 50,000 agents: decoding their states was a quarter of a
        busy instance's CPU)."""
        ...

    # Outbox
    async def claim(
        self, systems: Sequence[System], limit: int, lease_seconds: float, owner: str, now: datetime
    ) -> list[Delivery]:
        """Claims due rows (pending and due, or in flight with an expired lease), at most one row per
        (agent, system) in flight at any time; on PostgreSQL with ``FOR UPDATE SKIP LOCKED``."""
        ...

    async def redrive(self, system: System, now: datetime) -> int:
        """Every pending row of ``system`` waiting out a retry backoff (a failing run) is due ``now``:
        the upstream answered again (the breaker closed), so what waited for it goes at once, still
        through the rate limiters. Rows held for coalescing are left alone. Returns how many."""
        ...

    async def release_leases(self, owner: str, now: datetime) -> int:
        """Rows in flight under ``owner``'s leases become claimable at once (their leases end now):
        a restarted instance takes back what it was delivering when it died, instead of waiting out
        its own leases. Returns how many."""
        ...

    async def ack(self, delivery: Delivery, now: datetime) -> bool:
        """Marks delivered if the lease is still ours; if a newer generation was enqueued meanwhile,
        the row goes back to pending for it. False if the lease was lost (someone reclaimed)."""
        ...

    async def fail(
        self, delivery: Delivery, error: str, next_attempt_at: datetime | None, now: datetime
    ) -> OutboxStatus:
        """Records a failed attempt: pending again at ``next_attempt_at``, or dead when it is None.
        The first failure of a run sets the row's ``failing_since`` (the dead-letter budget's start);
        only a delivery ends the run. A newer generation enqueued meanwhile is due now and inherits the
        run (its tries and clock), or, when the attempt was to die, starts afresh instead."""
        ...

    async def list_outbox(self, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxRow]: ...
    async def outbox_counts(self) -> dict[str, int]: ...
    async def retry_dead(self, row_id: int | None, now: datetime) -> int:
        """Dead rows back to pending (one id, or all when None); returns how many."""
        ...

    async def outbox_row(self, agent_id: str, system: System) -> OutboxRow | None: ...

    async def ping(self) -> None:
        """Raises when the store cannot be reached or its schema is not current."""
        ...

    async def close(self) -> None: ...


class TokenProvider(Protocol):
    """Bearer tokens for an upstream (azure-identity credential, or the fixed token of static mode).
    Built once by ``service.auth``; adapters never build credentials themselves."""

    async def token(self, scope: str) -> str: ...
