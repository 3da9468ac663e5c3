"""An in-memory ``Store``: the reference behaviour of the port, and the store of fast unit tests.

The SQL store (``service.store``) must behave the same; ``tests/test_store_contract.py`` runs one
suite against both.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from mapping.model import (
    Agent,
    AgentSyncState,
    Delivery,
    OutboxRow,
    OutboxStatus,
    Presence,
    QuarantinedItem,
    SetPresence,
    System,
)
from mapping.redact import redact, redact_bytes

QUARANTINE_MAX_ITEMS = 10_000


@dataclass
class _Row:
    id: int
    agent_id: str
    system: System
    value: str
    reason: str
    status: OutboxStatus
    generation: int
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    lease_token: str | None
    lease_until: datetime | None
    last_error: str | None
    updated_at: datetime
    delivered_generation: int = 0
    held_since: datetime | None = None
    failing_since: datetime | None = None

    def view(self) -> OutboxRow:
        return OutboxRow(
            self.id,
            self.agent_id,
            self.system,
            self.value,
            self.status,
            self.generation,
            self.attempts,
            self.next_attempt_at,
            self.last_error,
            self.updated_at,
            self.reason,
        )


class _Data:
    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {}
        self.states: dict[str, AgentSyncState] = {}
        self.outbox: dict[tuple[str, System], _Row] = {}
        self.presences: dict[str, Presence] = {}
        self.unknown: dict[tuple[System, str], dict[str, Any]] = {}
        self.docs: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[str, bytes] = {}
        self.next_id = 1


class MemoryTransaction:
    def __init__(self, data: _Data) -> None:
        self.d = data

    async def load_state(self, agent_id: str) -> AgentSyncState:
        return copy.deepcopy(self.d.states.get(agent_id) or AgentSyncState(agent_id))

    async def save_state(self, state: AgentSyncState) -> None:
        self.d.states[state.agent_id] = copy.deepcopy(state)

    async def load_states(self, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
        return {a: await self.load_state(a) for a in agent_ids}

    async def save_states(self, states: Sequence[AgentSyncState], *, handed_over: bool = False) -> None:
        # The reference copies what it keeps whatever the caller promises: a promise broken in the
        # engine then shows as a difference between the stores in the contract and stateful tests.
        for state in states:
            await self.save_state(state)

    async def enqueue(self, command: SetPresence, now: datetime, hold: float = 0.0, max_hold: float = 0.0) -> int:
        key = (command.agent_id, command.system)
        row = self.d.outbox.get(key)
        due = now + timedelta(seconds=hold)
        held_since = now if hold > 0 else None
        if row is None:
            row = _Row(
                self.d.next_id,
                command.agent_id,
                command.system,
                command.value,
                command.reason,
                OutboxStatus.PENDING,
                1,
                0,
                due,
                None,
                None,
                None,
                None,
                now,
            )
            row.held_since = held_since
            self.d.next_id += 1
            self.d.outbox[key] = row
            return row.id
        if row.status is OutboxStatus.DEAD:
            row.failing_since = None  # a new value after a dead letter is a new run
        failing = row.failing_since is not None
        # A failing run (rule 7) keeps its tries and its dead-letter clock for the new value, so a
        # stream of new values cannot keep a row alive forever. It is due after its hold as any new
        # value: while the upstream is down the breaker claims nothing of it anyway, and when only
        # this row failed, the new value may well be the one that lands.
        holding = (
            row.status is OutboxStatus.PENDING
            and row.attempts == 0
            and row.held_since is not None
            and row.next_attempt_at is not None
            and row.next_attempt_at > now
        )
        if holding and row.held_since is not None:
            # A run in progress: due ``hold`` after this change, capped at ``max_hold`` after its start.
            if row.held_since >= due - timedelta(seconds=max(max_hold, hold)):
                row.next_attempt_at = due
        else:
            row.next_attempt_at, row.held_since = due, held_since
        row.value, row.reason, row.generation = command.value, command.reason, row.generation + 1
        if not failing:
            row.attempts, row.last_error = 0, None
        row.updated_at = now
        if row.status is not OutboxStatus.IN_FLIGHT:
            row.status = OutboxStatus.PENDING
        return row.id

    async def enqueue_many(self, items: Sequence[tuple[SetPresence, float, float]], now: datetime) -> None:
        for command, hold, max_hold in items:
            await self.enqueue(command, now, hold, max_hold)

    async def outbox_rows(self, agent_ids: Sequence[str]) -> dict[tuple[str, System], tuple[str, OutboxStatus]]:
        wanted = set(agent_ids)
        return {key: (row.value, row.status) for key, row in self.d.outbox.items() if key[0] in wanted}

    async def unsent_value(self, agent_id: str, system: System) -> str | None:
        row = self.d.outbox.get((agent_id, system))
        if row is None or row.status is not OutboxStatus.PENDING:
            return None
        return row.value

    async def cancel_pending(self, agent_id: str, system: System, now: datetime) -> OutboxStatus | None:
        row = self.d.outbox.get((agent_id, system))
        if row is None or row.status in (OutboxStatus.DELIVERED, OutboxStatus.DEAD):
            return None
        was = row.status
        # An attempt in flight cannot be called back; its ack is refused (the lease is gone), so
        # nothing is redelivered after it.
        row.lease_owner = row.lease_token = row.lease_until = None
        row.status, row.updated_at, row.last_error = OutboxStatus.DELIVERED, now, "cancelled (already shown)"
        row.failing_since = None
        return was

    async def get_agent(self, dynamics_user_id: str) -> Agent | None:
        return self.d.agents.get(dynamics_user_id.lower())

    async def get_agents(self, dynamics_user_ids: Sequence[str]) -> dict[str, Agent]:
        return {
            a.dynamics_user_id: a for k in dynamics_user_ids if (a := self.d.agents.get(k.strip().lower())) is not None
        }

    async def agents_with_states(
        self, dynamics_user_ids: Sequence[str]
    ) -> tuple[dict[str, Agent], dict[str, AgentSyncState]]:
        agents = await self.get_agents(dynamics_user_ids)
        return agents, await self.load_states(sorted(a.dynamics_user_id for a in agents.values() if a.enabled))

    async def upsert_agent(self, agent: Agent) -> str:
        agent = _norm(agent)
        old = self.d.agents.get(agent.dynamics_user_id)
        for other in self.d.agents.values():
            if other.entra_object_id == agent.entra_object_id and other.dynamics_user_id != agent.dynamics_user_id:
                raise ValueError(
                    f"Entra object id {agent.entra_object_id} already belongs to agent {other.dynamics_user_id}"
                )
        self.d.agents[agent.dynamics_user_id] = agent
        return "added" if old is None else ("unchanged" if old == agent else "updated")

    async def record_unknown(self, system: System, external_id: str, now: datetime) -> None:
        e = self.d.unknown.setdefault(
            (system, external_id), {"system": str(system), "id": external_id, "first_seen": now, "count": 0}
        )
        e["count"] += 1
        e["last_seen"] = now


def _norm(agent: Agent) -> Agent:
    return replace(
        agent,
        dynamics_user_id=agent.dynamics_user_id.strip().lower(),
        entra_object_id=agent.entra_object_id.strip().lower(),
    )


class MemoryStore:
    def __init__(self, *, quarantine_max_items: int = QUARANTINE_MAX_ITEMS) -> None:
        self.d = _Data()
        self.quarantine_max_items = quarantine_max_items
        # Outside ``_Data``: transactions never write it, and copying every kept body per
        # transaction would cost what the quarantine holds.
        self._quarantined: dict[int, QuarantinedItem] = {}
        self._quarantine_next = 1
        self._quarantine_dropped = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTransaction]:
        work = copy.deepcopy(self.d)
        yield MemoryTransaction(work)
        self.d = work  # commit only when the block finished without an exception

    async def get_agent(self, dynamics_user_id: str) -> Agent | None:
        return self.d.agents.get(dynamics_user_id.strip().lower())

    async def get_agent_by_entra(self, entra_object_id: str) -> Agent | None:
        key = entra_object_id.strip().lower()
        return next((a for a in self.d.agents.values() if a.entra_object_id == key), None)

    async def list_agents(self, *, enabled_only: bool = False) -> list[Agent]:
        agents = sorted(self.d.agents.values(), key=lambda a: (a.display_name.lower(), a.dynamics_user_id))
        return [a for a in agents if a.enabled or not enabled_only]

    async def count_agents(self, *, enabled_only: bool = False) -> int:
        return sum(1 for a in self.d.agents.values() if a.enabled or not enabled_only)

    async def upsert_agents(self, agents: Sequence[Agent]) -> dict[str, str]:
        async with self.transaction() as tx:
            return {_norm(a).dynamics_user_id: await tx.upsert_agent(a) for a in agents}

    async def set_agent_enabled(self, dynamics_user_id: str, enabled: bool) -> bool:
        a = self.d.agents.get(dynamics_user_id.lower())
        if a is None:
            return False
        self.d.agents[a.dynamics_user_id] = replace(a, enabled=enabled)
        return True

    async def list_unknown(self) -> list[dict[str, Any]]:
        return sorted((dict(v) for v in self.d.unknown.values()), key=lambda e: -e["count"])

    async def replace_presences(self, presences: Sequence[Presence]) -> None:
        self.d.presences = {p.presence_id.lower(): p for p in presences}

    async def list_presences(self) -> list[Presence]:
        return list(self.d.presences.values())

    async def load_states(self, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
        return {a: copy.deepcopy(self.d.states[a]) for a in agent_ids if a in self.d.states}

    async def seen_values(self, agent_ids: Sequence[str], system: System) -> dict[str, str | None]:
        seen = "dynamics_seen" if system is System.DYNAMICS else "teams_seen"
        return {a: getattr(self.d.states[a], seen).value for a in agent_ids if a in self.d.states}

    async def redrive(self, system: System, now: datetime) -> int:
        n = 0
        for row in self.d.outbox.values():
            if (
                row.system is system
                and row.status is OutboxStatus.PENDING
                and row.failing_since is not None
                and row.next_attempt_at is not None
                and row.next_attempt_at > now
            ):
                row.next_attempt_at = now
                n += 1
        return n

    async def release_leases(self, owner: str, now: datetime) -> int:
        rows = [r for r in self.d.outbox.values() if r.status is OutboxStatus.IN_FLIGHT and r.lease_owner == owner]
        for row in rows:
            row.lease_until = now
        return len(rows)

    async def claim(
        self, systems: Sequence[System], limit: int, lease_seconds: float, owner: str, now: datetime
    ) -> list[Delivery]:
        out: list[Delivery] = []
        for row in sorted(self.d.outbox.values(), key=lambda r: r.id):
            if len(out) >= limit:
                break
            if row.system not in systems:
                continue
            due = row.status is OutboxStatus.PENDING and (row.next_attempt_at is None or row.next_attempt_at <= now)
            expired = row.status is OutboxStatus.IN_FLIGHT and row.lease_until is not None and row.lease_until <= now
            if not (due or expired):
                continue
            row.status, row.lease_owner, row.lease_token = OutboxStatus.IN_FLIGHT, owner, uuid.uuid4().hex
            row.lease_until = now + timedelta(seconds=lease_seconds)
            out.append(
                Delivery(
                    row.id,
                    row.agent_id,
                    row.system,
                    row.value,
                    row.generation,
                    row.attempts,
                    row.lease_token,
                    row.reason,
                    row.failing_since,
                )
            )
        return out

    def _held(self, d: Delivery) -> _Row | None:
        row = self.d.outbox.get((d.agent_id, d.system))
        if row is None or row.status is not OutboxStatus.IN_FLIGHT or row.lease_token != d.lease_token:
            return None
        return row

    async def ack(self, delivery: Delivery, now: datetime) -> bool:
        row = self._held(delivery)
        if row is None:
            return False
        row.lease_owner = row.lease_token = row.lease_until = None
        row.updated_at = now
        row.delivered_generation = delivery.generation
        row.failing_since = None  # the upstream took a value: the run is not failing any more
        if row.generation != delivery.generation:
            row.status, row.attempts, row.next_attempt_at = OutboxStatus.PENDING, 0, now
        else:
            row.status, row.last_error = OutboxStatus.DELIVERED, None
        return True

    async def fail(
        self, delivery: Delivery, error: str, next_attempt_at: datetime | None, now: datetime
    ) -> OutboxStatus:
        row = self._held(delivery)
        if row is None:
            return OutboxStatus.IN_FLIGHT
        row.lease_owner = row.lease_token = row.lease_until = None
        row.updated_at, row.last_error = now, error
        if row.failing_since is None:
            row.failing_since = now
        if row.generation != delivery.generation and next_attempt_at is not None:
            # A newer value came during the attempt: due now, as any new value (the breaker holds a
            # down upstream back), but it inherits the failing run's tries and clock.
            row.status, row.attempts, row.next_attempt_at = OutboxStatus.PENDING, delivery.attempts + 1, now
        elif row.generation != delivery.generation:
            # The attempt's error was permanent for its value; the newer value starts afresh.
            row.status, row.attempts, row.next_attempt_at, row.failing_since = OutboxStatus.PENDING, 0, now, None
        elif next_attempt_at is None:
            row.status, row.attempts, row.next_attempt_at = OutboxStatus.DEAD, delivery.attempts + 1, None
        else:
            row.status, row.attempts, row.next_attempt_at = OutboxStatus.PENDING, delivery.attempts + 1, next_attempt_at
        return row.status

    async def list_outbox(self, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxRow]:
        rows = sorted(self.d.outbox.values(), key=lambda r: r.id)
        return [r.view() for r in rows if status is None or r.status is status][:limit]

    async def outbox_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in OutboxStatus}
        for r in self.d.outbox.values():
            counts[r.status.value] += 1
        return counts

    async def retry_dead(self, row_id: int | None, now: datetime) -> int:
        n = 0
        for r in self.d.outbox.values():
            if r.status is OutboxStatus.DEAD and (row_id is None or r.id == row_id):
                r.status, r.attempts, r.next_attempt_at, r.updated_at = OutboxStatus.PENDING, 0, now, now
                r.failing_since = None
                n += 1
        return n

    async def outbox_row(self, agent_id: str, system: System) -> OutboxRow | None:
        row = self.d.outbox.get((agent_id, system))
        return row.view() if row else None

    async def get_doc(self, kind: str, key: str) -> dict[str, Any] | None:
        doc = self.d.docs.get((kind, key))
        return copy.deepcopy(doc) if doc is not None else None

    async def put_doc(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        self.d.docs[(kind, key)] = copy.deepcopy(doc)

    async def put_docs(self, kind: str, items: Mapping[str, dict[str, Any]]) -> None:
        for key, doc in items.items():
            await self.put_doc(kind, key, doc)

    async def delete_doc(self, kind: str, key: str) -> None:
        self.d.docs.pop((kind, key), None)

    async def list_docs(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k: copy.deepcopy(v) for (kd, k), v in self.d.docs.items() if kd == kind}

    async def get_secret(self, name: str) -> bytes | None:
        return self.d.secrets.get(name)

    async def put_secret(self, name: str, value: bytes) -> None:
        self.d.secrets[name] = value

    async def try_lead(self, name: str, owner: str) -> bool:
        holder = self.d.docs.setdefault(("leader", name), {"owner": owner})
        return bool(holder["owner"] == owner)

    # Quarantine: newest ``quarantine_max_items`` kept, the oldest dropped first (and counted).
    async def quarantine(self, route: str, reason: str, body: bytes, detail: str, at: datetime) -> int:
        item_id = self._quarantine_next
        self._quarantine_next += 1
        self._quarantined[item_id] = QuarantinedItem(
            item_id, route, reason, redact(detail), at, len(body), redact_bytes(body)
        )
        while len(self._quarantined) > max(1, self.quarantine_max_items):
            del self._quarantined[next(iter(self._quarantined))]  # ids are inserted in order
            self._quarantine_dropped += 1
        return item_id

    async def list_quarantined(self, limit: int = 100) -> list[QuarantinedItem]:
        return [self._quarantined[i] for i in sorted(self._quarantined, reverse=True)[:limit]]

    async def get_quarantined(self, item_id: int) -> QuarantinedItem | None:
        return self._quarantined.get(item_id)

    async def drop_quarantined(self, item_id: int) -> bool:
        return self._quarantined.pop(item_id, None) is not None

    async def quarantine_count(self) -> int:
        return len(self._quarantined)

    async def quarantine_dropped(self) -> int:
        return self._quarantine_dropped

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
