"""What the console reads from the store, beyond the ``Store`` port: one page of agents (search,
sort, paging in the database, so 50,000 agents cost one indexed page read), the outbox rows of those
agents, and which agents changed since a moment (for the live stream).

``service.store.console_sql.ConsoleSql`` implements it on SQL; ``FallbackReads`` does it over the
plain ``Store`` port (the in-memory store of tests), in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from mapping.model import Agent, AgentSyncState, OutboxRow, System
from mapping.ports import Store

SORTS = ("name", "id", "dynamics", "teams", "changed")
MAX_PAGE = 200


@dataclass(frozen=True)
class AgentRow:
    agent: Agent
    state: AgentSyncState | None
    changed_at: datetime | None
    """When the bridge last saved the agent's state (any change on either side)."""


@dataclass(frozen=True)
class AgentPage:
    total: int
    rows: list[AgentRow]


@runtime_checkable
class ConsoleReads(Protocol):
    async def console_agents(
        self, *, search: str, sort: str, descending: bool, offset: int, limit: int
    ) -> AgentPage: ...

    async def console_outbox_for(self, agent_ids: Sequence[str]) -> dict[tuple[str, System], OutboxRow]: ...

    async def console_changed_since(self, since: datetime | None, limit: int) -> tuple[datetime | None, list[str]]:
        """The latest state save and the agents saved after ``since`` (at most ``limit``)."""
        ...

    async def console_last_teams_report(self, entra_ids: Sequence[str]) -> datetime | None:
        """The latest Teams observation of any agent among ``entra_ids`` (a subscription's agents):
        notifications and the sweep's reads alike. (Whether the subscription itself still delivers is
        its own record, ``graph_sync.notifications.NOTIFIED_KIND``, shown beside it.)"""
        ...


def _matches(agent: Agent, needle: str) -> bool:
    return any(needle in v.lower() for v in (agent.display_name, agent.dynamics_user_id, agent.entra_object_id))


class FallbackReads:
    """``ConsoleReads`` over the ``Store`` port alone: fine for a few hundred agents (tests)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def console_agents(self, *, search: str, sort: str, descending: bool, offset: int, limit: int) -> AgentPage:
        agents = await self.store.list_agents()
        needle = search.strip().lower()
        if needle:
            agents = [a for a in agents if _matches(a, needle)]
        states = await self.store.load_states([a.dynamics_user_id for a in agents])

        def key(a: Agent) -> str | None:
            s = states.get(a.dynamics_user_id)
            return {
                "name": a.display_name.lower(),
                "id": a.dynamics_user_id,
                "dynamics": s.dynamics_seen.value if s else None,
                "teams": s.teams_seen.value if s else None,
                "changed": None,  # the port keeps no save times
            }[sort]

        # As in SQL: ties by id ascending either way (a stable sort), agents without a value last.
        agents.sort(key=lambda a: a.dynamics_user_id)
        known = [a for a in agents if key(a) is not None]
        known.sort(key=lambda a: key(a) or "", reverse=descending)
        agents = known + [a for a in agents if key(a) is None]
        page = agents[offset : offset + limit]
        return AgentPage(len(agents), [AgentRow(a, states.get(a.dynamics_user_id), None) for a in page])

    async def console_outbox_for(self, agent_ids: Sequence[str]) -> dict[tuple[str, System], OutboxRow]:
        out: dict[tuple[str, System], OutboxRow] = {}
        for agent_id in agent_ids:
            for system in System:
                row = await self.store.outbox_row(agent_id, system)
                if row is not None:
                    out[(agent_id, system)] = row
        return out

    async def console_changed_since(self, since: datetime | None, limit: int) -> tuple[datetime | None, list[str]]:
        return since, []

    async def console_last_teams_report(self, entra_ids: Sequence[str]) -> datetime | None:
        wanted = {e.lower() for e in entra_ids}
        ids = [a.dynamics_user_id for a in await self.store.list_agents() if a.entra_object_id in wanted]
        times = [s.teams_seen.at for s in (await self.store.load_states(ids)).values() if s.teams_seen.at]
        return max(times) if times else None


def reads_for(store: Store) -> ConsoleReads:
    return store if isinstance(store, ConsoleReads) else FallbackReads(store)
