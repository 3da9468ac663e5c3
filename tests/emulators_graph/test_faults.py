"""Fault injection and throttling, and the request log the demo and the tests read."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from emulators.graph import GraphEmulator
from tests.emulators_graph.conftest import ALICE, BOB, CLIENT_ID, SUB_A, Clock, Graph, Receiver


async def test_fail_next_429_with_retry_after(emu: GraphEmulator, graph: Graph) -> None:
    emu.fail_next(2, status=429, retry_after=7)
    for _ in range(2):
        status, body, headers = await graph.call("GET", f"/users/{ALICE}/presence")
        assert status == 429
        assert headers["Retry-After"] == "7"
        assert body["error"]["code"] == "TooManyRequests"
        assert body["error"]["innerError"]["request-id"]
    assert (await graph.get(f"/users/{ALICE}/presence"))[0] == 200


@pytest.mark.parametrize(
    ("status", "code", "retry_header"),
    [
        (503, "ServiceUnavailable", True),
        (500, "InternalServerError", False),
        (502, "BadGateway", False),
        (403, "Forbidden", False),
    ],
)
async def test_fail_next_other_statuses(
    emu: GraphEmulator, graph: Graph, status: int, code: str, retry_header: bool
) -> None:
    emu.fail_next(1, status=status, retry_after=3)
    got, body, headers = await graph.call(
        "POST",
        f"/users/{ALICE}/presence/setPresence",
        {"sessionId": CLIENT_ID, "availability": "Busy", "activity": "InACall"},
    )
    assert got == status and body["error"]["code"] == code
    assert ("Retry-After" in headers) is retry_header
    assert emu.sessions_of(ALICE) == {}  # the failed call changed nothing


async def test_fail_next_only_on_given_paths(emu: GraphEmulator, graph: Graph) -> None:
    emu.fail_next(1, status=503, paths=["setPresence"])
    assert (await graph.get(f"/users/{ALICE}/presence"))[0] == 200
    assert (await graph.set_presence(ALICE, "Busy", "InACall"))[0] == 503
    assert (await graph.set_presence(ALICE, "Busy", "InACall"))[0] == 200


async def test_fail_next_on_subscriptions(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    emu.fail_next(1, status=500, paths="/subscriptions")
    assert (await graph.subscribe(receiver))[0] == 500
    assert receiver.validation_requests == []
    assert (await graph.subscribe(receiver))[0] == 201


async def test_latency(emu: GraphEmulator, graph: Graph) -> None:
    emu.latency(0.3)
    started = time.monotonic()
    assert (await graph.get(f"/users/{ALICE}/presence"))[0] == 200
    assert time.monotonic() - started >= 0.3
    emu.latency(0)
    started = time.monotonic()
    await graph.get(f"/users/{ALICE}/presence")
    assert time.monotonic() - started < 0.3


async def test_throttle_for(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    emu.throttle_for(60)
    status, _, headers = await graph.call("POST", "/communications/getPresencesByUserId", {"ids": [ALICE]})
    assert status == 429 and headers["Retry-After"] == "60"
    assert (await graph.set_presence(ALICE, "Busy", "InACall"))[0] == 429
    assert (await graph.subscribe(receiver))[0] == 201  # subscriptions are not presence calls
    emu.advance(45)
    _, _, headers = await graph.call("GET", f"/users/{ALICE}/presence")
    assert headers["Retry-After"] == "15"
    emu.advance(15)
    assert (await graph.get(f"/users/{ALICE}/presence"))[0] == 200


async def test_throttle_for_with_fixed_retry_after(emu: GraphEmulator, graph: Graph) -> None:
    emu.throttle_for(60, retry_after=2)
    _, _, headers = await graph.call("GET", f"/users/{ALICE}/presence")
    assert headers["Retry-After"] == "2"
    emu.clear_faults()
    assert (await graph.get(f"/users/{ALICE}/presence"))[0] == 200


async def test_presence_rate_limit(emu: GraphEmulator, graph: Graph) -> None:
    emu.presence_rate_limit = (3, 30.0)
    for _ in range(3):
        assert (await graph.get(f"/users/{ALICE}/presence"))[0] == 200
    status, body, headers = await graph.call("GET", f"/users/{BOB}/presence")
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert "3 requests per 30 s" in body["error"]["message"]


async def test_request_log(emu: GraphEmulator, graph: Graph) -> None:
    await graph.set_presence(ALICE, "Busy", "InACall")
    await graph.get(f"/users/{BOB}/presence", token=SUB_A)
    await graph.get(f"/users/{BOB}/presence", token="nope")
    first, second, third = emu.requests
    assert (first.method, first.path, first.status, first.account) == (
        "POST",
        f"/v1.0/users/{ALICE}/presence/setPresence",
        200,
        None,
    )
    assert first.body == {
        "sessionId": CLIENT_ID,
        "availability": "Busy",
        "activity": "InACall",
        "expirationDuration": "PT1H",
    }
    assert (second.status, second.account) == (200, "subscriber-a@contoso.example")
    assert third.status == 401
    assert [r.path for r in emu.calls("POST", "setPresence")] == [first.path]
    assert first.at == emu.now()


async def test_emulator_answers_client_request_id(graph: Graph) -> None:
    _, body, headers = await graph.call("GET", "/users/nobody/presence", headers={"client-request-id": "abc-123"})
    assert headers["request-id"] == "abc-123"
    assert body["error"]["innerError"]["client-request-id"] == "abc-123"


async def test_background_tick_applies_expiry(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, clock: Clock
) -> None:
    """Without ``advance()``: the background tick notices a session that ran out on the injected
    clock and notifies the change, as Graph does when a session lapses."""
    await graph.subscribe(receiver, [ALICE])
    emu.set_user_state(ALICE, "Offline", "Offline")
    await graph.set_presence(ALICE, "Busy", "InACall", duration="PT5M")
    await emu.wait_idle()
    assert [decoded(i) for i in receiver.items()] == [ALICE, ALICE]
    clock.now += timedelta(minutes=6)
    deadline = time.monotonic() + 5
    while len(receiver.items()) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(receiver.items()) == 3
    assert emu.presence_of(ALICE) == ("Offline", "Offline")


def decoded(item: dict[str, Any]) -> str:
    return str(item["resourceData"]["id"])
