"""Presence as Graph reports it: session aggregation, the documented pairs, session lifetime and
fading, preferred presence, getPresencesByUserId limits, authentication and 404s."""

from __future__ import annotations

from datetime import timedelta

import pytest

from emulators.graph import MAX_IDS, GraphEmulator, parse_iso_duration
from tests.emulators_graph.conftest import ALICE, APP_TOKEN, BOB, CLIENT_ID, SUB_A, Graph


async def presence(graph: Graph, user: str) -> tuple[str, str]:
    status, body = await graph.get(f"/users/{user}/presence")
    assert status == 200, body
    return body["availability"], body["activity"]


# ------------------------------------------------------------------ aggregation


async def test_get_presence_shape(graph: Graph) -> None:
    status, body = await graph.get(f"/users/{ALICE}/presence")
    assert status == 200
    assert body["id"] == ALICE
    assert (body["availability"], body["activity"]) == ("Available", "Available")
    assert body["@odata.context"].endswith(f"/$metadata#users('{ALICE}')/presence/$entity")
    assert "statusMessage" in body and "outOfOfficeSettings" in body


async def test_user_ids_are_case_insensitive(graph: Graph) -> None:
    assert await presence(graph, ALICE.upper()) == ("Available", "Available")


@pytest.mark.parametrize(
    ("own", "session", "shown"),
    [
        # the app session shows only when stronger: DoNotDisturb > Busy > Available > Away
        (("Available", "Available"), ("Busy", "InACall"), ("Busy", "InACall")),
        (("Available", "Available"), ("Away", "Away"), ("Available", "Available")),
        (("Busy", "InAMeeting"), ("DoNotDisturb", "Presenting"), ("DoNotDisturb", "Presenting")),
        (("DoNotDisturb", "Presenting"), ("Busy", "InACall"), ("DoNotDisturb", "Presenting")),
        (("Away", "Away"), ("Available", "Available"), ("Available", "Available")),
        (("BeRightBack", "BeRightBack"), ("Available", "Available"), ("Available", "Available")),
        # no client signed in: only the app session counts
        (("Offline", "Offline"), ("Away", "Away"), ("Away", "Away")),
        # equal rank: the person's own client wins (it carries their real activity)
        (("Busy", "InAMeeting"), ("Busy", "InACall"), ("Busy", "InAMeeting")),
    ],
)
async def test_aggregation_strongest_wins(
    emu: GraphEmulator, graph: Graph, own: tuple[str, str], session: tuple[str, str], shown: tuple[str, str]
) -> None:
    emu.set_user_state(ALICE, *own)
    assert (await graph.set_presence(ALICE, *session))[0] == 200
    assert await presence(graph, ALICE) == shown
    assert emu.presence_of(ALICE) == shown


async def test_fall_back_to_app_session_when_own_call_ends(emu: GraphEmulator, graph: Graph) -> None:
    """The fact the bridge's restore rule rests on: when the person's call ends, Teams shows exactly
    what the app session still says."""
    await graph.set_presence(ALICE, "Away", "Away")
    emu.set_user_state(ALICE, "Busy", "InACall")
    assert emu.presence_of(ALICE) == ("Busy", "InACall")
    emu.set_user_state(ALICE, "Offline", "Offline")
    assert emu.presence_of(ALICE) == ("Away", "Away")


async def test_clear_presence_returns_to_own_state(emu: GraphEmulator, graph: Graph) -> None:
    await graph.set_presence(ALICE, "DoNotDisturb", "Presenting")
    assert emu.presence_of(ALICE) == ("DoNotDisturb", "Presenting")
    status, _ = await graph.post(f"/users/{ALICE}/presence/clearPresence", {"sessionId": CLIENT_ID})
    assert status == 200
    assert emu.presence_of(ALICE) == ("Available", "Available")
    assert emu.sessions_of(ALICE) == {}
    # clearing again (no session) is not an error
    assert (await graph.post(f"/users/{ALICE}/presence/clearPresence", {"sessionId": CLIENT_ID}))[0] == 200


async def test_between_app_sessions_the_latest_change_wins_and_refresh_does_not_flip(
    emu: GraphEmulator, graph: Graph
) -> None:
    emu.set_user_state(ALICE, "Offline", "Offline")
    await graph.set_presence(ALICE, "Busy", "InACall", session="app-one")
    await graph.set_presence(ALICE, "Busy", "InAConferenceCall", session="app-two")
    assert emu.presence_of(ALICE) == ("Busy", "InAConferenceCall")
    await graph.set_presence(ALICE, "Busy", "InACall", session="app-one")  # keep-alive, same state
    assert emu.presence_of(ALICE) == ("Busy", "InAConferenceCall")
    assert set(emu.sessions_of(ALICE)) == {"app-one", "app-two"}


async def test_offline_user_without_sessions_is_offline(emu: GraphEmulator) -> None:
    emu.add_user("u-offline", own=("Offline", "Offline"))
    assert emu.presence_of("u-offline") == ("Offline", "Offline")


async def test_preferred_presence_overrides_sessions(emu: GraphEmulator, graph: Graph) -> None:
    await graph.set_presence(ALICE, "DoNotDisturb", "Presenting")
    status, _ = await graph.post(
        f"/users/{ALICE}/presence/setUserPreferredPresence",
        {"availability": "BeRightBack", "activity": "BeRightBack", "expirationDuration": "PT1H"},
    )
    assert status == 200
    assert emu.presence_of(ALICE) == ("BeRightBack", "BeRightBack")
    assert emu.preferred_of(ALICE) == ("BeRightBack", "BeRightBack")
    emu.advance(3601)  # preferred expired; the app session (PT1H) too
    assert emu.presence_of(ALICE) == ("Available", "Available")
    await graph.post(
        f"/users/{ALICE}/presence/setUserPreferredPresence", {"availability": "Offline", "activity": "OffWork"}
    )
    assert emu.presence_of(ALICE) == ("Offline", "OffWork")
    assert (await graph.post(f"/users/{ALICE}/presence/clearUserPreferredPresence", {}))[0] == 200
    assert emu.presence_of(ALICE) == ("Available", "Available")


async def test_preferred_presence_needs_a_session(emu: GraphEmulator) -> None:
    emu.set_user_state(ALICE, "Offline", "Offline")
    emu.set_user_preferred(ALICE, "Busy", "Busy")
    assert emu.presence_of(ALICE) == ("Offline", "Offline")
    emu.set_user_state(ALICE, "Available", "Available")
    assert emu.presence_of(ALICE) == ("Busy", "Busy")


async def test_preferred_presence_default_expiry(emu: GraphEmulator) -> None:
    emu.set_user_preferred(ALICE, "DoNotDisturb", "DoNotDisturb")
    emu.set_user_preferred(BOB, "Away", "Away")
    emu.advance(timedelta(days=1, seconds=1).total_seconds())
    assert emu.preferred_of(ALICE) is None
    assert emu.preferred_of(BOB) == ("Away", "Away")
    emu.advance(timedelta(days=6).total_seconds())
    assert emu.preferred_of(BOB) is None


# ------------------------------------------------------------------ pairs and bodies


@pytest.mark.parametrize(
    "pair",
    [
        ("Available", "Available"),
        ("Busy", "InACall"),
        ("Busy", "InAConferenceCall"),
        ("Away", "Away"),
        ("DoNotDisturb", "Presenting"),
    ],
)
async def test_set_presence_accepts_documented_pairs(emu: GraphEmulator, graph: Graph, pair: tuple[str, str]) -> None:
    emu.set_user_state(ALICE, "Offline", "Offline")
    status, _ = await graph.set_presence(ALICE, *pair)
    assert status == 200
    assert emu.presence_of(ALICE) == pair


@pytest.mark.parametrize(
    "pair",
    [
        ("Busy", "Busy"),
        ("Available", "InACall"),
        ("DoNotDisturb", "DoNotDisturb"),
        ("BeRightBack", "BeRightBack"),
        ("Offline", "OffWork"),
        ("Busy", "InAMeeting"),
        ("available", "available"),
    ],
)
async def test_set_presence_rejects_other_pairs(emu: GraphEmulator, graph: Graph, pair: tuple[str, str]) -> None:
    status, body = await graph.set_presence(ALICE, *pair)
    assert status == 400
    assert body["error"]["code"] == "BadRequest"
    assert f"{pair[0]}/{pair[1]}" in body["error"]["message"]
    assert emu.sessions_of(ALICE) == {}


@pytest.mark.parametrize(
    "pair",
    [
        ("Available", "Available"),
        ("Busy", "Busy"),
        ("DoNotDisturb", "DoNotDisturb"),
        ("BeRightBack", "BeRightBack"),
        ("Away", "Away"),
        ("Offline", "OffWork"),
    ],
)
async def test_preferred_accepts_its_pairs(graph: Graph, pair: tuple[str, str]) -> None:
    status, _ = await graph.post(
        f"/users/{ALICE}/presence/setUserPreferredPresence", {"availability": pair[0], "activity": pair[1]}
    )
    assert status == 200


@pytest.mark.parametrize("pair", [("Busy", "InACall"), ("DoNotDisturb", "Presenting"), ("Offline", "Offline")])
async def test_preferred_rejects_session_pairs(graph: Graph, pair: tuple[str, str]) -> None:
    status, body = await graph.post(
        f"/users/{ALICE}/presence/setUserPreferredPresence", {"availability": pair[0], "activity": pair[1]}
    )
    assert status == 400, body


async def test_set_presence_requires_session_id(graph: Graph) -> None:
    status, body = await graph.post(
        f"/users/{ALICE}/presence/setPresence", {"availability": "Busy", "activity": "InACall"}
    )
    assert status == 400
    assert "sessionId" in body["error"]["message"]
    status, _ = await graph.post(f"/users/{ALICE}/presence/clearPresence", {})
    assert status == 400


async def test_malformed_body_is_400(graph: Graph) -> None:
    status, _, _ = await graph.call(
        "POST", f"/users/{ALICE}/presence/setPresence", None, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    async with graph.session.post(
        f"{graph.emulator.url}/users/{ALICE}/presence/setPresence",
        data=b"{nope",
        headers={"Authorization": f"Bearer {APP_TOKEN}"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "BadRequest"


@pytest.mark.parametrize(
    ("duration", "ok"),
    [
        ("PT5M", True),
        ("PT1H", True),
        ("PT4H", True),
        ("P0DT2H", True),
        ("PT300S", True),
        ("PT4M59S", False),
        ("PT4H1M", False),
        ("P1D", False),
        ("1 hour", False),
        ("PT", False),
        # str(timedelta(hours=1)), what kiota's Python writer emits
        ("1:00:00", False),
    ],
)
async def test_expiration_duration_bounds(graph: Graph, duration: str, ok: bool) -> None:
    status, _ = await graph.set_presence(ALICE, "Busy", "InACall", duration=duration)
    assert (status == 200) is ok


# ------------------------------------------------------------------ time


async def test_session_expires(emu: GraphEmulator, graph: Graph) -> None:
    await graph.set_presence(ALICE, "Busy", "InACall", duration="PT10M")
    emu.advance(9 * 60)
    assert emu.presence_of(ALICE) == ("Busy", "InACall")
    emu.advance(61)
    assert emu.presence_of(ALICE) == ("Available", "Available")
    assert emu.sessions_of(ALICE) == {}


async def test_default_session_lifetime_is_five_minutes(emu: GraphEmulator, graph: Graph) -> None:
    await graph.set_presence(ALICE, "DoNotDisturb", "Presenting", duration=None)
    (session,) = emu.sessions_of(ALICE).values()
    assert session.expires_at - session.set_at == timedelta(minutes=5)


async def test_available_session_fades(emu: GraphEmulator, graph: Graph) -> None:
    emu.set_user_state(ALICE, "Offline", "Offline")
    await graph.set_presence(ALICE, "Available", "Available", duration="PT1H")
    emu.advance(5 * 60)
    assert await presence(graph, ALICE) == ("Available", "AvailableInactive")
    emu.advance(5 * 60)
    assert await presence(graph, ALICE) == ("Away", "Away")
    await graph.set_presence(ALICE, "Available", "Available", duration="PT1H")  # keep-alive restores it
    assert await presence(graph, ALICE) == ("Available", "Available")
    emu.advance(4 * 60)
    await graph.set_presence(ALICE, "Available", "Available", duration="PT1H")
    emu.advance(4 * 60)
    assert await presence(graph, ALICE) == ("Available", "Available")


async def test_busy_session_does_not_fade(emu: GraphEmulator, graph: Graph) -> None:
    await graph.set_presence(ALICE, "Busy", "InACall", duration="PT1H")
    emu.advance(30 * 60)
    assert emu.presence_of(ALICE) == ("Busy", "InACall")


# ------------------------------------------------------------------ bulk read


async def test_get_presences_by_user_id(emu: GraphEmulator, graph: Graph) -> None:
    emu.set_user_state(BOB, "Busy", "InAMeeting")
    status, body = await graph.post(
        "/communications/getPresencesByUserId",
        {"ids": [ALICE, "ffffffff-0000-4000-8000-00000000dead", BOB.upper(), ALICE]},
    )
    assert status == 200
    assert [(p["id"], p["availability"], p["activity"]) for p in body["value"]] == [
        (ALICE, "Available", "Available"),
        (BOB, "Busy", "InAMeeting"),
    ]


async def test_get_presences_limit(emu: GraphEmulator, graph: Graph) -> None:
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(MAX_IDS + 1)]
    emu.add_users(ids)
    status, body = await graph.post("/communications/getPresencesByUserId", {"ids": ids[:MAX_IDS]})
    assert status == 200 and len(body["value"]) == MAX_IDS
    status, body = await graph.post("/communications/getPresencesByUserId", {"ids": ids})
    assert status == 400
    assert "650" in body["error"]["message"]
    status, _ = await graph.post("/communications/getPresencesByUserId", {"nope": []})
    assert status == 400


async def test_single_presence_via_communications(graph: Graph) -> None:
    status, body = await graph.get(f"/communications/presences/{BOB}")
    assert status == 200 and body["id"] == BOB


# ------------------------------------------------------------------ auth and unknowns


async def test_unknown_user_is_404(graph: Graph) -> None:
    for status, body in [
        await graph.get("/users/nobody/presence"),
        await graph.set_presence("nobody", "Busy", "InACall"),
    ]:
        assert status == 404
        assert body["error"]["code"] == "NotFound"


@pytest.mark.parametrize("token", [None, "", "wrong"])
async def test_missing_or_wrong_token_is_401(graph: Graph, token: str | None) -> None:
    status, body = await graph.get(f"/users/{ALICE}/presence", token=token)
    assert status == 401
    assert body["error"]["code"] == "InvalidAuthenticationToken"


async def test_subscriber_token_reads_but_cannot_write_others_presence(graph: Graph) -> None:
    assert (await graph.get(f"/users/{ALICE}/presence", token=SUB_A))[0] == 200
    status, _, _ = await graph.call(
        "POST",
        f"/users/{ALICE}/presence/setPresence",
        {"sessionId": CLIENT_ID, "availability": "Busy", "activity": "InACall"},
        token=SUB_A,
    )
    assert status == 403


async def test_unknown_route_answers_graph_error(graph: Graph) -> None:
    status, body = await graph.get("/users/x/calendar")
    assert status == 400
    assert body["error"]["code"] == "BadRequest"


async def test_control_api_rejects_typos(emu: GraphEmulator) -> None:
    with pytest.raises(ValueError):
        emu.set_user_state(ALICE, "Bussy", "InACall")
    with pytest.raises(KeyError):
        emu.set_user_state("nobody", "Busy", "InACall")
    with pytest.raises(ValueError):
        emu.set_user_preferred(ALICE, "Busy", "InACall")


def test_parse_iso_duration() -> None:
    assert parse_iso_duration("PT1H") == timedelta(hours=1)
    assert parse_iso_duration("PT1H30M") == timedelta(minutes=90)
    assert parse_iso_duration("P1DT2H") == timedelta(days=1, hours=2)
    assert parse_iso_duration("PT0.5S") == timedelta(milliseconds=500)
    for bad in ("", "P", "PT", "1H", "PT1X", "P1Y"):
        with pytest.raises(ValueError):
            parse_iso_duration(bad)
