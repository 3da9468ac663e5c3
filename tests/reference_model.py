"""A reference model of the sync rules (version 2), written from the specification alone.

Why it exists: the stateful test (``tests/mapping/test_stateful.py``) and the HTTP scenario test drive
the real bridge through random histories and need an independent statement of what both systems must
show once everything has settled. Deriving that from ``mapping`` (its rules, translation or engine)
would only prove that the code agrees with itself, so this module imports nothing from ``mapping``:
the presence ids, the Teams translation and the Teams ranks are written out here as literals.

The model keeps the specification's two inputs per agent and nothing else:

- P, the agent's own Dynamics presence (the latest one the bridge did not write itself, whoever set
  it), and ``chose_at``, when the agent last chose a presence itself;
- Q, the person's own Teams state, and what Teams shows (the aggregate), from which ``q_since`` (since
  when Teams has continuously shown Q's value) follows.

Both outputs are pure functions of those inputs; there is no override flag and no snapshot to restore,
which is exactly what the specification demands of the bridge. The bridge's own writes are never fed
in: they are not inputs, and the caller only reports genuine changes and what Teams really shows.

Times (``at``) are plain numbers (seconds) on one clock the caller owns.
"""

from __future__ import annotations

from collections.abc import Mapping

AVAILABLE = "f523f628-c07a-e811-8162-000d3aa11f50"
BUSY = "efdeb843-c07a-e811-8162-000d3aa11f50"
DND = "08971864-c07a-e811-8162-000d3aa11f50"
AWAY = "3dacae76-c07a-e811-8162-000d3aa11f50"
OFFLINE = "70139190-c07a-e811-8162-000d3aa11f50"

BASES: Mapping[str, str] = {
    AVAILABLE: "Available",
    BUSY: "Busy",
    DND: "Busy DND",
    AWAY: "Away",
    OFFLINE: "Offline",
}
"""Presence id -> base presence name for the out-of-the-box presences; callers add custom ones."""

OOB_IDS: Mapping[str, str] = {base: presence_id for presence_id, base in BASES.items()}
"""Base name -> out-of-the-box presence id: what Dynamics shows during an override of that base."""

SESSION: Mapping[str, str | None] = {
    "Available": None,
    "Busy": "Busy/InACall",
    "Busy DND": "DoNotDisturb/Presenting",
    "Away": "Away/Away",
    "Offline": None,
}
"""translate(P) by base: the bridge's Teams session, ``None`` meaning no session at all."""

BLOCKING: Mapping[str, int] = {"Available": 0, "Away": 1, "Busy": 2, "Busy DND": 3}
"""How strongly a base keeps work away (Available < Away < Busy < Busy DND); Offline is never overridden
and so has no place in this order."""

RANK: Mapping[str, int] = {
    "DoNotDisturb": 7,
    "Busy": 6,
    "BusyIdle": 5,
    "Available": 4,
    "AvailableIdle": 3,
    "Away": 2,
    "BeRightBack": 2,
    "Offline": 0,
    "PresenceUnknown": 0,
}
"""Teams availability ranks used to aggregate the person's own state with the bridge's session."""

NO_CLIENT = frozenset({"Offline", "PresenceUnknown"})
"""Own availabilities that mean the person has no Teams client running: a session then always shows."""

_BUSY_ACTIVITIES = frozenset({"InACall", "InAConferenceCall", "InAMeeting"})


def _split(value: str) -> tuple[str, str]:
    """``"Availability/Activity"`` -> its two parts (a bare availability is its own activity)."""
    availability, _, activity = value.partition("/")
    return availability, activity or availability


def _rank(value: str) -> int:
    """Rank of a Teams value's availability; an availability outside the table ranks lowest, so an
    unknown own state can never outvote the bridge's session."""
    return RANK.get(_split(value)[0], 0)


def aggregate(own: str, session: str | None) -> str:
    """What Teams shows: the stronger of the person's own state and the bridge's session, the own state
    winning a tie; an own state of Offline/PresenceUnknown is "no client", and then the session shows
    if there is one."""
    if session is None:
        return own
    if _split(own)[0] in NO_CLIENT:
        return session
    return own if _rank(own) >= _rank(session) else session


def asks(q: str) -> str | None:
    """The base presence a Teams state asks Dynamics for, or ``None`` when it asks nothing.

    A state that matches more than one clause (none of the states the tests use does) asks for the
    strongest of them, because the override exists to keep work away."""
    availability, activity = _split(q)
    wanted: list[str] = []
    if activity in _BUSY_ACTIVITIES:
        wanted.append("Busy")
    if availability == "DoNotDisturb" or activity == "Presenting":
        wanted.append("Busy DND")
    if availability in ("Away", "BeRightBack"):
        wanted.append("Away")
    return max(wanted, key=BLOCKING.__getitem__) if wanted else None


def _fmt(t: float | None) -> str:
    return "None" if t is None else f"{t:g}"


class Truth:
    """One agent's ground truth: fed genuine changes and what Teams shows, answers what both systems
    must show once settled.

    ``bases`` maps every presence id the caller may use to its base name; custom presences map to a
    base there (``BASES | {TRAINING: "Busy DND"}``). The initial Dynamics presence counts as set by
    routing (the agent has not chosen anything yet), and Teams starts showing the own state, since the
    bridge has no session before it knows anything.
    """

    def __init__(self, dynamics: str, own: str, at: float, bases: Mapping[str, str] = BASES) -> None:
        self.bases = dict(bases)
        self._base(dynamics)  # fail early on an id the caller did not describe
        self.p = dynamics
        self.chose_at: float | None = None
        self.q = own
        self.shown = aggregate(own, None)
        self.shown_since = at

    def _base(self, presence_id: str) -> str:
        try:
            return self.bases[presence_id]
        except KeyError:
            raise KeyError(f"presence id {presence_id} has no base in the model's table") from None

    # Inputs -----------------------------------------------------------------------------------------

    def dynamics_chosen(self, presence_id: str, at: float) -> None:
        """The agent chose ``presence_id`` (in Dynamics, modified-by AGENT, or via the bot): it becomes
        P, and the choice ends any override until Teams begins showing a new Q."""
        self._base(presence_id)
        self.p = presence_id
        self.chose_at = at

    def dynamics_routed(self, presence_id: str, at: float) -> None:
        """Routing (SYSTEM) or a supervisor set ``presence_id``: it becomes P, but it is not the
        agent's choice, so an override in force stays in force."""
        self._base(presence_id)
        self.p = presence_id

    def teams_own(self, value: str, at: float) -> None:
        """The person's own Teams state became ``value`` (Q). Whether and since when Teams shows it is
        told separately by ``teams_shown``: the own state can change without the aggregate changing."""
        self.q = value

    def teams_shown(self, value: str, at: float) -> None:
        """What Teams really shows (the aggregate) is ``value`` from ``at`` on. Reporting the value it
        already shows changes nothing: "since" means continuously."""
        if value != self.shown:
            self.shown = value
            self.shown_since = at

    # Derived ----------------------------------------------------------------------------------------

    @property
    def q_since(self) -> float | None:
        """Since when Teams has continuously shown Q's value; ``None`` while Q is hidden behind the
        bridge's session (the aggregate shows something else)."""
        return self.shown_since if self.shown == self.q else None

    def _decide(self) -> tuple[str, str]:
        """(presence id Dynamics must show, why) from P, chose_at, Q and q_since alone."""
        base = self._base(self.p)
        q_since = self.q_since
        if q_since is None:
            return self.p, f"Q {self.q} hidden behind the session (Teams shows {self.shown}): Dynamics = P"
        wanted = asks(self.q)
        if wanted is None:
            return self.p, f"Q {self.q} asks nothing: Dynamics = P"
        if base == "Offline":
            return self.p, f"Q asks {wanted} but P is Offline: no override"
        if BLOCKING[wanted] <= BLOCKING[base]:
            return self.p, f"Q asks {wanted}, not more than P's {base}: Dynamics = P"
        if self.chose_at is not None and self.chose_at >= q_since:
            return self.p, f"Q asks {wanted} but the agent chose at {_fmt(self.chose_at)} >= q_since: Dynamics = P"
        return OOB_IDS[wanted], f"override: Q asks {wanted} over P's {base}"

    def expected_dynamics(self) -> str:
        """The presence id Dynamics must show when settled."""
        return self._decide()[0]

    def expected_session(self) -> str | None:
        """The bridge's Teams session when settled: translate(P) by base, never the override (a session
        that followed the override would keep Teams busy after the call: the "stuck busy" trap)."""
        return SESSION[self._base(self.p)]

    def explain(self) -> str:
        """One line for failure messages: the inputs and the reason for the expected Dynamics value."""
        base = self._base(self.p)
        expected, why = self._decide()
        return (
            f"P={base} ({self.p}) chose_at={_fmt(self.chose_at)} Q={self.q} shown={self.shown} "
            f"since={_fmt(self.shown_since)} q_since={_fmt(self.q_since)} -> Dynamics "
            f"{self.bases.get(expected, expected)}, session {self.expected_session()}: {why}"
        )
