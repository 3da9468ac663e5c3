"""Agent directory and unknown-id statements, shared by the store and its transactions."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.clock import utcnow
from mapping.model import Agent, System
from service.store.dialect import upsert
from service.store.schema import agents, unknown_ids


def norm(agent: Agent) -> Agent:
    """Ids are compared lower-case everywhere (Dataverse and Entra both hand out GUIDs in either case)."""
    return replace(agent, dynamics_user_id=agent.dynamics_user_id.strip().lower(),
                   entra_object_id=agent.entra_object_id.strip().lower())


def to_agent(r: Any) -> Agent:
    return Agent(r.dynamics_user_id, r.entra_object_id, r.display_name, bool(r.enabled))


async def get(conn: AsyncConnection, dynamics_user_id: str) -> Agent | None:
    key = dynamics_user_id.strip().lower()
    r = (await conn.execute(select(agents).where(agents.c.dynamics_user_id == key))).first()
    return to_agent(r) if r is not None else None


async def get_by_entra(conn: AsyncConnection, entra_object_id: str) -> Agent | None:
    key = entra_object_id.strip().lower()
    r = (await conn.execute(select(agents).where(agents.c.entra_object_id == key))).first()
    return to_agent(r) if r is not None else None


async def upsert_one(conn: AsyncConnection, agent: Agent) -> str:
    """``added``/``updated``/``unchanged``; ValueError (both ids named) when the Entra id is another
    agent's: one person must not be two agents, or their presences would be crossed."""
    agent = norm(agent)
    other = (await conn.execute(
        select(agents.c.dynamics_user_id).where(agents.c.entra_object_id == agent.entra_object_id,
                                                agents.c.dynamics_user_id != agent.dynamics_user_id)
    )).scalar_one_or_none()
    if other is not None:
        raise ValueError(f"Entra object id {agent.entra_object_id} already belongs to agent {other}")
    old = await get(conn, agent.dynamics_user_id)
    now = utcnow()
    if old is None:
        await conn.execute(agents.insert().values(
            dynamics_user_id=agent.dynamics_user_id, entra_object_id=agent.entra_object_id,
            display_name=agent.display_name, enabled=agent.enabled, created_at=now, updated_at=now,
        ))
        return "added"
    if old == agent:
        return "unchanged"
    await conn.execute(update(agents).where(agents.c.dynamics_user_id == agent.dynamics_user_id).values(
        entra_object_id=agent.entra_object_id, display_name=agent.display_name, enabled=agent.enabled,
        updated_at=now,
    ))
    return "updated"


async def set_enabled(conn: AsyncConnection, dynamics_user_id: str, enabled: bool) -> bool:
    stmt = (update(agents).where(agents.c.dynamics_user_id == dynamics_user_id.strip().lower())
            .values(enabled=enabled, updated_at=utcnow()).returning(agents.c.dynamics_user_id))
    return (await conn.execute(stmt)).first() is not None


async def record_unknown(conn: AsyncConnection, system: System, external_id: str, now: datetime) -> None:
    stmt = upsert(conn.dialect.name, unknown_ids).values(
        system=system.value, external_id=external_id, first_seen=now, last_seen=now, count=1
    )
    await conn.execute(stmt.on_conflict_do_update(
        index_elements=[unknown_ids.c.system, unknown_ids.c.external_id],
        set_={"count": unknown_ids.c.count + 1, "last_seen": stmt.excluded.last_seen},
    ))


async def list_unknown(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Most frequent first, the shape ``MemoryStore.list_unknown`` gives."""
    rows = (await conn.execute(
        select(unknown_ids).order_by(unknown_ids.c.count.desc(), unknown_ids.c.first_seen,
                                     unknown_ids.c.system, unknown_ids.c.external_id)
    )).all()
    out = []
    for r in rows:
        m = r._mapping  # ``Row.count`` would be the tuple method, not the column
        out.append({"system": m["system"], "id": m["external_id"], "first_seen": m["first_seen"],
                    "count": int(m["count"]), "last_seen": m["last_seen"]})
    return out
