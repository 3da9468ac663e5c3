"""Plain value types shared by the core and every adapter.

Presence values travel as strings so that the store, the outbox and the logs need no per-system types:
- Dynamics 365: the ``msdyn_presenceid`` (lower-case GUID) of the presence record.
- Teams: ``"Availability/Activity"`` (for example ``"Busy/InACall"``), or ``CLEAR`` for a bridge
  command that ends the bridge's presence session (``clearPresence``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

CLEAR = "clear"
"""Teams command value: end the bridge's presence session so Teams shows the person's own state."""


class System(enum.StrEnum):
    DYNAMICS = "dynamics"
    TEAMS = "teams"

    @property
    def other(self) -> System:
        return System.TEAMS if self is System.DYNAMICS else System.DYNAMICS


class BasePresence(enum.IntEnum):
    """``msdyn_basepresencestatus``: every Dynamics presence, custom ones too, maps to one of these."""

    AVAILABLE = 192360000
    BUSY = 192360001
    BUSY_DND = 192360002
    AWAY = 192360003
    OFFLINE = 192360004

    @property
    def label(self) -> str:
        return {
            BasePresence.AVAILABLE: "Available",
            BasePresence.BUSY: "Busy",
            BasePresence.BUSY_DND: "Busy DND",
            BasePresence.AWAY: "Away",
            BasePresence.OFFLINE: "Offline",
        }[self]


# Out-of-the-box presence ids (seed how-to); custom presences are extra rows in the catalogue.
OOB_PRESENCE_IDS: dict[BasePresence, str] = {
    BasePresence.AVAILABLE: "f523f628-c07a-e811-8162-000d3aa11f50",
    BasePresence.BUSY: "efdeb843-c07a-e811-8162-000d3aa11f50",
    BasePresence.BUSY_DND: "08971864-c07a-e811-8162-000d3aa11f50",
    BasePresence.OFFLINE: "70139190-c07a-e811-8162-000d3aa11f50",
    BasePresence.AWAY: "3dacae76-c07a-e811-8162-000d3aa11f50",
}


@dataclass(frozen=True)
class Agent:
    """One contact-center agent known in both systems. ``dynamics_user_id`` is the key everywhere."""

    dynamics_user_id: str
    entra_object_id: str
    display_name: str = ""
    enabled: bool = True

    @property
    def label(self) -> str:
        """How logs and messages name an agent: readable, but with the id an admin can search for."""
        return f"{self.display_name or '?'} ({self.dynamics_user_id})"


@dataclass(frozen=True)
class Presence:
    """One row of the live ``msdyn_presences`` catalogue."""

    presence_id: str
    name: str
    base: BasePresence
    can_user_set: bool = True


@dataclass(frozen=True)
class TeamsPresence:
    availability: str
    activity: str

    @property
    def value(self) -> str:
        return f"{self.availability}/{self.activity}"

    @classmethod
    def parse(cls, value: str) -> TeamsPresence:
        availability, _, activity = value.partition("/")
        return cls(availability, activity or availability)


@dataclass(frozen=True)
class PresenceObserved:
    """A presence seen in one system, as an adapter hands it to the core.

    ``version`` orders events of one agent and system: Dataverse ``RowVersion`` when known, else the
    source timestamp in epoch milliseconds; ``None`` means the adapter cannot order it, and the core
    falls back to ``observed_at``. ``modified_by`` is Dataverse's ``msdyn_presencemodifiedby``
    (``AGENT``/``SYSTEM``) when known. ``source`` says which intake saw it (``webhook``,
    ``notification``, ``reconcile``, ``bot``...), for logs and metrics only.
    """

    agent_id: str
    system: System
    value: str
    observed_at: datetime
    version: int | None = None
    modified_by: str | None = None
    source: str = "unknown"


@dataclass(frozen=True)
class SetPresence:
    """A command for the outbox: make ``system`` show ``value`` for the agent."""

    agent_id: str
    system: System
    value: str
    reason: str = ""


@dataclass(frozen=True)
class Delivery:
    """An outbox row claimed by a worker. ``generation`` grows with every new desired value."""

    id: int
    agent_id: str
    system: System
    value: str
    generation: int
    attempts: int
    lease_token: str
    reason: str = ""


class OutboxStatus(enum.StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True)
class OutboxRow:
    id: int
    agent_id: str
    system: System
    value: str
    status: OutboxStatus
    generation: int
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    updated_at: datetime
    reason: str = ""


@dataclass
class SideState:
    """What the core remembers of one agent in one system."""

    observed_value: str | None = None
    observed_version: int | None = None
    observed_at: datetime | None = None
    written_value: str | None = None
    """The last value the bridge decided to write to this system (echo memory and session state)."""
    written_at: datetime | None = None
    write_seen: bool = False
    """Whether the echo of ``written_value`` has come back already."""
    changed_at: datetime | None = None
    """When the last genuine (not echo) change of this system was observed, for the conflict window."""
    delivered_value: str | None = None
    """The last write of ours the system acknowledged: what our Teams session really holds now."""
    delivered_at: datetime | None = None
    recent_writes: list[tuple[str, datetime]] = field(default_factory=list)
    """Writes whose echo has not come back yet, oldest first: the echo of an older write can arrive
    after a newer write was decided (and before it was delivered), and must not count as a change."""


@dataclass
class AgentSyncState:
    """Everything the sync rules need about one agent; loaded and saved as one unit."""

    agent_id: str
    dynamics: SideState = field(default_factory=SideState)
    teams: SideState = field(default_factory=SideState)
    restore_value: str | None = None
    """Dynamics presence held before the bridge's override; set while an override is active."""
    override_value: str | None = None
    """Dynamics presence the bridge set because of Teams; ``None`` when no override is active."""

    def side(self, system: System) -> SideState:
        return self.dynamics if system is System.DYNAMICS else self.teams
