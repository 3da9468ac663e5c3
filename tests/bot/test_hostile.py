"""Hostile activities are refused as bad input, never as a 503 the Bot Connector would resend."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot.teams import ROUTE
from tests.bot.conftest import Harness
from tests.support import ALICE


@pytest.mark.parametrize("aad", ["x\x00y", "0a1b2c3d-" * 40, "not-a-guid", "'; drop table agents;--"], ids=repr)
async def test_a_sender_id_that_is_not_an_entra_object_id_is_400(harness: Harness, aad: Any) -> None:
    status, body = await harness.post(harness.activity(None, text="busy", aad_object_id=aad))
    assert status == 400 and "aadObjectId" in json.loads(body)["error"]
    assert harness.telemetry.rejections[(ROUTE, "malformed")] == 1
    assert await harness.bridge.store.list_unknown() == []  # nothing recorded for an id naming nobody
    assert (await harness.say("busy", agent=ALICE)).text.startswith("Done")  # and the bot goes on
