"""Reconciliation (rule 8): read both systems in batches and feed what they say through the normal
rules as observations, so drift is repaired by the same code, limits and outbox as any event."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mapping.engine import SyncEngine
from mapping.errors import UpstreamError
from mapping.model import Agent, System
from mapping.ports import PresenceReader
from mapping.rules import Result

log = logging.getLogger("presence_sync.reconcile")


@dataclass
class ReconcileSummary:
    checked: int = 0
    in_sync: int = 0
    repaired: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"checked {self.checked}, in sync {self.in_sync}, repaired {self.repaired}, failed {self.failed}"


async def reconcile(
    engine: SyncEngine,
    readers: Mapping[System, PresenceReader],
    agents: Sequence[Agent],
    *,
    batch_size: int = 650,
    progress: Callable[[str], None] | None = None,
) -> ReconcileSummary:
    """Dynamics first: it is the routing truth, and its newer versions decide conflicts. An agent
    counts as repaired when any observation produced commands, in sync when none did. Dead letters
    whose death the state never heard of are applied first (``SyncEngine.recheck_dead_letters``), so
    that what the state counts as shown is what the systems were really given."""
    summary = ReconcileSummary(checked=len(agents))
    lost = await engine.recheck_dead_letters()
    if lost:
        log.warning("dead letters whose report was lost, applied", extra={"fields": {"rows": lost}})
    changed: set[str] = set()
    failed: set[str] = set()
    order = [s for s in (System.DYNAMICS, System.TEAMS) if s in readers]
    for system in order:
        for start in range(0, len(agents), batch_size):
            chunk = agents[start : start + batch_size]
            try:
                observed = await readers[system].read(chunk)
            except UpstreamError as e:
                failed.update(a.dynamics_user_id for a in chunk)
                summary.errors.append(f"{system}: reading {len(chunk)} agents failed: {e.message}")
                log.warning("reconcile read failed", extra={"fields": {"system": str(system), "error": e.message}})
                continue
            for obs in observed:
                outcome = await engine.observe(obs, intake="reconcile")
                if outcome.commands:
                    changed.add(obs.agent_id)
                elif outcome.result is Result.UNKNOWN_PRESENCE:
                    failed.add(obs.agent_id)
            if progress:
                progress(f"{system}: read {min(start + batch_size, len(agents))}/{len(agents)}")
    summary.failed = len(failed)
    summary.repaired = len(changed - failed)
    summary.in_sync = summary.checked - summary.repaired - summary.failed
    return summary
