"""What an agent's chat message means: typed text, or an ``Action.Submit`` value from a card button,
turned into a ``Command``. Never a guess: a message naming two presences, a negation ("I'm not busy")
or a question ("am I busy?") changes nothing; unknown words get the help, never a best match."""

from __future__ import annotations

import enum
import html
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mapping.model import BasePresence


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


def keywords(tokens: Sequence[str]) -> tuple[set[BasePresence], set[int]]:
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
    bases, used = keywords(tokens)
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
        name_bases, _ = keywords(words(name))
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
        _, used = keywords(tokens)
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
