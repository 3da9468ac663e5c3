"""The core as adapters see it: one object bundling directory, catalogue, engine and outbox.

``service`` builds it once (``service.wiring``); adapters receive it and never build core parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mapping.catalogue import Catalogue
from mapping.clock import Clock, utcnow
from mapping.engine import SyncEngine
from mapping.model import System
from mapping.outbox import OutboxWorker
from mapping.ports import Store
from mapping.ratelimit import DATAVERSE_PER_USER, GRAPH_PRESENCE, UpstreamLimiter
from mapping.retry import RetryPolicy
from mapping.telemetry import NullTelemetry, Telemetry
from mapping.translation import Rules


def default_limiters() -> dict[System, UpstreamLimiter]:
    return {System.TEAMS: UpstreamLimiter(GRAPH_PRESENCE), System.DYNAMICS: UpstreamLimiter(DATAVERSE_PER_USER)}


@dataclass
class Bridge:
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

    async def load_catalogue(self) -> None:
        """Refreshes the in-memory catalogue from the store (after a sync from Dataverse)."""
        self.catalogue.replace(await self.store.list_presences())
