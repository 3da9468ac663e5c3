"""Sync rules 2-6 of DESIGN.md as one pure function: state + event in, decision out.

Pure so that every rule is unit- and property-testable without a store, a clock or a network; the
engine (``mapping.engine``) loads the state, calls ``decide`` and saves what it returns in one
transaction.
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
    BasePresence,
    Presence,
    PresenceObserved,
    SetPresence,
    SideState,
    System,
)
from mapping.translation import NONE, RESTORE, Rules

ECHO_WINDOW = timedelta(minutes=5)
"""How long a value the bridge wrote is expected back as an echo. Past it, the same value arriving
again is treated as a genuine change (the write may have failed and a person set the same value)."""

# How strongly a Dynamics base presence keeps work away: an override from Teams may only block more.
_BLOCKING = {
    BasePresence.AVAILABLE: 0,
    BasePresence.AWAY: 1,
    BasePresence.BUSY: 2,
    BasePresence.BUSY_DND: 3,
    BasePresence.OFFLINE: 4,
}


class Result(enum.StrEnum):
    APPLIED = "applied"  # commands were issued
    NO_CHANGE = "no_change"  # a genuine observation that needs nothing done (already in sync, rule says none)
    ECHO = "echo"  # the bridge's own write coming back: suppressed (rule 3)
    STALE = "stale"  # older than what is known (rule 4)
    DUPLICATE = "duplicate"  # the same observation again (rule 4)
    CONFLICT = "conflict"  # both sides changed inside the window; the loser was dropped (rule 5)
    UNKNOWN_PRESENCE = "unknown_presence"  # a Dynamics presence id not in the catalogue
    UNKNOWN_AGENT = "unknown_agent"  # set by the engine, never by decide()


@dataclass(frozen=True)
class Decision:
    result: Result
    state: AgentSyncState
    commands: tuple[SetPresence, ...] = ()
    cancel: tuple[System, ...] = ()
    detail: str = ""
    log: Mapping[str, object] = field(default_factory=dict)


def _is_set(value: str | None) -> bool:
    return value is not None and value != CLEAR


def effective(side: SideState) -> str | None:
    """What a system shows or is about to show: our write until its echo is seen, else what we saw."""
    if side.written_value is not None and not side.write_seen:
        return side.written_value
    return side.observed_value


def order(state: AgentSyncState, event: PresenceObserved) -> Result | None:
    """Rule 4: STALE or DUPLICATE when the event is not newer than what is known, else None."""
    side = state.side(event.system)
    if event.version is not None and side.observed_version is not None:
        if event.version < side.observed_version:
            return Result.STALE
        if event.version == side.observed_version:
            return Result.DUPLICATE
        return None
    if side.observed_at is not None:
        if event.observed_at < side.observed_at:
            return Result.STALE
        if event.observed_at == side.observed_at and event.value == side.observed_value:
            return Result.DUPLICATE
    return None


def delivered(state: AgentSyncState, system: System, value: str, now: datetime) -> AgentSyncState:
    """A write of ours landed: the system now holds ``value``; older writes can no longer show, and
    the echo of this one is expected from now (a write held back by an outage echoes late)."""
    s = copy.deepcopy(state)
    side = s.side(system)
    side.delivered_value = value
    side.delivered_at = now
    side.recent_writes = [(v, now if v == value else at) for v, at in side.recent_writes]
    return s


def decide(
    state: AgentSyncState,
    event: PresenceObserved,
    rules: Rules,
    catalogue: Mapping[str, Presence],
    now: datetime,
) -> Decision:
    """What the bridge does about one observation. ``state`` is not modified; the new one is returned."""
    s = copy.deepcopy(state)
    verdict = order(s, event)
    if verdict is not None:
        return Decision(verdict, state, detail=f"{event.system} {event.value} v{event.version}")
    side = s.side(event.system)
    previous = side.observed_value
    side.observed_value = event.value
    if event.version is not None:
        side.observed_version = event.version
    side.observed_at = max(event.observed_at, side.observed_at) if side.observed_at else event.observed_at
    if event.system is System.DYNAMICS:
        return _from_dynamics(s, event, previous, rules, catalogue, now)
    return _from_teams(s, event, previous, rules, catalogue, now)


MAX_RECENT_WRITES = 8


def _write(s: AgentSyncState, system: System, value: str, now: datetime, reason: str) -> SetPresence:
    side = s.side(system)
    side.written_value = value
    side.written_at = now
    side.write_seen = False
    recent = [(v, at) for v, at in side.recent_writes if now - at <= ECHO_WINDOW and v != value]
    side.recent_writes = [*recent, (value, now)][-MAX_RECENT_WRITES:]
    return SetPresence(s.agent_id, system, value, reason)


def _teams_follow(
    s: AgentSyncState, presence: Presence, rules: Rules, now: datetime, reason: str
) -> SetPresence | None:
    """The Teams write that makes the bridge's session mirror ``presence``, or None when the session
    already does (a cleared session and no session are the same thing)."""
    target = rules.teams_for(presence.base)
    held = s.teams.written_value
    if target == held or (target == CLEAR and not _is_set(held)):
        return None
    return _write(s, System.TEAMS, target, now, reason)


def _take_echo(side: SideState, value: str, now: datetime, observed_at: datetime | None = None) -> bool:
    """True (and forgets it, with every older write) when ``value`` is a write of ours still expected back.

    A write older than the one the system acknowledged last can only still be showing in an
    observation made before that acknowledgement; anything later that matches it is the person's own
    doing and must not be swallowed as an echo."""
    live = [(v, at) for v, at in side.recent_writes if now - at <= ECHO_WINDOW]
    held = next((i for i, (v, _) in enumerate(live) if v == side.delivered_value), None)
    for i, (v, _) in enumerate(live):
        if (
            held is not None
            and i < held
            and observed_at is not None
            and side.delivered_at is not None
            and observed_at >= side.delivered_at
        ):
            continue
        if v == value:
            side.recent_writes = live[i + 1 :]
            if value == side.written_value:
                side.write_seen = True
            return True
    side.recent_writes = live
    return False


def _from_dynamics(
    s: AgentSyncState,
    ev: PresenceObserved,
    previous: str | None,
    rules: Rules,
    catalogue: Mapping[str, Presence],
    now: datetime,
) -> Decision:
    d = s.dynamics
    presence = catalogue.get(ev.value)
    if presence is None:
        return Decision(Result.UNKNOWN_PRESENCE, s, detail=f"presence id {ev.value} is not in msdyn_presences")

    # Rule 3: our own write coming back. The bridge writes as the agent (impersonation), so a change
    # Dataverse marks SYSTEM (routing) is never ours, even when the value happens to match.
    if ev.modified_by != "SYSTEM" and _take_echo(d, ev.value, now):
        return Decision(Result.ECHO, s, detail=f"echo of bridge write {presence.name}")

    if previous == ev.value:
        # A newer version of the same presence (a duplicate webhook, a reconcile read): nothing moved,
        # and an override must survive it, or the restore after the call would be lost.
        return Decision(Result.NO_CHANGE, s, detail="unchanged")

    # Rule 5: the other side changed inside the window while our override for it is on.
    log: dict[str, object] = {}
    t_changed = s.teams.changed_at
    conflict = (
        rules.conflict_winner != "latest"
        and t_changed is not None
        and abs(ev.observed_at - t_changed) <= timedelta(seconds=rules.conflict_window_seconds)
        and s.override_value is not None
    )
    if conflict:
        log = {
            "conflict": True,
            "dynamics": presence.name,
            "teams": s.teams.observed_value,
            "winner": rules.conflict_winner,
        }
        if rules.conflict_winner == "teams":
            d.changed_at = ev.observed_at
            assert s.override_value is not None
            cmd = _write(s, System.DYNAMICS, s.override_value, now, "conflict: teams wins")
            return Decision(Result.CONFLICT, s, (cmd,), detail="teams wins", log=log)

    d.changed_at = ev.observed_at
    # A genuine Dynamics change is newer knowledge than any write of ours still queued for Dynamics:
    # withdraw it, and stop expecting echoes (a write already in flight that lands after this change
    # is then a real change, mirrored like any other, so the two systems cannot drift apart).
    # (Always: a change of the agent's that looked like our echo may have marked the write seen while
    # it still waits in the outbox; withdrawing a delivered row is a no-op.)
    cancel: tuple[System, ...] = (System.DYNAMICS,) if d.written_value is not None else ()
    d.recent_writes = []
    d.written_value = None
    # ...and ends any override: the agent (or routing) has decided.
    s.override_value = None
    s.restore_value = None
    follow = _teams_follow(s, presence, rules, now, f"dynamics {presence.name}")
    if follow is None:
        result = Result.CONFLICT if conflict else Result.NO_CHANGE
        detail = f"Teams session already {rules.teams_for(presence.base)}"
        return Decision(result, s, cancel=cancel, detail=detail, log=log)
    return Decision(Result.CONFLICT if conflict else Result.APPLIED, s, (follow,), cancel, log=log)


def _from_teams(
    s: AgentSyncState,
    ev: PresenceObserved,
    previous: str | None,
    rules: Rules,
    catalogue: Mapping[str, Presence],
    now: datetime,
) -> Decision:
    t = s.teams
    session = t.written_value
    holds = t.delivered_value
    live = [v for v, at in t.recent_writes if now - at <= ECHO_WINDOW]
    if _is_set(holds) and ev.value == holds:
        if holds in live and (t.delivered_at is None or ev.observed_at >= t.delivered_at):
            # The first sight of the session we just delivered: our own write (it may mask the person's
            # own state, which tells nothing about their call having ended).
            _take_echo(t, ev.value, now)
            return Decision(Result.ECHO, s, detail=f"echo of bridge session {holds}")
        if s.override_value is not None:
            # Teams showed something else since, and is back on our session: the person's own call,
            # meeting or DND has ended (even if a newer write of ours is still on its way).
            return _restore(s, now, "Teams fell back to the bridge session")
        return Decision(Result.ECHO, s, detail=f"Teams shows the bridge session {holds}")
    if holds is not None and t.delivered_at is not None and ev.observed_at >= t.delivered_at and holds in live:
        # Teams shows something other than the session it holds from us: the echo of that session is
        # no longer coming, and a later return to it is a fallback, not an echo.
        # Every write older than it is superseded and cannot be showing either.
        idx = next(i for i, (v, _) in enumerate(t.recent_writes) if v == holds)
        t.recent_writes = t.recent_writes[idx + 1 :]
    if _is_set(session) and ev.value == session:
        # Teams shows exactly the bridge's session: either the echo of our setPresence, or the person's
        # own call/meeting/DND ended and Teams fell back to our session. Either way an override ends.
        _take_echo(t, ev.value, now)
        t.write_seen = True
        if s.override_value is not None:
            return _restore(s, now, "Teams fell back to the bridge session")
        return Decision(Result.ECHO, s, detail=f"Teams shows the bridge session {session}")
    if _take_echo(t, ev.value, now, ev.observed_at):
        # An older session of ours, shown before our newer write landed: its own notification follows.
        return Decision(Result.ECHO, s, detail=f"Teams shows an earlier bridge session {ev.value}")

    if previous == ev.value:
        return Decision(Result.NO_CHANGE, s, detail="unchanged")
    t.changed_at = ev.observed_at
    action = rules.action_for(ev.value)
    if action.kind == NONE:
        return Decision(Result.NO_CHANGE, s, detail=f"rule: {ev.value} changes nothing in Dynamics")
    if action.kind == RESTORE:
        if s.override_value is not None:
            return _restore(s, now, f"Teams {ev.value}")
        return Decision(Result.NO_CHANGE, s, detail="no override to end")

    assert action.base is not None
    target = rules.dynamics_targets[action.base]
    # Rule 5: Dynamics changed on its own inside the window: by default it wins.
    d_changed = s.dynamics.changed_at
    window = timedelta(seconds=rules.conflict_window_seconds)
    if rules.conflict_winner == "dynamics" and d_changed is not None and abs(ev.observed_at - d_changed) <= window:
        log = {"conflict": True, "dynamics": s.dynamics.observed_value, "teams": ev.value, "winner": "dynamics"}
        return Decision(Result.CONFLICT, s, detail="dynamics wins", log=log)

    # What the override is measured against: the agent's own presence, not our earlier override.
    own = s.restore_value if s.override_value is not None else s.dynamics.observed_value
    own_presence = catalogue.get(own) if own else None
    if own_presence is not None and (
        own_presence.base is BasePresence.OFFLINE or _BLOCKING[own_presence.base] > _BLOCKING[action.base]
    ):
        return Decision(
            Result.NO_CHANGE,
            s,
            detail=f"Dynamics {own_presence.name} already keeps work away more than {action.base.label}",
        )
    current = effective(s.dynamics)
    if current == target and s.override_value is None:
        return Decision(Result.NO_CHANGE, s, detail="Dynamics already there")
    if s.override_value is None:
        s.restore_value = current
    s.override_value = target
    if current == target:
        return Decision(Result.NO_CHANGE, s, detail="Dynamics already there (override kept)")
    cmd = _write(s, System.DYNAMICS, target, now, f"teams {ev.value}")
    return Decision(Result.APPLIED, s, (cmd,))


def _restore(s: AgentSyncState, now: datetime, why: str) -> Decision:
    target = s.restore_value
    s.override_value = None
    s.restore_value = None
    if target is None or target == effective(s.dynamics):
        return Decision(Result.NO_CHANGE, s, detail=f"override ended ({why}); nothing to restore")
    cmd = _write(s, System.DYNAMICS, target, now, f"restore after override ({why})")
    return Decision(Result.APPLIED, s, (cmd,), detail=f"restore ({why})")


def command(state: AgentSyncState, presence: Presence, rules: Rules, now: datetime, source: str) -> Decision:
    """An agent's own request (the bot): Dynamics gets it and Teams follows, both written by us, so
    neither echo bounces; any override ends, because the agent has decided.

    The command is a Dynamics change made now, so rule 5 applies to it: a Teams change seen within
    the conflict window (typically one notified before the command but read after it) does not
    overturn the agent's explicit choice."""
    s = copy.deepcopy(state)
    s.dynamics.changed_at = now
    s.override_value = None
    s.restore_value = None
    cmds = []
    if effective(s.dynamics) != presence.presence_id:
        cmds.append(_write(s, System.DYNAMICS, presence.presence_id, now, f"{source}: {presence.name}"))
    teams = _teams_follow(s, presence, rules, now, f"{source}: {presence.name}")
    if teams is not None:
        cmds.append(teams)
    return Decision(Result.APPLIED if cmds else Result.NO_CHANGE, s, tuple(cmds))


def dynamics_write_died(
    state: AgentSyncState, value: str, rules: Rules, catalogue: Mapping[str, Presence], now: datetime
) -> Decision:
    """A write of ours to Dynamics became a dead letter: Dynamics keeps what it showed. Teams must
    mirror that, not the change that never landed (a bot command sets both sides at once, so without
    this Teams would keep showing, say, Do not disturb while Dynamics routes customers to the agent).
    An override whose write died is not in force either, so it ends without a restore."""
    s = copy.deepcopy(state)
    d = s.dynamics
    if d.written_value != value:
        return Decision(Result.NO_CHANGE, state, detail="a newer write replaced the dead one")
    d.written_value = None
    d.recent_writes = [(v, at) for v, at in d.recent_writes if v != value]
    if s.override_value == value:
        s.override_value = None
        s.restore_value = None
    shown = catalogue.get(d.observed_value) if d.observed_value else None
    if shown is None:
        return Decision(Result.NO_CHANGE, s, detail="Dynamics presence unknown; Teams left as it is")
    cmd = _teams_follow(s, shown, rules, now, f"dynamics write failed; Teams back to {shown.name}")
    if cmd is None:
        return Decision(Result.NO_CHANGE, s, detail=f"Teams session already {rules.teams_for(shown.base)}")
    return Decision(Result.APPLIED, s, (cmd,), detail=f"dead Dynamics write {value}")
