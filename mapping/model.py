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
from typing import TypeVar

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

    ``version`` orders events of one agent and system: Dataverse's ``RowVersion`` (webhook) or
    ``versionnumber`` (reads), the same counter; ``None`` when there is none (a Create, every Graph
    event), and the core falls back to ``observed_at`` (the ordering contract, ``docs/DESIGN.md``).
    ``modified_by`` is Dataverse's ``msdyn_presencemodifiedby``
    (``AGENT``/``SYSTEM``) when known. ``source`` says which intake saw it (``webhook``,
    ``notification``, ``reconcile``, ``bot``...), for logs and metrics only. ``current`` is True when
    the adapter read what the system shows at ``observed_at`` (a GET), not an event it was sent: only
    a read made after the bridge's own session write landed can tell the person's own Teams state
    from an older session of the bridge's still showing (rule 3). ``since``, for a read prompted by
    a change notification, is when that notification arrived: Teams has shown what is read since
    then at the latest (the read's own time would make the state look newer than it is).
    """

    agent_id: str
    system: System
    value: str
    observed_at: datetime
    version: int | None = None
    modified_by: str | None = None
    source: str = "unknown"
    current: bool = False
    since: datetime | None = None


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
    failing_since: datetime | None = None
    """The first failed attempt of the row's current run (None: no attempt of it failed yet): the
    dead-letter budget runs from here, and a new value for the row does not restart it."""


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
class Seen:
    """The last observation of one system: what it showed, its order key, and since when it has been
    showing that value (the Teams side needs "since when" for rule 2's override test)."""

    value: str | None = None
    version: int | None = None
    at: datetime | None = None
    since: datetime | None = None


@dataclass
class Write:
    """A write of the bridge whose echo may still come back (rule 3). ``at`` is when it was decided,
    moved to when it landed, so that a write held back by an outage is still recognised. One entry
    per delivery: the same value written twice echoes twice."""

    value: str
    at: datetime
    landed: bool = False
    below: int | None = None
    """Set once the echo of a later write came back with this RowVersion: this write landed before
    that one, so its own echo, if it still comes, carries a lower RowVersion (it can only be stale)."""
    above: int | None = None
    """The RowVersion Dynamics showed when the write was decided: its echo carries a higher one."""


@dataclass
class DynamicsEvent:
    """A versioned Dynamics event the rules judged, kept briefly: an echo of ours can arrive after a
    genuine change to the same value (both marked AGENT), and only their RowVersions then tell which
    was which (the lower one is the echo, because the write landed first)."""

    version: int
    value: str
    by: str | None
    at: datetime
    echo: bool
    in_flight: bool = False
    """Taken for the echo of a write that had not landed yet: an agent's change to the same value made
    while the write was on its way looks the same, so a later same-valued event may still be the echo.
    An event taken for the echo of a write that had landed is not reconsidered."""


@dataclass
class AgentSyncState:
    """Everything the sync rules know about one agent; loaded and saved as one unit.

    Two inputs (``own_dynamics`` = P, ``own_teams`` = Q) decide both outputs (``mapping.outputs``);
    the rest is what the bridge needs to tell its own writes from genuine changes and to deliver the
    difference between what each system should show and what it does."""

    agent_id: str
    # -- P: the agent's own Dynamics presence (the latest Dynamics presence the bridge did not write)
    own_dynamics: str | None = None
    own_dynamics_by: str | None = None
    """Who set P: ``AGENT``, ``SYSTEM`` (routing), ``bot``, or None when Dataverse did not say."""
    own_dynamics_at: datetime | None = None
    own_dynamics_version: int | None = None
    """The RowVersion P was read at (for a bot command: the one Dynamics showed when it was given). A
    late event above it that is not an echo of ours is a newer change of P, even below an echo."""
    chose_at: datetime | None = None
    """When the agent last chose a presence itself (Dynamics, modified-by AGENT, or the bot)."""
    undo_command: tuple[str | None, str | None, datetime | None] | None = None
    """P, who set it and ``chose_at`` before a bot command whose Dynamics write has not landed yet:
    if that write dies, the command did not happen and P is what it was."""
    # -- Q: the person's own Teams state (None: unknown, or hidden below the bridge's session)
    own_teams: str | None = None
    own_teams_since: datetime | None = None
    """Since when Teams has been showing Q (not when the bridge learned it)."""
    # -- Dynamics: what it showed last, and the bridge's writes to it
    dynamics_seen: Seen = field(default_factory=Seen)
    dynamics_written: str | None = None
    """A write to Dynamics decided and not landed yet (no echo, no ack); None when none is."""
    dynamics_unconfirmed: list[Write] = field(default_factory=list)
    """Writes whose echo has not come back yet, oldest first; each echo is consumed once."""
    dynamics_recent: list[DynamicsEvent] = field(default_factory=list)
    """The last versioned Dynamics events judged, oldest first (see ``DynamicsEvent``)."""
    dynamics_delivered: str | None = None
    """The last write Dynamics acknowledged, and when (what the bot can confirm when a read fails)."""
    dynamics_delivered_at: datetime | None = None
    # -- Teams: what it showed last, and the bridge's presence session
    teams_seen: Seen = field(default_factory=Seen)
    session_written: str | None = None
    """The session value last decided (``CLEAR`` for none); None: the bridge never wrote one."""
    session_written_at: datetime | None = None
    session_delivered: str | None = None
    """What the session really holds, as Graph last acknowledged (``CLEAR``/None: no session)."""
    session_landed_at: datetime | None = None
    session_unacked: list[str] = field(default_factory=list)
    """Session values decided and not acknowledged yet: Teams may already hold any of them."""
    session_replaced: list[str] = field(default_factory=list)
    """Sessions the bridge replaced that notifications may still show, until Graph shows a newer state."""
    read_after_landing: bool = False
    """Read Teams once the pending session write lands: the session being replaced was what Teams
    showed, and the person's own state may be hidden behind it (Graph notifies nothing when the
    aggregate does not change)."""


def clone(state: AgentSyncState) -> AgentSyncState:
    """A copy of ``state`` sharing nothing mutable with it, as ``copy.deepcopy`` would make, at a
    fraction of the cost: the rules copy the state on every decision. ``copy.deepcopy`` walked every
    string and datetime (a third of a start-up sweep's CPU), and ``copy.copy`` of the dataclasses goes
    through ``__reduce_ex__`` (16 µs a state, half of a decision); copying the instance dictionaries
    takes 3 µs. Every other field is immutable (``tests/mapping/test_clone.py`` fails when a new
    mutable field is not copied here)."""
    s = object.__new__(AgentSyncState)
    fields = s.__dict__
    fields.update(state.__dict__)
    fields["dynamics_seen"] = _copied(state.dynamics_seen)
    fields["teams_seen"] = _copied(state.teams_seen)
    fields["dynamics_unconfirmed"] = [_copied(w) for w in state.dynamics_unconfirmed]
    fields["dynamics_recent"] = [_copied(e) for e in state.dynamics_recent]
    fields["session_unacked"] = list(state.session_unacked)
    fields["session_replaced"] = list(state.session_replaced)
    return s


_Plain = TypeVar("_Plain", Seen, Write, DynamicsEvent)


def _copied(item: _Plain) -> _Plain:
    """A shallow copy of a small mutable dataclass whose fields are all immutable."""
    copied = object.__new__(type(item))
    copied.__dict__.update(item.__dict__)
    return copied


@dataclass(frozen=True)
class QuarantinedItem:
    """A request an intake could not use, kept instead of refused (the sender must get a 2xx).

    ``route``: the intake's fixed route name (``dataverse_webhook``). ``reason``: one of the route's
    small fixed set (a metric label). ``detail``: the parser's words. ``size``: the body's length as
    received; ``body``: as received, with anything secret masked (``mapping.redact``)."""

    id: int
    route: str
    reason: str
    detail: str
    received_at: datetime
    size: int
    body: bytes
