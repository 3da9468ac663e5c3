"""Presence translation between Dynamics 365 and Teams (sync rule 2, ``docs/rules.md``).

Rules come from one TOML file (``MAPPING_FILE``) laid over the defaults below; every value is checked
at load so that a typo stops start-up with the file and key named, instead of mistranslating later.

```toml
[dynamics_to_teams]          # base presence -> "Availability/Activity" of the bridge's session, or "clear"
"Busy DND" = "DoNotDisturb/Presenting"

[teams_to_dynamics]          # "Availability/Activity", "Availability/*" or "*/Activity" ->
"Busy/InAMeeting" = "Busy"   #   the base presence that Teams state asks of Dynamics, or "none"

[dynamics_targets]           # base presence -> presence id written to Dynamics (default: out-of-the-box id)
Busy = "efdeb843-c07a-e811-8162-000d3aa11f50"
```

Version 1's ``[conflict]`` section (a time window deciding which change counted) and the
``restore`` action are gone: rule 2 decides every case from the two inputs, and a Teams state that
asks nothing returns Dynamics to the agent's own presence by construction. A file that still has
them stops start-up with a line saying so.
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
NONE = "none"
REMOVED_CONFLICT = (
    "the [conflict] section was removed in sync rules version 2: no time window decides which change "
    "counts any more (rule 2 derives both systems from the agent's own Dynamics presence and the "
    "person's own Teams state); delete the section"
)
REMOVED_RESTORE = (
    "'restore' was removed in sync rules version 2: a Teams state that asks nothing returns Dynamics "
    "to the agent's own presence by itself; use 'none'"
)

AGGREGATION_RANK: Mapping[str, int] = {
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
"""How Teams ranks sessions when it aggregates them (Graph's documented order, idle states between):
a Teams read ranking below the session the bridge holds means that session is not in force."""

_BASE_BY_NAME = {b.label.lower(): b for b in BasePresence} | {b.name.lower(): b for b in BasePresence}

DEFAULT_DYNAMICS_TO_TEAMS: dict[BasePresence, str] = {
    BasePresence.AVAILABLE: CLEAR,
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
}
"""What a person's own Teams state asks of Dynamics; a state no key matches asks nothing."""


def parse_base(name: str) -> BasePresence | None:
    return _BASE_BY_NAME.get(name.strip().lower().replace("_", " ").replace("-", " ").replace("  ", " "))


@dataclass(frozen=True)
class Rules:
    dynamics_to_teams: Mapping[BasePresence, str] = field(default_factory=lambda: dict(DEFAULT_DYNAMICS_TO_TEAMS))
    teams_to_dynamics: Mapping[str, BasePresence | None] = field(
        default_factory=lambda: _parse_teams_rules(DEFAULT_TEAMS_TO_DYNAMICS, "defaults")
    )
    dynamics_targets: Mapping[BasePresence, str] = field(default_factory=lambda: dict(OOB_PRESENCE_IDS))

    def teams_for(self, base: BasePresence) -> str:
        return self.dynamics_to_teams[base]

    def asked_by(self, teams_value: str) -> BasePresence | None:
        """The base a Teams state asks of Dynamics (exact pair first, then by activity, then by
        availability), or None when it asks nothing."""
        p = TeamsPresence.parse(teams_value)
        for key in (p.value, f"*/{p.activity}", f"{p.availability}/*"):
            if key in self.teams_to_dynamics:
                return self.teams_to_dynamics[key]
        return None

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


def _parse_teams_rules(raw: Mapping[str, Any], where: str) -> dict[str, BasePresence | None]:
    out: dict[str, BasePresence | None] = {}
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
        if target.lower() == "restore":
            raise ConfigError(f"{where}: [teams_to_dynamics] {key!r}: {REMOVED_RESTORE}")
        if target.lower() == NONE:
            out[key] = None
            continue
        base = parse_base(target)
        if base is None or base is BasePresence.OFFLINE:
            raise ConfigError(
                f"{where}: [teams_to_dynamics] {key!r} = {target!r} is not a presence a Teams state can ask "
                "for; use one of Available, Busy, Busy DND, Away, none"
            )
        out[key] = base
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
    if "conflict" in raw:
        raise ConfigError(f"{where}: {REMOVED_CONFLICT}")
    unknown = set(raw) - {"dynamics_to_teams", "teams_to_dynamics", "dynamics_targets"}
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

    return Rules(d2t, t2d, targets)


def _section(raw: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value
