"""The fake Bot Connector (``emulators/connector.py``): product code for tests and the demo, so it is
tested like product code: the routes the SDK uses, recording, waiting, fault injection, and the
activities it builds being the shape Teams sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from botbuilder.schema import Activity

from emulators.connector import (
    ADAPTIVE_CARD,
    BotConnectorEmulator,
    personal_conversation_id,
    teams_install,
    teams_message,
    teams_user_id,
)

AAD = "0a1b2c3d-0000-4000-8000-000000000001"


@pytest.fixture
async def connector() -> AsyncIterator[BotConnectorEmulator]:
    async with BotConnectorEmulator() as c:
        yield c


async def test_replies_and_conversation_posts_are_recorded(connector: BotConnectorEmulator) -> None:
    async with aiohttp.ClientSession() as http:
        reply = {
            "type": "message",
            "text": "hello",
            "attachments": [{"contentType": ADAPTIVE_CARD, "content": {"a": 1}}],
        }
        async with http.post(f"{connector.url}v3/conversations/a:1/activities/99", json=reply) as r:
            assert r.status == 201 and (await r.json())["id"]
        async with http.post(f"{connector.url}v3/conversations/a:1/activities", json={"type": "typing"}) as r:
            assert r.status == 201
    first, second = connector.sent
    assert (first.conversation_id, first.reply_to_id, first.text, first.card) == ("a:1", "99", "hello", {"a": 1})
    assert (second.type, second.reply_to_id) == ("typing", None)
    assert [m.text for m in connector.messages()] == ["hello"]


async def test_wait_for_returns_a_later_activity_and_times_out_with_what_was_sent(
    connector: BotConnectorEmulator,
) -> None:
    async def later() -> None:
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            await http.post(f"{connector.url}v3/conversations/a:2/activities", json={"type": "message", "text": "late"})

    task = asyncio.create_task(later())
    found = await connector.wait_for(lambda s: s.text == "late", timeout=2)
    await task
    assert found.conversation_id == "a:2"
    with pytest.raises(TimeoutError, match="late"):
        await connector.wait_for(lambda s: s.text == "never", timeout=0.1)
    with pytest.raises(TimeoutError):
        await connector.wait_for(lambda s: True, timeout=0.05, since=1)


async def test_fail_next_answers_errors_then_recovers(connector: BotConnectorEmulator) -> None:
    connector.fail_next(2, status=429, retry_after=3)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(3):
            async with http.post(f"{connector.url}v3/conversations/a:1/activities", json={"type": "message"}) as r:
                statuses.append((r.status, r.headers.get("Retry-After")))
    assert statuses == [(429, "3"), (429, "3"), (201, None)]
    assert len(connector.sent) == 1


async def test_bad_posts_are_refused(connector: BotConnectorEmulator) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{connector.url}v3/conversations/a:1/activities", data=b"{") as r:
            assert r.status == 400
        async with http.post(f"{connector.url}v3/conversations/a:1/activities", json={"text": "no type"}) as r:
            assert r.status == 400
        async with http.post(f"{connector.url}v3/conversations", json={"members": []}) as r:
            assert r.status == 400
    assert connector.sent == []


async def test_conversation_creation_and_the_control_api(connector: BotConnectorEmulator) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{connector.url}v3/conversations", json={"members": [{"id": "29:1"}]}) as r:
            created = await r.json()
            assert r.status == 201 and created["id"].startswith("a:")
        await http.post(
            f"{connector.url}v3/conversations/{created['id']}/activities", json={"type": "message", "text": "x"}
        )
        async with http.get(f"{connector.url}_emulator/activities") as r:
            listed = await r.json()
        assert listed == [
            {"conversationId": created["id"], "replyToId": None, "activity": {"type": "message", "text": "x"}}
        ]
        async with http.post(f"{connector.url}_emulator/reset") as r:
            assert r.status == 200
    assert connector.sent == [] and connector.conversations == []


def test_teams_message_has_the_shape_teams_sends() -> None:
    act = teams_message(
        service_url="http://127.0.0.1:1/", aad_object_id=AAD, text="busy", user_name="Alice Agent", mention_bot=True
    )
    assert act["type"] == "message" and act["channelId"] == "msteams"
    assert act["text"] == "<at>Presence Sync</at> busy"
    assert act["from"] == {"id": teams_user_id(AAD), "name": "Alice Agent", "aadObjectId": AAD}
    assert act["from"]["id"].startswith("29:")
    assert act["recipient"]["id"].startswith("28:")
    assert act["conversation"] == {
        "conversationType": "personal",
        "tenantId": act["channelData"]["tenant"]["id"],
        "id": personal_conversation_id(AAD),
    }
    mention = act["entities"][0]
    assert mention["type"] == "mention" and mention["text"] == "<at>Presence Sync</at>"
    assert mention["mentioned"]["id"] == act["recipient"]["id"]
    assert act["timestamp"].endswith("Z")
    # The SDK reads it as Teams' own activity.
    parsed = Activity().deserialize(act)
    assert parsed.from_property.aad_object_id == AAD
    assert parsed.conversation.conversation_type == "personal"
    assert parsed.service_url == "http://127.0.0.1:1/"


def test_card_submit_and_install_activities() -> None:
    submit = teams_message(
        service_url="http://127.0.0.1:1/", aad_object_id=AAD, value={"command": "status"}, reply_to_id="1:5"
    )
    assert "text" not in submit and submit["value"] == {"command": "status"}
    assert submit["replyToId"] == "1:5" and submit["channelData"]["source"] == {"name": "message"}
    install = teams_install(service_url="http://127.0.0.1:1/", aad_object_id=AAD)
    assert install["type"] == "conversationUpdate"
    assert install["membersAdded"] == [{"id": install["recipient"]["id"]}]
    no_aad = teams_message(service_url="http://127.0.0.1:1/", aad_object_id=None, text="hi")
    assert "aadObjectId" not in no_aad["from"]


def test_ids_are_stable_per_user_and_distinct_between_users() -> None:
    other = "0a1b2c3d-0000-4000-8000-000000000002"
    assert teams_user_id(AAD) == teams_user_id(AAD) != teams_user_id(other)
    assert personal_conversation_id(AAD) != personal_conversation_id(other)
    a = teams_message(service_url="http://127.0.0.1:1/", aad_object_id=AAD, text="x")
    b = teams_message(service_url="http://127.0.0.1:1/", aad_object_id=AAD, text="x")
    assert a["id"] != b["id"]
