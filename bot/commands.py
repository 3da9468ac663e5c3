"""What the bot answers: plain code, no Bot Framework types. ``bot.parsing.parse`` turns what Teams
delivered into a ``Command``; ``handle(command, agent, bridge, readers)`` carries it out (the change
itself is the core's use case, ``CoreApi.change_presence``) and returns a
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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.parsing import Command, Kind, keywords, words
from bot.readback import Seen, read_both, seen_line
from bot.wording import (
    FRIENDLY,
    SYSTEM_NAMES,
    dynamics_label,
    first_name,
    help_text,
    presence_card,
    presence_label,
    teams_label,
    value_label,
)
from mapping.api import CoreApi
from mapping.catalogue import Catalogue
from mapping.model import CLEAR, Agent, OutboxRow, OutboxStatus, Presence, System, TeamsPresence
from mapping.ports import PresenceReader
from mapping.rules import Result

log = logging.getLogger("presence_sync.bot")

SETTLE_SECONDS = 4.0
"""How long a reply waits for the outbox to deliver a change: Teams shows the user a typing indicator
meanwhile, and the Bot Connector allows a turn 15 s, so a few seconds keep the answer honest without
risking the turn."""


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


# ---------------------------------------------------------------------------------------------- handling


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
    bases, used = keywords(tokens)
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
    shows = [seen_line(bridge, seen[System.DYNAMICS]), seen_line(bridge, seen[System.TEAMS])]
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
    parts += [seen_line(bridge, seen[System.DYNAMICS]), seen_line(bridge, seen[System.TEAMS])]
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
