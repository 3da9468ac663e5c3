"""Sync rules 3, 4, 6 and 7 around rule 2: keep the two inputs right, then write the difference.

Every function here is pure (state in, decision out) so that each rule is unit- and property-testable
without a store, a clock or a network; ``mapping.engine`` loads the state, calls one of them and saves
what it returns, with its outbox commands, in one transaction.

An observation goes through three steps:
1. **Order (rule 4)**: a stale or duplicate event changes nothing.
2. **Inputs (rule 3)**: the bridge's own writes come back as events and must never change P or Q.
   A Dynamics event is an echo when it matches, by value and in order, a write still unconfirmed
   (each echo is consumed once; routing's changes, marked SYSTEM, are never ours). A Teams report is
   the bridge's session showing through when it equals a session Teams may hold from the bridge; it
   is an older session still showing when it equals one the bridge replaced, until Graph shows a newer
   state or a read made after the new session landed says otherwise; anything else is the person's own.
3. **Converge**: ``mapping.outputs`` says what each system should show; the difference from what it
   shows (or will show once the writes in flight land) becomes outbox commands.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mapping.model import (
    CLEAR,
    AgentSyncState,
    Presence,
    PresenceObserved,
    Seen,
    SetPresence,
    System,
    TeamsPresence,
    Write,
)
from mapping.outputs import Outputs, inputs_of, no_session, outputs
from mapping.translation import AGGREGATION_RANK, Rules

ECHO_WINDOW = timedelta(minutes=5)
"""How long after it landed a write of ours is still expected back as an echo. Past it, the same
value arriving is a genuine change (the echo was lost, and a person set that value)."""

MAX_UNCONFIRMED = 8


class Result(enum.StrEnum):
    APPLIED = "applied"  # commands were issued
    NO_CHANGE = "no_change"  # a genuine observation that needs nothing written
    ECHO = "echo"  # the bridge's own write coming back (rule 3)
    STALE = "stale"  # older than what is known (rule 4)
    DUPLICATE = "duplicate"  # the same observation again (rule 4)
    UNKNOWN_PRESENCE = "unknown_presence"  # a Dynamics presence id not in the catalogue
    UNKNOWN_AGENT = "unknown_agent"  # set by the engine, never here


@dataclass(frozen=True)
class Decision:
    result: Result
    state: AgentSyncState
    commands: tuple[SetPresence, ...] = ()
    cancel: tuple[SetPresence, ...] = ()
    """Writes withdrawn from the outbox: the system already shows what it should. The engine tells
    ``withdrawn`` which of them never left (their echo will not come)."""
    read: tuple[System, ...] = ()
    """Systems to read now (after a session write landed over what Teams showed)."""
    detail: str = ""
    log: Mapping[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- rule 4


def order(state: AgentSyncState, event: PresenceObserved) -> Result | None:
    """STALE or DUPLICATE when the event is not newer than what is known, else None."""
    seen = state.dynamics_seen if event.system is System.DYNAMICS else state.teams_seen
    if event.version is not None and seen.version is not None:
        if event.version < seen.version:
            return Result.STALE
        if event.version == seen.version:
            return Result.DUPLICATE
        return None
    if seen.at is not None:
        if event.observed_at < seen.at:
            return Result.STALE
        if event.observed_at == seen.at and event.value == seen.value:
            return Result.DUPLICATE
    return None


def _see(seen: Seen, event: PresenceObserved) -> None:
    if seen.value != event.value or seen.since is None:
        seen.since = event.observed_at
    seen.value = event.value
    if event.version is not None:
        seen.version = event.version
    seen.at = max(event.observed_at, seen.at) if seen.at else event.observed_at


# ----------------------------------------------------------------------------------- observations


def decide(
    state: AgentSyncState,
    event: PresenceObserved,
    rules: Rules,
    catalogue: Mapping[str, Presence],
    now: datetime,
) -> Decision:
    """What the bridge does about one observation. ``state`` is not modified; the new one is returned."""
    verdict = order(state, event)
    if verdict is not None:
        late = _late_echo(state, event)
        if late is not None:
            return Decision(Result.ECHO, late, detail=f"late echo of bridge write {event.value} v{event.version}")
        return Decision(verdict, state, detail=f"{event.system} {event.value} v{event.version}")
    s = copy.deepcopy(state)
    if event.system is System.DYNAMICS:
        if event.value not in catalogue:
            return Decision(
                Result.UNKNOWN_PRESENCE, state, detail=f"presence id {event.value} is not in msdyn_presences"
            )
        echo = _observe_dynamics(s, event, now)
    else:
        echo = _observe_teams(s, event, rules)
    return _converge(s, rules, catalogue, now, f"{event.system} {event.value}", Result.ECHO if echo else None)


def _observe_dynamics(s: AgentSyncState, ev: PresenceObserved, now: datetime) -> bool:
    """Updates P from a Dynamics event; True when it was the echo of a write of ours."""
    _see(s.dynamics_seen, ev)
    # The bridge writes as the agent (impersonation): a change Dataverse marks SYSTEM is routing's.
    if ev.modified_by != "SYSTEM" and _take_echo(s, ev.value, now):
        return True
    s.own_dynamics, s.own_dynamics_by, s.own_dynamics_at = ev.value, ev.modified_by, ev.observed_at
    if ev.modified_by == "AGENT":
        s.chose_at = ev.observed_at
    s.undo_command = None  # Dynamics moved on: a bot command that fails later undoes nothing
    return False


def _take_echo(s: AgentSyncState, value: str, now: datetime) -> bool:
    """True, consuming it and every older write, when ``value`` is a write of ours still expected."""
    live = [w for w in s.dynamics_unconfirmed if w.value == s.dynamics_written or now - w.at <= ECHO_WINDOW]
    for i, w in enumerate(live):
        if w.value == value:
            s.dynamics_unconfirmed = live[i + 1 :]
            if s.dynamics_written == value:
                s.dynamics_written = None  # it landed: Dynamics shows it
            if s.own_dynamics == value:
                s.undo_command = None  # the bot command landed
            return True
    s.dynamics_unconfirmed = live
    return False


def _late_echo(state: AgentSyncState, event: PresenceObserved) -> AgentSyncState | None:
    """The state without the write a stale Dynamics echo belongs to, or None when it is not one: its
    expectation must not linger and swallow a later genuine change to the same value."""
    if event.system is not System.DYNAMICS or event.modified_by == "SYSTEM" or event.value == state.dynamics_written:
        return None
    if not any(w.value == event.value for w in state.dynamics_unconfirmed):
        return None
    s = copy.deepcopy(state)
    s.dynamics_unconfirmed = [w for w in s.dynamics_unconfirmed if w.value != event.value]
    return s


def _teams_holds(s: AgentSyncState) -> set[str]:
    """The sessions Teams may hold from the bridge right now: the acknowledged one and any decided
    since (a write can land before its acknowledgement reaches us)."""
    return {v for v in (s.session_delivered, *s.session_unacked) if v is not None and v != CLEAR}


def _observe_teams(s: AgentSyncState, ev: PresenceObserved, rules: Rules) -> bool:
    """Updates Q from a Teams report; True when it was the bridge's own session showing."""
    previous = s.teams_seen.value
    _see(s.teams_seen, ev)
    if ev.current:
        _check_session_in_force(s, ev.value)
    if ev.value in _teams_holds(s):
        # Teams shows exactly a session of ours: the person's last known state still stands if it
        # is that same value; any other has ended (or is hidden below the session, where it asks
        # nothing that the session's own presence does not already show).
        if s.own_teams != ev.value:
            s.own_teams, s.own_teams_since = None, ev.observed_at
        s.session_replaced = []
        return True
    read_after_landing = ev.current and s.session_landed_at is not None and ev.observed_at >= s.session_landed_at
    if ev.value in s.session_replaced and not read_after_landing:
        return True  # an older session of ours, shown before the newer one landed
    if s.own_teams != ev.value:
        # Since when Teams has shown it: a value Teams showed already (our session, now gone, over
        # the same own state) has been showing since then, not since we learned whose it is.
        since = s.teams_seen.since if previous == ev.value else ev.observed_at
        s.own_teams, s.own_teams_since = ev.value, since
    s.session_replaced = []
    return False


def _check_session_in_force(s: AgentSyncState, shown: str) -> None:
    """A read showing less than the session Graph acknowledged means the session is gone (it lapsed,
    or someone cleared it): forget it, so that converging writes it again."""
    held = s.session_delivered
    if no_session(held) or s.session_unacked or held is None:
        return
    rank = AGGREGATION_RANK.get(TeamsPresence.parse(shown).availability, 0)
    if rank < AGGREGATION_RANK.get(TeamsPresence.parse(held).availability, 0):
        s.session_delivered = None
        s.session_written = None


# -------------------------------------------------------------------------------------- converge


def explain(state: AgentSyncState, rules: Rules, catalogue: Mapping[str, Presence]) -> Outputs:
    """Rule 2 applied to the state's inputs: what each system should show, and why."""
    return outputs(
        inputs_of(state.own_dynamics, state.chose_at, state.own_teams, state.own_teams_since, catalogue), rules
    )


def _converge(
    s: AgentSyncState,
    rules: Rules,
    catalogue: Mapping[str, Presence],
    now: datetime,
    reason: str,
    result: Result | None,
    *,
    dynamics: bool = True,
) -> Decision:
    """Writes what each system should show where it does not already (or is not about to)."""
    out = explain(s, rules, catalogue)
    commands: list[SetPresence] = []
    cancel: list[SetPresence] = []
    if dynamics and out.dynamics is not None:
        shown = s.dynamics_seen.value
        if s.dynamics_written is not None:
            if out.dynamics == s.dynamics_written:
                pass  # on its way
            elif out.dynamics == shown:
                # Withdrawn; if already in flight, its landing is repaired by converging again.
                cancel.append(SetPresence(s.agent_id, System.DYNAMICS, s.dynamics_written, "withdrawn"))
                s.dynamics_written = None
            else:
                commands.append(_write_dynamics(s, out.dynamics, now, f"{reason}: {out.why}"))
        elif out.dynamics != shown:
            commands.append(_write_dynamics(s, out.dynamics, now, f"{reason}: {out.why}"))
    if out.session is not None:
        current = s.session_written
        same = out.session == current or (no_session(out.session) and no_session(current))
        if not same:
            commands.append(_write_session(s, out.session, now, reason))
    log = {"why": out.why} if commands else {}
    if result is None:
        result = Result.APPLIED if commands else Result.NO_CHANGE
    elif commands:
        result = Result.APPLIED
    return Decision(result, s, tuple(commands), tuple(cancel), detail=out.why, log=log)


def _write_dynamics(s: AgentSyncState, value: str, now: datetime, reason: str) -> SetPresence:
    s.dynamics_written = value
    kept = [w for w in s.dynamics_unconfirmed if w.value != value]
    s.dynamics_unconfirmed = [*kept, Write(value, now)][-MAX_UNCONFIRMED:]
    return SetPresence(s.agent_id, System.DYNAMICS, value, reason)


def _write_session(s: AgentSyncState, value: str, now: datetime, reason: str) -> SetPresence:
    shown = s.teams_seen.value
    if shown is not None and shown in _teams_holds(s):
        s.read_after_landing = True  # Teams showed exactly our session: what is behind it is unknown
    # Sessions whose report may still be on its way: the one Teams showed, and any not acknowledged
    # (a delivered session that Teams showed no longer cannot appear in a later notification).
    maybe = {shown} | {v for v in s.session_unacked if not no_session(v)}
    old = sorted(v for v in _teams_holds(s) if v in maybe and v != value)
    s.session_replaced = [*old, *[v for v in s.session_replaced if v not in old]][:MAX_UNCONFIRMED]
    s.session_written, s.session_written_at = value, now
    s.session_unacked = [*[v for v in s.session_unacked if v != value], value][-MAX_UNCONFIRMED:]
    return SetPresence(s.agent_id, System.TEAMS, value, reason)


# ------------------------------------------------------------------------------- other decisions


def command(
    state: AgentSyncState,
    presence: Presence,
    rules: Rules,
    catalogue: Mapping[str, Presence],
    now: datetime,
    source: str,
) -> Decision:
    """An agent's own request (the bot): a choice of P made now, so any Teams override ends until Q
    changes again; Dynamics gets it and Teams follows, both written by us."""
    s = copy.deepcopy(state)
    s.undo_command = (s.own_dynamics, s.own_dynamics_by, s.chose_at)
    s.own_dynamics, s.own_dynamics_by, s.own_dynamics_at, s.chose_at = presence.presence_id, source, now, now
    return _converge(s, rules, catalogue, now, f"{source}: {presence.name}", None)


def landed(
    state: AgentSyncState, system: System, value: str, rules: Rules, catalogue: Mapping[str, Presence], now: datetime
) -> Decision:
    """A write of ours was acknowledged: the system holds ``value``. For Teams, read it back when the
    session replaced was what Teams showed; for Dynamics, a write that landed after a newer genuine
    change is repaired by converging."""
    s = copy.deepcopy(state)
    read: tuple[System, ...] = ()
    if system is System.TEAMS:
        s.session_delivered, s.session_landed_at = value, now
        if value in s.session_unacked:
            s.session_unacked = s.session_unacked[s.session_unacked.index(value) + 1 :]
        if value == s.session_written and not s.session_unacked and s.read_after_landing:
            s.read_after_landing = False
            read = (System.TEAMS,)
        decision = _converge(s, rules, catalogue, now, f"teams session {value} landed", Result.NO_CHANGE)
        return Decision(decision.result, decision.state, decision.commands, decision.cancel, read, decision.detail)
    s.dynamics_delivered, s.dynamics_delivered_at = value, now
    for w in s.dynamics_unconfirmed:
        if w.value == value:
            w.at = now  # its echo is expected from now on
    if value == s.dynamics_written:
        s.dynamics_written = None
        if any(w.value == value for w in s.dynamics_unconfirmed):
            # Landed, echo not seen yet: Dynamics shows it now (its webhook will be consumed).
            s.dynamics_seen.value = value
            if s.own_dynamics == value:
                s.undo_command = None
        return Decision(Result.NO_CHANGE, s, detail=f"dynamics {value} landed")
    if s.dynamics_written is None and any(w.value == value for w in s.dynamics_unconfirmed):
        # A write withdrawn too late (it was in flight) landed over a newer change: Dynamics shows
        # it until the difference is written again.
        s.dynamics_seen.value = value
        return _converge(s, rules, catalogue, now, f"dynamics {value} landed late", Result.NO_CHANGE)
    return Decision(Result.NO_CHANGE, s, detail=f"dynamics {value} landed")


def write_died(
    state: AgentSyncState, system: System, value: str, rules: Rules, catalogue: Mapping[str, Presence], now: datetime
) -> Decision:
    """A write of ours became a dead letter: the system keeps what it showed, and the state records
    that, so the next observation or sweep writes the difference again (never at once: that would
    loop a dead upstream). A bot command whose Dynamics write died did not happen: P is what it was,
    and Teams follows that instead (else Teams would show, say, Do not disturb while Dynamics routes
    customers to the agent)."""
    s = copy.deepcopy(state)
    if system is System.TEAMS:
        s.session_unacked = [v for v in s.session_unacked if v != value]
        if s.session_written == value:
            s.session_written = s.session_delivered
            s.read_after_landing = False
        return Decision(Result.NO_CHANGE, s, detail=f"teams write {value} died; the sweep repairs it")
    s.dynamics_unconfirmed = [w for w in s.dynamics_unconfirmed if w.value != value]
    if s.dynamics_written != value:
        return Decision(Result.NO_CHANGE, s, detail="a newer write replaced the dead one")
    s.dynamics_written = None
    if s.undo_command is not None and s.own_dynamics == value:
        s.own_dynamics, s.own_dynamics_by, s.chose_at = s.undo_command
        s.undo_command = None
        if s.own_dynamics is None:
            s.own_dynamics = s.dynamics_seen.value
    shown = catalogue.get(s.dynamics_seen.value or "")
    reason = f"dynamics write {value} failed; Teams follows {shown.name if shown else 'Dynamics'}"
    return _converge(s, rules, catalogue, now, reason, Result.NO_CHANGE, dynamics=False)


def withdrawn(state: AgentSyncState, write: SetPresence) -> AgentSyncState:
    """A withdrawn write never left the outbox: no echo of it will come."""
    s = copy.deepcopy(state)
    if write.system is System.DYNAMICS:
        s.dynamics_unconfirmed = [w for w in s.dynamics_unconfirmed if w.value != write.value]
    return s


def refresh(state: AgentSyncState, now: datetime) -> tuple[AgentSyncState, SetPresence] | None:
    """Re-issues the session Teams holds from us before Graph lets it lapse; None when none is held."""
    held = state.session_written
    if no_session(held) or held is None or held != state.session_delivered:
        return None
    s = copy.deepcopy(state)
    s.session_written_at = now
    return s, SetPresence(s.agent_id, System.TEAMS, held, "session refresh")


__all__ = [
    "CLEAR",
    "Decision",
    "Result",
    "command",
    "decide",
    "explain",
    "landed",
    "order",
    "refresh",
    "withdrawn",
    "write_died",
]
