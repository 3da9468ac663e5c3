"""Presence translation between Dynamics 365 and Teams (DESIGN.md, sync rule 2).

Rules come from one TOML file (``MAPPING_FILE``) laid over the defaults below; every value is checked
at load so that a typo stops start-up with the file and key named, instead of mistranslating later.

```toml
[dynamics_to_teams]          # base presence -> "Availability/Activity" of the bridge's session, or "clear"
"Busy DND" = "DoNotDisturb/Presenting"

[teams_to_dynamics]          # "Availability/Activity", "Availability/*" or "*/Activity" ->
"Busy/InAMeeting" = "Busy"   #   a base presence name, "restore" or "none"

[dynamics_targets]           # base presence -> presence id written to Dynamics (default: out-of-the-box id)
Busy = "efdeb843-c07a-e811-8162-000d3aa11f50"

[conflict]
winner = "dynamics"          # "dynamics", "teams" or "latest"
window_seconds = 2.0
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapping.errors import ConfigError
from mapping.model import CLEAR, OOB_PRESENCE_IDS, BasePresence, Presence, TeamsPresence

# Pairs Graph accepts for an application session (setPresence).
SESSION_PAIRS = frozenset(
    {
        "Available/Available",
        "Busy/InACall",
        "Busy/InAConferenceCall",
        "Away/Away",
        "DoNotDisturb/Presenting",
    }
)
AVAILABILITIES = frozenset(
    "Available AvailableIdle Away BeRightBack Busy BusyIdle DoNotDisturb Offline PresenceUnknown".split()
)
ACTIVITIES = frozenset(
    (
        "Available Away BeRightBack Busy DoNotDisturb InACall InAConferenceCall Inactive InAMeeting "
        "Offline OffWork OutOfOffice PresenceUnknown Presenting UrgentInterruptionsOnly"
    ).split()
)
RESTORE = "restore"
NONE = "none"
CONFLICT_WINNERS = ("dynamics", "teams", "latest")

_BASE_BY_NAME = {b.label.lower(): b for b in BasePresence} | {b.name.lower(): b for b in BasePresence}

DEFAULT_DYNAMICS_TO_TEAMS: dict[BasePresence, str] = {
    BasePresence.AVAILABLE: "Available/Available",
    BasePresence.BUSY: "Busy/InACall",
    BasePresence.BUSY_DND: "DoNotDisturb/Presenting",
    BasePresence.AWAY: "Away/Away",
    BasePresence.OFFLINE: CLEAR,
}

DEFAULT_TEAMS_TO_DYNAMICS: dict[str, str] = {
    "Busy/InACall": "Busy",
    "Busy/InAConferenceCall": "Busy",
    "Busy/InAMeeting": "Busy",
    "DoNotDisturb/*": "Busy DND",
    "*/Presenting": "Busy DND",
    "Away/*": "Away",
    "BeRightBack/*": "Away",
    "Available/*": RESTORE,
    "Offline/*": NONE,
}


def parse_base(name: str) -> BasePresence | None:
    return _BASE_BY_NAME.get(name.strip().lower().replace("_", " ").replace("-", " ").replace("  ", " "))


@dataclass(frozen=True)
class TeamsAction:
    """What a Teams presence asks of Dynamics: set a base presence, restore, or nothing."""

    kind: str  # "set", "restore" or "none"
    base: BasePresence | None = None


@dataclass(frozen=True)
class Rules:
    dynamics_to_teams: Mapping[BasePresence, str] = field(default_factory=lambda: dict(DEFAULT_DYNAMICS_TO_TEAMS))
    teams_to_dynamics: Mapping[str, TeamsAction] = field(
        default_factory=lambda: _parse_teams_rules(DEFAULT_TEAMS_TO_DYNAMICS, "defaults")
    )
    dynamics_targets: Mapping[BasePresence, str] = field(default_factory=lambda: dict(OOB_PRESENCE_IDS))
    conflict_winner: str = "dynamics"
    conflict_window_seconds: float = 2.0

    def teams_for(self, base: BasePresence) -> str:
        return self.dynamics_to_teams[base]

    def action_for(self, teams_value: str) -> TeamsAction:
        p = TeamsPresence.parse(teams_value)
        for key in (p.value, f"*/{p.activity}", f"{p.availability}/*"):
            if key in self.teams_to_dynamics:
                return self.teams_to_dynamics[key]
        return TeamsAction(NONE)

    def check_catalogue(self, presences: Iterable[Presence]) -> list[str]:
        """Problems with the Dynamics targets against the live catalogue (empty when all is well)."""
        by_id = {p.presence_id.lower(): p for p in presences}
        problems = []
        for base, pid in self.dynamics_targets.items():
            p = by_id.get(pid.lower())
            if p is None:
                problems.append(f"target for {base.label} is presence id {pid}, which is not in msdyn_presences")
            elif p.base is not base:
                problems.append(f"target for {base.label} is presence {p.name!r} ({pid}), whose base is {p.base.label}")
        return problems


def _parse_teams_rules(raw: Mapping[str, Any], where: str) -> dict[str, TeamsAction]:
    out: dict[str, TeamsAction] = {}
    for key, target in raw.items():
        availability, sep, activity = key.partition("/")
        if (
            not sep
            or (availability != "*" and availability not in AVAILABILITIES)
            or (activity != "*" and activity not in ACTIVITIES)
        ):
            raise ConfigError(
                f"{where}: [teams_to_dynamics] key {key!r} is not 'Availability/Activity' with Graph "
                f"values (or '*'); availabilities: {', '.join(sorted(AVAILABILITIES))}"
            )
        if not isinstance(target, str):
            raise ConfigError(f"{where}: [teams_to_dynamics] {key!r} must be a string")
        if target.lower() in (RESTORE, NONE):
            out[key] = TeamsAction(target.lower())
            continue
        base = parse_base(target)
        if base is None:
            raise ConfigError(
                f"{where}: [teams_to_dynamics] {key!r} = {target!r} is not a presence; use one of "
                "Available, Busy, Busy DND, Away, Offline, restore, none"
            )
        out[key] = TeamsAction("set", base)
    return out


def load_rules(path: str | Path | None) -> Rules:
    """The defaults, with the TOML file at ``path`` laid over them. Raises ConfigError naming the file."""
    if not path:
        return Rules()
    p = Path(path)
    where = str(p)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"PRESENCE_SYNC_MAPPING_FILE: {where} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot be read: {e}") from None
    unknown = set(raw) - {"dynamics_to_teams", "teams_to_dynamics", "dynamics_targets", "conflict"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}")

    d2t = dict(DEFAULT_DYNAMICS_TO_TEAMS)
    for name, value in _section(raw, "dynamics_to_teams", where).items():
        base = parse_base(name)
        if base is None:
            raise ConfigError(f"{where}: [dynamics_to_teams] key {name!r} is not a base presence")
        if not isinstance(value, str) or (value != CLEAR and value not in SESSION_PAIRS):
            raise ConfigError(
                f"{where}: [dynamics_to_teams] {name} = {value!r}: Graph accepts only "
                f"{', '.join(sorted(SESSION_PAIRS))} or 'clear'"
            )
        d2t[base] = value

    t2d = _parse_teams_rules(DEFAULT_TEAMS_TO_DYNAMICS, "defaults")
    t2d.update(_parse_teams_rules(_section(raw, "teams_to_dynamics", where), where))

    targets = dict(OOB_PRESENCE_IDS)
    for name, value in _section(raw, "dynamics_targets", where).items():
        base = parse_base(name)
        if base is None:
            raise ConfigError(f"{where}: [dynamics_targets] key {name!r} is not a base presence")
        if not isinstance(value, str) or len(value.strip()) != 36:
            raise ConfigError(f"{where}: [dynamics_targets] {name} = {value!r} is not a presence id (GUID)")
        targets[base] = value.strip().lower()

    conflict = _section(raw, "conflict", where)
    winner = conflict.get("winner", "dynamics")
    if winner not in CONFLICT_WINNERS:
        raise ConfigError(f"{where}: [conflict] winner = {winner!r}; use one of {', '.join(CONFLICT_WINNERS)}")
    window = conflict.get("window_seconds", 2.0)
    if not isinstance(window, int | float) or isinstance(window, bool) or not 0 <= window <= 300:
        raise ConfigError(f"{where}: [conflict] window_seconds = {window!r}; use a number from 0 to 300")
    return Rules(d2t, t2d, targets, winner, float(window))


def _section(raw: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value
