"""``SqlTransaction``: the ``mapping.ports.Transaction`` the sync engine writes through.

A thin view over one connection inside one database transaction; ``SqlStore.transaction`` owns the
begin/commit/rollback, so everything written here lands together or not at all. Its statements run
on the drivers' own connections (``service.store.raw``: SQLAlchemy's per-statement work cost several
times what the databases took to run them, on the path every observation takes), written once for
both dialects with the semantics of the in-memory reference (``mapping.memory``), which the contract
suite (``tests/store``) holds all three to.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from mapping.clock import utcnow
from mapping.model import Agent, AgentSyncState, OutboxStatus, SetPresence, System
from service.store.directory_sql import norm, plan_upserts
from service.store.raw import Driver, Sql
from service.store.state_cache import StateCache
from service.store.state_doc import encode

PENDING, IN_FLIGHT = OutboxStatus.PENDING.value, OutboxStatus.IN_FLIGHT.value
CANCELLED = "cancelled (already shown)"

_AGENTS = Sql.of(
    "SELECT dynamics_user_id, entra_object_id, display_name, enabled FROM agents WHERE dynamics_user_id {in:1}"
)
_AGENT_ROWS = Sql.of(
    "SELECT dynamics_user_id, entra_object_id, display_name, enabled FROM agents "
    "WHERE dynamics_user_id = $1 OR entra_object_id = $2"
)
_INSERT_AGENT = Sql.of(
    "INSERT INTO agents (dynamics_user_id, entra_object_id, display_name, enabled, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4, $5, $5)"
)
_UPDATE_AGENT = Sql.of(
    "UPDATE agents SET entra_object_id = $2, display_name = $3, enabled = $4, updated_at = $5 "
    "WHERE dynamics_user_id = $1"
)
_UNKNOWN = Sql.of(
    "INSERT INTO unknown_ids (system, external_id, first_seen, last_seen, count) VALUES ($1, $2, $3, $3, 1) "
    "ON CONFLICT (system, external_id) DO UPDATE SET count = unknown_ids.count + 1, last_seen = excluded.last_seen"
)

_STATES = Sql.of("SELECT agent_id, doc FROM agent_state WHERE saved AND agent_id {in:1}")
_LOCKING = (
    # PostgreSQL: a placeholder row for each agent that has none, and every row locked until commit,
    # in one round trip (the conflict arm's update takes the row lock as SELECT ... FOR UPDATE does),
    # in sorted order so that two groups of agents cannot deadlock. A saved state is left as it is,
    # and read as its text (the state cache compares texts).
    "ON CONFLICT (agent_id) DO UPDATE SET agent_id = excluded.agent_id RETURNING agent_id, saved, doc::text AS doc"
)
_LOCK_STATES = Sql.of(
    "INSERT INTO agent_state (agent_id, saved, updated_at) "
    f"SELECT id, false, $2 FROM unnest($1::text[]) AS ids(id) ORDER BY id {_LOCKING}"
)
_AGENTS_LOCKING_STATES = Sql.of(
    # PostgreSQL: the directory entries and, for the enabled ones, what _LOCK_STATES does, in one
    # round trip. The agents are read with the statement's snapshot; each state row as it is once
    # locked (the conflict arm's RETURNING gives the row's latest committed version).
    "WITH a AS (SELECT dynamics_user_id, entra_object_id, display_name, enabled FROM agents "
    "WHERE dynamics_user_id {in:1}), "
    "l AS (INSERT INTO agent_state (agent_id, saved, updated_at) "
    f"SELECT dynamics_user_id, false, $2 FROM a WHERE enabled ORDER BY dynamics_user_id {_LOCKING}) "
    "SELECT a.dynamics_user_id, a.entra_object_id, a.display_name, a.enabled, l.saved, l.doc "
    "FROM a LEFT JOIN l ON l.agent_id = a.dynamics_user_id"
)
_SAVE_STATE = Sql.of(
    "INSERT INTO agent_state (agent_id, saved, doc, updated_at) VALUES ($1, true, $2::json, $3) "
    "ON CONFLICT (agent_id) DO UPDATE SET saved = true, doc = excluded.doc, updated_at = excluded.updated_at"
)

_HOLDING = (
    "outbox.status = 'pending' AND outbox.attempts = 0 AND outbox.held_since IS NOT NULL "
    "AND outbox.next_attempt_at IS NOT NULL AND outbox.next_attempt_at > $6"
)
_FAILING = "outbox.failing_since IS NOT NULL AND outbox.status != 'dead'"
_ENQUEUE = (
    # The coalescing upsert (rule 6): $1 agent, $2 system, $3 value, $4 reason, $5 when due, $6 now,
    # $7 held since (None: not held), $8 the hold's cap (a run started before it is due now).
    "INSERT INTO outbox (agent_id, system, value, reason, status, generation, delivered_generation, attempts, "
    "next_attempt_at, created_at, updated_at, held_since) "
    "VALUES ($1, $2, $3, $4, 'pending', 1, 0, 0, $5, $6, $6, $7) "
    "ON CONFLICT (agent_id, system) DO UPDATE SET "
    "value = excluded.value, reason = excluded.reason, "
    # A row in flight stays in flight: its lease holder acks, and ``ack`` sends it back to pending.
    "status = CASE WHEN outbox.status = 'in_flight' THEN 'in_flight' ELSE 'pending' END, "
    "generation = outbox.generation + 1, "
    # A failing run keeps its tries and its dead-letter clock for the new value (rule 7).
    f"attempts = CASE WHEN {_FAILING} THEN outbox.attempts ELSE 0 END, "
    f"last_error = CASE WHEN {_FAILING} THEN outbox.last_error ELSE NULL END, "
    f"failing_since = CASE WHEN {_FAILING} THEN outbox.failing_since ELSE NULL END, "
    f"next_attempt_at = CASE WHEN {_HOLDING} AND outbox.held_since >= $8 THEN excluded.next_attempt_at "
    f"WHEN {_HOLDING} THEN outbox.next_attempt_at ELSE excluded.next_attempt_at END, "
    f"held_since = CASE WHEN {_HOLDING} THEN outbox.held_since ELSE excluded.held_since END, "
    "updated_at = excluded.updated_at"
)
_ENQUEUE_ONE = Sql.of(_ENQUEUE + " RETURNING id")
_ENQUEUE_MANY = Sql.of(_ENQUEUE)
_OUTBOX_ROWS = Sql.of("SELECT agent_id, system, value, status FROM outbox WHERE agent_id {in:1}")
_UNSENT = Sql.of("SELECT value FROM outbox WHERE agent_id = $1 AND system = $2 AND status = 'pending'")
_LIVE = "agent_id = $1 AND system = $2 AND status IN ('pending', 'in_flight')"
_LIVE_STATUS = Sql.of(f"SELECT status FROM outbox WHERE {_LIVE}")
_CANCEL = Sql.of(
    "UPDATE outbox SET lease_owner = NULL, lease_token = NULL, lease_until = NULL, status = 'delivered', "
    f"updated_at = $3, last_error = $4, failing_since = NULL WHERE {_LIVE}"
)


class SqlTransaction:
    def __init__(self, driver: Driver, *, lock_rows: bool, states: StateCache) -> None:
        """``lock_rows`` (PostgreSQL): ``load_state(s)`` lock each agent's row until commit, so
        engines on other instances serialise on the agent instead of overwriting each other's
        decisions; SQLite writers hold the database's only write lock already (``BEGIN
        IMMEDIATE``). ``states``: the store's decoded states by their stored text."""
        self.db = driver
        self._lock_rows = lock_rows
        self._states = states

    # Sync state --------------------------------------------------------------------------------
    async def load_state(self, agent_id: str) -> AgentSyncState:
        return (await self.load_states([agent_id]))[agent_id]

    async def save_state(self, state: AgentSyncState) -> None:
        await self.save_states([state])

    async def load_states(self, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
        ids = list(dict.fromkeys(agent_ids))
        db = self.db
        if self._lock_rows:
            rows = await db.fetch(_LOCK_STATES, db.ids(ids), db.time(utcnow()))
            found = {r[0]: self._states.decode(r[0], r[2]) for r in rows if r[1]}
        else:
            rows = await db.fetch(_STATES, db.ids(ids))
            found = {r[0]: self._states.decode(r[0], r[1]) for r in rows}
        return {a: found.get(a) or AgentSyncState(a) for a in ids}

    async def save_states(self, states: Sequence[AgentSyncState], *, handed_over: bool = False) -> None:
        if not states:
            return
        db = self.db
        now = db.time(utcnow())
        rows = []
        for state in states:
            text = encode(state)
            self._states.keep(state.agent_id, text, state, copy=not handed_over)
            rows.append((state.agent_id, text, now))
        await db.executemany(_SAVE_STATE, rows)

    # Outbox --------------------------------------------------------------------------------------
    def _enqueue_args(
        self, command: SetPresence, now: datetime, hold: float, max_hold: float, times: dict[tuple[float, float], Any]
    ) -> tuple[Any, ...]:
        """``Transaction.enqueue``'s parameters: due ``hold`` after ``now``; a hold run that started
        before ``due - max(max_hold, hold)`` (its cap) is due now instead of later. ``times``: the
        instants already worked out for this ``now``, by (hold, max_hold)."""
        known = times.get((hold, max_hold))
        if known is None:
            t = self.db.time
            due = now + timedelta(seconds=hold)
            cap = due - timedelta(seconds=max(max_hold, hold))
            at = t(now)
            known = times[(hold, max_hold)] = (t(due), at, at if hold > 0 else None, t(cap))
        due_at, at, held_since, cap_at = known
        return (command.agent_id, command.system.value, command.value, command.reason, due_at, at, held_since, cap_at)

    async def enqueue(self, command: SetPresence, now: datetime, hold: float = 0.0, max_hold: float = 0.0) -> int:
        rows = await self.db.fetch(_ENQUEUE_ONE, *self._enqueue_args(command, now, hold, max_hold, {}))
        return int(rows[0][0])

    async def enqueue_many(self, items: Sequence[tuple[SetPresence, float, float]], now: datetime) -> None:
        times: dict[tuple[float, float], Any] = {}
        await self.db.executemany(_ENQUEUE_MANY, [self._enqueue_args(c, now, h, m, times) for c, h, m in items])

    async def outbox_rows(self, agent_ids: Sequence[str]) -> dict[tuple[str, System], tuple[str, OutboxStatus]]:
        rows = await self.db.fetch(_OUTBOX_ROWS, self.db.ids(list(dict.fromkeys(agent_ids))))
        return {(r[0], System(r[1])): (r[2], OutboxStatus(r[3])) for r in rows}

    async def unsent_value(self, agent_id: str, system: System) -> str | None:
        rows = await self.db.fetch(_UNSENT, agent_id, system.value)
        return None if not rows else str(rows[0][0])

    async def cancel_pending(self, agent_id: str, system: System, now: datetime) -> OutboxStatus | None:
        """Marks a live row delivered as cancelled and drops its lease, so an attempt in flight cannot
        ack it and nothing is redelivered after it. The caller holds the agent's state lock, so the
        read and the update see the same row."""
        rows = await self.db.fetch(_LIVE_STATUS, agent_id, system.value)
        if not rows:
            return None
        await self.db.execute(_CANCEL, agent_id, system.value, self.db.time(now), CANCELLED)
        return OutboxStatus(rows[0][0])

    # Directory -----------------------------------------------------------------------------------
    async def get_agent(self, dynamics_user_id: str) -> Agent | None:
        key = dynamics_user_id.strip().lower()
        return (await self.get_agents([key])).get(key)

    async def get_agents(self, dynamics_user_ids: Sequence[str]) -> dict[str, Agent]:
        keys = list(dict.fromkeys(k.strip().lower() for k in dynamics_user_ids))
        rows = await self.db.fetch(_AGENTS, self.db.ids(keys))
        return {r[0]: Agent(r[0], r[1], r[2], bool(r[3])) for r in rows}

    async def agents_with_states(
        self, dynamics_user_ids: Sequence[str]
    ) -> tuple[dict[str, Agent], dict[str, AgentSyncState]]:
        if not self._lock_rows:  # SQLite: two statements on the loop thread cost no round trip
            agents = await self.get_agents(dynamics_user_ids)
            return agents, await self.load_states(sorted(a.dynamics_user_id for a in agents.values() if a.enabled))
        keys = list(dict.fromkeys(k.strip().lower() for k in dynamics_user_ids))
        db = self.db
        agents, states = {}, {}
        for r in await db.fetch(_AGENTS_LOCKING_STATES, db.ids(keys), db.time(utcnow())):
            agents[r[0]] = Agent(r[0], r[1], r[2], bool(r[3]))
            if r[3]:
                states[r[0]] = self._states.decode(r[0], r[5]) if r[4] else AgentSyncState(r[0])
        return agents, dict(sorted(states.items()))

    async def upsert_agent(self, agent: Agent) -> str:
        """``added``/``updated``/``unchanged``; ValueError (both ids named) when the Entra id is another
        agent's (``directory_sql.plan_upserts``, the store's bulk upsert's own rule)."""
        agent = norm(agent)
        db = self.db
        current: dict[str, Agent] = {}
        owner: dict[str, str] = {}
        for r in await db.fetch(_AGENT_ROWS, agent.dynamics_user_id, agent.entra_object_id):
            current[r[0]] = Agent(r[0], r[1], r[2], bool(r[3]))
            owner[r[1]] = r[0]
        result, writes = plan_upserts([agent], current, owner)
        now = db.time(utcnow())
        for kind, a in writes:
            sql = _INSERT_AGENT if kind == "insert" else _UPDATE_AGENT
            await db.execute(sql, a.dynamics_user_id, a.entra_object_id, a.display_name, a.enabled, now)
        return result[agent.dynamics_user_id]

    async def record_unknown(self, system: System, external_id: str, now: datetime) -> None:
        await self.db.execute(_UNKNOWN, system.value, external_id, self.db.time(now))
