"""The core's application API: everything an adapter (``bot/``, ``graph_sync/``, ``dataverse/``) may
ask of the core. Adapters are typed against ``CoreApi`` and never see the store's sync state, the
outbox or the engine, so a use case (an agent changing presence and waiting for both systems) lives
here once, is tested here, and every adapter gets the same behaviour.

``mapping.bridge.Bridge`` implements it; ``service`` builds one and hands it to the adapters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mapping.catalogue import Catalogue
from mapping.clock import Clock
from mapping.engine import Outcome
from mapping.model import Agent, AgentSyncState, OutboxRow, PresenceObserved, System
from mapping.ports import AdapterRecords, AgentDirectory, DeliveryListener, Quarantine, ReadRequests
from mapping.ratelimit import UpstreamLimiter
from mapping.retry import RetryPolicy
from mapping.rules import Result
from mapping.telemetry import Telemetry
from mapping.translation import Rules


@dataclass(frozen=True)
class PresenceChange:
    """What became of an agent's own request to change presence, once it settled or the wait ran out.

    ``expected``: what each system should show for it. ``rows``: for each system the request had to
    write (or found still on its way from an earlier request), the outbox row as last seen: delivered,
    dead (with the upstream's reason) or still pending when the wait ran out. A system missing from
    ``rows`` already showed the value."""

    result: Result
    detail: str
    expected: Mapping[System, str] = field(default_factory=dict)
    rows: Mapping[System, OutboxRow | None] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentAdded:
    """What became of adding one agent: ``outcome`` is ``added``, ``updated``, ``unchanged`` or
    ``kept`` (the directory had it already, from discovery or a CSV: left as it is); ``problem`` says
    why it was refused (its Entra object id belongs to another agent), else None."""

    agent: Agent | None
    outcome: str
    problem: str | None = None


class CoreApi(Protocol):
    """The narrow surface of the core that adapters use."""

    @property
    def catalogue(self) -> Catalogue: ...
    @property
    def rules(self) -> Rules: ...
    @property
    def telemetry(self) -> Telemetry: ...
    @property
    def retry(self) -> RetryPolicy:
        """The one retry policy, for adapters' own upstream reads."""
        ...

    @property
    def limiters(self) -> Mapping[System, UpstreamLimiter]:
        """Shared with the outbox: adapters' reads and the bridge's writes count against one bucket."""
        ...

    @property
    def clock(self) -> Clock: ...
    @property
    def directory(self) -> AgentDirectory: ...
    @property
    def records(self) -> AdapterRecords: ...
    @property
    def quarantine(self) -> Quarantine:
        """Where an intake keeps a request it could not use but must answer 2xx (bounded, scrubbed)."""
        ...

    async def observe(self, event: PresenceObserved, *, intake: str | None = None) -> Outcome:
        """A presence seen in one system (webhook, notification, read): the sync rules decide."""
        ...

    async def observe_many(self, events: Sequence[PresenceObserved], *, intake: str | None = None) -> list[Outcome]:
        """Several observations, committed in a few transactions (one Graph request's items)."""
        ...

    async def agent_for(self, system: System, external_id: str) -> Agent | None:
        """The enabled agent an upstream id belongs to; an unknown id is recorded (rule 1)."""
        ...

    async def change_presence(
        self, agent: Agent, presence_id: str, *, source: str, settle_seconds: float
    ) -> PresenceChange:
        """The agent's own choice of presence (rule 2: it sets P now): both systems are written and
        the call waits, at most ``settle_seconds``, until each write was delivered or died."""
        ...

    async def add_agent(self, candidate: Agent) -> AgentAdded:
        """A new agent found upstream (a Dataverse Create): added unless the directory has it already
        (kept as it is) or its Entra object id belongs to another agent (refused, with the reason)."""
        ...

    async def delivery(self, agent_id: str, system: System) -> OutboxRow | None:
        """The outbox row of the agent's latest write to ``system``, if any."""
        ...

    def on_delivery(self, listener: DeliveryListener) -> None:
        """``listener`` hears every write that finally landed or died (the bot's follow-ups)."""
        ...

    def serve_reads(self, system: System, reads: ReadRequests) -> None:
        """``reads`` serves the core's requests to read an agent's present state in ``system``."""
        ...

    async def last_known(self, agent_id: str) -> AgentSyncState | None:
        """What the core last knew of the agent (for a reply when an upstream cannot be read)."""
        ...

    async def teams_seen_many(self, agent_ids: Sequence[str]) -> dict[str, str | None]:
        """What the core last saw Teams show for each agent (``teams_seen.value``), in one narrow query
        (the poller's 650 a read); agents without a saved state left out."""
        ...
