"""The core's application service: implements ``mapping.api.CoreApi`` over the store, the engine and
the outbox, and holds the use cases that span them (an agent changing presence and waiting for both
systems). ``service.runtime`` builds the one instance; adapters see it only as ``CoreApi``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mapping.api import AgentAdded, PresenceChange
from mapping.catalogue import Catalogue
from mapping.clock import Clock, utcnow
from mapping.engine import HOLD_CAP_FACTOR, Outcome, SyncEngine
from mapping.model import Agent, AgentSyncState, Delivery, OutboxRow, OutboxStatus, PresenceObserved, System
from mapping.outbox import OutboxWorker
from mapping.ports import (
    AdapterRecords,
    AgentDirectory,
    DeliveryListener,
    PresenceWriter,
    Quarantine,
    ReadRequests,
    Store,
)
from mapping.ratelimit import DATAVERSE_PER_USER, GRAPH_PRESENCE, UpstreamLimiter
from mapping.retry import RetryPolicy
from mapping.rules import Result
from mapping.telemetry import NullTelemetry, Telemetry
from mapping.translation import Rules
from mapping.upstream_health import BreakerPolicy


def default_limiters() -> dict[System, UpstreamLimiter]:
    return {System.TEAMS: UpstreamLimiter(GRAPH_PRESENCE), System.DYNAMICS: UpstreamLimiter(DATAVERSE_PER_USER)}


class _Relay:
    """Where the core's own parts call out to adapters that register later through the API (they are
    built with the core in hand): delivery outcomes for the bot's follow-ups, read requests for the
    Graph intake. Each registration is an explicit ``CoreApi`` call, not a field patched from outside."""

    def __init__(self) -> None:
        self.listeners: list[DeliveryListener] = []
        self.readers: dict[System, ReadRequests] = {}

    async def on_outcome(self, delivery: Delivery, outcome: str, error: str | None) -> None:
        for listener in self.listeners:
            await listener.on_outcome(delivery, outcome, error)

    async def request_read(self, system: System, agent_id: str, why: str) -> None:
        reads = self.readers.get(system)
        if reads is not None:
            await reads.request_read(system, agent_id, why)


@dataclass
class Bridge:
    """Build with ``Bridge.assemble``: it wires the engine and the outbox to each other."""

    store: Store
    catalogue: Catalogue
    rules: Rules
    engine: SyncEngine
    outbox: OutboxWorker
    telemetry: Telemetry = field(default_factory=NullTelemetry)
    limiters: Mapping[System, UpstreamLimiter] = field(default_factory=default_limiters)
    """Shared with adapters' reads: Graph presence reads and writes count against one bucket."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Clock = utcnow
    relay: _Relay = field(default_factory=_Relay)

    @classmethod
    def assemble(
        cls,
        store: Store,
        catalogue: Catalogue,
        rules: Rules,
        writers: Mapping[System, PresenceWriter],
        *,
        telemetry: Telemetry | None = None,
        limiters: Mapping[System, UpstreamLimiter] | None = None,
        retry: RetryPolicy | None = None,
        holds: Mapping[System, float] | None = None,
        clock: Clock = utcnow,
        owner: str | None = None,
        breaker: BreakerPolicy | None = None,
    ) -> Bridge:
        """The core, complete: the engine decides and enqueues (waking the outbox), the outbox
        delivers through ``writers`` and reports every outcome to the engine, then to whoever
        registered with ``on_delivery``. ``holds``: see ``SyncEngine``. ``breaker``: when an upstream
        counts as down and how it is probed (``mapping.upstream_health``)."""
        telemetry = telemetry or NullTelemetry()
        limiters = default_limiters() if limiters is None else limiters
        retry = retry or RetryPolicy()
        holds = dict(holds or {})
        relay = _Relay()
        wakeup = asyncio.Event()
        engine = SyncEngine(
            store, catalogue, rules, telemetry=telemetry, clock=clock, on_enqueued=wakeup.set, holds=holds, reads=relay
        )
        outbox = OutboxWorker(
            store,
            writers,
            limiters=limiters,
            policy=retry,
            telemetry=telemetry,
            listeners=[engine, relay],
            clock=clock,
            owner=owner,
            hold_seconds=max(holds.values(), default=0.0) * HOLD_CAP_FACTOR,
            wakeup=wakeup,
            breaker=breaker,
        )
        return cls(store, catalogue, rules, engine, outbox, telemetry, limiters, retry, clock, relay)

    def on_delivery(self, listener: DeliveryListener) -> None:
        self.relay.listeners.append(listener)

    def serve_reads(self, system: System, reads: ReadRequests) -> None:
        self.relay.readers[system] = reads

    # ---------------------------------------------------------------------------- CoreApi

    @property
    def directory(self) -> AgentDirectory:
        return self.store

    @property
    def records(self) -> AdapterRecords:
        return self.store

    @property
    def quarantine(self) -> Quarantine:
        return self.store

    async def observe(self, event: PresenceObserved, *, intake: str | None = None) -> Outcome:
        return await self.engine.observe(event, intake=intake)

    async def observe_many(self, events: Sequence[PresenceObserved], *, intake: str | None = None) -> list[Outcome]:
        return await self.engine.observe_many(events, intake=intake)

    async def agent_for(self, system: System, external_id: str) -> Agent | None:
        return await self.engine.agent_for(system, external_id)

    async def add_agent(self, candidate: Agent) -> AgentAdded:
        other = await self.store.get_agent_by_entra(candidate.entra_object_id)
        if other is not None and other.dynamics_user_id != candidate.dynamics_user_id:
            return AgentAdded(
                None,
                "refused",
                f"its Entra object id {candidate.entra_object_id} already belongs to agent {other.label}",
            )
        existing = await self.store.get_agent(candidate.dynamics_user_id)
        if existing is not None:
            return AgentAdded(existing, "kept")
        try:
            outcome = (await self.store.upsert_agents([candidate])).get(candidate.dynamics_user_id, "added")
        except ValueError as e:  # the Entra object id was taken meanwhile (another instance, a CSV)
            return AgentAdded(None, "refused", str(e))
        return AgentAdded(candidate, outcome)

    async def delivery(self, agent_id: str, system: System) -> OutboxRow | None:
        return await self.store.outbox_row(agent_id, system)

    async def last_known(self, agent_id: str) -> AgentSyncState | None:
        return (await self.store.load_states([agent_id])).get(agent_id)

    async def teams_seen_many(self, agent_ids: Sequence[str]) -> dict[str, str | None]:
        return await self.store.seen_values(agent_ids, System.TEAMS)

    async def change_presence(
        self, agent: Agent, presence_id: str, *, source: str, settle_seconds: float
    ) -> PresenceChange:
        outcome = await self.engine.command(agent, presence_id, source=source)
        presence = self.catalogue.get(presence_id)
        if outcome.result is Result.UNKNOWN_PRESENCE or presence is None:
            return PresenceChange(Result.UNKNOWN_PRESENCE, outcome.detail)
        expected = {System.DYNAMICS: presence.presence_id, System.TEAMS: self.rules.teams_for(presence.base)}
        systems = [c.system for c in outcome.commands]
        systems += await self._unfinished(agent, expected, exclude=systems)
        rows = await self._settle(agent, systems, settle_seconds) if systems else {}
        return PresenceChange(outcome.result, outcome.detail, expected, rows)

    async def _unfinished(
        self, agent: Agent, expected: Mapping[System, str], *, exclude: Sequence[System]
    ) -> list[System]:
        """Systems where this very value is still on its way, or died, although the core issued no new
        command for it (the core counts its last decided write as what the system shows until the
        echo comes back, even when that write died). A dead row is retried: the agent asking again is
        the human decision the dead letter was waiting for. Either way the caller waits for it and
        reports it, instead of answering "already" while the system shows something else."""
        found: list[System] = []
        for system, value in expected.items():
            if system in exclude:
                continue
            row = await self.store.outbox_row(agent.dynamics_user_id, system)
            if row is None or row.value != value or row.status is OutboxStatus.DELIVERED:
                continue
            if row.status is OutboxStatus.DEAD:
                await self.store.retry_dead(row.id, self.clock())
                self.outbox.wake()
            found.append(system)
        return found

    async def _settle(
        self, agent: Agent, systems: Sequence[System], settle_seconds: float
    ) -> dict[System, OutboxRow | None]:
        """Waits (bounded) for the rows just enqueued for ``systems`` to be delivered or dead."""
        generations: dict[System, int] = {}
        for system in systems:
            row = await self.store.outbox_row(agent.dynamics_user_id, system)
            generations[system] = row.generation if row else 0
        rows = await asyncio.gather(
            *(
                self.outbox.wait_settled(
                    agent.dynamics_user_id, s, after_generation=generations[s], timeout=settle_seconds
                )
                for s in systems
            )
        )
        return dict(zip(systems, rows, strict=True))
