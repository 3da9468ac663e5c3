"""Sync rule 2: what each system should show, as one pure function of the agent's two inputs.

This is the whole policy of the bridge. Everything else (echo recognition, order, the outbox, the
sweep) exists to keep the two inputs right and to make each system show what this returns:

- **P**, the agent's own Dynamics presence: the latest Dynamics presence the bridge did not write
  itself (the agent's, routing's, a supervisor's), and ``chose_at``, when the agent last chose one.
- **Q**, the person's own Teams state, and ``q_since``, since when Teams has been showing it.

Outputs:
- **Teams session** = the translation of P's base status (defaults: Busy -> Busy/InACall, Busy DND ->
  DoNotDisturb/Presenting, Away -> Away/Away, Available and Offline -> no session, so the person's own
  Teams state shows through).
- **Dynamics** = P, except while Q asks for more: Q asks (call or meeting -> Busy, DND or presenting ->
  Busy DND, Away or Be right back -> Away) for a base that keeps work away more than P's, P is not
  Offline, and the agent has not chosen a presence since Teams began showing Q. Routing changing P
  does not end such an override; the agent's own choice does, until Q changes again. When Q stops
  asking, Dynamics is P as it is then.

No time window decides anything: the outputs depend on the inputs only, so a change that arrives
late or twice, or a sweep that reads both systems again, lands on the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from mapping.model import CLEAR, BasePresence, Presence
from mapping.translation import Rules

KEEPS_WORK_AWAY = {
    BasePresence.AVAILABLE: 0,
    BasePresence.AWAY: 1,
    BasePresence.BUSY: 2,
    BasePresence.BUSY_DND: 3,
}
"""How strongly a base presence keeps work away (Available < Away < Busy < Busy DND). Offline is not
on the scale: an Offline agent gets no work, and an override never brings them online."""


@dataclass(frozen=True)
class Inputs:
    own_dynamics: Presence | None
    """P; None while the bridge has not seen the agent's Dynamics presence (nothing is written then)."""
    chose_at: datetime | None
    own_teams: str | None
    """Q as ``Availability/Activity``; None when unknown or hidden below the bridge's session (a
    hidden state never asks for more than P already shows: see ``docs/rules.md``)."""
    own_teams_since: datetime | None


@dataclass(frozen=True)
class Outputs:
    session: str | None
    """The bridge's Teams session (``Availability/Activity``), ``CLEAR`` for none; None: no opinion."""
    dynamics: str | None
    """The presence id Dynamics should show; None: no opinion (P unknown)."""
    override: BasePresence | None
    """The base Q asks for when it overrides P (for logs and explanations), else None."""
    why: str


def asks(rules: Rules, own_teams: str | None) -> BasePresence | None:
    """The Dynamics base a person's Teams state asks for, or None when it asks nothing."""
    return rules.asked_by(own_teams) if own_teams else None


def outputs(inputs: Inputs, rules: Rules) -> Outputs:
    p = inputs.own_dynamics
    if p is None:
        return Outputs(None, None, None, "the agent's Dynamics presence is not known yet")
    session = rules.teams_for(p.base)
    asked = asks(rules, inputs.own_teams)
    if asked is None:
        return Outputs(session, p.presence_id, None, f"Dynamics shows the agent's own {p.name}")
    if p.base is BasePresence.OFFLINE:
        return Outputs(session, p.presence_id, None, f"the agent is Offline; Teams {inputs.own_teams} is ignored")
    if KEEPS_WORK_AWAY[asked] <= KEEPS_WORK_AWAY[p.base]:
        why = f"the agent's own {p.name} already keeps work away as much as Teams {inputs.own_teams} asks"
        return Outputs(session, p.presence_id, None, why)
    since = inputs.own_teams_since
    if inputs.chose_at is not None and (since is None or inputs.chose_at >= since):
        why = f"the agent chose {p.name} after Teams began showing {inputs.own_teams}"
        return Outputs(session, p.presence_id, None, why)
    why = f"Teams {inputs.own_teams} asks {asked.label} over the agent's own {p.name}"
    return Outputs(session, rules.dynamics_targets[asked], asked, why)


def inputs_of(
    own_dynamics: str | None,
    chose_at: datetime | None,
    own_teams: str | None,
    own_teams_since: datetime | None,
    catalogue: Mapping[str, Presence],
) -> Inputs:
    return Inputs(catalogue.get(own_dynamics) if own_dynamics else None, chose_at, own_teams, own_teams_since)


def no_session(value: str | None) -> bool:
    """A cleared session and a session never written are the same thing to Teams."""
    return value is None or value == CLEAR
