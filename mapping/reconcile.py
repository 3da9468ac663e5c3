"""Reconciliation (rule 8): read both systems in batches and feed what they say through the normal
rules as observations, so drift is repaired by the same code, limits and outbox as any event.

At 50,000 agents the sweep is 77 Graph reads and as many Dataverse queries, but 100,000 observations:
they cost what the engine's transactions cost. So each batch of agents (650, one Graph call) is
read from both systems, decided first *in memory* against the states loaded in one query, and only
the observations that change something go through ``SyncEngine.observe_many`` (the rules again,
under the agent's lock and in a transaction, folding the batch into few commits). An observation
the rules find needs nothing written, leaving the state unchanged, is settled without a transaction:
the engine would have written nothing for it either, but for when Teams was last seen showing an
unchanged value (``_unchanged``; ``tests/scenarios/test_sweep_batching.py``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mapping import rules as R
from mapping.engine import Outcome, SyncEngine
from mapping.errors import UpstreamError
from mapping.model import Agent, AgentSyncState, PresenceObserved, System
from mapping.ports import PresenceReader
from mapping.rules import Result

log = logging.getLogger("presence_sync.reconcile")

BATCH = 650
"""Agents per batch: what one ``getPresencesByUserId`` call takes."""
WHOLE_AT = 1000
"""From this many agents on, a reader that can read its whole table in pages (``WholeReader``: the
Dataverse client) reads it once for the sweep instead of once per batch of ids."""


@runtime_checkable
class WholeReader(Protocol):
    async def read_all(self, agents: Sequence[Agent]) -> list[PresenceObserved]:
        """What ``read`` would return for ``agents``, read as a whole table (paged)."""
        ...


@dataclass
class ReconcileSummary:
    checked: int = 0
    in_sync: int = 0
    repaired: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    settled: int = 0
    """Observations found in sync in memory, without a transaction (not part of ``line``)."""

    def line(self) -> str:
        return f"checked {self.checked}, in sync {self.in_sync}, repaired {self.repaired}, failed {self.failed}"


async def reconcile(
    engine: SyncEngine,
    readers: Mapping[System, PresenceReader],
    agents: Sequence[Agent],
    *,
    batch_size: int = BATCH,
    progress: Callable[[str], None] | None = None,
    presettle: bool = True,
) -> ReconcileSummary:
    """Dynamics first (within each agent's observations): it is the routing truth, and its newer
    versions decide conflicts. An agent counts as repaired when any observation produced commands,
    in sync when none did. Dead letters whose death the state never heard of are applied first
    (``SyncEngine.recheck_dead_letters``), so that what the state counts as shown is what the
    systems were really given. ``presettle=False`` sends every observation through the engine (the
    test comparing both ways)."""
    summary = ReconcileSummary(checked=len(agents))
    lost = await engine.recheck_dead_letters()
    if lost:
        log.warning("dead letters whose report was lost, applied", extra={"fields": {"rows": lost}})
    changed: set[str] = set()
    failed: set[str] = set()
    order = [s for s in (System.DYNAMICS, System.TEAMS) if s in readers]
    whole: dict[System, dict[str, PresenceObserved]] = {}
    for system in order:
        reader = readers[system]
        if len(agents) >= WHOLE_AT and isinstance(reader, WholeReader):
            try:
                whole[system] = {o.agent_id: o for o in await reader.read_all(agents)}
            except UpstreamError as e:  # read batch by batch instead
                log.warning(
                    "reconcile whole read failed", extra={"fields": {"system": str(system), "error": e.message}}
                )
    for start in range(0, len(agents), batch_size):
        chunk = agents[start : start + batch_size]
        observed: list[PresenceObserved] = []
        for system in order:
            if system in whole:
                seen = whole[system]
                observed.extend(o for a in chunk if (o := seen.get(a.dynamics_user_id)) is not None)
                continue
            try:
                observed.extend(await readers[system].read(chunk))
            except UpstreamError as e:
                failed.update(a.dynamics_user_id for a in chunk)
                summary.errors.append(f"{system}: reading {len(chunk)} agents failed: {e.message}")
                log.warning("reconcile read failed", extra={"fields": {"system": str(system), "error": e.message}})
        rest = await _settle_in_memory(engine, observed, summary) if presettle else observed
        outcomes: list[Outcome] = await engine.observe_many(rest, intake="reconcile") if rest else []
        for obs, outcome in zip(rest, outcomes, strict=True):
            if outcome.commands:
                changed.add(obs.agent_id)
            elif outcome.result is Result.UNKNOWN_PRESENCE:
                failed.add(obs.agent_id)
        if progress:
            progress(f"read {min(start + batch_size, len(agents))}/{len(agents)} agents from {len(order)} system(s)")
    summary.failed = len(failed)
    summary.repaired = len(changed - failed)
    summary.in_sync = summary.checked - summary.repaired - summary.failed
    return summary


async def _settle_in_memory(
    engine: SyncEngine, observed: Sequence[PresenceObserved], summary: ReconcileSummary
) -> list[PresenceObserved]:
    """The observations the engine must see, in their order; the others (nothing to do, state
    unchanged) are counted as the engine counts them and dropped. Once one observation of an agent
    goes to the engine, the agent's later ones do too: they must be decided on the state it leaves.
    Needing the outbox (a write of ours unconfirmed) also sends it there: only a transaction may
    read the outbox consistently with the state."""
    if not observed:
        return []
    states: dict[str, AgentSyncState] = await engine.store.load_states(sorted({o.agent_id for o in observed}))
    now = engine.clock()
    rest: list[PresenceObserved] = []
    dirty: set[str] = set()
    for obs in observed:
        state = states.get(obs.agent_id)
        if state is None or obs.agent_id in dirty or _needs_outbox(state, obs.system):
            dirty.add(obs.agent_id)
            rest.append(obs)
            continue
        decision = R.decide(state, obs, engine.rules, engine.catalogue, now)
        quiet = not (decision.commands or decision.cancel or decision.read)
        if quiet and decision.result in SETTLED and _unchanged(decision.state, state):
            engine.telemetry.event("reconcile", decision.result)
            summary.settled += 1
            continue
        dirty.add(obs.agent_id)
        rest.append(obs)
    return rest


SETTLED = (Result.DUPLICATE, Result.STALE, Result.NO_CHANGE, Result.ECHO)


def _unchanged(new: AgentSyncState, old: AgentSyncState) -> bool:
    """Whether a decision left the state as it was, but for when Teams was last seen showing the
    value it still shows. That time orders Teams events (an event received before it is stale);
    a sweep's read of the value already known does not move it: every Teams read is newer than the
    last one, so without this the whole second half of every sweep (50,000 reads) would be
    transactions that change nothing else. An event received before this read but handled after
    it is then applied instead of found stale; what it says was already shown before this read, and
    the next notification, poll or sweep brings Teams' newer state."""
    if new == old:
        return True
    if new.teams_seen.value != old.teams_seen.value:
        return False
    return dataclasses.replace(new, teams_seen=dataclasses.replace(new.teams_seen, at=old.teams_seen.at)) == old


def _needs_outbox(state: AgentSyncState, system: System) -> bool:
    return R.needs_unsent(state, system) or (system is System.TEAMS and R.needs_unsent(state, System.DYNAMICS))
