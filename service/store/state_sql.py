"""``AgentSyncState`` in ``agent_state`` read outside the engine's transactions (the sweep, the
poller, the console): one row per agent, the state as a JSON document (its codec:
``service.store.state_doc``). The engine's own reads and writes, and the row lock PostgreSQL takes
while an engine decides for an agent, are ``service.store.tx``'s."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.model import AgentSyncState, System
from service.store.schema import agent_state
from service.store.state_doc import SEEN_KEYS, from_doc

_CHUNK = 500  # ids per IN (...): far below both dialects' bound-parameter limits


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
