"""What an agent's chat message means, and what the bot answers: plain code, no Bot Framework types.

``parse(text, value)`` turns what Teams delivered (typed text, or an ``Action.Submit`` value from a card
button) into a ``Command``; ``handle(command, agent, bridge, readers)`` carries it out and returns a
``Reply`` (text, an optional Adaptive Card, and the changes still on their way, for follow-ups).

Why it is careful the way it is:

- **Never a false confirmation.** A change is only called done once the outbox row was delivered; what
  the reply says each system shows is read back from that system (or, when the read fails, taken from
  the last observation the bridge stored, and the reply says so). A change still pending says it is
  queued and why (the outbox row's last error), and the agent is told later when it lands or dies.
- **Never a guess.** A message naming two presences, a negation ("I'm not busy") or a question
  ("am I busy?") does not change anything: the first two get a clarification, the question gets the
  status. Unknown words get the help, never a best match.
- **Only one's own presence.** The agent comes from the sender's Entra object id (``bot.teams``);
  nothing in the text or the card value can name another person. A card value's presence id is
  checked against the catalogue and ``msdyn_canuserset``, so a forged value can at most pick one of
  the presences the agent may set anyway.
"""

from __future__ import annotations

import asyncio
import enum
import html
import itertools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mapping.api import CoreApi
from mapping.catalogue import Catalogue
from mapping.errors import UpstreamError
from mapping.model import CLEAR, Agent, BasePresence, OutboxRow, OutboxStatus, Presence, System, TeamsPresence
from mapping.ports import PresenceReader
from mapping.rules import Result

log = logging.getLogger("presence_sync.bot")

SETTLE_SECONDS = 4.0
"""How long a reply waits for the outbox to deliver a change: Teams shows the user a typing indicator
meanwhile, and the Bot Connector allows a turn 15 s, so a few seconds keep the answer honest without
risking the turn."""
READ_SECONDS = 2.0
"""Budget for reading one system back for a reply (a failed read falls back to stored observations)."""

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


class Kind(enum.StrEnum):
    CHANGE = "change"
    STATUS = "status"
    HELP = "help"
    PRESENCES = "presences"
    EMPTY = "empty"  # nothing but a mention, or whitespace
    UNCLEAR = "unclear"  # names a presence, but not so that acting on it would be safe
    UNKNOWN = "unknown"  # words the bot does not know (may still be a custom presence's name)
    INVALID = "invalid"  # a card value the bot never sent


@dataclass(frozen=True)
class Command:
    """A parsed message. For ``CHANGE``: ``presence_id`` (a card button), or ``name`` (``set <name>``,
    matched against the catalogue), or ``base`` (a keyword; Dynamics target from the rules); ``name``
    and ``base`` may both be set, the name is tried first."""

    kind: Kind
    base: BasePresence | None = None
    presence_id: str | None = None
    name: str | None = None
    text: str = ""
    reason: str = ""


@dataclass(frozen=True)
class PendingChange:
    """A change the reply called queued: the follow-up tells the agent when this row settles."""

    agent_id: str
    system: System
    generation: int
    value: str
    label: str


@dataclass(frozen=True)
class Reply:
    text: str
    card: dict[str, Any] | None = None
    pending: tuple[PendingChange, ...] = ()


@dataclass(frozen=True)
class Seen:
    """What one system shows for the agent: read live, or from the bridge's last observation."""

    system: System
    value: str | None
    live: bool
    at: datetime | None = None
    problem: str | None = None
    how: str = "read"
    """``read`` (live), ``observed`` (the bridge's last observation) or ``accepted`` (the bridge's last
    write that the system acknowledged)."""


# ---------------------------------------------------------------------------------------------- parsing

_MENTION = re.compile(r"<at\b[^>]*>.*?</at>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")

_PHRASES: list[tuple[tuple[str, ...], BasePresence]] = [
    (("do", "not", "disturb"), BasePresence.BUSY_DND),
    (("don", "t", "disturb"), BasePresence.BUSY_DND),
    (("dont", "disturb"), BasePresence.BUSY_DND),
    (("dnd",), BasePresence.BUSY_DND),
    (("be", "right", "back"), BasePresence.AWAY),
    (("brb",), BasePresence.AWAY),
    (("away",), BasePresence.AWAY),
    (("available",), BasePresence.AVAILABLE),
    (("busy",), BasePresence.BUSY),
    (("offline",), BasePresence.OFFLINE),
]
_NEGATIONS = frozenset({"not", "no", "never", "dont", "isn", "aren", "stop", "unset"})
_VERBS = frozenset({"set", "change", "switch"})
_HELP = frozenset({"help", "commands", "hi", "hello", "hey", "start", "menu", "options"})
_LIST = frozenset({"presences", "list"})
_STATUS = frozenset({"status", "presence", "state", "show", "where", "who"})
_FILLER = frozenset(
    {
        "me",
        "my",
        "myself",
        "status",
        "presence",
        "state",
        "to",
        "as",
        "the",
        "please",
        "pls",
        "i",
        "am",
        "im",
        "now",
        "m",
        "thanks",
        "thank",
        "you",
        "thx",
        "again",
        "into",
        "on",
        "for",
        "a",
    }
)


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped: ``"Don't disturb!"`` -> ``["don", "t", "disturb"]``."""
    return _WORD.findall(text.lower())


def clean_text(text: str | None) -> str:
    """Message text as the agent typed it: Teams' ``<at>bot</at>`` mentions and HTML removed."""
    if not text:
        return ""
    text = _MENTION.sub(" ", text)
    text = html.unescape(_TAG.sub(" ", text)).replace("\u00a0", " ")
    return " ".join(text.split())


def _keywords(tokens: Sequence[str]) -> tuple[set[BasePresence], set[int]]:
    """Base presences named in ``tokens`` and the positions their phrases used."""
    found: set[BasePresence] = set()
    used: set[int] = set()
    i = 0
    while i < len(tokens):
        for phrase, base in _PHRASES:
            if tuple(tokens[i : i + len(phrase)]) == phrase:
                found.add(base)
                used.update(range(i, i + len(phrase)))
                i += len(phrase)
                break
        else:
            i += 1
    if found == {BasePresence.BUSY, BasePresence.BUSY_DND}:  # "Busy - DND", Dynamics' own label
        found = {BasePresence.BUSY_DND}
    return found, used


def _strip_fillers(raw_words: list[str]) -> list[str]:
    def filler(w: str) -> bool:
        ws = words(w)
        return not ws or all(x in _FILLER for x in ws)

    while raw_words and filler(raw_words[0]):
        raw_words = raw_words[1:]
    while raw_words and filler(raw_words[-1]):
        raw_words = raw_words[:-1]
    return raw_words


def parse_text(text: str | None) -> Command:
    """Typed text -> Command. Case-insensitive; mentions, punctuation and polite extra words ignored."""
    cleaned = clean_text(text)
    tokens = words(cleaned)
    if not tokens:
        return Command(Kind.EMPTY, text=cleaned)
    bases, used = _keywords(tokens)
    rest = [t for i, t in enumerate(tokens) if i not in used]
    verb_at = next((i for i, t in enumerate(tokens) if t in _VERBS and i not in used), None)
    if not bases and any(t in _HELP for t in rest):
        return Command(Kind.HELP, text=cleaned)
    negated = _negated(tokens, bases, used)
    if verb_at is not None:
        # "set <name>": keep the name as typed (punctuation included) for the catalogue match. A
        # negation or two presences make it unclear, unless the name is exactly a presence's
        # ("set Not available for calls"): handle() decides that against the catalogue.
        raw = cleaned.split()
        verb_word = next(i for i, w in enumerate(raw) if tokens[verb_at] in words(w))
        name = " ".join(_strip_fillers(raw[verb_word + 1 :]))
        if not name:
            return Command(Kind.PRESENCES, text=cleaned, reason="set needs the name of a presence")
        name_bases, _ = _keywords(words(name))
        if negated:
            # Only a negation inside the name may turn out to be part of a presence's own name.
            inside = any(t in _NEGATIONS for t in words(name)) or "don t" in " ".join(words(name))
            return Command(Kind.UNCLEAR, name=name if inside else None, text=cleaned, reason="negation")
        if len(name_bases) > 1:
            return Command(Kind.UNCLEAR, name=name, text=cleaned, reason="several presences")
        base = next(iter(name_bases)) if name_bases else None
        return Command(Kind.CHANGE, base=base, name=name, text=cleaned)
    if bases and "?" in cleaned:
        return Command(Kind.STATUS, text=cleaned, reason="question")
    if negated:
        return Command(Kind.UNCLEAR, name=cleaned, text=cleaned, reason="negation")
    if len(bases) > 1:
        return Command(Kind.UNCLEAR, name=cleaned, text=cleaned, reason="several presences")
    if bases:
        # The whole text doubles as a name: "Away - Lunch" is a custom presence before it is "away".
        return Command(Kind.CHANGE, base=next(iter(bases)), name=cleaned, text=cleaned)
    if any(t in _LIST for t in rest):
        return Command(Kind.PRESENCES, text=cleaned)
    if any(t in _STATUS for t in rest):
        return Command(Kind.STATUS, text=cleaned)
    return Command(Kind.UNKNOWN, text=cleaned)


def _negated(tokens: Sequence[str], bases: set[BasePresence], used: set[int] | None = None) -> bool:
    if not bases:
        return False
    if used is None:
        _, used = _keywords(tokens)
    rest = [t for i, t in enumerate(tokens) if i not in used]
    if any(t in _NEGATIONS for t in rest):
        return True
    return any(a == "don" and b == "t" for a, b in itertools.pairwise(rest))


def parse_value(value: Any) -> Command:
    """An ``Action.Submit`` value (``activity.value``) -> Command. Teams delivers the button's ``data``
    object; some clients send it as a JSON string. Anything the bot's own cards never send is INVALID."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return Command(Kind.INVALID, reason="card value is not JSON")
    if not isinstance(value, Mapping):
        return Command(Kind.INVALID, reason="card value is not an object")
    command = value.get("command")
    if not isinstance(command, str) or not command.strip():
        return Command(Kind.INVALID, reason="card value has no command")
    command = command.strip().lower()
    if command == "set":
        pid = value.get("presence_id")
        if not isinstance(pid, str) or not _GUID.match(pid.strip()):
            return Command(Kind.INVALID, reason="card value has no valid presence_id")
        return Command(Kind.CHANGE, presence_id=pid.strip().lower(), text="set (card)")
    parsed = parse_text(command)
    if parsed.kind in (Kind.UNKNOWN, Kind.EMPTY):
        return Command(Kind.INVALID, reason=f"card command {command!r} is not one the bot sends")
    return parsed


def parse(text: str | None, value: Any = None) -> Command:
    """A message: a card submit carries ``value`` (text is then empty); otherwise the text counts."""
    if value is not None and not clean_text(text):
        return parse_value(value)
    if isinstance(value, Mapping) and "command" in value:
        return parse_value(value)
    return parse_text(text)


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


# ---------------------------------------------------------------------------------------------- reading


async def read_side(
    bridge: CoreApi,
    readers: Mapping[System, PresenceReader],
    agent: Agent,
    system: System,
    *,
    timeout: float = READ_SECONDS,
) -> Seen:
    """What ``system`` shows now. A failing or missing reader falls back to the bridge's stored
    observation, with the reason, so that the reply can say it is not a live read."""
    reader = readers.get(system)
    problem: str
    if reader is None:
        problem = f"{SYSTEM_NAMES[system]} is not connected to this bridge"
    else:
        try:
            seen = await asyncio.wait_for(reader.read([agent]), timeout)
        except UpstreamError as e:
            problem = e.message
        except TimeoutError:
            problem = f"{SYSTEM_NAMES[system]} did not answer within {timeout:g} s"
        except Exception as e:  # a reader bug must not cost the agent the reply
            log.exception("presence read failed", extra={"fields": {"agent": agent.dynamics_user_id}})
            problem = f"{type(e).__name__}: {e}"
        else:
            mine = [o for o in seen if o.agent_id == agent.dynamics_user_id]
            if mine:
                return Seen(system, mine[-1].value, True, mine[-1].observed_at)
            problem = f"{SYSTEM_NAMES[system]} did not return this agent"
    # Fallback: the newest of what the bridge last observed there and what the system last
    # acknowledged from the bridge (right after a change, that is newer than any observation).
    state = await bridge.last_known(agent.dynamics_user_id)
    if state is None:
        return Seen(system, None, False, None, problem)
    last = state.dynamics_seen if system is System.DYNAMICS else state.teams_seen
    candidates = [(last.at, last.value, "observed")]
    if system is System.DYNAMICS:
        candidates.append((state.dynamics_delivered_at, state.dynamics_delivered, "accepted"))
    elif state.session_delivered not in (None, CLEAR):
        candidates.append((state.session_landed_at, state.session_delivered, "accepted"))
    best = Seen(system, None, False, None, problem)
    for at, value, how in candidates:
        if at is not None and value is not None and (best.at is None or at > best.at):
            best = Seen(system, value, False, at, problem, how)
    return best


async def read_both(bridge: CoreApi, readers: Mapping[System, PresenceReader], agent: Agent) -> dict[System, Seen]:
    d, t = await asyncio.gather(
        read_side(bridge, readers, agent, System.DYNAMICS), read_side(bridge, readers, agent, System.TEAMS)
    )
    return {System.DYNAMICS: d, System.TEAMS: t}


def _seen_line(bridge: CoreApi, seen: Seen) -> str:
    label = value_label(bridge, seen.system, seen.value)
    if seen.live:
        return f"{SYSTEM_NAMES[seen.system]} shows **{label}**."
    name = SYSTEM_NAMES[seen.system]
    when = f" at {seen.at:%H:%M} UTC" if seen.at else ""
    if seen.value is None:
        return f"{name}: unknown right now (could not read it: {seen.problem})."
    if seen.how == "accepted":
        return f"{name} accepted **{label}**{when} (could not read it back just now: {seen.problem})."
    return f"{name} showed **{label}** when the bridge last saw it{when} (could not read it just now: {seen.problem})."


# ---------------------------------------------------------------------------------------------- handling


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


async def handle(
    command: Command,
    agent: Agent,
    bridge: CoreApi,
    readers: Mapping[System, PresenceReader],
    *,
    settle_seconds: float = SETTLE_SECONDS,
) -> Reply:
    """Carries out ``command`` for ``agent`` (the sender, resolved by the caller) and says what happened."""
    settable = bridge.catalogue.settable()
    card = presence_card(agent, settable)
    if not agent.enabled:
        return Reply(
            f"Your entry in the presence directory is disabled, {first_name(agent)}, so I can't change your "
            "presence. Ask your admin to enable it."
        )
    kind = command.kind
    if kind in (Kind.EMPTY, Kind.HELP):
        return Reply(help_text(agent), card)
    if kind is Kind.PRESENCES:
        names = ", ".join(presence_label(p) for p in settable) or "none"
        lead = f"{command.reason[:1].upper()}{command.reason[1:]}. " if command.reason else ""
        return Reply(f"{lead}Presences you can set: {names}.", card)
    if kind is Kind.STATUS:
        return await _status(agent, bridge, readers)
    if kind is Kind.INVALID:
        bridge.telemetry.rejected("bot_messages", "bad_card_value")
        return Reply("That button is from an older card and I can't use it. Here's a fresh one.", card)
    if kind is Kind.UNCLEAR:
        exact = _exact_settable(bridge.catalogue, command.name or "")
        if exact is not None:  # "set Not available for calls" when that is a presence's own name
            return await _change(agent, exact, bridge, readers, settle_seconds)
        why = {
            "negation": "I can't tell which presence you want from that, so I changed nothing.",
            "several presences": "That names more than one presence, so I changed nothing.",
        }.get(command.reason, "I'm not sure what you want, so I changed nothing.")
        return Reply(f"{why} Tell me the one you want, e.g. **available**, or tap a button.", card)
    presence, problem = _resolve(command, bridge)
    if presence is None:
        if kind is Kind.UNKNOWN:
            return Reply(f"Sorry, I don't know \u201c{command.text}\u201d.\n\n{help_text(agent)}", card)
        return Reply(problem, card)
    return await _change(agent, presence, bridge, readers, settle_seconds)


def _exact_settable(catalogue: Catalogue, name: str) -> Presence | None:
    """The settable presence whose name is ``name`` (case, spacing and punctuation ignored)."""
    wanted = " ".join(words(name))
    if not wanted:
        return None
    return next((p for p in catalogue.settable() if " ".join(words(p.name)) == wanted), None)


def _pure_keyword(name: str) -> bool:
    tokens = words(name)
    bases, used = _keywords(tokens)
    return bool(bases) and len(used) == len(tokens)


def _resolve(command: Command, bridge: CoreApi) -> tuple[Presence | None, str]:
    """The presence a CHANGE (or an UNKNOWN that is a custom presence's name) asks for, or why none."""
    cat = bridge.catalogue
    settable = cat.settable()
    names = ", ".join(presence_label(p) for p in settable) or "none"
    if command.presence_id:
        p = cat.get(command.presence_id)
        if p is None or not p.can_user_set:
            bridge.telemetry.rejected("bot_messages", "bad_card_value")
            return None, f"That presence can't be set from here any more. You can set: {names}."
        return p, ""
    name = command.name or (command.text if command.kind is Kind.UNKNOWN else None)
    if name and not (command.base and _pure_keyword(name)):
        match = _exact_settable(cat, name)
        if match is not None:
            return match, ""
        wanted = " ".join(words(name))
        if command.base is None:
            other = next((p for p in cat.values() if " ".join(words(p.name)) == wanted), None)
            if other is not None:
                return None, f"{other.name} is a presence agents can't set themselves. You can set: {names}."
            return None, f"There's no presence called \u201c{name}\u201d that you can set. You can set: {names}."
    if command.base is None:
        return None, f"You can set: {names}."
    target = bridge.rules.dynamics_targets.get(command.base)
    p = cat.get(target) if target else None
    if p is None:
        return None, (
            f"{FRIENDLY[command.base]} isn't set up in this bridge (its Dynamics 365 presence {target} is "
            "not in the catalogue). Please tell your admin."
        )
    if not p.can_user_set:
        return None, f"Your organisation doesn't let agents set {presence_label(p)} themselves. You can set: {names}."
    return p, ""


async def _change(
    agent: Agent,
    presence: Presence,
    bridge: CoreApi,
    readers: Mapping[System, PresenceReader],
    settle_seconds: float,
) -> Reply:
    label = presence_label(presence)
    change = await bridge.change_presence(agent, presence.presence_id, source="bot", settle_seconds=settle_seconds)
    if change.result is Result.UNKNOWN_PRESENCE:
        return Reply(f"I couldn't set {label}: {change.detail}. Please tell your admin.")
    expected, rows = change.expected, change.rows
    systems = list(rows)
    seen = await read_both(bridge, readers, agent)

    lines: list[str] = []
    pending: list[PendingChange] = []
    failed: list[str] = []
    for system in (System.DYNAMICS, System.TEAMS):
        if system not in rows:
            continue
        row = rows[system]
        value = expected[system]
        name = SYSTEM_NAMES[system]
        if row is None:  # cannot happen with a sane store: say so rather than confirm
            lines.append(f"{name}: I can't find the change in the outbox; please check `status` in a moment.")
            continue
        if row.status is OutboxStatus.DEAD and row.value == value:
            failed.append(name)
            lines.append(f"{name} refused the change: {row.last_error or 'no reason given'}.")
        elif row.status is OutboxStatus.DELIVERED and row.value == value:
            continue
        elif row.status is OutboxStatus.DELIVERED or row.status is OutboxStatus.DEAD:
            lines.append(f"{name}: a newer change replaced this one before it was applied.")
        else:
            why = f": {row.last_error}" if row.last_error else " (still being applied)"
            lines.append(f"{name}: queued, not applied yet{why}.")
            pending.append(PendingChange(agent.dynamics_user_id, system, row.generation, value, label))

    head = _change_headline(agent, label, presence, systems, rows, seen, pending, failed)
    shows = [_seen_line(bridge, seen[System.DYNAMICS]), _seen_line(bridge, seen[System.TEAMS])]
    note = _teams_note(bridge, presence, rows, seen)
    parts = [head, *lines, *shows]
    if note:
        parts.append(note)
    if pending:
        parts.append("I'll message you here when the queued change lands, or if it finally fails.")
    return Reply("\n\n".join(parts), pending=tuple(pending))


def _change_headline(
    agent: Agent,
    label: str,
    presence: Presence,
    systems: Sequence[System],
    rows: Mapping[System, OutboxRow | None],
    seen: Mapping[System, Seen],
    pending: Sequence[PendingChange],
    failed: Sequence[str],
) -> str:
    who = first_name(agent)
    dyn_row = rows.get(System.DYNAMICS)
    dyn_seen = seen[System.DYNAMICS]
    dyn_ok = dyn_row is not None and dyn_row.status is OutboxStatus.DELIVERED and dyn_row.value == presence.presence_id
    if not systems:
        if dyn_seen.live and dyn_seen.value != presence.presence_id:
            return (
                f"{who}, the bridge believes you're already **{label}**, but Dynamics 365 shows something else "
                "(below), so I changed nothing yet. The bridge catches up when Dynamics 365 reports its change, "
                "or at its next check; ask again in a minute if it still differs."
            )
        return f"{who}, you're already **{label}**; nothing to change."
    if dyn_ok and dyn_seen.live and dyn_seen.value != presence.presence_id:
        return (
            f"{who}, Dynamics 365 accepted your change to **{label}**, but reading it back shows something "
            "else (below): another change may have come in since."
        )
    if "Dynamics 365" in failed:
        return f"{who}, I could **not** set you to **{label}**: Dynamics 365 refused the change."
    if any(p.system is System.DYNAMICS for p in pending):
        return f"{who}, your change to **{label}** is **queued**: Dynamics 365 hasn't applied it yet."
    if System.DYNAMICS in rows and not dyn_ok:
        return f"{who}, your change to **{label}** was overtaken by a newer change; see below what is shown now."
    if failed or pending:
        return f"{who}, Dynamics 365 has you as **{label}**; Teams hasn't followed yet."
    if not dyn_seen.live and System.DYNAMICS in rows:
        return f"Done, {who}: Dynamics 365 accepted **{label}** (I couldn't read it back to show you)."
    return f"Done, {who}: you're **{label}**."


def _teams_note(
    bridge: CoreApi, presence: Presence, rows: Mapping[System, OutboxRow | None], seen: Mapping[System, Seen]
) -> str:
    """Teams shows the strongest of the person's own sessions and the bridge's: say so when the read
    differs from what the bridge's session holds, so the agent isn't surprised (or misled)."""
    target = bridge.rules.teams_for(presence.base)
    row = rows.get(System.TEAMS)
    t = seen[System.TEAMS]
    if not t.live or not t.value:
        return ""
    if row is not None and row.status is not OutboxStatus.DELIVERED:
        return ""
    if target == CLEAR:
        return "Teams now shows your own status again (the bridge no longer sets it)."
    if TeamsPresence.parse(t.value).availability != TeamsPresence.parse(target).availability:
        return (
            f"Teams shows the strongest of your own status and the bridge's ({teams_label(target)}), "
            "so your own Teams status wins until it changes."
        )
    return ""


async def _status(agent: Agent, bridge: CoreApi, readers: Mapping[System, PresenceReader]) -> Reply:
    seen = await read_both(bridge, readers, agent)
    parts = [f"Here's your presence, {first_name(agent)}:"]
    parts += [_seen_line(bridge, seen[System.DYNAMICS]), _seen_line(bridge, seen[System.TEAMS])]
    for system in (System.DYNAMICS, System.TEAMS):
        row = await bridge.delivery(agent.dynamics_user_id, system)
        if row is None or row.status is OutboxStatus.DELIVERED:
            continue
        what = value_label(bridge, system, row.value)
        if row.status is OutboxStatus.DEAD:
            parts.append(f"A change of {SYSTEM_NAMES[system]} to {what} failed: {row.last_error or 'no reason given'}.")
        else:
            why = f": {row.last_error}" if row.last_error else ""
            parts.append(f"A change of {SYSTEM_NAMES[system]} to {what} is still queued{why}.")
    current = dynamics_label(bridge.catalogue, seen[System.DYNAMICS].value) if seen[System.DYNAMICS].value else None
    return Reply("\n\n".join(parts), presence_card(agent, bridge.catalogue.settable(), current=current))


__all__ = [
    "FRIENDLY",
    "Command",
    "Kind",
    "PendingChange",
    "Reply",
    "Seen",
    "clean_text",
    "dynamics_label",
    "handle",
    "parse",
    "parse_text",
    "parse_value",
    "presence_card",
    "presence_label",
    "read_both",
    "read_side",
    "teams_label",
]
