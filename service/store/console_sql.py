"""The console's reads on SQL (``console.reads.ConsoleReads``), mixed into ``SqlStore``.

Additive and read-only: one page of agents joined with their state rows, searched, sorted and paged
by the database (LIMIT/OFFSET on ``agents``; the sort keys inside the state document are read with
the dialect's JSON path operator), so the console shows 50,000 agents at the cost of one page.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from console.reads import AgentPage, AgentRow
from mapping.model import OutboxRow, System
from service.store.directory_sql import to_agent
from service.store.outbox_sql import to_row
from service.store.schema import agent_state, agents, outbox
from service.store.state_doc import SEEN_KEYS, from_doc

_CHUNK = 500


def _sort_column(sort: str) -> Any:
    doc = agent_state.c.doc
    return {
        "name": func.lower(agents.c.display_name),
        "id": agents.c.dynamics_user_id,
        "dynamics": doc[(SEEN_KEYS[System.DYNAMICS], "value")].as_string(),
        "teams": doc[(SEEN_KEYS[System.TEAMS], "value")].as_string(),
        "changed": agent_state.c.updated_at,
    }[sort]


class ConsoleSql:
    """Mixed into ``SqlStore``; uses its ``_reading`` connections."""

    def _reading(self) -> Any:  # provided by SqlStore
        raise NotImplementedError

    async def console_agents(self, *, search: str, sort: str, descending: bool, offset: int, limit: int) -> AgentPage:
        joined = agents.outerjoin(agent_state, agent_state.c.agent_id == agents.c.dynamics_user_id)
        where = []
        needle = search.strip().lower()
        if needle:
            escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            like = f"%{escaped}%"
            where.append(
                or_(
                    func.lower(agents.c.display_name).like(like, escape="\\"),
                    agents.c.dynamics_user_id.like(like, escape="\\"),
                    agents.c.entra_object_id.like(like, escape="\\"),
                )
            )
        col = _sort_column(sort)
        # Agents the bridge has not seen yet (no state, no value) come last either way, as in console.reads.
        order = [(col.desc() if descending else col.asc()).nulls_last(), agents.c.dynamics_user_id]
        # Two steps: the page's ids first, from narrow rows (a sort by name or id never touches a state
        # document), then those agents' rows with their documents: sorting 50,000 rows that carry
        # their documents costs more than the page itself.
        page_ids = select(agents.c.dynamics_user_id).where(*where).order_by(*order).offset(offset).limit(limit)
        if sort in ("dynamics", "teams", "changed"):
            page_ids = page_ids.select_from(joined)
        count = select(func.count()).select_from(agents).where(*where)
        conn: AsyncConnection
        async with self._reading() as conn:
            total = int((await conn.execute(count)).scalar_one())
            ids = [r.dynamics_user_id for r in (await conn.execute(page_ids)).all()]
            result = (
                await conn.execute(
                    select(
                        agents,
                        agent_state.c.saved,
                        agent_state.c.doc,
                        agent_state.c.updated_at.label("state_updated_at"),
                    )
                    .select_from(joined)
                    .where(agents.c.dynamics_user_id.in_(ids))
                )
            ).all()
        by_id = {r.dynamics_user_id: r for r in result}
        rows = [
            AgentRow(
                to_agent(r),
                from_doc(r.dynamics_user_id, r.doc) if r.saved else None,
                r.state_updated_at if r.saved else None,
            )
            for i in ids
            if (r := by_id.get(i)) is not None
        ]
        return AgentPage(total, rows)

    async def console_outbox_for(self, agent_ids: Sequence[str]) -> dict[tuple[str, System], OutboxRow]:
        out: dict[tuple[str, System], OutboxRow] = {}
        ids = list(dict.fromkeys(agent_ids))
        async with self._reading() as conn:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                for r in (await conn.execute(select(outbox).where(outbox.c.agent_id.in_(chunk)))).all():
                    row = to_row(r)
                    out[(row.agent_id, row.system)] = row
        return out

    async def console_last_teams_report(self, entra_ids: Sequence[str]) -> datetime | None:
        # ISO times in UTC (state_doc) order as strings, so the database takes the max.
        seen_at = agent_state.c.doc[(SEEN_KEYS[System.TEAMS], "at")].as_string()
        joined = agents.join(agent_state, agent_state.c.agent_id == agents.c.dynamics_user_id)
        ids = sorted({e.lower() for e in entra_ids})
        latest: str | None = None
        async with self._reading() as conn:
            for start in range(0, len(ids), _CHUNK):
                query = (
                    select(func.max(seen_at))
                    .select_from(joined)
                    .where(agents.c.entra_object_id.in_(ids[start : start + _CHUNK]), agent_state.c.saved.is_(True))
                )
                found = (await conn.execute(query)).scalar_one()
                if found and (latest is None or found > latest):
                    latest = found
        return datetime.fromisoformat(latest).astimezone(UTC) if latest else None

    async def console_changed_since(self, since: datetime | None, limit: int) -> tuple[datetime | None, list[str]]:
        async with self._reading() as conn:
            latest = (await conn.execute(select(func.max(agent_state.c.updated_at)))).scalar_one()
            if since is None or latest is None or latest <= since:
                return latest or since, []
            rows = (
                await conn.execute(
                    select(agent_state.c.agent_id)
                    .where(agent_state.c.updated_at > since)
                    .order_by(agent_state.c.updated_at.desc())
                    .limit(limit)
                )
            ).all()
        return latest, [r.agent_id for r in rows]
