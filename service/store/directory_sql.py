"""Agent directory and unknown-id statements, shared by the store and its transactions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.clock import utcnow
from mapping.model import Agent
from service.store.schema import agents, unknown_ids


def norm(agent: Agent) -> Agent:
    """Ids are compared lower-case everywhere (Dataverse and Entra both hand out GUIDs in either case)."""
    return replace(
        agent,
        dynamics_user_id=agent.dynamics_user_id.strip().lower(),
        entra_object_id=agent.entra_object_id.strip().lower(),
    )


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


_CHUNK = 500


async def upsert_many(conn: AsyncConnection, batch: Sequence[Agent]) -> dict[str, str]:
    """Upserts a whole import (``agents discover`` at 50,000 agents): each agent's outcome as if
    upserted one by one in batch order (``plan_upserts``), but reading what exists in a few queries
    and inserting new agents in bulk. Writes replay the batch order, so no intermediate state breaks
    the unique Entra id."""
    normed = [norm(a) for a in batch]
    current: dict[str, Agent] = {}
    owner: dict[str, str] = {}
    ids = list({a.dynamics_user_id for a in normed})
    entras = list({a.entra_object_id for a in normed})
    for column, keys in ((agents.c.dynamics_user_id, ids), (agents.c.entra_object_id, entras)):
        for start in range(0, len(keys), _CHUNK):
            for r in (await conn.execute(select(agents).where(column.in_(keys[start : start + _CHUNK])))).all():
                current[r.dynamics_user_id] = to_agent(r)
                owner[r.entra_object_id] = r.dynamics_user_id
    result, writes = plan_upserts(normed, current, owner)
    now = utcnow()
    if all(kind == "insert" for kind, _ in writes):  # a first import: one statement per chunk
        for start in range(0, len(writes), _CHUNK):
            await conn.execute(agents.insert(), [_row(a, now) for _, a in writes[start : start + _CHUNK]])
        return result
    for kind, agent in writes:
        if kind == "insert":
            await conn.execute(agents.insert().values(**_row(agent, now)))
        else:
            await conn.execute(
                update(agents)
                .where(agents.c.dynamics_user_id == agent.dynamics_user_id)
                .values(
                    entra_object_id=agent.entra_object_id,
                    display_name=agent.display_name,
                    enabled=agent.enabled,
                    updated_at=now,
                )
            )
    return result


def plan_upserts(
    normed: Sequence[Agent], current: dict[str, Agent], owner: dict[str, str]
) -> tuple[dict[str, str], list[tuple[str, Agent]]]:
    """What upserting ``normed`` (in order) does, given the directory's rows for their ids
    (``current``: by Dynamics id; ``owner``: Dynamics id by Entra id; both updated as it goes): each
    agent's outcome, and the writes (``insert``/``update``) that replay it. ValueError when an Entra id
    belongs to another agent."""
    result: dict[str, str] = {}
    writes: list[tuple[str, Agent]] = []
    for agent in normed:
        other = owner.get(agent.entra_object_id)
        if other is not None and other != agent.dynamics_user_id:
            raise ValueError(f"Entra object id {agent.entra_object_id} already belongs to agent {other}")
        old = current.get(agent.dynamics_user_id)
        if old is None:
            result[agent.dynamics_user_id] = "added"
            writes.append(("insert", agent))
        elif old == agent:
            result[agent.dynamics_user_id] = "unchanged"
        else:
            result[agent.dynamics_user_id] = "updated"
            writes.append(("update", agent))
            if old.entra_object_id != agent.entra_object_id:
                owner.pop(old.entra_object_id, None)
        current[agent.dynamics_user_id] = agent
        owner[agent.entra_object_id] = agent.dynamics_user_id
    return result, writes


def _row(agent: Agent, now: datetime) -> dict[str, Any]:
    return {
        "dynamics_user_id": agent.dynamics_user_id,
        "entra_object_id": agent.entra_object_id,
        "display_name": agent.display_name,
        "enabled": agent.enabled,
        "created_at": now,
        "updated_at": now,
    }


async def set_enabled(conn: AsyncConnection, dynamics_user_id: str, enabled: bool) -> bool:
    stmt = (
        update(agents)
        .where(agents.c.dynamics_user_id == dynamics_user_id.strip().lower())
        .values(enabled=enabled, updated_at=utcnow())
        .returning(agents.c.dynamics_user_id)
    )
    return (await conn.execute(stmt)).first() is not None


async def list_unknown(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Most frequent first, the shape ``MemoryStore.list_unknown`` gives."""
    rows = (
        await conn.execute(
            select(unknown_ids).order_by(
                unknown_ids.c.count.desc(), unknown_ids.c.first_seen, unknown_ids.c.system, unknown_ids.c.external_id
            )
        )
    ).all()
    out = []
    for r in rows:
        m = r._mapping  # ``Row.count`` would be the tuple method, not the column
        out.append(
            {
                "system": m["system"],
                "id": m["external_id"],
                "first_seen": m["first_seen"],
                "count": int(m["count"]),
                "last_seen": m["last_seen"],
            }
        )
    return out
