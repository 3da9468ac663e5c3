"""Why each system shows what it shows for one agent: rule 2 (``mapping.outputs``) told in words.

The first question an admin gets is "why does Dynamics show Alice Busy?". The answer is always the
same two inputs (P, the agent's own Dynamics presence and who set it; Q, the person's own Teams state
and since when Teams has been showing it) and the one case of rule 2 that applied. This module names
that case; it does not decide anything itself: the outputs it reports are ``outputs()``'s, so an
explanation can never disagree with what the bridge writes. Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from mapping.model import AgentSyncState, BasePresence, Presence
from mapping.outputs import KEEPS_WORK_AWAY, Inputs, Outputs, asks, inputs_of, no_session, outputs
from mapping.translation import Rules

RULES_DOC = "docs/rules.md"


class Case(enum.StrEnum):
    """The branches of rule 2, in the order ``outputs()`` tries them."""

    P_UNKNOWN = "p_unknown"
    Q_ASKS_NOTHING = "q_asks_nothing"
    P_OFFLINE = "p_offline"
    P_KEEPS_AWAY_ALREADY = "p_keeps_away_already"
    AGENT_CHOSE_SINCE = "agent_chose_since"
    TEAMS_OVERRIDES = "teams_overrides"

    @property
    def heading(self) -> str:
        return {
            Case.P_UNKNOWN: "Rule 2: nothing is written until the agent's Dynamics presence is known",
            Case.Q_ASKS_NOTHING: "Rule 2: Dynamics = P (the Teams state asks nothing)",
            Case.P_OFFLINE: "Rule 2: Dynamics = P (an Offline agent is never overridden)",
            Case.P_KEEPS_AWAY_ALREADY: "Rule 2: Dynamics = P (P already keeps work away as much as Teams asks)",
            Case.AGENT_CHOSE_SINCE: "Rule 2: Dynamics = P (the agent chose it after Teams began showing Q)",
            Case.TEAMS_OVERRIDES: "Rule 2: Teams override (Q asks more than P keeps away)",
        }[self]


@dataclass(frozen=True)
class Explanation:
    case: Case
    rule: str
    """The case's title, naming the rule of ``docs/rules.md`` that applied."""
    why: str
    """``outputs()``'s own sentence for this agent."""
    p: str | None
    """P's name as the catalogue has it (or its id when the catalogue lacks it); None: unknown."""
    p_by: str | None
    p_at: datetime | None
    chose_at: datetime | None
    q: str | None
    q_since: datetime | None
    asked: str | None
    """The Dynamics base Q asks for (its label), None when it asks nothing."""
    session: str | None
    """The bridge's Teams session rule 2 calls for: ``Availability/Activity``, ``none``, or None."""
    dynamics: str | None
    """The presence Dynamics should show (name), None: no opinion."""
    override: bool


def case_of(inputs: Inputs, rules: Rules) -> Case:
    """Which branch of ``outputs()`` these inputs take (same tests, same order)."""
    p = inputs.own_dynamics
    if p is None:
        return Case.P_UNKNOWN
    asked = asks(rules, inputs.own_teams)
    if asked is None:
        return Case.Q_ASKS_NOTHING
    if p.base is BasePresence.OFFLINE:
        return Case.P_OFFLINE
    if KEEPS_WORK_AWAY[asked] <= KEEPS_WORK_AWAY[p.base]:
        return Case.P_KEEPS_AWAY_ALREADY
    since = inputs.own_teams_since
    if inputs.chose_at is not None and (since is None or inputs.chose_at >= since):
        return Case.AGENT_CHOSE_SINCE
    return Case.TEAMS_OVERRIDES


def presence_name(catalogue: Mapping[str, Presence], presence_id: str | None) -> str | None:
    if presence_id is None:
        return None
    presence = catalogue.get(presence_id)
    return presence.name if presence is not None else presence_id


def explain(state: AgentSyncState, catalogue: Mapping[str, Presence], rules: Rules) -> Explanation:
    """The explanation of the agent's current outputs from its sync state."""
    inputs = inputs_of(state.own_dynamics, state.chose_at, state.own_teams, state.own_teams_since, catalogue)
    out: Outputs = outputs(inputs, rules)
    case = case_of(inputs, rules)
    asked = asks(rules, inputs.own_teams)
    session = None if out.session is None else ("none" if no_session(out.session) else out.session)
    return Explanation(
        case=case,
        rule=case.heading,
        why=out.why,
        p=presence_name(catalogue, state.own_dynamics),
        p_by=state.own_dynamics_by,
        p_at=state.own_dynamics_at,
        chose_at=state.chose_at,
        q=state.own_teams,
        q_since=state.own_teams_since,
        asked=asked.label if asked is not None else None,
        session=session,
        dynamics=presence_name(catalogue, out.dynamics),
        override=out.override is not None,
    )


@dataclass(frozen=True)
class SyncView:
    """What each system shows against what rule 2 calls for: in sync, or why not."""

    in_sync: bool | None
    """None: nothing to compare yet (P unknown)."""
    dynamics_shows: str | None
    session_holds: str | None
    differences: tuple[str, ...]


def sync_view(state: AgentSyncState, catalogue: Mapping[str, Presence], rules: Rules) -> SyncView:
    inputs = inputs_of(state.own_dynamics, state.chose_at, state.own_teams, state.own_teams_since, catalogue)
    out = outputs(inputs, rules)
    shows = state.dynamics_seen.value
    holds = state.session_delivered
    if out.dynamics is None:
        return SyncView(None, presence_name(catalogue, shows), holds, ())
    diffs: list[str] = []
    if shows != out.dynamics:
        diffs.append(
            f"Dynamics shows {presence_name(catalogue, shows) or 'nothing known'}, "
            f"rule 2 calls for {presence_name(catalogue, out.dynamics)}"
        )
    if out.session is not None and (
        no_session(out.session) != no_session(holds) or (not no_session(out.session) and holds != out.session)
    ):
        want = "no session" if no_session(out.session) else out.session
        have = "no session" if no_session(holds) else holds
        diffs.append(f"the bridge's Teams session is {have}, rule 2 calls for {want}")
    return SyncView(not diffs, presence_name(catalogue, shows), holds, tuple(diffs))
