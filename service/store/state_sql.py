"""``AgentSyncState`` in two tables: ``agent_state`` (one row per agent, also the row that
PostgreSQL locks) and ``sync_state`` (one row per agent and system)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.clock import utcnow
from mapping.model import AgentSyncState, SideState, System
from service.store.dialect import upsert
from service.store.schema import agent_state, sync_state

SIDE_COLUMNS = (
    "observed_value",
    "observed_version",
    "observed_at",
    "written_value",
    "written_at",
    "write_seen",
    "changed_at",
    "delivered_value",
    "delivered_at",
)
"""``SideState`` fields stored as plain columns; ``recent_writes`` is JSON (see ``_encode_writes``).
``tests/store`` fails when the model gains a field that is in neither, so nothing is silently lost."""
JSON_COLUMNS = ("recent_writes",)
_CHUNK = 500  # ids per IN (...): far below both dialects' bound-parameter limits


async def load(conn: AsyncConnection, agent_id: str, *, lock: bool) -> AgentSyncState:
    """The agent's state, blank when never saved. ``lock`` (PostgreSQL): make sure the agent has an
    ``agent_state`` row and lock it until commit, so concurrent engines on other instances
    serialise on the agent instead of overwriting each other's decisions."""
    if lock:
        placeholder = (
            upsert(conn.dialect.name, agent_state)
            .values(agent_id=agent_id, saved=False, updated_at=utcnow())
            .on_conflict_do_nothing(index_elements=[agent_state.c.agent_id])
        )
        await conn.execute(placeholder)
    query = select(agent_state).where(agent_state.c.agent_id == agent_id)
    if lock:
        query = query.with_for_update()
    head = (await conn.execute(query)).first()
    if head is None or not head.saved:
        return AgentSyncState(agent_id)
    sides = (await conn.execute(select(sync_state).where(sync_state.c.agent_id == agent_id))).all()
    return _build(head, sides)


def _build(head: Any, sides: Sequence[Any]) -> AgentSyncState:
    state = AgentSyncState(head.agent_id, restore_value=head.restore_value, override_value=head.override_value)
    for s in sides:
        side = state.side(System(s.system))
        for name in SIDE_COLUMNS:
            setattr(side, name, getattr(s, name))
        side.recent_writes = _decode_writes(s.recent_writes)
    return state


def _encode_writes(writes: Sequence[tuple[str, datetime]]) -> list[list[str]]:
    return [[value, at.astimezone(UTC).isoformat()] for value, at in writes]


def _decode_writes(raw: Any) -> list[tuple[str, datetime]]:
    return [(value, datetime.fromisoformat(at).astimezone(UTC)) for value, at in (raw or [])]


@functools.cache
def _save_statements(dialect: str) -> tuple[Any, Any]:
    """The two upserts of ``save``, built once per dialect and executed with parameters: building an
    ``ON CONFLICT`` statement (its ``excluded`` columns) costs more CPU than running it, and
    ``save`` runs for every event."""
    head = upsert(dialect, agent_state)
    head = head.on_conflict_do_update(
        index_elements=[agent_state.c.agent_id],
        set_={
            "saved": True,
            "restore_value": head.excluded.restore_value,
            "override_value": head.excluded.override_value,
            "updated_at": head.excluded.updated_at,
        },
    )
    row = upsert(dialect, sync_state)
    row = row.on_conflict_do_update(
        index_elements=[sync_state.c.agent_id, sync_state.c.system],
        set_={name: row.excluded[name] for name in (*SIDE_COLUMNS, *JSON_COLUMNS)},
    )
    return head, row


async def save(conn: AsyncConnection, state: AgentSyncState) -> None:
    head, row = _save_statements(conn.dialect.name)
    await conn.execute(
        head,
        {
            "agent_id": state.agent_id,
            "saved": True,
            "restore_value": state.restore_value,
            "override_value": state.override_value,
            "updated_at": utcnow(),
        },
    )
    sides = []
    for system in System:
        side: SideState = state.side(system)
        values: dict[str, Any] = {name: getattr(side, name) for name in SIDE_COLUMNS}
        values["recent_writes"] = _encode_writes(side.recent_writes)
        sides.append({"agent_id": state.agent_id, "system": system.value, **values})
    await conn.execute(row, sides)


async def load_many(conn: AsyncConnection, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
    """Saved states only (placeholders left by ``load(lock=True)`` are not states), as the
    in-memory store returns only agents whose state was saved."""
    out: dict[str, AgentSyncState] = {}
    ids = list(dict.fromkeys(agent_ids))
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        heads = (
            await conn.execute(
                select(agent_state).where(agent_state.c.agent_id.in_(chunk), agent_state.c.saved.is_(True))
            )
        ).all()
        if not heads:
            continue
        sides: dict[str, list[Any]] = {}
        for s in (await conn.execute(select(sync_state).where(sync_state.c.agent_id.in_(chunk)))).all():
            sides.setdefault(s.agent_id, []).append(s)
        for h in heads:
            out[h.agent_id] = _build(h, sides.get(h.agent_id, []))
    return {a: out[a] for a in agent_ids if a in out}
