"""``AgentSyncState`` in ``agent_state``: one row per agent, the state as a JSON document (its codec:
``service.store.state_doc``), and the row PostgreSQL locks while an engine decides for the agent."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.clock import utcnow
from mapping.model import AgentSyncState, System
from service.store.dialect import upsert
from service.store.schema import agent_state
from service.store.state_doc import SEEN_KEYS, from_doc, to_doc
from service.store.types import UTCDateTime

_CHUNK = 500  # ids per IN (...): far below both dialects' bound-parameter limits


async def load(conn: AsyncConnection, agent_id: str, *, lock: bool) -> AgentSyncState:
    """The agent's state, blank when never saved. ``lock`` (PostgreSQL): make sure the agent has an
    ``agent_state`` row and lock it until commit, so concurrent engines on other instances
    serialise on the agent instead of overwriting each other's decisions. Both in one round trip:
    an upsert whose conflict arm updates the row takes its row lock as ``SELECT ... FOR UPDATE``
    does, and returns the row as it stands (a placeholder when new)."""
    if not lock:
        return (await load_many(conn, [agent_id])).get(agent_id) or AgentSyncState(agent_id)
    head = (await conn.execute(_lock_statement(conn.dialect.name), {"agent_id": agent_id, "now": utcnow()})).first()
    return _state_of(head) if head is not None else AgentSyncState(agent_id)


def _placeholders(dialect: str, values: Any) -> Any:
    """Inserts a placeholder row per agent or locks the existing one, returning each row as it stands.
    The conflict arm sets only ``agent_id`` to itself, so a saved state is left as it is."""
    stmt = upsert(dialect, agent_state).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[agent_state.c.agent_id], set_={"agent_id": stmt.excluded.agent_id}
    )
    return stmt.returning(agent_state.c.agent_id, agent_state.c.saved, agent_state.c.doc)


@functools.cache
def _lock_statement(dialect: str) -> Any:
    """``load(lock=True)``'s ``_placeholders`` for one agent, built once per dialect."""
    now = bindparam("now", type_=UTCDateTime())
    return _placeholders(dialect, {"agent_id": bindparam("agent_id"), "saved": False, "updated_at": now})


def _state_of(row: Any) -> AgentSyncState:
    """A row of ``_placeholders``: its saved state, or a blank one for a placeholder."""
    return from_doc(row.agent_id, row.doc) if row.saved else AgentSyncState(row.agent_id)


@functools.cache
def _save_statement(dialect: str) -> Any:
    """The upsert of ``save``, built once per dialect and executed with parameters: building an
    ``ON CONFLICT`` statement (its ``excluded`` columns) costs more CPU than running it, and
    ``save`` runs for every event."""
    stmt = upsert(dialect, agent_state)
    return stmt.on_conflict_do_update(
        index_elements=[agent_state.c.agent_id],
        set_={"saved": True, "doc": stmt.excluded.doc, "updated_at": stmt.excluded.updated_at},
    )


async def save(conn: AsyncConnection, state: AgentSyncState) -> None:
    await save_many(conn, [state])


async def load_group(conn: AsyncConnection, agent_ids: Sequence[str], *, lock: bool) -> dict[str, AgentSyncState]:
    """``load`` of each agent, in one statement per ``_CHUNK`` ids: the engine's read of a group of
    observations. ``lock`` (PostgreSQL) upserts every placeholder at once; its conflict arm locks
    the existing rows in the order given (callers sort the ids)."""
    ids = list(dict.fromkeys(agent_ids))
    if not lock:
        saved = await load_many(conn, ids)
        return {a: saved.get(a) or AgentSyncState(a) for a in ids}
    out: dict[str, AgentSyncState] = {}
    now = utcnow()
    for start in range(0, len(ids), _CHUNK):
        rows = [{"agent_id": a, "saved": False, "updated_at": now} for a in ids[start : start + _CHUNK]]
        for row in await conn.execute(_placeholders(conn.dialect.name, rows)):
            out[row.agent_id] = _state_of(row)
    return {a: out.get(a) or AgentSyncState(a) for a in ids}


async def save_many(conn: AsyncConnection, states: Sequence[AgentSyncState]) -> None:
    """``save`` of each state, as one executemany."""
    if not states:
        return
    now = utcnow()
    await conn.execute(
        _save_statement(conn.dialect.name),
        [{"agent_id": s.agent_id, "saved": True, "doc": to_doc(s), "updated_at": now} for s in states],
    )


@functools.cache
def _seen_statement(system: System) -> Any:
    """``seen_values``' query, built once per system: the value read with the dialect's JSON path
    operator (the console's sort keys are read the same way)."""
    value = agent_state.c.doc[(SEEN_KEYS[system], "value")].as_string()
    return select(agent_state.c.agent_id, value).where(
        agent_state.c.agent_id.in_(bindparam("ids", expanding=True)), agent_state.c.saved.is_(True)
    )


async def seen_values(conn: AsyncConnection, agent_ids: Sequence[str], system: System) -> dict[str, str | None]:
    """One value of each saved state's document, without decoding the documents."""
    out: dict[str, str | None] = {}
    ids = list(dict.fromkeys(agent_ids))
    for start in range(0, len(ids), _CHUNK):
        rows = await conn.execute(_seen_statement(system), {"ids": ids[start : start + _CHUNK]})
        out.update((row[0], row[1]) for row in rows)
    return out


_LOAD_MANY = select(agent_state.c.agent_id, agent_state.c.doc).where(
    agent_state.c.agent_id.in_(bindparam("ids", expanding=True)), agent_state.c.saved.is_(True)
)
"""Built once (an expanding IN): building the query for every group cost more CPU than running it."""


async def load_many(conn: AsyncConnection, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
    """Saved states only (placeholders left by ``load(lock=True)`` are not states), as the
    in-memory store returns only agents whose state was saved."""
    out: dict[str, AgentSyncState] = {}
    ids = list(dict.fromkeys(agent_ids))
    for start in range(0, len(ids), _CHUNK):
        rows = (await conn.execute(_LOAD_MANY, {"ids": ids[start : start + _CHUNK]})).all()
        for row in rows:
            out[row.agent_id] = from_doc(row.agent_id, row.doc)
    return {a: out[a] for a in agent_ids if a in out}
