"""One test (or a few) per sync rule of DESIGN.md, through the engine on the in-memory store."""

from __future__ import annotations

import pytest

from mapping.errors import PermanentError, Throttled
from mapping.model import CLEAR, OutboxStatus, System
from mapping.rules import Result
from mapping.translation import Rules
from tests.support import (
    ALICE,
    AVAILABLE,
    AWAY,
    BOB,
    BUSY,
    DND,
    OFFLINE,
    TRAINING,
    FakeClock,
    RecordingWriter,
    ev,
    make_bridge,
)

D, T = System.DYNAMICS, System.TEAMS


@pytest.fixture
async def b():
    bridge = make_bridge()
    await bridge.store.upsert_agents([ALICE, BOB])
    return bridge


def calls(bridge, system):
    return bridge.outbox.writers[system].calls


async def settle(bridge):
    await bridge.outbox.drain()


# Rule 1: directory
async def test_rule1_unknown_ids_are_counted_not_guessed(b):
    assert await b.engine.agent_for(T, "11111111-2222-3333-4444-555555555555") is None
    assert await b.engine.agent_for(T, "11111111-2222-3333-4444-555555555555") is None
    unknown = await b.store.list_unknown()
    assert unknown[0]["id"] == "11111111-2222-3333-4444-555555555555" and unknown[0]["count"] == 2
    found = await b.engine.agent_for(T, ALICE.entra_object_id.upper())
    assert found == ALICE


async def test_rule1_event_for_unknown_agent_changes_nothing(b):
    out = await b.engine.observe(
        ev(ALICE, D, BUSY, b.clock(), 1).__class__("99999999-0000-0000-0000-000000000000", D, BUSY, b.clock(), 1)
    )
    assert out.result is Result.UNKNOWN_AGENT
    assert await b.store.list_outbox() == []


# Rule 2: translation
@pytest.mark.parametrize(
    "presence,teams",
    [
        (AVAILABLE, "Available/Available"),
        (BUSY, "Busy/InACall"),
        (DND, "DoNotDisturb/Presenting"),
        (AWAY, "Away/Away"),
        (TRAINING, "DoNotDisturb/Presenting"),
    ],
)
async def test_rule2_dynamics_to_teams_by_base(b, presence, teams):
    out = await b.engine.observe(ev(ALICE, D, presence, b.clock(), 1))
    assert out.result is Result.APPLIED
    await settle(b)
    assert calls(b, T) == [(ALICE.dynamics_user_id, teams)]


async def test_rule2_offline_clears_the_session(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1))
    await b.engine.observe(ev(ALICE, D, OFFLINE, b.clock.advance(10), 2))
    await settle(b)
    assert calls(b, T) == [(ALICE.dynamics_user_id, CLEAR)] or calls(b, T)[-1][1] == CLEAR


async def test_rule2_offline_first_costs_no_call(b):
    out = await b.engine.observe(ev(ALICE, D, OFFLINE, b.clock(), 1))
    assert out.result is Result.NO_CHANGE and out.commands == ()


@pytest.mark.parametrize(
    "teams,expected",
    [
        ("Busy/InACall", BUSY),
        ("Busy/InAConferenceCall", BUSY),
        ("Busy/InAMeeting", BUSY),
        ("DoNotDisturb/DoNotDisturb", DND),
        ("DoNotDisturb/Presenting", DND),
        ("Away/Away", AWAY),
        ("BeRightBack/BeRightBack", AWAY),
    ],
)
async def test_rule2_teams_to_dynamics(b, teams, expected):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, teams, b.clock.advance(30)))
    assert out.result is Result.APPLIED
    assert [(c.system, c.value) for c in out.commands] == [(D, expected)]


@pytest.mark.parametrize("teams", ["Offline/Offline", "Busy/Busy", "AvailableIdle/Available"])
async def test_rule2_teams_states_that_change_nothing(b, teams):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, teams, b.clock.advance(30)))
    assert out.commands == ()


async def test_rule2_call_ends_restores_previous_presence_not_a_guess(b):
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock(), 1))  # session Away/Away
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    # Person's own client is Available, which outranks the session's Away: Teams shows Available.
    out = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(300)))
    assert [(c.system, c.value) for c in out.commands] == [(D, AWAY)]


async def test_rule2_fallback_to_bridge_session_ends_override_even_if_not_available(b):
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock(), 1))
    await settle(b)
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    out = await b.engine.observe(ev(ALICE, T, "Away/Away", b.clock.advance(300)))  # = the bridge session
    assert [(c.system, c.value) for c in out.commands] == [(D, AWAY)]


async def test_rule2_available_without_override_changes_nothing(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1, "SYSTEM"))
    out = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(30)))
    assert out.commands == ()


async def test_rule2_no_override_from_teams_while_dynamics_is_offline(b):
    await b.engine.observe(ev(ALICE, D, OFFLINE, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(30)))
    assert out.commands == ()


async def test_rule2_override_never_weakens_dynamics(b):
    await b.engine.observe(ev(ALICE, D, DND, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    assert out.commands == ()


# Rule 3: no echo
async def test_rule3_stuck_busy_trap(b):
    """Available in both; a Teams call starts; the bridge sets Dynamics Busy; Dynamics' webhook for that
    write must change nothing in Teams; when the call ends, Dynamics comes back to Available."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    assert calls(b, T) == [(ALICE.dynamics_user_id, "Available/Available")]
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    assert [c.value for c in out.commands] == [BUSY]
    await settle(b)
    echo = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.3), 2, "AGENT"))
    assert echo.result is Result.ECHO and echo.commands == ()
    await settle(b)
    assert calls(b, T) == [(ALICE.dynamics_user_id, "Available/Available")]  # nothing mirrored back
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert [c.value for c in end.commands] == [AVAILABLE]
    await settle(b)
    assert calls(b, D) == [(ALICE.dynamics_user_id, BUSY), (ALICE.dynamics_user_id, AVAILABLE)]
    echo2 = await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(0.3), 3, "AGENT"))
    assert echo2.result is Result.ECHO
    assert len(calls(b, T)) == 1


async def test_rule3_teams_echo_of_our_session_is_suppressed(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(1)))
    assert out.result is Result.ECHO and out.commands == ()


async def test_rule3_system_change_with_same_value_is_not_an_echo(b):
    """Routing set Busy (SYSTEM) while our Busy write was in flight: genuine, so the override ends
    and the call's end must not restore Available over a customer conversation."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    out = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(10), 2, "SYSTEM"))
    assert out.result is not Result.ECHO
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert all(c.system is not D for c in end.commands)


async def test_rule3_old_write_is_no_longer_expected_as_echo(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    out = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(3600), 2, "AGENT"))
    assert out.result is not Result.ECHO


# Rule 4: order
async def test_rule4_stale_row_version_never_overwrites(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 10))
    out = await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(1), 9))
    assert out.result is Result.STALE
    await settle(b)
    assert calls(b, T) == [(ALICE.dynamics_user_id, "Busy/InACall")]


async def test_rule4_duplicate_delivery_is_idempotent(b):
    e = ev(ALICE, D, BUSY, b.clock(), 10)
    assert (await b.engine.observe(e)).result is Result.APPLIED
    assert (await b.engine.observe(e)).result is Result.DUPLICATE
    await settle(b)
    assert len(calls(b, T)) == 1


async def test_rule4_older_teams_observation_is_stale(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    t1 = b.clock.advance(10)
    await b.engine.observe(ev(ALICE, T, "Away/Away", b.clock.advance(10)))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", t1))
    assert out.result is Result.STALE


# Rule 5: conflicts
async def test_rule5_dynamics_wins_when_it_changed_just_before(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(60), 2, "AGENT"))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(0.5)))
    assert out.result is Result.CONFLICT and out.commands == ()


async def test_rule5_dynamics_wins_when_it_changed_just_after(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))  # Dynamics Busy queued
    out = await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(0.5), 2, "AGENT"))
    assert out.result is Result.CONFLICT
    assert [(c.system, c.value) for c in out.commands] == [(T, "Away/Away")]
    await settle(b)
    assert calls(b, D) == []  # the Teams-driven Busy was withdrawn


async def test_rule5_teams_wins_when_configured(b):
    bridge = make_bridge(rules=Rules(conflict_winner="teams"))
    await bridge.store.upsert_agents([ALICE])
    c = bridge.clock
    await bridge.engine.observe(ev(ALICE, D, AVAILABLE, c(), 1))
    await bridge.engine.observe(ev(ALICE, T, "Busy/InACall", c.advance(60)))
    out = await bridge.engine.observe(ev(ALICE, D, AWAY, c.advance(0.5), 2, "AGENT"))
    assert out.result is Result.CONFLICT and [(x.system, x.value) for x in out.commands] == [(D, BUSY)]


async def test_rule5_outside_the_window_no_conflict(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(60), 2, "AGENT"))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    assert out.result is Result.APPLIED


# Rule 6: coalescing
async def test_rule6_burst_of_ten_costs_one_call(b):
    values = [BUSY, AVAILABLE, AWAY, DND, BUSY, AVAILABLE, AWAY, DND, AVAILABLE, BUSY]
    for i, v in enumerate(values, start=1):
        await b.engine.observe(ev(ALICE, D, v, b.clock.advance(0.1), i))
    rows = await b.store.list_outbox()
    assert len(rows) == 1 and rows[0].generation == 10
    await settle(b)
    assert calls(b, T) == [(ALICE.dynamics_user_id, "Busy/InACall")]


# Rule 7: outbox
async def test_rule7_retries_with_backoff_and_honours_retry_after():
    clock = FakeClock()
    writer = RecordingWriter(T, [Throttled("429", retry_after=30)])
    b = make_bridge(clock=clock, writers={T: writer, D: RecordingWriter(D)})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, BUSY, clock(), 1))
    await b.outbox.run_once()
    row = (await b.store.list_outbox())[0]
    assert row.status is OutboxStatus.PENDING and row.attempts == 1 and "429" in (row.last_error or "")
    assert (row.next_attempt_at - clock()).total_seconds() >= 30
    clock.advance(29)
    assert await b.outbox.run_once() == 0  # neither the row nor Teams is due before Retry-After
    clock.advance(2)
    await b.outbox.run_once()
    assert writer.calls == [(ALICE.dynamics_user_id, "Busy/InACall")]
    assert (await b.store.list_outbox())[0].status is OutboxStatus.DELIVERED


async def test_rule7_dead_letter_after_bounded_tries_and_retry():
    from mapping.errors import RetryableError
    from mapping.retry import RetryPolicy

    clock = FakeClock()
    writer = RecordingWriter(T, [RetryableError("503")] * 3)
    b = make_bridge(
        clock=clock, writers={T: writer, D: RecordingWriter(D)}, policy=RetryPolicy(max_attempts=3, jitter=False)
    )
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, BUSY, clock(), 1))
    for _ in range(3):
        await b.outbox.run_once()
        clock.advance(600)
    row = (await b.store.list_outbox())[0]
    assert row.status is OutboxStatus.DEAD and row.attempts == 3 and row.last_error == "503"
    assert await b.store.retry_dead(None, clock()) == 1
    await b.outbox.run_once()
    assert writer.calls == [(ALICE.dynamics_user_id, "Busy/InACall")]


async def test_rule7_permanent_error_dead_letters_at_once():
    writer = RecordingWriter(D, [PermanentError("0x80040217: agent not found")])
    b = make_bridge(writers={T: RecordingWriter(T), D: writer})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    await b.outbox.drain()
    dead = await b.store.list_outbox(OutboxStatus.DEAD)
    assert [(r.system, r.attempts, r.last_error) for r in dead] == [(D, 1, "0x80040217: agent not found")]


async def test_rule7_a_dead_bot_command_puts_teams_back_in_line_with_dynamics():
    teams = RecordingWriter(T)
    b = make_bridge(writers={T: teams, D: RecordingWriter(D, [PermanentError("0x80040220: no privilege")])})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.outbox.drain()
    b.clock.advance(60)
    await b.engine.command(ALICE, DND)  # both sides at once: Dynamics DND (dies), Teams DND
    await b.outbox.drain()
    assert [v for _, v in teams.calls] == ["Available/Available", "DoNotDisturb/Presenting", "Available/Available"]
    state = (await b.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert state.dynamics.written_value is None and state.teams.written_value == "Available/Available"
    # The dead write is no longer expected as an echo: if an admin retries it and it lands, its
    # webhook is a real change, and Teams follows it again.
    out = await b.engine.observe(ev(ALICE, D, DND, b.clock.advance(600), 2, "AGENT"))
    assert out.result is Result.APPLIED and [(c.system, c.value) for c in out.commands] == [
        (T, "DoNotDisturb/Presenting")]


async def test_rule7_a_dead_override_ends_the_override_without_a_restore():
    b = make_bridge(writers={T: RecordingWriter(T), D: RecordingWriter(D, [PermanentError("0x80040217")])})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.outbox.drain()
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))  # override: Dynamics Busy
    await b.outbox.drain()  # ...dies
    state = (await b.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert state.override_value is None and state.restore_value is None
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(60)))
    assert end.commands == ()  # Dynamics never left Available: nothing to restore
    assert b.outbox.writers[T].calls == [(ALICE.dynamics_user_id, "Available/Available")]  # Teams untouched


async def test_rule7_newer_value_during_flight_is_delivered_after(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1))
    [d] = await b.store.claim([T], 10, 30, "w1", b.clock())
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(1), 2))
    assert await b.store.claim([T], 10, 30, "w2", b.clock()) == []  # one in flight per agent+system
    assert await b.store.ack(d, b.clock())
    [d2] = await b.store.claim([T], 10, 30, "w2", b.clock())
    assert d2.value == "Away/Away"


# Bot command: Dynamics changes, Teams follows, neither echo bounces
async def test_agent_command_writes_both_and_ends_override(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    out = await b.engine.command(ALICE, DND)
    assert {(c.system, c.value) for c in out.commands} == {(D, DND), (T, "DoNotDisturb/Presenting")}
    await settle(b)
    assert (await b.engine.observe(ev(ALICE, D, DND, b.clock.advance(1), 2, "AGENT"))).result is Result.ECHO
    assert (await b.engine.observe(ev(ALICE, T, "DoNotDisturb/Presenting", b.clock.advance(1)))).result is Result.ECHO
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert end.commands == ()


async def test_rule5_a_teams_change_inside_the_window_after_a_command_does_not_overturn_it(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    b.clock.advance(60)
    await b.engine.command(ALICE, AWAY)
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(0.5)))
    assert out.result is Result.CONFLICT and out.commands == ()
    await settle(b)
    assert calls(b, D)[-1][1] == AWAY


async def test_rule5_a_teams_change_after_the_window_overrides_a_command_as_usual(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    b.clock.advance(60)
    await b.engine.command(ALICE, AVAILABLE)
    await settle(b)
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    assert out.result is Result.APPLIED and [(c.system, c.value) for c in out.commands] == [(D, BUSY)]


async def test_session_refresh_reissues_held_sessions(b):
    from datetime import timedelta

    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(BOB, D, BUSY, b.clock(), 1))
    await settle(b)
    b.clock.advance(250)
    n = await b.engine.refresh_sessions(available_every=timedelta(seconds=240), others_every=timedelta(minutes=50))
    assert n == 1
    await settle(b)
    assert calls(b, T)[-1] == (ALICE.dynamics_user_id, "Available/Available")
