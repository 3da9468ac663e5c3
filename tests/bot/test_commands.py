"""``bot.commands`` as plain code: parsing (no SDK, no HTTP), naming, the card, and ``handle`` on a
bridge whose readers fail or disagree, where the honesty of the reply matters most."""

from __future__ import annotations

from typing import Any

import pytest

from bot.commands import handle
from bot.parsing import Command, Kind, clean_text, parse, parse_text, parse_value
from bot.wording import dynamics_label, presence_card, presence_label, teams_label
from mapping.catalogue import Catalogue
from mapping.errors import RetryableError
from mapping.model import CLEAR, BasePresence, Presence, System
from tests.bot.conftest import WriterReader
from tests.support import ALICE, AVAILABLE, BUSY, DND, PRESENCES, TRAINING, FakeClock, RecordingWriter, make_bridge

B = BasePresence


@pytest.mark.parametrize(
    ("text", "kind", "base"),
    [
        ("available", Kind.CHANGE, B.AVAILABLE),
        ("Available.", Kind.CHANGE, B.AVAILABLE),
        ("BUSY", Kind.CHANGE, B.BUSY),
        ("<at>Presence Sync</at> busy", Kind.CHANGE, B.BUSY),
        ('<at id="0">Presence Sync</at>&nbsp;busy', Kind.CHANGE, B.BUSY),
        ("<p>busy</p>", Kind.CHANGE, B.BUSY),
        ("please set me to busy", Kind.CHANGE, B.BUSY),
        ("busy please, thanks!", Kind.CHANGE, B.BUSY),
        ("dnd", Kind.CHANGE, B.BUSY_DND),
        ("do not disturb", Kind.CHANGE, B.BUSY_DND),
        ("Do Not Disturb!!", Kind.CHANGE, B.BUSY_DND),
        ("don't disturb", Kind.CHANGE, B.BUSY_DND),
        ("Busy - DND", Kind.CHANGE, B.BUSY_DND),
        ("set me to do not disturb", Kind.CHANGE, B.BUSY_DND),
        ("away", Kind.CHANGE, B.AWAY),
        ("brb", Kind.CHANGE, B.AWAY),
        ("be right back", Kind.CHANGE, B.AWAY),
        ("offline", Kind.CHANGE, B.OFFLINE),
        ("change my status to offline", Kind.CHANGE, B.OFFLINE),
        ("status", Kind.STATUS, None),
        ("What's my status?", Kind.STATUS, None),
        ("am I busy?", Kind.STATUS, None),
        ("help", Kind.HELP, None),
        ("Hi", Kind.HELP, None),
        ("presences", Kind.PRESENCES, None),
        ("list", Kind.PRESENCES, None),
        ("set", Kind.PRESENCES, None),
        ("", Kind.EMPTY, None),
        ("   ", Kind.EMPTY, None),
        ("<at>Presence Sync</at>", Kind.EMPTY, None),
        ("?!", Kind.EMPTY, None),
        ("I'm not busy", Kind.UNCLEAR, None),
        ("no longer away", Kind.UNCLEAR, None),
        ("don't set me busy", Kind.UNCLEAR, None),
        ("busy or away", Kind.UNCLEAR, None),
        ("set away and busy", Kind.UNCLEAR, None),
        ("make me a sandwich", Kind.UNKNOWN, None),
        ("Training", Kind.UNKNOWN, None),
    ],
)
def test_parse_text(text: str, kind: Kind, base: BasePresence | None) -> None:
    command = parse_text(text)
    assert (command.kind, command.base) == (kind, base)


def test_set_keeps_the_name_as_typed_for_the_catalogue() -> None:
    assert parse_text("please set me to Away - Lunch").name == "Away - Lunch"
    assert parse_text("set Training!").name == "Training!"
    assert parse_text("set my status to Not available for calls").name == "Not available for calls"


def test_a_negation_outside_the_name_never_becomes_a_name() -> None:
    command = parse_text("don't set me busy")
    assert command.kind is Kind.UNCLEAR and command.name is None


def test_clean_text_drops_mentions_and_markup() -> None:
    assert clean_text('<at id="x">Presence   Sync</at> set <b>Training</b>&amp;co') == "set Training &co"
    assert clean_text(None) == ""


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ({"command": "set", "presence_id": "F523F628-C07A-E811-8162-000D3AA11F50"}, Kind.CHANGE),
        ('{"command": "status"}', Kind.STATUS),
        ({"command": "Help"}, Kind.HELP),
        ({"command": "busy"}, Kind.CHANGE),
        ({"command": "set", "presence_id": "x"}, Kind.INVALID),
        ({"command": "set", "presence_id": 7}, Kind.INVALID),
        ({"command": "shutdown"}, Kind.INVALID),
        ({"command": ""}, Kind.INVALID),
        ({}, Kind.INVALID),
        ([], Kind.INVALID),
        ("{", Kind.INVALID),
        (42, Kind.INVALID),
    ],
)
def test_parse_value(value: Any, kind: Kind) -> None:
    assert parse_value(value).kind is kind


def test_card_presence_id_is_normalised() -> None:
    assert (
        parse_value({"command": "set", "presence_id": " F523F628-C07A-E811-8162-000D3AA11F50 "}).presence_id
        == AVAILABLE
    )


def test_a_card_value_wins_over_empty_text_and_text_wins_without_a_command() -> None:
    assert parse(None, {"command": "status"}).kind is Kind.STATUS
    assert parse("", {"command": "status"}).kind is Kind.STATUS
    assert parse("busy", {"something": "else"}).kind is Kind.CHANGE
    assert parse("busy", None).base is B.BUSY


def test_labels() -> None:
    cat = Catalogue(PRESENCES)
    assert dynamics_label(cat, BUSY) == "Busy"
    assert dynamics_label(cat, DND) == "Do not disturb"
    assert dynamics_label(cat, TRAINING) == "Training (do not disturb)"
    assert dynamics_label(cat, "11111111-0000-0000-0000-000000000000").startswith("an unknown presence")
    assert teams_label("Busy/InACall") == "Busy (in a call)"
    assert teams_label("DoNotDisturb/Presenting") == "Do not disturb (presenting)"
    assert teams_label("Available/Available") == "Available"
    assert teams_label("BeRightBack/BeRightBack") == "Be right back"
    assert teams_label("Offline/OffWork") == "Offline (off work)"
    assert teams_label(CLEAR) == "your own Teams status"
    assert presence_label(Presence("x", "Lunch", B.AWAY)) == "Lunch (away)"


def test_the_card_is_adaptive_card_1_5_with_one_submit_button_per_settable_presence() -> None:
    presences = [*PRESENCES, Presence("9e3f0c1a-0000-4000-8000-00000000aa02", "Locked", B.BUSY, can_user_set=False)]
    cat = Catalogue(presences)
    card = presence_card(ALICE, cat.settable(), current="Busy")
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.5"
    buttons = [a for el in card["body"] if el["type"] == "ActionSet" for a in el["actions"]]
    assert all(b["type"] == "Action.Submit" for b in buttons)
    ids = [b["data"]["presence_id"] for b in buttons]
    assert ids == [p.presence_id for p in cat.settable()] and "9e3f0c1a-0000-4000-8000-00000000aa02" not in ids
    assert all(len(el["actions"]) <= 3 for el in card["body"] if el["type"] == "ActionSet")
    # Every element and action type used is one Adaptive Cards 1.5 defines.
    types = {el["type"] for el in card["body"]} | {a["type"] for a in card["actions"]} | {b["type"] for b in buttons}
    assert types <= {"TextBlock", "ActionSet", "Action.Submit"}
    assert card["actions"] == [{"type": "Action.Submit", "title": "Status", "data": {"command": "status"}}]
    # What a tap sends back parses to the same presence.
    for b in buttons:
        assert parse_value(b["data"]).presence_id == b["data"]["presence_id"]


@pytest.mark.slow
async def test_read_failure_after_a_change_falls_back_to_what_the_system_accepted() -> None:
    clock = FakeClock()
    writers = {s: RecordingWriter(s) for s in System}
    bridge = make_bridge(clock=clock, writers=writers)
    await bridge.store.upsert_agents([ALICE])
    down = RetryableError("Dataverse answered 503")
    readers = {
        System.DYNAMICS: WriterReader(writers[System.DYNAMICS], clock, errors=[down]),
        System.TEAMS: WriterReader(writers[System.TEAMS], clock),
    }
    pending = _drain_in_background(bridge)
    reply = await handle(parse_text("busy"), ALICE, bridge, readers, settle_seconds=2)
    await pending
    assert reply.text.startswith("Done, Alice: Dynamics 365 accepted **Busy** (I couldn't read it back")
    assert "Dynamics 365 accepted **Busy** at 09:00 UTC (could not read it back just now: Dataverse answered 503)" in (
        reply.text
    )
    assert "Teams shows **Busy (in a call)**." in reply.text


@pytest.mark.slow
async def test_a_read_that_disagrees_after_delivery_is_reported_not_hidden() -> None:
    clock = FakeClock()
    writers = {s: RecordingWriter(s) for s in System}
    bridge = make_bridge(clock=clock, writers=writers)
    await bridge.store.upsert_agents([ALICE])

    class Stale(WriterReader):
        def value(self, agent_id: str) -> str | None:
            return AVAILABLE

    readers = {
        System.DYNAMICS: Stale(writers[System.DYNAMICS], clock),
        System.TEAMS: WriterReader(writers[System.TEAMS], clock),
    }
    pending = _drain_in_background(bridge)
    reply = await handle(parse_text("busy"), ALICE, bridge, readers, settle_seconds=2)
    await pending
    assert "Dynamics 365 accepted your change to **Busy**, but reading it back shows something else" in reply.text
    assert "Dynamics 365 shows **Available**." in reply.text
    assert "Done" not in reply.text
    # Asking again: the core sees nothing to do; the reply must not claim "already Busy".
    again = await handle(parse_text("busy"), ALICE, bridge, readers, settle_seconds=2)
    assert again.text.startswith("Alice, the bridge believes you're already **Busy**, but Dynamics 365 shows")
    assert "Dynamics 365 shows **Available**." in again.text


async def test_without_readers_and_without_history_the_reply_says_unknown() -> None:
    bridge = make_bridge()
    await bridge.store.upsert_agents([ALICE])
    reply = await handle(Command(Kind.STATUS), ALICE, bridge, {})
    assert "Dynamics 365: unknown right now (could not read it: Dynamics 365 is not connected to this bridge)." in (
        reply.text
    )


async def test_a_rules_target_missing_from_the_catalogue_is_reported_not_guessed() -> None:
    bridge = make_bridge(presences=[p for p in PRESENCES if p.presence_id != BUSY])
    await bridge.store.upsert_agents([ALICE])
    reply = await handle(parse_text("busy"), ALICE, bridge, {})
    assert "isn't set up in this bridge" in reply.text
    assert await bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS) is None


@pytest.mark.slow
async def test_an_exact_custom_name_wins_over_its_keywords() -> None:
    lunch = Presence("9e3f0c1a-0000-4000-8000-00000000aa03", "Away - Lunch", B.AWAY)
    bridge = make_bridge(presences=[*PRESENCES, lunch])
    await bridge.store.upsert_agents([ALICE])
    pending = _drain_in_background(bridge)
    reply = await handle(parse_text("away - lunch"), ALICE, bridge, {}, settle_seconds=2)
    await pending
    row = await bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.value == lunch.presence_id
    assert "Away - Lunch (away)" in reply.text


async def test_set_of_an_unknown_name_lists_what_can_be_set() -> None:
    bridge = make_bridge()
    await bridge.store.upsert_agents([ALICE])
    reply = await handle(parse_text("set Gardening"), ALICE, bridge, {})
    assert reply.text.startswith("There's no presence called \u201cGardening\u201d that you can set. You can set: ")
    assert "Training (do not disturb)" in reply.text


def _drain_in_background(bridge: Any) -> Any:
    import asyncio

    async def run() -> None:
        for _ in range(40):
            await bridge.outbox.drain(timeout=1)
            await asyncio.sleep(0.02)

    return asyncio.create_task(run())


def test_only_the_sdk_module_imports_the_bot_framework() -> None:
    """Replacing botbuilder (archived; successor: Microsoft 365 Agents SDK) must mean rewriting
    bot/teams.py only: no other module of the adapter may import it."""
    import re
    from pathlib import Path

    bot_dir = Path(__file__).resolve().parents[2] / "bot"
    importing = sorted(
        p.name
        for p in bot_dir.glob("*.py")
        if re.search(r"^\s*(from|import)\s+(botbuilder|botframework)\b", p.read_text(), re.MULTILINE)
    )
    assert importing == ["teams.py"]
