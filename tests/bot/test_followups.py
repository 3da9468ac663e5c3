"""Honest replies when an upstream is throttled or down, and the proactive follow-ups that keep the
promise: "queued" now, then "applied" or "failed" in the same chat when the outbox settles the row.
The bridge's clock is frozen, so a retry happens exactly when a test advances it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from bot.commands import PendingChange
from bot.followups import CONVERSATION_KIND, FOLLOWUP_KIND, FollowUps, followup_key
from mapping.errors import PermanentError, RetryableError, Throttled
from mapping.model import OutboxStatus, System
from mapping.retry import RetryPolicy
from tests.bot.conftest import Harness, MakeHarness
from tests.support import ALICE, AWAY, BUSY, RecordingWriter

pytestmark = pytest.mark.slow

THROTTLED = Throttled("Dataverse throttled the presence change for Alice (429); retry after 30 s", retry_after=30)
DOWN = RetryableError("Dataverse answered 503 Service Unavailable for Alice's presence change")
REFUSED = PermanentError("Dataverse answered 400: presence 'Busy' is not allowed for Alice's profile")


def _followups(h: Harness, since: int) -> list[str]:
    return [s.text for s in h.connector.messages()[since:] if s.text.startswith("Update:")]


async def _wait_followup(h: Harness, since_sent: int) -> str:
    found = await h.connector.wait_for(
        lambda s: s.type == "message" and s.text.startswith("Update:"), timeout=5, since=since_sent
    )
    return found.text


async def test_throttled_change_is_reported_queued_then_followed_up_when_it_lands(make_harness: MakeHarness) -> None:
    h = await make_harness(
        writers={
            System.DYNAMICS: RecordingWriter(System.DYNAMICS, [THROTTLED]),
            System.TEAMS: RecordingWriter(System.TEAMS),
        },
        settle_seconds=0.5,
    )
    reply = await h.say("busy")
    # Never a false confirmation: Dynamics 365 has not applied it, and the reply says why.
    assert "Done" not in reply.text
    assert "your change to **Busy** is **queued**" in reply.text
    assert f"Dynamics 365: queued, not applied yet: {THROTTLED.message}." in reply.text
    assert "I'll message you here when the queued change lands" in reply.text
    assert h.writers[System.DYNAMICS].calls == []
    assert await h.bridge.store.get_doc(FOLLOWUP_KIND, followup_key(ALICE.dynamics_user_id, System.DYNAMICS))

    sent_before = len(h.connector.sent)
    h.clock.advance(31)  # Retry-After has passed
    await h.settle()
    text = await _wait_followup(h, sent_before)
    assert text == "Update: your change to **Busy** is now applied in Dynamics 365."
    assert h.writers[System.DYNAMICS].calls == [(ALICE.dynamics_user_id, BUSY)]
    follow = h.connector.sent[-1]
    # Proactive: into Alice's own conversation, not a reply to anything she sent.
    assert follow.conversation_id == h.posted[-1]["conversation"]["id"]
    assert follow.reply_to_id != h.posted[-1]["id"]
    assert await h.bridge.store.list_docs(FOLLOWUP_KIND) == {}


async def test_a_change_that_finally_fails_is_followed_up_with_the_reason(make_harness: MakeHarness) -> None:
    h = await make_harness(
        writers={
            System.DYNAMICS: RecordingWriter(System.DYNAMICS, [DOWN, REFUSED]),
            System.TEAMS: RecordingWriter(System.TEAMS),
        },
        settle_seconds=0.5,
    )
    reply = await h.say("busy")
    assert "**queued**" in reply.text and DOWN.message in reply.text

    sent_before = len(h.connector.sent)
    h.clock.advance(5)
    await h.settle()
    text = await _wait_followup(h, sent_before)
    assert text.startswith("Update: your change to **Busy** could **not** be applied in Dynamics 365: ")
    assert REFUSED.message in text
    row = await h.bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.status is OutboxStatus.DEAD
    assert await h.bridge.store.list_docs(FOLLOWUP_KIND) == {}


async def test_retries_exhausted_count_as_finally_failed(make_harness: MakeHarness) -> None:
    h = await make_harness(
        writers={
            System.DYNAMICS: RecordingWriter(System.DYNAMICS, [DOWN] * 3),
            System.TEAMS: RecordingWriter(System.TEAMS),
        },
        policy=RetryPolicy(jitter=False, max_attempts=3, dead_letter_after_seconds=0),
        settle_seconds=0.3,
    )
    await h.say("away")
    sent_before = len(h.connector.sent)
    for _ in range(3):
        h.clock.advance(10)
        await h.settle()
    text = await _wait_followup(h, sent_before)
    assert "could **not** be applied in Dynamics 365" in text and DOWN.message in text
    assert len(_followups(h, 0)) == 1


async def test_a_permanent_refusal_inside_the_wait_is_reported_at_once_without_a_follow_up(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(
        writers={
            System.DYNAMICS: RecordingWriter(System.DYNAMICS, [REFUSED]),
            System.TEAMS: RecordingWriter(System.TEAMS),
        }
    )
    reply = await h.say("busy")
    assert "I could **not** set you to **Busy**" in reply.text
    assert f"Dynamics 365 refused the change: {REFUSED.message}." in reply.text
    assert await h.bridge.store.list_docs(FOLLOWUP_KIND) == {}
    # Dynamics 365 still shows what it had: the reply reads it, it does not assume.
    assert "Dynamics 365: unknown right now" in reply.text or "Dynamics 365 shows" in reply.text


async def test_teams_throttled_after_dynamics_applied_says_exactly_that(make_harness: MakeHarness) -> None:
    graph_429 = Throttled("Graph throttled setPresence for Alice (429); retry after 20 s", retry_after=20)
    h = await make_harness(
        writers={
            System.DYNAMICS: RecordingWriter(System.DYNAMICS),
            System.TEAMS: RecordingWriter(System.TEAMS, [graph_429]),
        },
        settle_seconds=0.5,
    )
    reply = await h.say("dnd")
    assert reply.text.startswith("Alice, Dynamics 365 has you as **Do not disturb**; Teams hasn't followed yet.")
    assert f"Teams: queued, not applied yet: {graph_429.message}." in reply.text
    sent_before = len(h.connector.sent)
    h.clock.advance(21)
    await h.settle()
    text = await _wait_followup(h, sent_before)
    assert text == (
        "Update: Teams now follows your change to **Do not disturb**: the bridge's Teams status is "
        "Do not disturb (presenting)."
    )


async def test_a_newer_change_replaces_the_promise_and_the_follow_up_says_what_landed(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(
        writers={
            System.DYNAMICS: RecordingWriter(System.DYNAMICS, [THROTTLED, THROTTLED]),
            System.TEAMS: RecordingWriter(System.TEAMS),
        },
        settle_seconds=0.3,
    )
    await h.say("busy")
    h.clock.advance(31)
    await h.settle()  # second try throttled again: still queued, no follow-up yet
    second = await h.say("away")
    assert "**queued**" in second.text
    docs = await h.bridge.store.list_docs(FOLLOWUP_KIND)
    assert [d["value"] for d in docs.values()] == [AWAY]
    sent_before = len(h.connector.sent)
    h.clock.advance(31)
    await h.settle()
    text = await _wait_followup(h, sent_before)
    assert text == "Update: your change to **Away** is now applied in Dynamics 365."
    await asyncio.sleep(0.1)
    assert len(_followups(h, 0)) == 1  # one promise, one follow-up


class _Sender:
    def __init__(self, failures: int = 0) -> None:
        self.sent: list[tuple[Mapping[str, Any], str]] = []
        self.failures = failures

    async def send(self, reference: Mapping[str, Any], text: str) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Bot Connector unreachable")
        self.sent.append((reference, text))


async def test_outcomes_survive_a_restart_and_are_sent_by_the_sweep(harness: Harness) -> None:
    """The outcome is recorded before sending; a process that dies before the send leaves it for the
    next instance's sweep, which also finds rows that settled where no listener saw them."""
    bridge = harness.bridge
    await bridge.store.put_doc(CONVERSATION_KIND, ALICE.dynamics_user_id, {"conversation": {"id": "a:1"}})
    # Row delivered while no bot was listening (another instance, or before the promise was stored).
    async with bridge.store.transaction() as tx:
        from mapping.model import SetPresence

        await tx.enqueue(SetPresence(ALICE.dynamics_user_id, System.DYNAMICS, BUSY), bridge.clock())
    await bridge.outbox.drain()
    row = await bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.status is OutboxStatus.DELIVERED

    dead_process = FollowUps(bridge, sender=None)  # recorded, cannot send
    await bridge.store.put_doc(
        FOLLOWUP_KIND,
        followup_key(ALICE.dynamics_user_id, System.DYNAMICS),
        {
            "agent_id": ALICE.dynamics_user_id,
            "system": "dynamics",
            "generation": row.generation,
            "value": BUSY,
            "label": "Busy",
            "outcome": None,
            "send_attempts": 0,
        },
    )
    assert await dead_process.sweep() == 1
    await dead_process.drain()
    assert (await bridge.store.list_docs(FOLLOWUP_KIND))[followup_key(ALICE.dynamics_user_id, System.DYNAMICS)][
        "outcome"
    ] == "delivered"

    sender = _Sender()
    restarted = FollowUps(bridge, sender)
    await restarted.sweep()
    await restarted.drain()
    assert [t for _, t in sender.sent] == ["Update: your change to **Busy** is now applied in Dynamics 365."]
    assert sender.sent[0][0] == {"conversation": {"id": "a:1"}}
    assert await bridge.store.list_docs(FOLLOWUP_KIND) == {}


async def test_a_follow_up_the_connector_refuses_is_retried_then_dropped(harness: Harness) -> None:
    bridge = harness.bridge
    await bridge.store.put_doc(CONVERSATION_KIND, ALICE.dynamics_user_id, {"conversation": {"id": "a:1"}})
    key = followup_key(ALICE.dynamics_user_id, System.TEAMS)
    doc = {
        "agent_id": ALICE.dynamics_user_id,
        "system": "teams",
        "generation": 1,
        "value": "Away/Away",
        "label": "Away",
        "outcome": "dead",
        "error": "Graph answered 403",
        "send_attempts": 0,
    }

    sender = _Sender(failures=1)
    f = FollowUps(bridge, sender)
    await bridge.store.put_doc(FOLLOWUP_KIND, key, doc)
    await f.sweep()
    await f.drain()
    assert sender.sent == [] and (await bridge.store.get_doc(FOLLOWUP_KIND, key) or {})["send_attempts"] == 1
    await f.sweep()
    await f.drain()
    assert [t for _, t in sender.sent] == [
        "Update: Teams could **not** be updated to follow your change to **Away**: Graph answered 403. "
        "Dynamics 365 is not affected; type **status** to see what each shows."
    ]

    always = _Sender(failures=99)
    g = FollowUps(bridge, always)
    await bridge.store.put_doc(FOLLOWUP_KIND, key, doc)
    for _ in range(5):
        await g.sweep()
        await g.drain()
    assert await bridge.store.get_doc(FOLLOWUP_KIND, key) is None


async def test_a_promise_made_after_the_row_already_settled_is_kept_at_once(harness: Harness) -> None:
    bridge = harness.bridge
    await bridge.store.put_doc(CONVERSATION_KIND, ALICE.dynamics_user_id, {"conversation": {"id": "a:1"}})
    async with bridge.store.transaction() as tx:
        from mapping.model import SetPresence

        await tx.enqueue(SetPresence(ALICE.dynamics_user_id, System.DYNAMICS, AWAY), bridge.clock())
    await bridge.outbox.drain()
    row = await bridge.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None
    sender = _Sender()
    f = FollowUps(bridge, sender)
    await f.expect([PendingChange(ALICE.dynamics_user_id, System.DYNAMICS, row.generation, AWAY, "Away")])
    await f.drain()
    assert [t for _, t in sender.sent] == ["Update: your change to **Away** is now applied in Dynamics 365."]


async def test_an_older_generation_settling_does_not_trigger_the_newer_promise(harness: Harness) -> None:
    from mapping.model import Delivery

    bridge = harness.bridge
    sender = _Sender()
    f = FollowUps(bridge, sender)
    key = followup_key(ALICE.dynamics_user_id, System.DYNAMICS)
    await bridge.store.put_doc(
        FOLLOWUP_KIND,
        key,
        {
            "agent_id": ALICE.dynamics_user_id,
            "system": "dynamics",
            "generation": 3,
            "value": AWAY,
            "label": "Away",
            "outcome": None,
            "send_attempts": 0,
        },
    )
    await f.on_outcome(Delivery(1, ALICE.dynamics_user_id, System.DYNAMICS, BUSY, 2, 0, "t"), "delivered", None)
    await f.drain()
    assert sender.sent == []
    assert (await bridge.store.get_doc(FOLLOWUP_KIND, key) or {})["outcome"] is None


async def test_asking_again_after_a_refusal_retries_instead_of_claiming_it_is_already_set(
    make_harness: MakeHarness,
) -> None:
    """The core still remembers the refused write as what it last decided; a second request for the
    same presence must not be answered "already Busy" while Dynamics 365 shows something else."""
    h = await make_harness(
        writers={
            System.DYNAMICS: RecordingWriter(System.DYNAMICS, [REFUSED]),
            System.TEAMS: RecordingWriter(System.TEAMS),
        }
    )
    first = await h.say("busy")
    assert "could **not**" in first.text
    again = await h.say("busy")
    assert "already" not in again.text
    assert again.text.startswith("Done, Alice: you're **Busy**.")
    assert h.writers[System.DYNAMICS].calls == [(ALICE.dynamics_user_id, BUSY)]


async def test_a_queued_teams_clear_is_followed_up_as_teams_showing_the_own_status(make_harness: MakeHarness) -> None:
    h = await make_harness(settle_seconds=0.5)
    await h.say("busy")
    h.writers[System.TEAMS].errors.append(Throttled("Graph throttled clearPresence for Alice (429)", retry_after=10))
    reply = await h.say("offline")
    assert "Teams: queued, not applied yet: Graph throttled clearPresence for Alice (429)." in reply.text
    sent_before = len(h.connector.sent)
    h.clock.advance(11)
    await h.settle()
    assert await _wait_followup(h, sent_before) == (
        "Update: Teams now follows your change to **Offline**: it shows your own status again."
    )
