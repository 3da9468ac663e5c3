"""The Teams port against the Graph emulator: the exact calls made, batching of reads, and the typed
error each Graph failure becomes (the outbox decides retry/wait/dead-letter from the type alone)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from emulators.graph import GraphEmulator
from graph_sync.teams import TeamsPresenceClient
from mapping.errors import ConfigError, PermanentError, RetryableError, Throttled
from mapping.memory import MemoryStore
from mapping.model import CLEAR, Agent, System
from service import cli
from service.settings import load_settings
from tests.graph.conftest import APP_TOKEN, CLIENT_ID, agents, entra
from tests.support import FakeClock, StaticTokens

ALICE = Agent("97c90b02-4e38-ef11-a315-000d3a5a54dc", entra(1), "Alice Agent")


@pytest.fixture
async def teams(emu: GraphEmulator, clock: FakeClock) -> AsyncIterator[TeamsPresenceClient]:
    emu.add_user(ALICE.entra_object_id)
    client = TeamsPresenceClient(
        emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore(), clock=clock, expiration_minutes=60
    )
    yield client
    await client.close()


async def test_set_presence_opens_the_apps_session(
    teams: TeamsPresenceClient, emu: GraphEmulator, clock: FakeClock
) -> None:
    await teams.apply(ALICE, "Busy/InACall")
    (call,) = emu.calls("POST", "setPresence")
    assert call.path == f"/v1.0/users/{ALICE.entra_object_id}/presence/setPresence"
    assert call.body == {
        "sessionId": CLIENT_ID,
        "availability": "Busy",
        "activity": "InACall",
        "expirationDuration": "PT60M",
    }
    session = emu.sessions_of(ALICE.entra_object_id)[CLIENT_ID.lower()]
    assert (session.availability, session.activity) == ("Busy", "InACall")
    assert (session.expires_at - session.set_at).total_seconds() == 3600
    assert emu.presence_of(ALICE.entra_object_id) == ("Busy", "InACall")


async def test_clear_ends_the_session(teams: TeamsPresenceClient, emu: GraphEmulator) -> None:
    await teams.apply(ALICE, "DoNotDisturb/Presenting")
    await teams.apply(ALICE, CLEAR)
    (call,) = emu.calls("POST", "clearPresence")
    assert call.body == {"sessionId": CLIENT_ID}
    assert emu.sessions_of(ALICE.entra_object_id) == {}
    assert emu.presence_of(ALICE.entra_object_id) == ("Available", "Available")  # her own client again


def test_preferred_mode_refuses_to_start_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Graph shows a preferred presence only while the user has a presence session; the session the
    bridge would keep for it shows whenever the bridge steps back (see the emulator test below), so
    the service refuses the mode and says what to use."""
    for name in [k for k in os.environ if k.startswith("PRESENCE_SYNC_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("PRESENCE_SYNC_GRAPH_PRESENCE_MODE", "preferred")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "PRESENCE_SYNC_GRAPH_PRESENCE_MODE" in err and "presence session" in err and "use session" in err
    with pytest.raises(ConfigError, match="use session"):
        load_settings(graph_presence_mode="preferred")
    assert load_settings(graph_presence_mode="session").graph_presence_mode == "session"


async def test_a_kept_session_for_preferred_presence_would_break_rule_2(emu: GraphEmulator) -> None:
    """Why preferred mode is refused, on the emulator's aggregation: without a session a preferred
    presence shows Offline; an Available session of the app would make it show, but once the bridge
    steps back (clears the preferred presence, as for Available or Offline agents) that session
    outranks the person's own Away, and shows an agent who is offline as Available."""
    bob = entra(2)
    emu.add_user(bob, own=("Offline", "Offline"))
    emu.set_user_preferred(bob, "Busy", "Busy")
    assert emu.presence_of(bob) == ("Offline", "Offline")  # no session: the preferred presence does not show
    emu.add_user(ALICE.entra_object_id, own=("Away", "Away"))
    teams = TeamsPresenceClient(emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore())
    try:
        for agent in (ALICE, Agent("97c90b02-0000-4000-8000-000000000002", bob, "Bob Agent")):
            await teams.apply(agent, "Available/Available")  # the session preferred mode would need
        assert emu.presence_of(bob) == ("Busy", "Busy")  # it makes the preferred presence show ...
        emu.clear_user_preferred(bob)
        assert emu.presence_of(bob) == ("Available", "Available")  # ... and then an offline agent shows Available
        assert emu.presence_of(ALICE.entra_object_id) == ("Available", "Available")  # hiding her own Away
    finally:
        await teams.close()


async def test_pair_graph_refuses_is_permanent_without_a_call(teams: TeamsPresenceClient, emu: GraphEmulator) -> None:
    with pytest.raises(PermanentError, match=r"Alice Agent.*Busy/Busy") as e:
        await teams.apply(ALICE, "Busy/Busy")
    assert "Busy/InACall" in e.value.message
    assert emu.calls("POST", "setPresence") == []


async def test_read_batches_650_ids_and_maps_back_to_dynamics_ids(emu: GraphEmulator, clock: FakeClock) -> None:
    directory = agents(1400)
    for a in directory[:-5]:  # the last five are unknown to Graph
        emu.add_user(a.entra_object_id, own=("Away", "Away"))
    emu.set_user_state(directory[0].entra_object_id, "Busy", "InAMeeting")
    client = TeamsPresenceClient(
        emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore(), clock=clock
    )
    try:
        observed = await client.read(directory)
    finally:
        await client.close()
    calls = emu.calls("POST", "getPresencesByUserId")
    assert [len(c.body["ids"]) for c in calls] == [650, 650, 100]
    assert len(observed) == 1395
    by_agent = {o.agent_id: o for o in observed}
    first = by_agent[directory[0].dynamics_user_id]
    assert (first.system, first.value, first.version, first.source) == (
        System.TEAMS,
        "Busy/InAMeeting",
        None,
        "reconcile",
    )
    assert first.observed_at == clock()
    assert by_agent[directory[1].dynamics_user_id].value == "Away/Away"
    assert not {a.dynamics_user_id for a in directory[-5:]} & set(by_agent)


async def test_429_is_throttled_with_retry_after_and_no_retry_inside(
    teams: TeamsPresenceClient, emu: GraphEmulator
) -> None:
    emu.fail_next(1, status=429, retry_after=7, paths="setPresence")
    with pytest.raises(Throttled) as e:
        await teams.apply(ALICE, "Away/Away")
    assert e.value.retry_after == 7
    assert "Alice Agent" in e.value.message
    assert len(emu.calls("POST", "setPresence")) == 1  # the outbox retries, not the SDK


async def test_503_with_retry_after_is_throttled_and_500_retryable(
    teams: TeamsPresenceClient, emu: GraphEmulator
) -> None:
    emu.fail_next(1, status=503, retry_after=3)
    with pytest.raises(Throttled) as t:
        await teams.apply(ALICE, "Away/Away")
    assert (t.value.retry_after, t.value.status) == (3, 503)
    emu.fail_next(1, status=500)
    with pytest.raises(RetryableError, match="500"):
        await teams.apply(ALICE, "Away/Away")


async def test_403_names_the_missing_permission(teams: TeamsPresenceClient, emu: GraphEmulator) -> None:
    emu.fail_next(1, status=403, paths="setPresence")
    with pytest.raises(PermanentError) as w:
        await teams.apply(ALICE, "Away/Away")
    assert "Presence.ReadWrite.All (application)" in w.value.message and "Alice Agent" in w.value.message
    health = await teams.health()
    assert health["write"]["ok"] is False and "Presence.ReadWrite.All" in str(health["write"]["error"])
    await teams.apply(ALICE, "Away/Away")
    assert (await teams.health())["write"]["ok"] is True
    emu.fail_next(1, status=403, paths="getPresencesByUserId")
    teams.retry = teams.retry.__class__(max_attempts=1)
    with pytest.raises(PermanentError, match=r"Presence\.Read\.All \(application\)"):
        await teams.read([ALICE])


async def test_404_and_400_carry_graphs_message(teams: TeamsPresenceClient) -> None:
    ghost = Agent("a7f9a9ed-b311-ef11-9f89-000d3a544b4c", entra(999), "Ghost Agent")
    with pytest.raises(PermanentError, match=f"User '{ghost.entra_object_id}' was not found") as e:
        await teams.apply(ghost, "Away/Away")
    assert e.value.status == 404 and "Ghost Agent" in e.value.message


@pytest.mark.slow
async def test_timeout_and_refused_connection_are_retryable(emu: GraphEmulator) -> None:
    emu.add_user(ALICE.entra_object_id)
    slow = TeamsPresenceClient(emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore(), timeout=0.2)
    emu.latency(1.0)
    try:
        with pytest.raises(RetryableError, match="did not answer in time"):
            await slow.apply(ALICE, "Away/Away")
    finally:
        emu.latency(0)
        await slow.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = TeamsPresenceClient(
        f"http://127.0.0.1:{port}/v1.0", StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore()
    )
    try:
        with pytest.raises(RetryableError, match="cannot reach Graph"):
            await dead.apply(ALICE, "Away/Away")
    finally:
        await dead.close()


async def test_reads_are_retried_by_the_policy(teams: TeamsPresenceClient, emu: GraphEmulator) -> None:
    teams.retry = teams.retry.__class__(base_seconds=0.01, jitter=False, max_attempts=3)
    emu.fail_next(2, status=429, retry_after=0, paths="getPresencesByUserId")
    (obs,) = await teams.read([ALICE])
    assert obs.value == "Available/Available"
    assert len(emu.calls("POST", "getPresencesByUserId")) == 3


async def test_token_scope_and_loopback_rule(emu: GraphEmulator) -> None:
    emu.add_user(ALICE.entra_object_id)
    tokens = StaticTokens(APP_TOKEN)
    client = TeamsPresenceClient(emu.url, tokens, session_id=CLIENT_ID, store=MemoryStore())
    try:
        await client.apply(ALICE, "Away/Away")
    finally:
        await client.close()
    assert tokens.scopes == ["https://graph.microsoft.com/.default"]
    with pytest.raises(ConfigError, match="https"):
        TeamsPresenceClient("http://graph.example.com/v1.0", tokens, session_id=CLIENT_ID, store=MemoryStore())
    with pytest.raises(ConfigError, match="5 to 240"):
        TeamsPresenceClient(emu.url, tokens, session_id=CLIENT_ID, store=MemoryStore(), expiration_minutes=300)
