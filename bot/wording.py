"""How the bot names things and what its cards look like: presence labels in the words agents use,
the two systems' names, the help text and the Adaptive Card of presence buttons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.parsing import words
from mapping.api import CoreApi
from mapping.catalogue import Catalogue
from mapping.model import CLEAR, Agent, BasePresence, Presence, System, TeamsPresence

SYSTEM_NAMES = {System.DYNAMICS: "Dynamics 365", System.TEAMS: "Teams"}

FRIENDLY: dict[BasePresence, str] = {
    BasePresence.AVAILABLE: "Available",
    BasePresence.BUSY: "Busy",
    BasePresence.BUSY_DND: "Do not disturb",
    BasePresence.AWAY: "Away",
    BasePresence.OFFLINE: "Offline",
}
"""How the bot names a base presence: the words agents use, not Dynamics' labels ("Busy DND")."""

_AVAILABILITY = {
    "Available": "Available",
    "AvailableIdle": "Available (idle)",
    "Away": "Away",
    "BeRightBack": "Be right back",
    "Busy": "Busy",
    "BusyIdle": "Busy (idle)",
    "DoNotDisturb": "Do not disturb",
    "Offline": "Offline",
    "PresenceUnknown": "Unknown",
}
_ACTIVITY = {
    "InACall": "in a call",
    "InAConferenceCall": "in a conference call",
    "InAMeeting": "in a meeting",
    "Presenting": "presenting",
    "OutOfOffice": "out of office",
    "OffWork": "off work",
    "Inactive": "inactive",
    "UrgentInterruptionsOnly": "urgent interruptions only",
}


# ---------------------------------------------------------------------------------------------- naming


def presence_label(presence: Presence) -> str:
    """``Busy`` for out-of-the-box presences, ``Training (do not disturb)`` for custom ones."""
    friendly = FRIENDLY[presence.base]
    own = " ".join(words(presence.name))
    if own in (" ".join(words(friendly)), " ".join(words(presence.base.label))):
        return friendly
    return f"{presence.name} ({friendly.lower()})"


def dynamics_label(catalogue: Catalogue, presence_id: str | None) -> str:
    if not presence_id:
        return "nothing known yet"
    p = catalogue.get(presence_id)
    return presence_label(p) if p else f"an unknown presence ({presence_id})"


def teams_label(value: str | None) -> str:
    """``Busy/InACall`` -> ``Busy (in a call)``; ``clear`` -> the person's own status."""
    if not value:
        return "nothing known yet"
    if value == CLEAR:
        return "your own Teams status"
    p = TeamsPresence.parse(value)
    head = _AVAILABILITY.get(p.availability, p.availability)
    act = _ACTIVITY.get(p.activity)
    return f"{head} ({act})" if act else head


def value_label(bridge: CoreApi, system: System, value: str | None) -> str:
    return dynamics_label(bridge.catalogue, value) if system is System.DYNAMICS else teams_label(value)


def first_name(agent: Agent) -> str:
    return agent.display_name.split()[0] if agent.display_name.strip() else "there"


# ---------------------------------------------------------------------------------------------- cards


def presence_card(agent: Agent, presences: Sequence[Presence], *, current: str | None = None) -> dict[str, Any]:
    """Adaptive Card 1.5: one ``Action.Submit`` button per settable presence, three to a row (Teams
    shows at most a handful of actions per row; ``ActionSet`` rows keep every button visible), and a
    status button. The data is what ``parse_value`` reads back."""
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "text": "Set your presence", "weight": "Bolder", "size": "Medium", "wrap": True},
        {
            "type": "TextBlock",
            "text": f"{agent.display_name or 'You'}: Dynamics 365 changes, Teams follows.",
            "isSubtle": True,
            "wrap": True,
            "spacing": "None",
        },
    ]
    if current:
        body.append({"type": "TextBlock", "text": f"Now: {current}", "wrap": True})
    buttons = [
        {
            "type": "Action.Submit",
            "title": presence_label(p),
            "data": {"command": "set", "presence_id": p.presence_id},
        }
        for p in presences
    ]
    for i in range(0, len(buttons), 3):
        body.append({"type": "ActionSet", "actions": buttons[i : i + 3]})
    return {
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.5",
        "body": body,
        "actions": [{"type": "Action.Submit", "title": "Status", "data": {"command": "status"}}],
    }


def help_text(agent: Agent) -> str:
    return "\n\n".join(
        [
            f"Hi {first_name(agent)}! I change your presence in Dynamics 365, and Teams follows. Type:",
            "**available**, **busy**, **dnd** (do not disturb), **away** or **offline**",
            "**set** *name* for another presence you may set, e.g. *set Training*",
            "**presences** to list them, **status** to see what Dynamics 365 and Teams show, **help** for this.",
            "Or tap a button below.",
        ]
    )
