"""``agents discover``: the agent directory from Dataverse instead of typed in (rule 1).

An agent is a ``systemuser`` that has an ``msdyn_agentstatus`` row (what Dynamics 365 Contact Center
keeps for every agent; its Create is what the webhook reports for a new one). Other users (back office,
application users) are counted, not added: every directory entry costs a Graph subscription slot and
would have its Teams changes written to Dynamics 365, where the CCaaS API refuses non-agents.

Each page of ``systemusers`` is checked and written as one batch (``store.upsert_agents``, all or
nothing), so an interrupted run leaves whole pages; a failed page is retried with ``bridge.retry``
from its own link, not from the start. Skipped users are listed with the reason an admin can fix:
no Entra object id, disabled, or an Entra object id that another agent already has. A directory
agent whose user is now disabled in Dataverse is disabled in the directory (counted as updated); an
agent disabled by hand in the directory stays disabled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from dataverse.client import DataverseClient, SystemUser
from mapping.api import CoreApi
from mapping.model import Agent

NO_ENTRA = "no Entra object id (azureactivedirectoryobjectid is empty)"
DISABLED = "disabled user"
ENTRA_TAKEN = "Entra object id used by another agent"


@dataclass
class DiscoverySummary:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    not_agents: int = 0
    """Users without an ``msdyn_agentstatus`` row: not contact-center agents, left out."""
    pages: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> the users skipped for it (``name (systemuserid)``)."""

    def skip(self, reason: str, who: str) -> None:
        self.skipped.setdefault(reason, []).append(who)

    @property
    def skipped_count(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def __str__(self) -> str:
        lines = [
            f"agents discovered: added {self.added}, updated {self.updated}, unchanged {self.unchanged}, "
            f"skipped {self.skipped_count} ({self.pages} page(s); {self.not_agents} user(s) without an "
            "msdyn_agentstatus row are not agents and were left out)"
        ]
        for reason, who in sorted(self.skipped.items()):
            shown = ", ".join(who[:10]) + (f" and {len(who) - 10} more" if len(who) > 10 else "")
            lines.append(f"  skipped, {reason}: {len(who)}: {shown}")
        return "\n".join(lines)


def _label(user: SystemUser) -> str:
    return f"{user.fullname or '?'} ({user.systemuserid})"


async def discover_agents(
    client: DataverseClient,
    bridge: CoreApi,
    progress: Callable[[str], None],
    *,
    page_size: int = 500,
    agents_only: bool = True,
) -> DiscoverySummary:
    """Adds or updates directory agents from Dataverse ``systemusers``; ``progress`` gets a line per page.
    ``agents_only=False`` takes every user with an Entra object id (no ``msdyn_agentstatus`` check)."""
    store = bridge.directory
    summary = DiscoverySummary()
    agent_ids: set[str] | None = None
    if agents_only:
        agent_ids = await bridge.retry.run(client.agent_ids)
        progress(f"{len(agent_ids)} user(s) have an msdyn_agentstatus row (contact-center agents)")
    known = {a.dynamics_user_id: a for a in await store.list_agents()}
    entra_owner = {a.entra_object_id: a.dynamics_user_id for a in known.values()}
    link: str | None = None
    while True:
        users, link = await bridge.retry.run(functools.partial(client.systemusers_page, link, page_size=page_size))
        summary.pages += 1
        before = (summary.added, summary.updated, summary.unchanged, summary.skipped_count)
        batch: list[Agent] = []
        for user in users:
            if agent_ids is not None and user.systemuserid not in agent_ids:
                summary.not_agents += 1
                continue
            existing = known.get(user.systemuserid)
            if user.disabled:
                if existing is not None and existing.enabled:
                    await store.set_agent_enabled(user.systemuserid, False)
                    summary.updated += 1
                else:
                    summary.skip(DISABLED, _label(user))
                continue
            if user.entra_object_id is None:
                summary.skip(NO_ENTRA, _label(user))
                continue
            owner = entra_owner.get(user.entra_object_id)
            if owner is not None and owner != user.systemuserid:
                summary.skip(ENTRA_TAKEN, f"{_label(user)} (held by {owner})")
                continue
            entra_owner[user.entra_object_id] = user.systemuserid
            enabled = existing.enabled if existing is not None else True
            batch.append(Agent(user.systemuserid, user.entra_object_id, user.fullname, enabled))
        await _write(bridge, batch, summary, known)
        added, updated, unchanged, skipped = (
            summary.added - before[0],
            summary.updated - before[1],
            summary.unchanged - before[2],
            summary.skipped_count - before[3],
        )
        progress(
            f"page {summary.pages}: {len(users)} user(s) read; added {added}, updated {updated}, "
            f"unchanged {unchanged}, skipped {skipped}"
        )
        if link is None:
            return summary


async def _write(bridge: CoreApi, batch: list[Agent], summary: DiscoverySummary, known: dict[str, Agent]) -> None:
    """One page in one batch; if the store refuses it (an Entra id swapped between two agents), agent by
    agent, so one conflict skips one user, not the page."""
    if not batch:
        return
    try:
        results = await bridge.directory.upsert_agents(batch)
    except ValueError:
        results = {}
        for agent in batch:
            try:
                results.update(await bridge.directory.upsert_agents([agent]))
            except ValueError as e:
                summary.skip(ENTRA_TAKEN, f"{agent.label}: {e}")
    for agent in batch:
        outcome = results.get(agent.dynamics_user_id)
        if outcome is None:
            continue
        known[agent.dynamics_user_id] = agent
        if outcome == "added":
            summary.added += 1
        elif outcome == "updated":
            summary.updated += 1
        else:
            summary.unchanged += 1
