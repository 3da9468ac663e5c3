"""``SqlTransaction``: the ``mapping.ports.Transaction`` the sync engine writes through.

It is a thin view over one connection inside one database transaction; ``SqlStore.transaction``
owns the begin/commit/rollback, so everything written here lands together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.model import Agent, AgentSyncState, OutboxStatus, SetPresence, System
from service.store import directory_sql, outbox_sql, state_sql


class SqlTransaction:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        # SQLite writers hold the only write lock already (BEGIN IMMEDIATE); PostgreSQL must lock the row.
        self._lock_rows = conn.dialect.name == "postgresql"

    async def load_state(self, agent_id: str) -> AgentSyncState:
        return await state_sql.load(self.conn, agent_id, lock=self._lock_rows)

    async def save_state(self, state: AgentSyncState) -> None:
        await state_sql.save(self.conn, state)

    async def load_states(self, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
        return await state_sql.load_group(self.conn, agent_ids, lock=self._lock_rows)

    async def save_states(self, states: Sequence[AgentSyncState]) -> None:
        await state_sql.save_many(self.conn, states)

    async def enqueue(self, command: SetPresence, now: datetime, hold: float = 0.0, max_hold: float = 0.0) -> int:
        return await outbox_sql.enqueue(self.conn, command, now, hold, max_hold)

    async def unsent_value(self, agent_id: str, system: System) -> str | None:
        return await outbox_sql.unsent_value(self.conn, agent_id, system)

    async def cancel_pending(self, agent_id: str, system: System, now: datetime) -> OutboxStatus | None:
        return await outbox_sql.cancel_pending(self.conn, agent_id, system, now)

    async def get_agent(self, dynamics_user_id: str) -> Agent | None:
        return await directory_sql.get(self.conn, dynamics_user_id)

    async def get_agents(self, dynamics_user_ids: Sequence[str]) -> dict[str, Agent]:
        return await directory_sql.get_many(self.conn, dynamics_user_ids)

    async def upsert_agent(self, agent: Agent) -> str:
        return await directory_sql.upsert_one(self.conn, agent)

    async def record_unknown(self, system: System, external_id: str, now: datetime) -> None:
        await directory_sql.record_unknown(self.conn, system, external_id, now)
