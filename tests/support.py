"""Test helpers shared by every suite: a Bridge on the in-memory store, fake ports, the catalogue."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from mapping.bridge import Bridge
from mapping.catalogue import Catalogue
from mapping.errors import UpstreamError
from mapping.memory import MemoryStore
from mapping.model import OOB_PRESENCE_IDS, Agent, BasePresence, Presence, PresenceObserved, System
from mapping.ports import PresenceWriter, ReadRequests, Store
from mapping.retry import RetryPolicy
from mapping.telemetry import Telemetry
from mapping.translation import Rules

AVAILABLE = OOB_PRESENCE_IDS[BasePresence.AVAILABLE]
BUSY = OOB_PRESENCE_IDS[BasePresence.BUSY]
DND = OOB_PRESENCE_IDS[BasePresence.BUSY_DND]
AWAY = OOB_PRESENCE_IDS[BasePresence.AWAY]
OFFLINE = OOB_PRESENCE_IDS[BasePresence.OFFLINE]
TRAINING = "9e3f0c1a-0000-4000-8000-00000000aa01"  # a custom presence (base Busy DND)

PRESENCES = [
    Presence(AVAILABLE, "Available", BasePresence.AVAILABLE),
    Presence(BUSY, "Busy", BasePresence.BUSY),
    Presence(DND, "Busy - DND", BasePresence.BUSY_DND),
    Presence(AWAY, "Away", BasePresence.AWAY),
    Presence(OFFLINE, "Offline", BasePresence.OFFLINE),
    Presence(TRAINING, "Training", BasePresence.BUSY_DND),
]

ALICE = Agent("97c90b02-4e38-ef11-a315-000d3a5a54dc", "0a1b2c3d-0000-4000-8000-000000000001", "Alice Agent")
BOB = Agent("a7f9a9ed-b311-ef11-9f89-000d3a544b4c", "0a1b2c3d-0000-4000-8000-000000000002", "Bob Agent")

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class RecordingWriter:
    """A PresenceWriter that records calls and raises the queued errors first."""

    def __init__(self, system: System, errors: Sequence[UpstreamError] = ()) -> None:
        self.system = system
        self.calls: list[tuple[str, str]] = []
        self.errors = list(errors)

    async def apply(self, agent: Agent, value: str) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.calls.append((agent.dynamics_user_id, value))


def make_bridge(
    *,
    store: Store | None = None,
    rules: Rules | None = None,
    clock: Any = None,
    writers: Mapping[System, PresenceWriter] | None = None,
    policy: RetryPolicy | None = None,
    presences: Sequence[Presence] = PRESENCES,
    reads: ReadRequests | None = None,
    telemetry: Telemetry | None = None,
) -> Bridge:
    store = store or MemoryStore()
    clock = clock or FakeClock()
    catalogue = Catalogue(presences)
    rules = rules or Rules()
    writers = writers or {s: RecordingWriter(s) for s in System}
    bridge = Bridge.assemble(
        store,
        catalogue,
        rules,
        writers,
        retry=policy or RetryPolicy(jitter=False),
        clock=clock,
        limiters={},
        telemetry=telemetry,
    )
    if reads is not None:
        bridge.serve_reads(System.TEAMS, reads)
    return bridge


def ev(
    agent: Agent,
    system: System,
    value: str,
    at: datetime,
    version: int | None = None,
    modified_by: str | None = None,
    source: str = "test",
) -> PresenceObserved:
    return PresenceObserved(agent.dynamics_user_id, system, value, at, version, modified_by, source)


class StaticTokens:
    """A ``TokenProvider`` with one fixed token (an emulator's), recording the scopes asked for."""

    def __init__(self, token: str) -> None:
        self._token = token
        self.scopes: list[str] = []

    async def token(self, scope: str) -> str:
        self.scopes.append(scope)
        return self._token


class RecordingTelemetry:
    """A ``Telemetry`` that keeps what it was told, for assertions."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.rejections: Counter[tuple[str, str]] = Counter()
        self.quarantines: Counter[tuple[str, str]] = Counter()
        self.latencies: list[tuple[str, float]] = []

    def event(self, source: str, result: str) -> None:
        self.events[(source, str(result))] += 1

    def rejected(self, route: str, reason: str) -> None:
        self.rejections[(route, reason)] += 1

    def quarantined(self, route: str, reason: str) -> None:
        self.quarantines[(route, reason)] += 1

    def delivery(self, system: str, result: str, seconds: float) -> None:
        pass

    def latency(self, name: str, seconds: float) -> None:
        self.latencies.append((name, seconds))

    def breaker(self, system: str, state: str) -> None:
        pass

    def probe(self, system: str, result: str) -> None:
        pass

    def dead_lettered(self, system: str) -> None:
        pass
