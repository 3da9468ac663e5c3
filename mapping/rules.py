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

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mapping.model import (
    CLEAR,
    AgentSyncState,
    DynamicsEvent,
    Presence,
    PresenceObserved,
    Seen,
    SetPresence,
    System,
    TeamsPresence,
    Write,
    clone,
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
    unsent: str | None = None,
    dynamics_unsent: str | None = None,
    *,
    owned: bool = False,
) -> Decision:
    """What the bridge does about one observation. ``state`` is not modified; the new one is returned.

    ``unsent``: the value queued for the event's system that no attempt has sent yet (the outbox
    knows; see ``needs_unsent``): the system cannot be showing it, nor echoing it. For a Teams event,
    ``dynamics_unsent`` is the same for Dynamics: the outbox may show that a Dynamics attempt failed,
    which changes P (``_retry_pending``), and a Teams event converges Dynamics too.

    ``owned``: the caller hands ``state`` over (it holds no other reference it will read, nor one
    anyone else holds): the new state is then ``state`` changed in place instead of a copy. The
    engine's states are its own (loaded for its transaction), and the copy was a tenth of its time
    per observation (py-spy)."""
    given = state
    state = _retry_pending(state, unsent if event.system is System.DYNAMICS else dynamics_unsent)
    verdict = order(state, event)
    if verdict is not None:
        if verdict is Result.STALE and event.system is System.DYNAMICS:
            late = _late_dynamics(state, event, rules, catalogue, now)
            if late is not None:
                return late
        if verdict is Result.DUPLICATE and event.current:
            # The sweep read what is already known: nothing new, but compare with the outputs anyway
            # (rule 8), so a difference left by a dead letter is written again.
            repair = _converge(clone(state), rules, catalogue, now, "sweep", Result.DUPLICATE)
            if repair.commands:
                return repair
        if state is not given:
            # Stale or a duplicate, but the outbox showed an attempt failed: what that changed is kept
            # (a STALE or DUPLICATE decision is not saved), and P may have changed with it.
            return _converge(clone(state), rules, catalogue, now, "failed attempt", Result.NO_CHANGE)
        return Decision(verdict, state, detail=f"{event.system} {event.value} v{event.version}")
    s = state if owned else clone(state)
    if event.system is System.DYNAMICS:
        if event.value not in catalogue:
            return Decision(
                Result.UNKNOWN_PRESENCE, state, detail=f"presence id {event.value} is not in msdyn_presences"
            )
        echo = _observe_dynamics(s, event, now, unsent)
    else:
        echo, read = _observe_teams(s, event, rules, unsent)
        if read:
            decision = _converge(s, rules, catalogue, now, f"{event.system} {event.value}", Result.ECHO)
            return dataclasses.replace(decision, read=(System.TEAMS,))
    return _converge(s, rules, catalogue, now, f"{event.system} {event.value}", Result.ECHO if echo else None)


def needs_unsent(state: AgentSyncState, system: System) -> bool:
    """Whether ``decide`` for this system needs to know the unsent queued value (a write of ours is
    expected that may not have left yet, or an event was taken for the echo of a write in flight,
    whose attempt may have failed since); False spares the engine the outbox look-up."""
    if system is System.DYNAMICS:
        return any(not w.landed and w.below is None for w in state.dynamics_unconfirmed) or any(
            e.echo and e.in_flight for e in state.dynamics_recent
        )
    return bool(state.session_unacked)


def _retry_pending(state: AgentSyncState, unsent: str | None) -> AgentSyncState:
    """The outbox holds ``unsent`` pending (no attempt under way, none succeeded) while the state
    expects no write of that value: an event was taken for the echo of its attempt while that was in
    flight, and the attempt failed (a failure waiting for its retry is reported to no one). That
    event was a change of the agent's own, made then; the retry is still ours, and still expected.
    Left as it was, nothing withdraws the retry once P moves on, and its echo, matching no write,
    becomes the agent's choice of a value the bridge wrote."""
    if unsent is None or any(not w.landed and w.value == unsent for w in state.dynamics_unconfirmed):
        return state
    taken = [e for e in state.dynamics_recent if e.echo and e.in_flight and e.value == unsent]
    if not taken:
        return state
    s = clone(state)
    mistaken = next(e for e in s.dynamics_recent if e.version == taken[-1].version)
    mistaken.echo = mistaken.in_flight = False
    _agents_own(s, mistaken)
    s.dynamics_written = unsent
    write = Write(unsent, mistaken.at, above=s.dynamics_seen.version)  # it lands after all seen so far
    s.dynamics_unconfirmed = [*s.dynamics_unconfirmed, write][-MAX_UNCONFIRMED:]
    return s


def _observe_dynamics(s: AgentSyncState, ev: PresenceObserved, now: datetime, unsent: str | None) -> bool:
    """Updates P from a Dynamics event; True when it was the echo of a write of ours."""
    _see(s.dynamics_seen, ev)
    # The bridge writes as the agent (impersonation): a change Dataverse marks SYSTEM is routing's.
    in_flight = any(not w.landed for w in s.dynamics_unconfirmed if w.value == ev.value)
    echo = ev.modified_by != "SYSTEM" and _take_echo(s, ev, now, unsent)
    previous = max(
        (e for e in s.dynamics_recent if ev.version is None or e.version < ev.version),
        key=lambda e: e.version,
        default=None,
    )
    _remember(s, ev, echo=echo, in_flight=echo and in_flight)
    if echo:
        return True
    if (
        ev.modified_by == "AGENT"
        and previous is not None
        and previous.echo
        and previous.in_flight
        and previous.value == ev.value
    ):
        # The event just before, same value, was taken for the echo of our write while that was still
        # on its way, and nothing came between: one of the two was the agent's own change, made while
        # the write was in flight. Pair this one with the write, and the earlier one is the agent's
        # choice, made then. (Taken after the write landed, the earlier one is its echo, and this is
        # the agent choosing the same value again.)
        s.dynamics_recent = [
            DynamicsEvent(e.version, e.value, e.by, e.at, e.version == ev.version or (e.echo and e is not previous))
            for e in s.dynamics_recent
        ]
        _agents_own(s, previous)
        return True
    _genuine(s, ev.value, ev.modified_by, ev.observed_at, ev.version)
    return False


def _take_echo(s: AgentSyncState, ev: PresenceObserved, now: datetime, unsent: str | None) -> bool:
    """True, consuming it, when ``ev`` is the echo of a write of ours still expected.

    Echoes are matched to writes in the order the writes were made (Dataverse echoes in landing
    order; a pairing a held-back echo proves wrong is swapped in ``_late_dynamics``). Every write
    landed before the one it belongs to has a lower echo, if that still comes: it is kept for that
    (stale) echo only. Dynamics then shows the newest of our writes that landed after it."""
    live = [w for w in s.dynamics_unconfirmed if not (w.landed or w.below) or now - w.at <= ECHO_WINDOW]
    s.dynamics_unconfirmed = live
    # While the row is pending (queued, or waiting out a retry) no attempt is under way: the engine
    # never calls back an attempt in flight (``superseded``), so a write of ours not acknowledged by
    # then was not sent yet or failed. Neither can have echoed.
    pending = unsent is not None
    candidates = [
        i
        for i, w in enumerate(live)
        if w.value == ev.value
        and w.below is None
        and (w.above is None or ev.version is None or ev.version > w.above)
        and not (pending and not w.landed)
    ]
    if not candidates:
        return False
    i = candidates[0]  # in the order they were written: Dataverse echoes in landing order
    for older in live[:i]:
        if older.below is None and older.landed and ev.version is not None:
            older.below = ev.version
    s.dynamics_unconfirmed = live[:i] + live[i + 1 :]
    landed_since = [x for x in live[i + 1 :] if x.landed]
    if landed_since:
        s.dynamics_seen.value = landed_since[-1].value
    if s.dynamics_written == ev.value and not any(x.value == ev.value for x in live[i + 1 :]):
        s.dynamics_written = None  # it landed: Dynamics shows it
    if s.own_dynamics == ev.value:
        s.undo_command = None  # the bot command landed
    return True


def _drop_unlanded(writes: list[Write], value: str) -> list[Write]:
    """``writes`` without its oldest entry for ``value`` that has not landed."""
    for i, w in enumerate(writes):
        if w.value == value and not w.landed:
            return writes[:i] + writes[i + 1 :]
    return writes


def _late_dynamics(
    state: AgentSyncState, ev: PresenceObserved, rules: Rules, catalogue: Mapping[str, Presence], now: datetime
) -> Decision | None:
    """A Dynamics event older than one already judged, never seen before (deliveries can be held back
    and reordered; RowVersions still tell the order). None when it is only stale. Otherwise:
    - an echo of ours held back: its expectation must not linger to swallow a later genuine change;
    - an echo of ours with the same value as an event taken for that write's echo: one of the two
      was the agent's own change, made then (RowVersions cannot tell which when both are above the
      version the write was decided at);
    - a genuine change above the version P was read at: P changed, even if an echo of ours with a
      higher RowVersion came first (the bridge's write landed over it, and must be undone)."""
    if ev.version is None or any(e.version == ev.version for e in state.dynamics_recent):
        return None
    s = clone(state)
    if ev.modified_by != "SYSTEM":
        for i, w in enumerate(s.dynamics_unconfirmed):
            expected_below = w.below is not None and ev.version < w.below
            possible = w.above is None or ev.version > w.above  # decided after Dynamics showed w.above
            if w.value == ev.value and possible and (expected_below or (w.below is None and w.landed)):
                s.dynamics_unconfirmed = s.dynamics_unconfirmed[:i] + s.dynamics_unconfirmed[i + 1 :]
                _remember(s, ev, echo=True)
                return Decision(Result.ECHO, s, detail=f"late echo of bridge write {ev.value} v{ev.version}")
        # An event of ours was taken for a write's echo, and this one has the same value and no
        # write left to explain it: one of the two was the agent's own change. Either way, the agent
        # chose that value then; P takes it if nothing newer set P since.
        taken = [e for e in s.dynamics_recent if e.echo and e.value == ev.value and e.by != "SYSTEM"]
        for e in taken:
            # Two writes of the same value, their echoes reordered: the one taken for the older write
            # was the newer write's, and this one is the older write's. Both ours: swap, nothing else.
            for i, w in enumerate(s.dynamics_unconfirmed):
                if w.value == ev.value and w.landed and w.below is None and (w.above is None or e.version > w.above):
                    s.dynamics_unconfirmed = s.dynamics_unconfirmed[:i] + s.dynamics_unconfirmed[i + 1 :]
                    _remember(s, ev, echo=True)
                    return Decision(Result.ECHO, s, detail=f"late echo {ev.value} v{ev.version} (echoes reordered)")
        if taken:
            _remember(s, ev, echo=True)
            mistaken = taken[-1]
            mistaken.echo = False
            _agents_own(s, mistaken)
            reason = f"late echo v{ev.version}: v{mistaken.version} {ev.value} was the agent's own change"
            return _converge(s, rules, catalogue, now, reason, Result.ECHO)
    if s.own_dynamics_version is not None and ev.version <= s.own_dynamics_version:
        return None
    _remember(s, ev, echo=False)
    _genuine(s, ev.value, ev.modified_by, ev.observed_at, ev.version)
    return _converge(s, rules, catalogue, now, f"late dynamics {ev.value} v{ev.version}", None)


def _remember(s: AgentSyncState, ev: PresenceObserved, *, echo: bool, in_flight: bool = False) -> None:
    if ev.version is not None:
        event = DynamicsEvent(ev.version, ev.value, ev.modified_by, ev.observed_at, echo, in_flight)
        s.dynamics_recent = sorted([*s.dynamics_recent, event], key=lambda e: e.version)[-MAX_UNCONFIRMED:]


def _agents_own(s: AgentSyncState, e: DynamicsEvent) -> None:
    """An event taken for an echo of ours was the agent's own change, made then: P takes it unless
    something newer set P since; then the agent's choice still counts from then."""
    if s.own_dynamics_version is None or e.version > s.own_dynamics_version:
        _genuine(s, e.value, e.by, e.at, e.version)
    elif e.by == "AGENT" and (s.chose_at is None or e.at > s.chose_at):
        s.chose_at = e.at  # routing changed P since, but the agent's choice stands


def _genuine(s: AgentSyncState, value: str, by: str | None, at: datetime, version: int | None) -> None:
    s.own_dynamics, s.own_dynamics_by, s.own_dynamics_at = value, by, at
    s.own_dynamics_version = version
    if by == "AGENT":
        s.chose_at = at
    s.undo_command = None  # Dynamics moved on: a bot command that fails later undoes nothing


def _teams_holds(s: AgentSyncState) -> set[str]:
    """The sessions Teams may hold from the bridge right now: the acknowledged one and any decided
    since (a write can land before its acknowledgement reaches us)."""
    return {v for v in (s.session_delivered, *s.session_unacked) if v is not None and v != CLEAR}


def _observe_teams(s: AgentSyncState, ev: PresenceObserved, rules: Rules, unsent: str | None) -> tuple[bool, bool]:
    """Updates Q from a Teams report. Returns whether it was the bridge's own session showing, and
    whether Teams must be read now to tell (a read made after the bridge's newer session landed)."""
    previous, seen_before = s.teams_seen.value, s.teams_seen.at
    _see(s.teams_seen, ev)
    if previous != ev.value and ev.since is not None and ev.since < ev.observed_at:
        # Shown since the notification that prompted this read, but not before what was seen last.
        s.teams_seen.since = max(ev.since, seen_before) if seen_before else ev.since
    if ev.current:
        _check_session_in_force(s, ev.value)
    holds = _teams_holds(s)
    if unsent is not None and unsent != s.session_delivered:
        holds.discard(unsent)  # still in the outbox: Teams cannot be showing it
    if ev.value in holds:
        # Teams shows exactly a session of ours: the person's last known state still stands if it
        # is that same value; any other has ended (or is hidden below the session, where it asks
        # nothing that the session's own presence does not already show).
        if s.own_teams != ev.value:
            s.own_teams, s.own_teams_since = None, ev.observed_at
        if s.session_written != ev.value:
            # Another session (or a clear) is on its way: once it lands, what this one hid is read.
            s.read_after_landing = True
        s.session_replaced = []
        return True, False
    read_after_landing = ev.current and s.session_landed_at is not None and ev.observed_at >= s.session_landed_at
    if ev.value in s.session_replaced and not read_after_landing:
        # An older session of ours, shown before the newer one landed; or the person's own state of
        # the same value (the old session may never have shown: the person's own state outranked it,
        # and Graph notifies nothing then). Only a read made after the newer session landed tells.
        if s.session_unacked:
            s.read_after_landing = True
            return True, False
        return True, not ev.current
    if s.own_teams != ev.value:
        # Since when Teams has shown it: a value Teams showed already (our session, now gone, over
        # the same own state) has been showing since then, not since we learned whose it is.
        s.own_teams, s.own_teams_since = ev.value, s.teams_seen.since or ev.observed_at
    s.session_replaced = []
    return False, False


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
    write = Write(value, now, above=s.dynamics_seen.version)
    s.dynamics_unconfirmed = [*s.dynamics_unconfirmed, write][-MAX_UNCONFIRMED:]
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
    s = clone(state)
    s.undo_command = (s.own_dynamics, s.own_dynamics_by, s.chose_at)
    s.own_dynamics, s.own_dynamics_by, s.own_dynamics_at, s.chose_at = presence.presence_id, source, now, now
    s.own_dynamics_version = s.dynamics_seen.version  # a later genuine change is above it
    return _converge(s, rules, catalogue, now, f"{source}: {presence.name}", None)


def landed(
    state: AgentSyncState, system: System, value: str, rules: Rules, catalogue: Mapping[str, Presence], now: datetime
) -> Decision:
    """A write of ours was acknowledged: the system holds ``value``. For Teams, read it back when the
    session replaced was what Teams showed; for Dynamics, a write that landed after a newer genuine
    change is repaired by converging."""
    s = clone(state)
    read: tuple[System, ...] = ()
    if system is System.TEAMS:
        before = s.session_delivered
        s.session_delivered, s.session_landed_at = value, now
        if value in s.session_unacked:
            i = s.session_unacked.index(value)
            # One attempt per row at a time: the sessions decided before this one and never
            # acknowledged failed (a failure replaced by a newer value is reported to no one), so
            # Teams never showed them, and a later report of one is the person's own state.
            failed = set(s.session_unacked[:i]) - {before, value}
            s.session_replaced = [v for v in s.session_replaced if v not in failed]
            s.session_unacked = s.session_unacked[i + 1 :]
        if value == s.session_written and not s.session_unacked and s.read_after_landing:
            s.read_after_landing = False
            read = (System.TEAMS,)
        decision = _converge(s, rules, catalogue, now, f"teams session {value} landed", Result.NO_CHANGE)
        return Decision(decision.result, decision.state, decision.commands, decision.cancel, read, decision.detail)
    acked_before = s.dynamics_delivered_at
    s.dynamics_delivered, s.dynamics_delivered_at = value, now
    mine = next((w for w in s.dynamics_unconfirmed if w.value == value and not w.landed), None)
    if mine is None:
        return Decision(Result.NO_CHANGE, s, detail=f"dynamics {value} landed; its echo came first")
    mine.landed, mine.at = True, now  # its echo is expected from now on
    # One attempt per row at a time (an attempt in flight is superseded, never called back): the
    # writes decided before this one and not acknowledged are over, and failed (a failure replaced by
    # a newer value is reported to no one). Their echo will not come; kept, one would swallow the
    # agent's own later change to its value.
    i = s.dynamics_unconfirmed.index(mine)
    s.dynamics_unconfirmed = [w for w in s.dynamics_unconfirmed[:i] if w.landed] + s.dynamics_unconfirmed[i:]
    # For the same reason, an event of another value taken for the echo of a write on its way, since
    # the last acknowledgement, was no echo: that write was never acknowledged, so it failed, and the
    # event was the agent's own change (made during this attempt, say). Only this write's own echo may
    # have come before its acknowledgement.
    mistaken = [
        e
        for e in s.dynamics_recent
        if e.echo and e.in_flight and e.value != value and (acked_before is None or e.at > acked_before)
    ]
    for m in mistaken:
        m.echo = m.in_flight = False
    if mistaken:
        _agents_own(s, mistaken[-1])
    s.dynamics_seen.value = value  # Dynamics shows it now (its webhook will be consumed)
    if s.own_dynamics == value:
        s.undo_command = None
    if value == s.dynamics_written:
        s.dynamics_written = None
        if not mistaken:
            return Decision(Result.NO_CHANGE, s, detail=f"dynamics {value} landed")
    # A write withdrawn too late (it was in flight) or replaced landed, or P was found changed:
    # Dynamics shows it until the difference is written again.
    return _converge(s, rules, catalogue, now, f"dynamics {value} landed", Result.NO_CHANGE)


def write_died(
    state: AgentSyncState, system: System, value: str, rules: Rules, catalogue: Mapping[str, Presence], now: datetime
) -> Decision:
    """A write of ours became a dead letter: the system keeps what it showed, and the state records
    that, so the next observation or sweep writes the difference again (never at once: that would
    loop a dead upstream). A bot command whose Dynamics write died did not happen: P is what it was,
    and Teams follows that instead (else Teams would show, say, Do not disturb while Dynamics routes
    customers to the agent)."""
    s = clone(state)
    if system is System.TEAMS:
        s.session_unacked = [v for v in s.session_unacked if v != value]
        if s.session_written == value:
            s.session_written = s.session_delivered
            s.read_after_landing = False
        return Decision(Result.NO_CHANGE, s, detail=f"teams write {value} died; the sweep repairs it")
    s.dynamics_unconfirmed = _drop_unlanded(s.dynamics_unconfirmed, value)
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


def superseded(state: AgentSyncState, write: SetPresence, now: datetime) -> tuple[AgentSyncState, SetPresence] | None:
    """A withdrawn Dynamics write whose attempt is in flight: it cannot be called back. Cancelling the
    row would void the attempt's lease, so that its failure would be reported to no one and the state
    would expect its echo for good (a later change of the agent's own to that value was swallowed as
    that echo, and the bridge wrote over the agent's last choice). Instead the row gets what Dynamics
    shows as its next value: if the attempt lands, that repairs it; if it fails, the row is pending
    again (no attempt under way, so the failed write is not expected back), and the value is written
    once more, which changes nothing that Dynamics shows. None when what Dynamics shows is unknown
    (a write is withdrawn only because Dynamics already shows what it should, so never in practice)."""
    if state.dynamics_seen.value is None:
        return None
    s = clone(state)
    shown = state.dynamics_seen.value
    return s, _write_dynamics(s, shown, now, f"{write.reason}: {write.value} in flight, superseded")


def withdrawn(state: AgentSyncState, write: SetPresence) -> AgentSyncState:
    """A withdrawn write never left the outbox: no echo of it will come."""
    return never_sent(state, write.system, write.value)


def never_sent(state: AgentSyncState, system: System, value: str, *, owned: bool = False) -> AgentSyncState:
    """A write replaced in the outbox before it was ever attempted (coalescing, rule 6) or withdrawn
    never reaches the system: Teams cannot be showing it, and Dynamics will not echo it, so a later
    report of that value is the person's own or the agent's own change. ``owned``: as ``decide``'s."""
    s = state if owned else clone(state)
    if system is System.DYNAMICS:
        # The oldest entry not landed: with the same value written again, the newest stays expected.
        s.dynamics_unconfirmed = _drop_unlanded(s.dynamics_unconfirmed, value)
    elif value != s.session_written:
        s.session_unacked = [v for v in s.session_unacked if v != value]
        s.session_replaced = [v for v in s.session_replaced if v != value]
    return s


def refresh(state: AgentSyncState, now: datetime) -> tuple[AgentSyncState, SetPresence] | None:
    """Re-issues the session Teams holds from us before Graph lets it lapse; None when none is held."""
    held = state.session_written
    if no_session(held) or held is None or held != state.session_delivered:
        return None
    s = clone(state)
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
    "needs_unsent",
    "never_sent",
    "order",
    "refresh",
    "superseded",
    "withdrawn",
    "write_died",
]
