"""One test (or a few) per sync rule (``docs/rules.md``), through the engine on the in-memory store.

Version 2 of the rules: both outputs are a function of P (the agent's own Dynamics presence) and Q
(the person's own Teams state). Tests named after a v1 rule that still holds were kept; those of the
removed conflict window (rule 5) were replaced by tests of the cases it got wrong."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mapping.errors import PermanentError, Throttled
from mapping.model import CLEAR, OutboxStatus, System
from mapping.rules import Result
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


class ReadRecorder:
    """``ReadRequests``: the reads the engine asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[System, str]] = []

    async def request_read(self, system: System, agent_id: str, why: str) -> None:
        self.asked.append((system, agent_id))


READS: dict[int, ReadRecorder] = {}
"""The recorder each fixture bridge was given, by ``id`` of the bridge (however it wires reads in)."""


@pytest.fixture
async def b():
    reads = ReadRecorder()
    bridge = make_bridge(reads=reads)
    READS[id(bridge)] = reads
    await bridge.store.upsert_agents([ALICE, BOB])
    yield bridge
    del READS[id(bridge)]


def asked(bridge):
    """The reads the engine of a fixture bridge asked for."""
    return READS[id(bridge)].asked


async def state_of(bridge, agent=ALICE):
    return (await bridge.store.load_states([agent.dynamics_user_id]))[agent.dynamics_user_id]


def writes(out):
    return [(c.system, c.value) for c in out.commands]


def read_now(agent, value, at):
    """A Teams read (GET) of what Teams shows now."""
    return ev(agent, T, value, at, source="reconcile").__class__(
        agent.dynamics_user_id, T, value, at, None, None, "reconcile", True
    )


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


# Rule 2: what each system should show
@pytest.mark.parametrize(
    "presence,teams",
    [
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


@pytest.mark.parametrize("presence", [AVAILABLE, OFFLINE])
async def test_rule2_available_and_offline_mean_no_session(b, presence):
    """No Available session: it would outrank the person's own Away in Teams' aggregation."""
    first = await b.engine.observe(ev(ALICE, D, presence, b.clock(), 1))
    assert first.commands == ()  # no session yet, none needed
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(10), 2, "SYSTEM"))
    await settle(b)
    out = await b.engine.observe(ev(ALICE, D, presence, b.clock.advance(10), 3, "SYSTEM"))
    assert writes(out) == [(T, CLEAR)]


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
    assert writes(out) == [(D, expected)]


@pytest.mark.parametrize("teams", ["Offline/Offline", "Busy/Busy", "AvailableIdle/Available"])
async def test_rule2_teams_states_that_ask_nothing(b, teams):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, teams, b.clock.advance(30)))
    assert out.commands == ()


async def test_rule2_a_teams_away_stops_routing(b):
    """v1 held an Available session that hid the person's own Away; now nothing hides it."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    assert calls(b, T) == []
    out = await b.engine.observe(ev(ALICE, T, "Away/Away", b.clock.advance(30)))
    assert writes(out) == [(D, AWAY)]
    await settle(b)
    back = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert writes(back) == [(D, AVAILABLE)]


async def test_rule2_a_meeting_right_after_a_dynamics_change_is_applied(b):
    """v1 dropped it as a conflict (2 s window) and never applied it: the agent got customers."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(60), 2, "AGENT"))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(0.5)))
    assert writes(out) == [(D, BUSY)]


async def test_rule2_call_ends_returns_to_the_own_presence_as_it_is_then(b):
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock(), 1))  # session Away/Away
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    await settle(b)
    # The person's own client is Available, which outranks the session's Away: Teams shows Available.
    out = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(300)))
    assert writes(out) == [(D, AWAY)]


async def test_rule2_a_routing_change_during_an_override_does_not_end_it(b):
    """A conversation ends (routing: Available) while the agent is still in a Teams meeting: Dynamics
    stays Busy; when the meeting ends, Dynamics shows what routing set meanwhile."""
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1, "SYSTEM"))
    await settle(b)
    await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(30)))  # own beats the tie
    routed = await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(30), 2, "SYSTEM"))
    assert set(writes(routed)) == {(D, BUSY), (T, CLEAR)}
    await settle(b)
    assert (await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 3, "AGENT"))).result is Result.ECHO
    routed_again = await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(30), 4, "SYSTEM"))
    assert writes(routed_again) == [(D, BUSY), (T, "Away/Away")]
    await settle(b)
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 5, "AGENT"))  # echo
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert writes(end) == [(D, AWAY)]


async def test_rule2_the_agents_own_choice_ends_the_override_until_teams_changes(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(30)))
    await settle(b)
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))  # echo of the override
    chose = await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(30), 3, "AGENT"))
    assert writes(chose) == [(T, "Away/Away")]  # Dynamics keeps the agent's Away
    routed = await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(30), 4, "SYSTEM"))
    assert (D, BUSY) not in writes(routed)  # routing does not bring the ended override back
    call = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    assert writes(call) == [(D, BUSY)]  # Q changed: it asks again


async def test_rule2_choosing_the_value_the_override_set_is_a_real_choice(b):
    """v1 took it for the bridge's echo and, when the meeting ended, restored a presence the agent
    had left."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(30)))
    await settle(b)
    assert (await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))).result is Result.ECHO
    chose = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(30), 3, "AGENT"))
    assert chose.result is not Result.ECHO
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert all(system is not D for system, _ in writes(end))  # Dynamics stays on the agent's Busy


async def test_rule2_no_override_from_teams_while_dynamics_is_offline(b):
    await b.engine.observe(ev(ALICE, D, OFFLINE, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(30)))
    assert out.commands == ()


async def test_rule2_override_never_weakens_dynamics(b):
    await b.engine.observe(ev(ALICE, D, DND, b.clock(), 1))
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    assert out.commands == ()


async def test_rule2_a_state_hidden_behind_a_cleared_session_is_read_once_it_landed(b):
    """The person's own call under the bridge's Busy/InACall session: Teams shows Busy/InACall either
    way, so clearing the session changes nothing Graph would notify. The bridge reads Teams once the
    clear landed, and the call it finds keeps Dynamics Busy."""
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1, "SYSTEM"))
    await settle(b)
    assert (await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(1)))).result is Result.ECHO
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(30), 2, "SYSTEM"))
    assert asked(b) == []
    await settle(b)  # the clear lands
    assert asked(b) == [(T, ALICE.dynamics_user_id)]
    found = await b.engine.observe(read_now(ALICE, "Busy/InACall", b.clock.advance(1)))
    assert writes(found) == [(D, BUSY)]


# Rule 3: no echo
async def test_rule3_stuck_busy_trap(b):
    """Available in both; a Teams call starts; the bridge sets Dynamics Busy; Dynamics' webhook for that
    write must change nothing in Teams; when the call ends, Dynamics comes back to Available."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    assert [c.value for c in out.commands] == [BUSY]
    await settle(b)
    echo = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.3), 2, "AGENT"))
    assert echo.result is Result.ECHO and echo.commands == ()
    await settle(b)
    assert calls(b, T) == []  # nothing mirrored back: Teams keeps the person's own state
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert [c.value for c in end.commands] == [AVAILABLE]
    await settle(b)
    assert calls(b, D) == [(ALICE.dynamics_user_id, BUSY), (ALICE.dynamics_user_id, AVAILABLE)]
    echo2 = await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(0.3), 3, "AGENT"))
    assert echo2.result is Result.ECHO
    assert calls(b, T) == []


async def test_rule3_teams_echo_of_our_session_is_suppressed(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1))
    await settle(b)
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(1)))
    assert out.result is Result.ECHO and out.commands == ()
    assert (await state_of(b)).own_teams is None


async def test_rule3_system_change_with_same_value_is_not_an_echo(b):
    """Routing set Busy (SYSTEM) while our Busy write was in flight: genuine, so P is Busy and the
    call's end must not bring Available over a customer conversation."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    out = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(10), 2, "SYSTEM"))
    assert out.result is not Result.ECHO
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert all(c.system is not D for c in end.commands)


async def test_rule3_each_echo_is_consumed_once(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    await settle(b)
    assert (await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))).result is Result.ECHO
    again = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 3, "AGENT"))
    assert again.result is not Result.ECHO and (await state_of(b)).own_dynamics == BUSY


async def test_rule3_old_write_is_no_longer_expected_as_echo(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    await settle(b)
    out = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(3600), 2, "AGENT"))
    assert out.result is not Result.ECHO


async def test_rule3_a_late_echo_of_an_older_write_is_consumed_not_kept(b):
    """An echo held back past a newer genuine change is stale by RowVersion; its expectation must not
    linger to swallow a later genuine change to the same value."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))  # writes Busy (lands as v2)
    await settle(b)
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(30), 3, "AGENT"))  # the agent, before v2's echo
    late = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))
    assert late.result is Result.ECHO and (await state_of(b)).dynamics_unconfirmed == []
    chose = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 4, "AGENT"))
    assert chose.result is not Result.ECHO and (await state_of(b)).own_dynamics == BUSY


async def test_rule3_a_session_still_in_the_outbox_is_not_what_teams_shows(b):
    """Coalescing holds the write back: a person's own call equal to it is theirs, not our echo."""
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1, "SYSTEM"))  # session Busy/InACall queued
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(0.1)))
    assert out.result is not Result.ECHO and (await state_of(b)).own_teams == "Busy/InACall"


async def test_rule3_a_change_overwritten_by_our_write_is_still_the_agents_own(b):
    """A bot command's write lands over the agent's newer change in Dynamics, and our echo (higher
    RowVersion) arrives before the agent's webhook: the agent's change is still P, and the bridge
    writes it back (found by the stateful test)."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.command(ALICE, BUSY)  # queued
    await settle(b)  # lands as v3, over the agent's v2 below
    assert (await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.1), 3, "AGENT"))).result is Result.ECHO
    late = await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(0.1), 2, "AGENT"))
    assert set(writes(late)) == {(D, AVAILABLE), (T, CLEAR)}
    assert (await state_of(b)).own_dynamics == AVAILABLE


async def test_rule3_an_agents_change_taken_for_our_echo_is_their_choice_once_the_real_echo_comes(b):
    """Our override lands over the agent's own choice of the same value, whose webhook comes first and
    is taken for our echo; routing then frees the agent. When our real echo arrives (lower RowVersion
    than routing's, never seen), the earlier event was the agent's choice: no override after it."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))  # override Busy
    await settle(b)  # lands as v3
    mine = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))  # the agent's, v2
    assert mine.result is Result.ECHO  # indistinguishable from our echo so far
    routed = await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(1), 4, "SYSTEM"))
    assert writes(routed) == [(D, BUSY)]  # the override, as far as the bridge knows
    late = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 3, "AGENT"))
    assert late.result is Result.ECHO
    row = await b.store.outbox_row(ALICE.dynamics_user_id, D)
    assert row is not None and row.last_error == "cancelled (already shown)"  # the re-override withdrawn
    assert (await state_of(b)).chose_at is not None


async def test_rule3_a_change_while_our_write_waits_out_a_retry_is_not_its_echo():
    """The write failed and waits for its retry: it has not landed, so the agent's own change to the
    same value is theirs (found by the stateful test)."""
    from mapping.errors import RetryableError

    b = make_bridge(writers={T: RecordingWriter(T), D: RecordingWriter(D, [RetryableError("503")])})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))  # override Busy queued
    await b.outbox.run_once()  # ...fails, waits for its retry
    chose = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))
    assert chose.result is not Result.ECHO and (await state_of(b)).chose_at == b.clock()


async def test_rule3_an_older_session_still_showing_is_not_the_persons_state(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1, "SYSTEM"))
    await settle(b)
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(1)))  # our session shows
    await b.engine.observe(ev(ALICE, D, DND, b.clock.advance(30), 2, "SYSTEM"))  # replaced, not landed
    old = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(0.1)))
    assert old.result is Result.ECHO and old.commands == ()
    assert (await state_of(b)).own_teams is None


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
        clock=clock,
        writers={T: writer, D: RecordingWriter(D)},
        policy=RetryPolicy(max_attempts=3, jitter=False, dead_letter_after_seconds=0),
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
    assert [v for _, v in teams.calls] == ["DoNotDisturb/Presenting", CLEAR]
    state = await state_of(b)
    assert state.own_dynamics == AVAILABLE and state.dynamics_written is None and state.session_written == CLEAR
    # The dead write is no longer expected as an echo: if an admin retries it and it lands, its
    # webhook is a real change, and Teams follows it again.
    out = await b.engine.observe(ev(ALICE, D, DND, b.clock.advance(600), 2, "AGENT"))
    assert out.result is Result.APPLIED and writes(out) == [(T, "DoNotDisturb/Presenting")]


async def test_rule7_a_dead_override_leaves_no_drift_the_sweep_cannot_repair():
    """The state records what Dynamics really shows, so the next reading of it (the sweep) writes the
    override again instead of reporting the agent in sync."""
    dynamics = RecordingWriter(D, [PermanentError("0x80040217")])
    b = make_bridge(writers={T: RecordingWriter(T), D: dynamics})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))  # override: Dynamics Busy
    await b.outbox.drain()  # ...dies
    assert [r.system for r in await b.store.list_outbox(OutboxStatus.DEAD)] == [D]
    assert (await state_of(b)).dynamics_written is None
    reread = ev(ALICE, D, AVAILABLE, b.clock.advance(300), 1, "SYSTEM")
    swept = await b.engine.observe(replace(reread, source="reconcile", current=True))
    assert writes(swept) == [(D, BUSY)]  # the same row version, but compared with the outputs: repaired
    await b.outbox.drain()
    assert dynamics.calls == [(ALICE.dynamics_user_id, BUSY)]


async def test_rule7_a_dead_letter_whose_report_was_lost_is_repaired_by_the_sweep():
    """The process dies (or the state's transaction fails) between the store marking the row dead and
    the engine hearing of it: the state still counts the override as on its way. The sweep applies
    the death first, so it sees the difference and writes the override again instead of reporting
    the agent in sync while Dynamics routes customers to someone in a call."""
    from mapping.reconcile import reconcile

    class Reader:
        def __init__(self, system, value):
            self.system, self.value = system, value

        async def read(self, agents):
            return [
                replace(ev(a, self.system, self.value, b.clock(), 1 if self.system is D else None), current=True)
                for a in agents
            ]

    dynamics = RecordingWriter(D, [PermanentError("0x80040217")])
    b = make_bridge(writers={T: RecordingWriter(T), D: dynamics})
    b.outbox.listeners.clear()  # the death is never reported
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    await b.outbox.drain()
    assert [r.system for r in await b.store.list_outbox(OutboxStatus.DEAD)] == [D]
    assert (await state_of(b)).dynamics_written == BUSY  # the state still expects it
    b.clock.advance(300)
    readers = {D: Reader(D, AVAILABLE), T: Reader(T, "Busy/InACall")}
    summary = await reconcile(b.engine, readers, [ALICE])
    assert (summary.repaired, summary.in_sync) == (1, 0), summary.line()
    await b.outbox.drain()
    assert dynamics.calls == [(ALICE.dynamics_user_id, BUSY)]
    assert await b.engine.recheck_dead_letters() == 0  # applied once


async def test_rule7_newer_value_during_flight_is_delivered_after(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1))
    [d] = await b.store.claim([T], 10, 30, "w1", b.clock())
    await b.engine.observe(ev(ALICE, D, AWAY, b.clock.advance(1), 2))
    assert await b.store.claim([T], 10, 30, "w2", b.clock()) == []  # one in flight per agent+system
    assert await b.store.ack(d, b.clock())
    [d2] = await b.store.claim([T], 10, 30, "w2", b.clock())
    assert d2.value == "Away/Away"


# Bot command: a choice of P made now; Dynamics changes, Teams follows, neither echo bounces
async def test_agent_command_writes_both_and_ends_override(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(60)))
    out = await b.engine.command(ALICE, DND)
    assert set(writes(out)) == {(D, DND), (T, "DoNotDisturb/Presenting")}
    await settle(b)
    assert (await b.engine.observe(ev(ALICE, D, DND, b.clock.advance(1), 2, "AGENT"))).result is Result.ECHO
    assert (await b.engine.observe(ev(ALICE, T, "DoNotDisturb/Presenting", b.clock.advance(1)))).result is Result.ECHO
    end = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(600)))
    assert end.commands == ()


async def test_a_teams_change_read_after_a_command_but_older_does_not_overturn_it(b):
    """v1 needed the conflict window for this; in v2 a command is the agent's choice, and only a Teams
    state that Teams began showing after it can override it."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    await settle(b)
    b.clock.advance(60)
    out = await b.engine.command(ALICE, AWAY)
    assert (D, AWAY) in writes(out)
    again = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(0.5), source="reconcile"))
    assert again.commands == ()


async def test_a_teams_state_notified_before_a_command_and_read_after_it_does_not_overturn_it(b):
    """A basic notification is only a prompt to read: the read returns after the agent's command, but
    Teams showed the call since the notification arrived, before the command (the bridge must not
    take the read's own time as "since")."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    notified = b.clock.advance(30)
    b.clock.advance(0.2)
    await b.engine.command(ALICE, AWAY)
    await settle(b)
    read = replace(read_now(ALICE, "Busy/InACall", b.clock.advance(0.5)), since=notified)
    out = await b.engine.observe(read)
    assert (D, BUSY) not in writes(out)
    later = await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(30)))
    assert writes(later) == [(D, BUSY)]  # a state Teams began showing after the command still asks


async def test_a_teams_change_after_a_command_overrides_it_as_usual(b):
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    b.clock.advance(60)
    await b.engine.command(ALICE, AVAILABLE)
    await settle(b)
    out = await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))
    assert out.result is Result.APPLIED and writes(out) == [(D, BUSY)]


async def test_session_refresh_reissues_held_sessions(b):
    from datetime import timedelta

    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(BOB, D, BUSY, b.clock(), 1))
    await settle(b)
    b.clock.advance(3100)
    n = await b.engine.refresh_sessions(available_every=timedelta(seconds=240), others_every=timedelta(minutes=50))
    assert n == 1  # Alice holds no session (Available); Bob's Busy is re-set
    await settle(b)
    assert calls(b, T)[-1] == (BOB.dynamics_user_id, "Busy/InACall")


async def test_a_read_below_the_session_means_it_is_gone_and_it_is_set_again(b):
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock(), 1, "SYSTEM"))
    await settle(b)
    out = await b.engine.observe(read_now(ALICE, "Available/Available", b.clock.advance(7200)))
    assert writes(out) == [(T, "Busy/InACall")]


async def test_a_teams_change_to_the_value_of_a_session_being_cleared_is_the_persons_own(b):
    """From the stateful test's counterexample in CI. The person is in a meeting under the bridge's
    Busy/InACall session (own wins the tie, so Teams shows the meeting); the agent then chooses
    Available with the bot and, before the clear is sent, the person's own state becomes a call. Teams
    now shows Busy/InACall, the session's value: the change of what Teams shows can only be the
    person's own, since the session did not change. It is newer than the choice, so Dynamics goes
    Busy."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    await b.engine.observe(ev(ALICE, T, "Busy/InAMeeting", b.clock.advance(1.2)))
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))
    await settle(b)
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.1), 3, "AGENT"))
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.1), 3, "AGENT"))
    b.clock.advance(1.5)
    await b.engine.command(ALICE, AVAILABLE)
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(2)))
    await settle(b)
    assert asked(b) == [(T, ALICE.dynamics_user_id)]  # the clear landed: what it hid is read
    await b.engine.observe(read_now(ALICE, "Busy/InACall", b.clock.advance(0.1)))
    await settle(b)
    state = await state_of(b)
    assert state.own_teams == "Busy/InACall"
    assert calls(b, D)[-1] == (ALICE.dynamics_user_id, BUSY)


async def test_rule3_the_agent_choosing_again_what_our_landed_write_set_is_their_choice(b):
    """From the stateful test's counterexample: a bot command's write landed and its echo came (twice,
    the same RowVersion); the agent then chooses Available with the bot and, before that is sent,
    sets Busy again in Dynamics themselves. That later Busy is the agent's own choice, newer than the
    command: it is not re-paired with the landed write as if the first echo had been theirs."""
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await settle(b)
    b.clock.advance(1.3)
    await b.engine.command(ALICE, BUSY)
    await settle(b)
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.1), 2, "AGENT"))
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.1), 2, "AGENT"))
    b.clock.advance(1.2)
    await b.engine.command(ALICE, AVAILABLE)
    out = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 3, "AGENT"))
    assert out.result is not Result.ECHO
    await settle(b)
    state = await state_of(b)
    assert state.own_dynamics == BUSY
    assert calls(b, D)[-1] != (ALICE.dynamics_user_id, AVAILABLE)


class DuringWrite(RecordingWriter):
    """A Dynamics writer that, before its next attempt commits, lets the bridge judge the webhook of
    an earlier change of the row (Dataverse's synchronous webhook is answered before the bridge's
    write of the same row commits), then raises the queued errors first, like ``RecordingWriter``."""

    def __init__(self, errors=(), system=D) -> None:
        super().__init__(system, errors)
        self.before: list = []

    async def apply(self, agent, value):
        if self.before:  # one per attempt
            await self.before.pop(0)()
        await super().apply(agent, value)


async def test_rule3_a_withdrawn_write_that_failed_in_flight_is_not_expected_back():
    """From the stateful test's counterexample: our override Busy is in flight when the agent's own
    DND is judged, so the write is no longer needed; then the attempt fails. It never landed, so a
    later Busy of the agent's own is their choice, not its echo (it was taken for the echo, kept DND
    as P, and the bridge wrote DND over the agent's last choice)."""
    from mapping.errors import RetryableError

    dynamics = DuringWrite([RetryableError("503")])
    b = make_bridge(writers={T: RecordingWriter(T), D: dynamics})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))  # override Busy queued

    async def agent_sets_dnd() -> None:
        await b.engine.observe(ev(ALICE, D, DND, b.clock.advance(1), 2, "AGENT"))

    dynamics.before.append(agent_sets_dnd)
    await b.outbox.drain()  # the agent's DND is judged during the Busy attempt, which then fails
    b.clock.advance(60)
    await b.outbox.drain()
    written = len(dynamics.calls)
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 5, "AGENT"))
    await b.outbox.drain()
    state = await state_of(b)
    assert state.own_dynamics == BUSY and state.chose_at == b.clock()
    assert dynamics.calls[written:] == []  # nothing written over the agent's last choice
    assert (ALICE.dynamics_user_id, BUSY) not in dynamics.calls  # the failed Busy is never retried


async def test_rule3_a_change_taken_for_the_echo_of_an_attempt_that_failed_is_the_agents_own():
    """From the stateful test's counterexample: the agent sets Busy while our override Busy is in
    flight, and their webhook is taken for its echo; then the attempt fails and waits for its retry.
    A write still pending cannot have echoed, so that Busy was the agent's own: the retry is ours and
    still expected, and when the agent then chooses Available it is withdrawn (it was written later,
    and its echo taken for the agent's choice of Busy)."""
    from mapping.errors import RetryableError

    dynamics = DuringWrite([RetryableError("503")])
    b = make_bridge(writers={T: RecordingWriter(T), D: dynamics})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))  # override Busy queued

    async def agent_sets_busy() -> None:
        taken = await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))
        assert taken.result is Result.ECHO  # indistinguishable from our echo so far

    dynamics.before.append(agent_sets_busy)
    await b.outbox.run_once()  # the agent's Busy is judged during the attempt, which then fails
    assert (await b.store.outbox_row(ALICE.dynamics_user_id, D)).status is OutboxStatus.PENDING
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(1), 3, "AGENT"))
    b.clock.advance(600)
    await b.outbox.drain()
    state = await state_of(b)
    assert state.own_dynamics == AVAILABLE and state.dynamics_unconfirmed == []
    assert dynamics.calls == []  # the retry of Busy was withdrawn


async def test_rule3_a_teams_change_after_an_attempt_failed_sees_the_agents_own_change():
    """From the stateful test's counterexample: as above, the agent's Busy is taken for the echo of
    our Busy whose attempt then fails; the next event is the person's call ending in Teams. The
    agent's Busy was their choice, made after the call began: Dynamics stays Busy (it was written
    Available, P as it stood before the agent's change)."""
    from mapping.errors import RetryableError

    dynamics = DuringWrite([RetryableError("503")])
    b = make_bridge(writers={T: RecordingWriter(T), D: dynamics})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))  # override Busy queued

    async def agent_sets_busy() -> None:
        await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(1), 2, "AGENT"))

    dynamics.before.append(agent_sets_busy)
    await b.outbox.run_once()  # the agent's Busy is judged during the attempt, which then fails
    out = await b.engine.observe(ev(ALICE, T, "Available/Available", b.clock.advance(1)))
    assert (D, AVAILABLE) not in writes(out)
    b.clock.advance(600)
    await b.outbox.drain()
    state = await state_of(b)
    assert state.own_dynamics == BUSY and state.chose_at is not None
    assert AVAILABLE not in [v for _, v in dynamics.calls]


async def test_rule3_a_change_taken_for_the_echo_of_a_write_never_acknowledged_is_the_agents_own(b):
    """From the stateful test's counterexample: the bot's Available is in flight when the agent's own
    Busy is judged (our write is superseded by Busy, what Dynamics shows), and the attempt fails. The
    agent then chooses Available while the superseding Busy is in flight: taken for the echo of our
    Available, which could still be on its way. Once Busy lands without Available ever acknowledged,
    Available never landed: that event was the agent's choice, and Dynamics is written Available."""
    from mapping.errors import RetryableError

    dynamics = DuringWrite()
    b = make_bridge(writers={T: RecordingWriter(T), D: dynamics})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1))
    await b.engine.observe(ev(ALICE, T, "Busy/InACall", b.clock.advance(30)))  # override Busy
    await b.outbox.drain()  # lands as v2
    await b.engine.observe(ev(ALICE, D, BUSY, b.clock.advance(0.1), 2, "AGENT"))  # its echo
    await b.engine.command(ALICE, AVAILABLE)
    dynamics.errors.append(RetryableError("503"))

    async def agent_sets(value: str, version: int) -> None:
        await b.engine.observe(ev(ALICE, D, value, b.clock.advance(1), version, "AGENT"))

    dynamics.before += [lambda: agent_sets(BUSY, 3), lambda: agent_sets(AVAILABLE, 4)]
    await b.outbox.drain()  # Available fails after the agent's Busy; Busy lands after their Available
    await b.outbox.drain()
    state = await state_of(b)
    assert state.own_dynamics == AVAILABLE
    assert dynamics.calls[-1] == (ALICE.dynamics_user_id, AVAILABLE)


async def test_rule3_a_session_whose_attempt_failed_is_not_an_older_session_still_showing(b):
    """From the stateful test's counterexample: routing frees the agent while our DND session is in
    flight, so a clear replaces it; the DND attempt then fails, and the clear lands. The failed session
    never showed, so a later report of that value is the person's own state, not an older session of
    ours still showing."""
    from mapping.errors import RetryableError

    teams = DuringWrite([RetryableError("503")], system=T)
    b = make_bridge(writers={T: teams, D: RecordingWriter(D)})
    await b.store.upsert_agents([ALICE])
    await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock(), 1, "SYSTEM"))
    await b.engine.observe(ev(ALICE, D, DND, b.clock.advance(1), 2, "SYSTEM"))  # session DND queued

    async def routing_frees() -> None:
        await b.engine.observe(ev(ALICE, D, AVAILABLE, b.clock.advance(1), 3, "SYSTEM"))  # clear queued

    teams.before.append(routing_frees)
    await b.outbox.drain()  # the DND session attempt fails after the clear replaced it; the clear lands
    assert teams.calls == [(ALICE.dynamics_user_id, CLEAR)]
    out = await b.engine.observe(ev(ALICE, T, "DoNotDisturb/Presenting", b.clock.advance(1)))
    assert writes(out) == [(D, DND)]  # the person's own Do not disturb asks Busy DND


async def test_rule3_a_replaced_sessions_value_notified_after_the_replacement_landed_is_read():
    """From the stateful sweeps (after the last fixes): a bot command's Away/Away session is written
    under the person's own Available (Teams keeps showing Available: nothing is notified); while the
    command's Dynamics write is in flight, the agent's own Available arrives, so the session is
    cleared, and the clear lands. Later the person goes Away in Teams: the notification carries the
    replaced session's value. It may be the old session still showing, or the person's own state: a
    read made now, after the clear landed, tells, and the Away it finds stops routing."""
    reads = ReadRecorder()

    class AgentActsDuringTheWrite(RecordingWriter):
        async def apply(self, agent, value):
            await super().apply(agent, value)
            if len(self.calls) == 1:  # Dataverse answers the agent's own change's webhook first
                await bridge.engine.observe(ev(ALICE, D, AVAILABLE, bridge.clock.advance(0.1), 2, "AGENT"))

    bridge = make_bridge(writers={D: AgentActsDuringTheWrite(D), T: RecordingWriter(T)}, reads=reads)
    await bridge.store.upsert_agents([ALICE])
    await bridge.engine.observe(ev(ALICE, D, AVAILABLE, bridge.clock(), 1))
    await bridge.engine.observe(ev(ALICE, T, "Available/Available", bridge.clock()))
    await settle(bridge)
    bridge.clock.advance(1.3)
    await bridge.engine.command(ALICE, AWAY)
    await settle(bridge)
    for value in calls(bridge, D):  # the echoes of our writes
        await bridge.engine.observe(
            ev(ALICE, D, value[1], bridge.clock.advance(0.1), 3 + calls(bridge, D).index(value), "AGENT")
        )
    await settle(bridge)
    assert calls(bridge, T)[-1] == (ALICE.dynamics_user_id, CLEAR)
    reads.asked.clear()
    await bridge.engine.observe(ev(ALICE, T, "Away/Away", bridge.clock.advance(1.2)))
    assert reads.asked == [(T, ALICE.dynamics_user_id)]
    found = await bridge.engine.observe(read_now(ALICE, "Away/Away", bridge.clock.advance(0.1)))
    assert writes(found) == [(D, AWAY)]
