"""One bad follow-up document never stops the follow-up book: it is handed to ``on_poison`` and taken
out, and the sweep goes on with the others."""

from __future__ import annotations

from typing import Any

import pytest

from bot.followups import FOLLOWUP_KIND, followup_key, malformed
from mapping.model import System
from tests.bot.conftest import Harness
from tests.support import ALICE, BUSY


class Poisoned(list[tuple[str, str, bytes, str]]):
    async def __call__(self, route: str, reason: str, body: bytes, detail: str) -> None:
        self.append((route, reason, body, detail))


def _recorded(generation: int = 1) -> dict[str, Any]:
    """An outcome recorded but never sent (the process stopped between the two)."""
    return {
        "agent_id": ALICE.dynamics_user_id,
        "system": "dynamics",
        "generation": generation,
        "value": BUSY,
        "label": "Busy",
        "queued_at": "2026-11-25T09:00:00+00:00",
        "outcome": "delivered",
        "error": None,
        "landed_value": BUSY,
        "send_attempts": 0,
    }


@pytest.mark.parametrize(
    "broken",
    [
        {"agent_id": ALICE.dynamics_user_id, "system": "fax", "generation": 1, "outcome": None},
        {"agent_id": ALICE.dynamics_user_id, "system": "dynamics", "generation": "one", "outcome": None},
        {"system": "teams", "generation": 1, "outcome": "delivered"},
        {"agent_id": ALICE.dynamics_user_id, "system": "teams", "generation": 1, "outcome": "maybe"},
    ],
    ids=["unknown-system", "generation-not-a-number", "no-agent", "unknown-outcome"],
)
async def test_a_malformed_followup_is_handed_off_and_the_sweep_goes_on(harness: Harness, broken: Any) -> None:
    poisoned = Poisoned()
    followups = harness.intake.followups
    followups.on_poison = poisoned
    await harness.say("status")  # Alice's conversation is known
    store = harness.bridge.store
    await store.put_doc(FOLLOWUP_KIND, "0-broken", broken)  # sorted first: checked before the good one
    await store.put_doc(FOLLOWUP_KIND, followup_key(ALICE.dynamics_user_id, System.DYNAMICS), _recorded())
    since = len(harness.connector.sent)
    assert await followups.sweep() == 1
    found = await harness.connector.wait_for(
        lambda s: s.type == "message" and s.text.startswith("Update:"), timeout=5, since=since
    )
    assert found.text == "Update: your change to **Busy** is now applied in Dynamics 365."
    await followups.drain()
    assert await store.list_docs(FOLLOWUP_KIND) == {}
    ((route, reason, body, detail),) = poisoned
    assert (route, reason) == ("bot_followups", "malformed_followup") and b"0-broken" in body
    assert "cannot be sent" in detail


async def test_a_followup_whose_check_fails_is_left_for_the_next_sweep(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    followups = harness.intake.followups
    store = harness.bridge.store
    queued = {**_recorded(), "outcome": None, "landed_value": None}
    await store.put_doc(FOLLOWUP_KIND, "0-first", {**queued, "agent_id": "0-first"})
    await store.put_doc(FOLLOWUP_KIND, followup_key(ALICE.dynamics_user_id, System.DYNAMICS), queued)
    real = harness.bridge.delivery
    asked: list[str] = []

    async def delivery(agent_id: str, system: System) -> Any:
        asked.append(agent_id)
        if agent_id == "0-first":
            raise ConnectionError("store connection reset")
        return await real(agent_id, system)

    monkeypatch.setattr(harness.bridge, "delivery", delivery)
    assert await followups.sweep() == 0
    assert asked == ["0-first", ALICE.dynamics_user_id]  # the failure did not stop the sweep
    assert "0-first" in await store.list_docs(FOLLOWUP_KIND)  # not an item's own fault: kept


def test_malformed_says_why() -> None:
    assert malformed(_recorded()) is None
    assert malformed([]) == "not a JSON object"
    assert malformed({**_recorded(), "generation": True}) == "generation is not a number"
