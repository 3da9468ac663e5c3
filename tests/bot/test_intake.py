"""``POST /api/messages`` end to end: a real aiohttp server on a free port runs ``BotIntake`` (no app id,
loopback), activities are shaped as Teams sends them, replies are read at the fake Bot Connector, and
changes are followed into the outbox and onto the (recording) upstream writers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from bot.teams import ADAPTIVE_CARD, MAX_BODY, BotIntake, is_loopback
from emulators.connector import personal_conversation_id
from mapping.errors import ConfigError
from mapping.model import CLEAR, Agent, OutboxStatus, System
from tests.bot.conftest import Harness, MakeHarness
from tests.support import ALICE, AVAILABLE, AWAY, BOB, BUSY, DND, OFFLINE, TRAINING, make_bridge

ROUTE = "bot_messages"


def _card_buttons(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for el in card["body"] if el["type"] == "ActionSet" for a in el["actions"]]


@pytest.mark.parametrize(
    ("text", "presence_id", "teams_value", "label"),
    [
        ("available", AVAILABLE, None, "Available"),  # no session: the person's own Teams state shows
        ("<at>Presence Sync</at> busy", BUSY, "Busy/InACall", "Busy"),
        ("dnd", DND, "DoNotDisturb/Presenting", "Do not disturb"),
        ("Do not disturb please", DND, "DoNotDisturb/Presenting", "Do not disturb"),
        ("AWAY!", AWAY, "Away/Away", "Away"),
        ("please set me to offline", OFFLINE, None, "Offline"),  # likewise
        ("set Training", TRAINING, "DoNotDisturb/Presenting", "Training (do not disturb)"),
    ],
)
async def test_change_commands_reach_both_systems_and_confirm_what_they_show(
    harness: Harness, text: str, presence_id: str, teams_value: str | None, label: str
) -> None:
    reply = await harness.say(text)
    # The Dynamics 365 command went through the outbox to the writer, and Teams followed.
    assert harness.writers[System.DYNAMICS].calls == [(ALICE.dynamics_user_id, presence_id)]
    expected_teams = [(ALICE.dynamics_user_id, teams_value)] if teams_value else []
    assert harness.writers[System.TEAMS].calls == expected_teams
    row = await harness.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.status is OutboxStatus.DELIVERED and row.value == presence_id
    assert reply.text.startswith(f"Done, Alice: you're **{label}**.")
    assert f"Dynamics 365 shows **{label}**." in reply.text
    assert "queued" not in reply.text
    # The reply is a reply: to the conversation and the activity the agent sent.
    sent = harness.posted[-1]
    assert reply.conversation_id == sent["conversation"]["id"]
    assert reply.reply_to_id == sent["id"]
    assert reply.activity["recipient"]["aadObjectId"] == ALICE.entra_object_id


async def test_a_typing_indicator_precedes_a_change_reply(harness: Harness) -> None:
    await harness.say("busy")
    assert [s.type for s in harness.connector.sent] == ["typing", "message"]


async def test_teams_line_says_what_teams_shows_with_the_agents_own_state_stronger(make_harness: MakeHarness) -> None:
    h = await make_harness(own={ALICE.dynamics_user_id: "DoNotDisturb/InAMeeting"})
    reply = await h.say("away")
    assert "Teams shows **Do not disturb (in a meeting)**." in reply.text
    assert "your own Teams status wins" in reply.text
    assert h.writers[System.TEAMS].calls == [(ALICE.dynamics_user_id, "Away/Away")]


async def test_offline_clears_the_bridge_session_and_says_teams_shows_the_own_status(harness: Harness) -> None:
    await harness.say("busy")
    reply = await harness.say("offline")
    assert harness.writers[System.TEAMS].calls[-1] == (ALICE.dynamics_user_id, CLEAR)
    assert "Teams shows **Available**." in reply.text
    assert "Teams now shows your own status again" in reply.text


async def test_status_reads_both_systems(harness: Harness) -> None:
    await harness.say("busy")
    reply = await harness.say("what's my status")
    assert "Dynamics 365 shows **Busy**." in reply.text
    assert "Teams shows **Busy (in a call)**." in reply.text
    assert harness.readers[System.DYNAMICS].reads == 2 and harness.readers[System.TEAMS].reads == 2
    assert reply.card is not None and "Now: Busy" in json.dumps(reply.card)


async def test_status_falls_back_to_stored_observations_and_says_so(make_harness: MakeHarness) -> None:
    from mapping.errors import RetryableError

    h = await make_harness(read_errors={System.DYNAMICS: [RetryableError("Dataverse answered 503")] * 5})
    await h.say("busy")
    reply = await h.say("status")
    assert "Dynamics 365 accepted **Busy**" in reply.text
    assert "could not read it back just now: Dataverse answered 503" in reply.text
    assert "Dynamics 365 shows" not in reply.text


@pytest.mark.parametrize("text", ["help", "HELP!", "hi", ""])
async def test_help_lists_the_commands_with_a_card(harness: Harness, text: str) -> None:
    reply = await harness.say(text)
    for word in ("available", "busy", "dnd", "away", "offline", "set", "presences", "status"):
        assert f"**{word}**" in reply.text
    assert reply.card is not None
    assert reply.activity["attachments"][0]["contentType"] == ADAPTIVE_CARD
    assert harness.writers[System.DYNAMICS].calls == []


async def test_a_message_that_is_only_a_mention_gets_the_help(harness: Harness) -> None:
    reply = await harness.say(None, mention_bot=True)
    assert harness.posted[-1]["text"] == "<at>Presence Sync</at>"
    assert "I change your presence in Dynamics 365" in reply.text
    assert await harness.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS) is None


async def test_presences_lists_what_the_agent_may_set_with_a_button_each(harness: Harness) -> None:
    reply = await harness.say("presences")
    assert "Training (do not disturb)" in reply.text
    assert reply.card is not None
    buttons = _card_buttons(reply.card)
    settable = harness.bridge.catalogue.settable()
    assert [b["data"] for b in buttons] == [{"command": "set", "presence_id": p.presence_id} for p in settable]
    assert reply.card["version"] == "1.5"


async def test_a_card_button_changes_presence_like_a_typed_command(harness: Harness) -> None:
    card = (await harness.say("help")).card
    assert card is not None
    away = next(b for b in _card_buttons(card) if b["title"] == "Away")
    reply = await harness.tap(away["data"])
    assert harness.writers[System.DYNAMICS].calls == [(ALICE.dynamics_user_id, AWAY)]
    assert reply.text.startswith("Done, Alice: you're **Away**.")
    status = await harness.tap({"command": "status"})
    assert "Dynamics 365 shows **Away**." in status.text


async def test_a_card_value_sent_as_a_json_string_works_too(harness: Harness) -> None:
    await harness.tap(json.dumps({"command": "set", "presence_id": BUSY}))
    assert harness.writers[System.DYNAMICS].calls == [(ALICE.dynamics_user_id, BUSY)]


@pytest.mark.parametrize(
    "value",
    [
        {"command": "set", "presence_id": "not-a-guid"},
        {"command": "set"},
        {"command": "reboot"},
        {"presence_id": BUSY},
        ["set", BUSY],
        "not json",
    ],
)
async def test_a_forged_or_stale_card_value_changes_nothing(harness: Harness, value: Any) -> None:
    reply = await harness.tap(value)
    assert harness.writers[System.DYNAMICS].calls == []
    assert "older card" in reply.text and reply.card is not None
    assert harness.telemetry.rejections[(ROUTE, "bad_card_value")] == 1


async def test_a_card_value_for_a_presence_the_agent_may_not_set_is_refused(make_harness: MakeHarness) -> None:
    from mapping.model import BasePresence, Presence
    from tests.support import PRESENCES

    locked = "9e3f0c1a-0000-4000-8000-00000000aa02"
    h = await make_harness()
    h.bridge.catalogue.replace([*PRESENCES, Presence(locked, "Supervisor hold", BasePresence.BUSY, can_user_set=False)])
    reply = await h.tap({"command": "set", "presence_id": locked})
    assert h.writers[System.DYNAMICS].calls == []
    assert "can't be set from here" in reply.text
    reply = await h.say("set Supervisor hold")
    assert "agents can't set themselves" in reply.text
    assert h.writers[System.DYNAMICS].calls == []


async def test_unknown_words_get_the_help_and_change_nothing(harness: Harness) -> None:
    reply = await harness.say("make me a sandwich")
    assert reply.text.startswith("Sorry, I don't know \u201cmake me a sandwich\u201d.")
    assert "**available**" in reply.text and reply.card is not None
    assert harness.writers[System.DYNAMICS].calls == []


@pytest.mark.parametrize("text", ["I'm not busy", "busy or away", "don't set me to away"])
async def test_ambiguous_messages_change_nothing(harness: Harness, text: str) -> None:
    reply = await harness.say(text)
    assert "changed nothing" in reply.text
    assert await harness.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS) is None


async def test_a_question_gets_the_status_not_a_change(harness: Harness) -> None:
    reply = await harness.say("am I busy?")
    assert reply.text.startswith("Here's your presence")
    assert harness.writers[System.DYNAMICS].calls == []


async def test_setting_the_presence_one_already_has_changes_nothing(harness: Harness) -> None:
    await harness.say("busy")
    reply = await harness.say("busy")
    assert "you're already **Busy**; nothing to change." in reply.text
    assert len(harness.writers[System.DYNAMICS].calls) == 1


async def test_an_unmapped_user_is_told_to_ask_the_admin_with_their_object_id(harness: Harness) -> None:
    stranger = "7d3c1a5e-0000-4000-8000-0000000000ff"
    reply = await harness.say("busy", agent=None, aad_object_id=stranger.upper())
    assert "Ask your admin to add you" in reply.text
    assert f"your Entra object id is `{stranger}`" in reply.text
    assert harness.writers[System.DYNAMICS].calls == []
    assert {u["id"] for u in await harness.bridge.store.list_unknown()} == {stranger}
    assert await harness.bridge.store.get_doc("bot.conversation", stranger) is None


async def test_no_one_can_change_another_persons_presence(harness: Harness) -> None:
    # Bob names Alice's ids in the text and in a forged card value: only Bob's own presence moves.
    await harness.say(f"set {ALICE.dynamics_user_id} busy", agent=BOB)
    await harness.tap({"command": "set", "presence_id": AWAY, "agent_id": ALICE.dynamics_user_id}, agent=BOB)
    await harness.say(f"busy for {ALICE.entra_object_id}", agent=BOB)
    agents = {a for a, _ in harness.writers[System.DYNAMICS].calls}
    assert agents == {BOB.dynamics_user_id}
    assert await harness.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS) is None


async def test_a_message_without_an_entra_object_id_is_answered_not_applied(harness: Harness) -> None:
    reply = await harness.say("busy", agent=None)
    assert "without a Microsoft Entra object id" in reply.text
    assert harness.telemetry.rejections[(ROUTE, "no_aad_object_id")] == 1
    assert harness.writers[System.DYNAMICS].calls == []


async def test_a_disabled_agent_is_told_so(harness: Harness) -> None:
    await harness.bridge.store.set_agent_enabled(ALICE.dynamics_user_id, False)
    reply = await harness.say("busy")
    assert "disabled" in reply.text
    assert await harness.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS) is None


async def test_group_chats_are_refused_so_presence_details_stay_private(harness: Harness) -> None:
    act = harness.activity(ALICE, text="busy")
    act["conversation"]["conversationType"] = "groupChat"
    since = len(harness.connector.sent)
    status, _ = await harness.post(act)
    assert status == 200
    reply = await harness.connector.wait_for(lambda s: s.type == "message", since=since)
    assert "1:1 chat" in reply.text
    assert harness.writers[System.DYNAMICS].calls == []


async def test_installing_the_app_sends_a_welcome_and_remembers_the_conversation(harness: Harness) -> None:
    from emulators.connector import teams_install

    act = teams_install(service_url=harness.connector.url, aad_object_id=ALICE.entra_object_id, user_name="Alice")
    status, _ = await harness.post(act)
    assert status == 200
    reply = await harness.connector.wait_for(lambda s: s.type == "message")
    assert "I change your presence" in reply.text and reply.card is not None
    ref = await harness.bridge.store.get_doc("bot.conversation", ALICE.dynamics_user_id)
    assert ref is not None
    assert ref["conversation"]["id"] == personal_conversation_id(ALICE.entra_object_id)
    assert ref["serviceUrl"] == harness.connector.url


async def test_every_message_refreshes_the_stored_conversation_reference(harness: Harness) -> None:
    await harness.say("help")
    ref = await harness.bridge.store.get_doc("bot.conversation", ALICE.dynamics_user_id)
    assert ref is not None and ref["user"]["aadObjectId"] == ALICE.entra_object_id


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        (lambda a: a.pop("from"), 400, "malformed"),
        (lambda a: a.update({"from": {"name": "no id"}}), 400, "malformed"),
        (lambda a: a.pop("conversation"), 400, "malformed"),
        (lambda a: a.pop("serviceUrl"), 400, "malformed"),
        (lambda a: a.pop("type"), 400, "malformed"),
        (lambda a: a.update({"type": 42}), 400, "malformed"),
        (lambda a: a.update({"serviceUrl": "https://smba.trafficmanager.net/emea/"}), 400, "service_url"),
    ],
    ids=["no-from", "from-without-id", "no-conversation", "no-serviceUrl", "no-type", "type-not-string", "remote-url"],
)
async def test_malformed_activities_get_400_and_a_metric_never_500(
    harness: Harness, mutate: Any, status: int, reason: str
) -> None:
    act = harness.activity(ALICE, text="busy")
    mutate(act)
    got, body = await harness.post(act)
    assert got == status
    assert "error" in json.loads(body)
    assert harness.telemetry.rejections[(ROUTE, reason)] == 1
    assert harness.connector.sent == []
    assert harness.writers[System.DYNAMICS].calls == []


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2, 3]", "application/json", 400),
        (b'"a string"', "application/json", 400),
        (b"null", "application/json", 400),
        (b"type=message", "application/x-www-form-urlencoded", 415),
        (b"", "application/json", 400),
    ],
)
async def test_bodies_that_are_not_an_activity_are_refused(
    harness: Harness, raw: bytes, content_type: str, status: int
) -> None:
    got, body = await harness.post(None, raw=raw, headers={"Content-Type": content_type})
    assert got == status
    assert json.loads(body)["error"]


async def test_an_oversized_body_gets_413(harness: Harness) -> None:
    act = harness.activity(ALICE, text="x" * (MAX_BODY + 10))
    got, _ = await harness.post(act)
    assert got == 413
    assert harness.telemetry.rejections[(ROUTE, "too_large")] == 1


@pytest.mark.parametrize("kind", ["typing", "messageReaction", "invoke", "event", "somethingNew"])
async def test_activity_types_the_bot_has_no_use_for_are_ignored_with_200(harness: Harness, kind: str) -> None:
    act = harness.activity(ALICE, text="busy")
    act["type"] = kind
    got, body = await harness.post(act)
    assert (got, body) == (200, "")
    assert harness.connector.sent == []
    assert harness.writers[System.DYNAMICS].calls == []
    assert harness.telemetry.rejections[(ROUTE, "unsupported_type")] == (1 if kind == "somethingNew" else 0)


async def test_a_non_message_without_from_is_ignored_not_an_error(harness: Harness) -> None:
    act = harness.activity(ALICE, text="x")
    act["type"] = "typing"
    act.pop("from")
    assert await harness.post(act) == (200, "")


async def test_each_request_is_timed(harness: Harness) -> None:
    await harness.say("help")
    assert [n for n, _ in harness.telemetry.latencies] == ["ack.bot_messages"]


async def test_a_connector_that_fails_the_reply_does_not_fail_the_request_or_lose_the_change(
    harness: Harness,
) -> None:
    harness.connector.fail_next(5, status=502)
    status, _ = await harness.post(harness.activity(ALICE, text="busy"))
    assert status == 200
    assert harness.writers[System.DYNAMICS].calls == [(ALICE.dynamics_user_id, BUSY)]


async def test_a_store_failure_answers_503_not_500(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*a: Any, **k: Any) -> Any:
        raise OSError("database is gone")

    monkeypatch.setattr(harness.bridge.store, "get_agent_by_entra", broken)
    got, body = await harness.post(harness.activity(ALICE, text="busy"))
    assert got == 503
    assert "send it again" in json.loads(body)["error"]


# ------------------------------------------------------------------------------------------ auth


def _intake(**kw: Any) -> BotIntake:
    args: dict[str, Any] = {"app_id": "", "app_password": "", "app_type": "MultiTenant", "tenant_id": ""}
    args.update(kw)
    return BotIntake(make_bridge(), {}, **args)


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


async def test_without_an_app_id_only_loopback_callers_are_served() -> None:
    intake = _intake()
    from tests.support import RecordingTelemetry

    telemetry = RecordingTelemetry()
    intake.bridge.telemetry = telemetry
    request = make_mocked_request(
        "POST", "/api/messages", headers={"Content-Type": "application/json"}, transport=_Transport(("10.1.2.3", 5555))
    )
    response = await intake.handle(request)
    assert response.status == 401
    assert isinstance(response, web.Response) and response.text is not None
    assert "loopback" in json.loads(response.text)["error"]
    assert telemetry.rejections[(ROUTE, "unauthenticated")] == 1


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("10.0.0.1", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.1", False),
        ("smba.trafficmanager.net", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_with_an_app_id_a_request_without_a_token_is_refused(make_harness: MakeHarness) -> None:
    h = await make_harness(app_id="0b6f8e2a-1111-4222-8333-444455556666")
    got, body = await h.post(h.activity(ALICE, text="busy"))
    assert got == 401 and "Authorization" in json.loads(body)["error"]
    assert h.telemetry.rejections[(ROUTE, "unauthenticated")] == 1


async def test_with_an_app_id_a_forged_token_is_refused_by_the_sdk(make_harness: MakeHarness) -> None:
    h = await make_harness(app_id="0b6f8e2a-1111-4222-8333-444455556666")
    got, _ = await h.post(h.activity(ALICE, text="busy"), headers={"Authorization": "Bearer not.a.jwt"})
    assert got == 401
    assert h.writers[System.DYNAMICS].calls == []


async def test_a_configured_tenant_refuses_activities_from_other_tenants(make_harness: MakeHarness) -> None:
    h = await make_harness(tenant_id="00000000-0000-0000-0000-0000000070e7")
    assert (await h.say("busy")).text.startswith("Done")
    got, _ = await h.post(h.activity(BOB, text="busy", tenant_id="99999999-0000-0000-0000-000000000000"))
    assert got == 403
    assert h.telemetry.rejections[(ROUTE, "wrong_tenant")] == 1
    assert [a for a, _ in h.writers[System.DYNAMICS].calls] == [ALICE.dynamics_user_id]


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"app_id": "not-a-guid", "app_password": "x"}, "PRESENCE_SYNC_BOT_APP_ID"),
        ({"app_id": "0b6f8e2a-1111-4222-8333-444455556666"}, "PRESENCE_SYNC_BOT_APP_PASSWORD"),
        (
            {"app_id": "0b6f8e2a-1111-4222-8333-444455556666", "app_password": "x", "app_type": "SingleTenant"},
            "PRESENCE_SYNC_BOT_TENANT_ID",
        ),
    ],
)
def test_bad_bot_settings_are_config_errors_naming_the_setting(kw: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        _intake(**kw)


def test_no_app_id_ignores_the_app_type_the_sdk_would_reject() -> None:
    intake = _intake(app_type="SingleTenant")
    assert intake.auth_enabled is False


async def test_replies_only_ever_address_the_sender(harness: Harness) -> None:
    await harness.say("busy", agent=BOB)
    await harness.say("status", agent=ALICE)
    for s in harness.connector.messages():
        expected: Agent = BOB if s.activity["recipient"]["aadObjectId"] == BOB.entra_object_id else ALICE
        assert s.conversation_id == personal_conversation_id(expected.entra_object_id)


async def test_a_chunked_body_is_read_whole(harness: Harness) -> None:
    data = json.dumps(harness.activity(ALICE, text="busy" + " " * 200_000)).encode()

    async def chunks() -> Any:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    async with harness.http.post(harness.url, data=chunks(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
    assert harness.writers[System.DYNAMICS].calls == [(ALICE.dynamics_user_id, BUSY)]


async def test_a_chunked_body_over_the_limit_gets_413(harness: Harness) -> None:
    async def chunks() -> Any:
        yield b'{"type": "message", "text": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    async with harness.http.post(harness.url, data=chunks(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413


async def test_with_an_app_id_even_ignored_types_need_a_valid_token(make_harness: MakeHarness) -> None:
    h = await make_harness(app_id="0b6f8e2a-1111-4222-8333-444455556666")
    act = h.activity(ALICE, text="x")
    act["type"] = "typing"
    got, _ = await h.post(act, headers={"Authorization": "Bearer not.a.jwt"})
    assert got == 401
