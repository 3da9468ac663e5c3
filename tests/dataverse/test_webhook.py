"""``POST /api/dataverse/webhook`` through a real aiohttp server: the key, unusable bodies answered 2xx
and quarantined with their reason (the step is synchronous: a refusal fails the agent's own change),
413 over 1 MiB, the durable write before the 200, unknown and new agents, and no upstream call while
Dataverse waits for the answer."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dataverse.client import DataverseClient
from dataverse.webhook import KEY_HEADER, PENDING_KIND
from emulators.dataverse import DataverseEmulator
from mapping.bridge import Bridge
from mapping.memory import MemoryStore
from mapping.model import Agent, System
from tests.dataverse.conftest import KEY, Served, seed, seed_bytes, serve_intake
from tests.support import ALICE, AVAILABLE, BOB, BUSY, OFFLINE, RecordingTelemetry

ROUTE = "dataverse_webhook"
JSON = {"Content-Type": "application/json"}


def update(
    presence: str = BUSY, *, agent: Agent = ALICE, row_version: int = 5948260, modified_by: str = "AGENT"
) -> bytes:
    """The update seed for ``agent`` with ``presence`` (the parent context dropped so only the target speaks)."""
    ctx = seed("update-presence")
    ctx["ParentContext"] = None
    target = ctx["InputParameters"][0]["value"]
    target["RowVersion"] = str(row_version)
    for pair in target["Attributes"]:
        if pair["key"] == "msdyn_currentpresenceid":
            pair["value"]["Id"] = presence
        elif pair["key"] == "msdyn_agentid":
            pair["value"]["Id"] = agent.dynamics_user_id
        elif pair["key"] == "msdyn_presencemodifiedby":
            pair["value"] = modified_by
    return json.dumps(ctx).encode()


async def post(
    http: aiohttp.ClientSession,
    served: Served,
    body: bytes,
    *,
    key: str | None = KEY,
    via: str = "query",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    params = {"code": key} if key is not None and via == "query" else {}
    hdrs = dict(JSON if headers is None else headers)
    if key is not None and via == "header":
        hdrs[KEY_HEADER] = key
    skip = () if "Content-Type" in hdrs else ("Content-Type",)  # else aiohttp says application/octet-stream
    async with http.post(served.url, data=body, params=params, headers=hdrs, skip_auto_headers=skip) as r:
        assert r.content_type == "application/json", await r.text()
        return r.status, await r.json()


@pytest.fixture
async def known(bridge: Bridge) -> Bridge:
    await bridge.store.upsert_agents([ALICE])
    return bridge


# ---------------------------------------------------------------------------------------------- the key


async def test_missing_key_is_401(
    served: Served, http: aiohttp.ClientSession, known: Bridge, telemetry: RecordingTelemetry
) -> None:
    status, body = await post(http, served, seed_bytes("update-presence"), key=None)
    assert status == 401
    assert body == {"error": f"missing webhook key: send ?code=<key> or header {KEY_HEADER}"}
    assert telemetry.rejections[(ROUTE, "unauthenticated")] == 1
    assert (await known.store.load_states([ALICE.dynamics_user_id])) == {}


@pytest.mark.parametrize("via", ["query", "header"])
async def test_wrong_key_is_401(served: Served, http: aiohttp.ClientSession, known: Bridge, via: str) -> None:
    status, body = await post(http, served, seed_bytes("update-presence"), key=KEY + "x", via=via)
    assert (status, body) == (401, {"error": "wrong webhook key"})
    assert await known.store.outbox_row(ALICE.dynamics_user_id, System.TEAMS) is None


@pytest.mark.parametrize("via", ["query", "header"])
async def test_key_by_query_or_header(served: Served, http: aiohttp.ClientSession, known: Bridge, via: str) -> None:
    status, body = await post(http, served, seed_bytes("update-presence"), via=via)
    assert status == 200, body
    assert body["status"] == "recorded"


async def test_no_key_configured_accepts_loopback_but_not_a_proxied_call(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    await bridge.store.upsert_agents([ALICE])
    served = await serve_intake(bridge, key="")
    try:
        status, _ = await post(http, served, seed_bytes("update-presence"), key=None)
        assert status == 200
        status, body = await post(
            http, served, seed_bytes("update-presence"), key=None, headers={**JSON, "X-Forwarded-For": "203.0.113.9"}
        )
        assert status == 401 and "loopback" in body["error"]
    finally:
        await served.close()


# ---------------------------------------------------------------------------------------------- bad input


def quarantined(status: int, body: dict[str, Any], reason: str) -> int:
    """Asserts the answer is the quarantine's 202 with ``reason``; returns the item id."""
    assert status == 202, body
    assert body["status"] == "quarantined" and body["reason"] == reason, body
    assert "left to the sweep" in body["next"]
    return int(body["id"])


async def test_malformed_json_is_quarantined_with_the_reason(
    served: Served, http: aiohttp.ClientSession, bridge: Bridge, telemetry: RecordingTelemetry
) -> None:
    status, body = await post(http, served, b'{"MessageName": "Update",')
    first = quarantined(status, body, "invalid_json")
    assert body["detail"].startswith("body is not JSON: Expecting property name")
    status, body = await post(http, served, b"   ")
    quarantined(status, body, "not_json")
    assert body["detail"] == "empty body; expected a RemoteExecutionContext JSON object"
    status, body = await post(http, served, b"\xff\xfe{}")
    last = quarantined(status, body, "invalid_json")
    assert telemetry.quarantines[(ROUTE, "invalid_json")] == 2
    assert telemetry.quarantines[(ROUTE, "not_json")] == 1
    assert not telemetry.rejections
    item = await bridge.quarantine.get_quarantined(first)
    assert item is not None and item.body == b'{"MessageName": "Update",' and item.route == ROUTE
    assert item.reason == "invalid_json" and item.size == len(b'{"MessageName": "Update",')
    stored = await bridge.quarantine.get_quarantined(last)
    assert stored is not None and stored.body == b"\xff\xfe{}"  # kept as received, bytes and all


async def test_malformed_context_is_quarantined_with_the_parsers_reason(
    served: Served, http: aiohttp.ClientSession, bridge: Bridge, telemetry: RecordingTelemetry
) -> None:
    status, body = await post(http, served, b"[]")
    quarantined(status, body, "not_context")
    assert body["detail"] == (
        "not a usable msdyn_agentstatus context: body is an array; expected a RemoteExecutionContext JSON object"
    )
    ctx = seed("update-presence")
    ctx["MessageName"] = "Delete"
    status, body = await post(http, served, json.dumps(ctx).encode())
    quarantined(status, body, "unknown_message")
    assert "MessageName 'Delete' is not handled" in body["detail"]
    assert await bridge.quarantine.quarantine_count() == 2
    assert not telemetry.rejections


def _with(ctx: dict[str, Any], key: str, value: Any) -> bytes:
    """The update seed with the Target attribute ``key`` set to ``value`` (removed for ``None``)."""
    ctx["ParentContext"] = None
    target = ctx["InputParameters"][0]["value"]
    target["Attributes"] = [p for p in target["Attributes"] if p["key"] != key]
    if value is not None:
        target["Attributes"].append({"key": key, "value": value})
    return json.dumps(ctx).encode()


def _unusable_bodies() -> list[tuple[str, bytes, str]]:
    deep = seed("update-presence")
    level: dict[str, Any] = deep
    for _ in range(12):
        level["ParentContext"] = {"MessageName": "Update"}
        level = level["ParentContext"]
    no_agent = seed("update-presence")
    no_agent["ParentContext"] = None
    no_agent["PostEntityImages"] = []
    superscript = seed("update-presence")
    superscript["InputParameters"][0]["value"]["RowVersion"] = "\u00b2"  # a digit, not a decimal one
    return [
        ("invalid JSON", b'{"MessageName": ', "invalid_json"),
        ("an empty body", b"", "not_json"),
        ("a lone surrogate", b'{"MessageName": "\\ud800"}', "invalid_json"),
        ("nested past the JSON parser", b"[" * 5000 + b"]" * 5000, "too_deep"),
        ("ParentContext nested too deeply", json.dumps(deep).encode(), "too_deep"),
        ("null", b"null", "not_context"),
        ("a number", b"0", "not_context"),
        ("an empty object", b"{}", "not_context"),
        ("a Delete", json.dumps({**seed("update-presence"), "MessageName": "Delete"}).encode(), "unknown_message"),
        (
            "another entity",
            json.dumps({**seed("update-presence"), "PrimaryEntityName": "account"}).encode(),
            "unknown_message",
        ),
        (
            "a date it does not know",
            _with(seed("update-presence"), "msdyn_presencemodifiedon", "2024-08-02"),
            "bad_date",
        ),
        ("an Update without the agent", _with(no_agent, "msdyn_agentid", None), "no_agent"),
        (
            "a Target of the wrong shape",
            b'{"MessageName": "Update", "InputParameters": [{"key": "Target", "value": {}}]}',
            "unknown_shape",
        ),
        ("NUL bytes", b"\x00" * 10, "invalid_json"),
        ("a RowVersion of a superscript digit", json.dumps(superscript).encode(), "unknown_shape"),
    ]


@pytest.mark.parametrize(("what", "raw", "reason"), _unusable_bodies(), ids=[w for w, _, _ in _unusable_bodies()])
async def test_every_unusable_body_with_the_right_key_is_2xx_and_quarantined(
    served: Served,
    http: aiohttp.ClientSession,
    known: Bridge,
    telemetry: RecordingTelemetry,
    what: str,
    raw: bytes,
    reason: str,
) -> None:
    status, body = await post(http, served, raw)
    item_id = quarantined(status, body, reason)
    item = await known.quarantine.get_quarantined(item_id)
    assert item is not None, what
    assert (item.route, item.reason, item.size, item.body) == (ROUTE, reason, len(raw), raw)
    assert item.detail == body["detail"]
    assert telemetry.quarantines == {(ROUTE, reason): 1}
    assert not telemetry.rejections
    assert await known.store.load_states([ALICE.dynamics_user_id]) == {}


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_not_json_content_type_is_quarantined(
    served: Served, http: aiohttp.ClientSession, bridge: Bridge, telemetry: RecordingTelemetry, ctype: str | None
) -> None:
    headers = {} if ctype is None else {"Content-Type": ctype}
    status, body = await post(http, served, seed_bytes("update-presence"), headers=headers)
    item_id = quarantined(status, body, "not_json")
    assert body["detail"].startswith(f"content type {ctype or 'none'!r}")
    item = await bridge.quarantine.get_quarantined(item_id)
    assert item is not None and item.body == seed_bytes("update-presence")
    assert telemetry.quarantines[(ROUTE, "not_json")] == 1


async def test_the_key_is_never_stored_with_a_quarantined_body(
    served: Served, http: aiohttp.ClientSession, bridge: Bridge
) -> None:
    raw = ('{"MessageName": "Update", "echo": "' + KEY + '", "url": "https://x/?code=' + KEY + '"').encode()
    status, body = await post(http, served, raw, via="header")
    item = await bridge.quarantine.get_quarantined(quarantined(status, body, "invalid_json"))
    assert item is not None
    assert KEY.encode() not in item.body and KEY not in item.detail
    assert item.body.startswith(b'{"MessageName": "Update", "echo": "**')
    assert item.size == len(raw)


async def test_the_quarantine_is_bounded_oldest_dropped_first(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    assert isinstance(bridge.store, MemoryStore)
    bridge.store.quarantine_max_items = 3
    served = await serve_intake(bridge)
    try:
        ids = [quarantined(*(await post(http, served, f"junk {i}".encode())), "invalid_json") for i in range(5)]
    finally:
        await served.close()
    kept = await bridge.quarantine.list_quarantined()
    assert [q.id for q in kept] == ids[:1:-1]  # newest first: the two oldest were dropped
    assert [q.body for q in kept] == [b"junk 4", b"junk 3", b"junk 2"]
    assert await bridge.quarantine.quarantine_count() == 3
    assert await bridge.quarantine.quarantine_dropped() == 2


async def test_wrong_key_with_junk_is_still_401_and_keeps_nothing(
    served: Served, http: aiohttp.ClientSession, bridge: Bridge
) -> None:
    status, body = await post(http, served, b"junk", key=KEY + "x")
    assert (status, body) == (401, {"error": "wrong webhook key"})
    status, _ = await post(http, served, b"junk", key=None)
    assert status == 401
    assert await bridge.quarantine.quarantine_count() == 0


async def test_over_one_mebibyte_with_content_length_is_413(
    served: Served, http: aiohttp.ClientSession, telemetry: RecordingTelemetry
) -> None:
    body = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    status, answer = await post(http, served, body)
    assert status == 413
    assert answer == {"error": f"body of {len(body)} bytes exceeds {1024 * 1024}"}
    assert telemetry.rejections[(ROUTE, "too_large")] == 1


async def test_over_one_mebibyte_chunked_is_413(
    served: Served, http: aiohttp.ClientSession, telemetry: RecordingTelemetry
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"pad": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    async with http.post(served.url, data=chunks(), params={"code": KEY}, headers=JSON) as r:
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.request_info.headers
        status, answer = r.status, await r.json()
    assert status == 413
    assert answer == {"error": f"body exceeds {1024 * 1024} bytes"}
    assert telemetry.rejections[(ROUTE, "too_large")] == 1


async def test_a_body_just_under_the_limit_is_read(served: Served, http: aiohttp.ClientSession, known: Bridge) -> None:
    ctx = seed("update-presence")
    ctx["Padding"] = "x" * (1024 * 1024 - len(json.dumps(ctx)) - 20)
    body = json.dumps(ctx).encode()
    assert 1024 * 1024 - 100 < len(body) <= 1024 * 1024
    status, answer = await post(http, served, body)
    assert status == 200, answer


async def test_json_with_charset_is_accepted(served: Served, http: aiohttp.ClientSession, known: Bridge) -> None:
    status, _ = await post(
        http, served, seed_bytes("update-presence"), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert status == 200


# ---------------------------------------------------------------------------------------------- the durable path


async def test_presence_change_is_committed_before_the_200(
    served: Served, http: aiohttp.ClientSession, known: Bridge, telemetry: RecordingTelemetry
) -> None:
    status, body = await post(http, served, seed_bytes("update-presence"))
    assert status == 200
    assert body == {"status": "recorded", "result": "applied", "commands": 1}
    state = (await known.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (BUSY, 5948260)
    row = await known.store.outbox_row(ALICE.dynamics_user_id, System.TEAMS)
    assert row is not None and row.value == "Busy/InACall"
    assert [n for n, _ in telemetry.latencies] == ["ack.dataverse_webhook"]


async def test_older_row_version_does_not_overwrite(served: Served, http: aiohttp.ClientSession, known: Bridge) -> None:
    assert (await post(http, served, update(BUSY, row_version=100)))[0] == 200
    status, body = await post(http, served, update(AVAILABLE, row_version=99))
    assert status == 200 and body["result"] == "stale"
    state = (await known.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (BUSY, 100)


async def test_non_presence_update_is_200_ignored(
    served: Served, http: aiohttp.ClientSession, known: Bridge, telemetry: RecordingTelemetry
) -> None:
    ctx = seed("update-presence")
    ctx["ParentContext"] = None
    target = ctx["InputParameters"][0]["value"]
    target["Attributes"] = [p for p in target["Attributes"] if p["key"] != "msdyn_currentpresenceid"]
    status, body = await post(http, served, json.dumps(ctx).encode())
    assert (status, body) == (
        200,
        {"status": "ignored", "reason": "Update without msdyn_currentpresenceid: not a presence change"},
    )
    assert await known.store.load_states([ALICE.dynamics_user_id]) == {}
    assert telemetry.events[(ROUTE, "not_presence_change")] == 1


async def test_store_failure_is_503_json_never_500(
    served: Served,
    http: aiohttp.ClientSession,
    known: Bridge,
    telemetry: RecordingTelemetry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise ConnectionResetError("database connection lost")

    monkeypatch.setattr(known.store, "transaction", broken)
    status, body = await post(http, served, seed_bytes("update-presence"))
    assert status == 503
    assert body == {"error": "temporarily unable to record the change; nothing was acknowledged, send it again"}
    assert telemetry.rejections[(ROUTE, "internal")] == 1
    monkeypatch.setattr(known.store, "get_agent", broken)
    status, _ = await post(http, served, seed_bytes("update-presence"))
    assert status == 503
    monkeypatch.undo()
    status, _ = await post(http, served, seed_bytes("update-presence"))  # Dataverse sends it again: recorded
    assert status == 200
    assert await known.store.outbox_row(ALICE.dynamics_user_id, System.TEAMS) is not None


async def test_no_upstream_call_while_the_request_waits(
    emu: DataverseEmulator, served: Served, http: aiohttp.ClientSession, known: Bridge
) -> None:
    """The step is synchronous: the agent's own change waits for this answer. A slow Dataverse must not
    slow it, because nothing here calls Dataverse (or Graph) before answering."""
    emu.latency(2.0)
    started = time.monotonic()
    status, _ = await post(http, served, seed_bytes("update-presence"))
    elapsed = time.monotonic() - started
    assert status == 200
    assert elapsed < 1.0, f"the ack took {elapsed:.2f} s with a 2 s upstream: it waited on an upstream call"
    assert list(emu.calls) == []


# ---------------------------------------------------------------------------------------------- unknown and new agents


async def test_update_for_an_unknown_agent_is_202_and_counted(
    served: Served, http: aiohttp.ClientSession, bridge: Bridge, telemetry: RecordingTelemetry
) -> None:
    status, body = await post(http, served, seed_bytes("update-presence"))
    assert status == 202
    assert body["status"] == "unknown_agent" and body["agent"] == ALICE.dynamics_user_id
    assert "not in the agent directory" in body["detail"]
    assert telemetry.events[(ROUTE, "unknown_agent")] == 1
    unknown = await bridge.store.list_unknown()
    assert [(u["system"], u["id"]) for u in unknown] == [("dynamics", ALICE.dynamics_user_id)]
    assert await bridge.store.list_docs(PENDING_KIND) == {}


async def test_disabled_agent_is_202(served: Served, http: aiohttp.ClientSession, bridge: Bridge) -> None:
    await bridge.store.upsert_agents([ALICE])
    await bridge.store.set_agent_enabled(ALICE.dynamics_user_id, False)
    status, body = await post(http, served, seed_bytes("update-presence"))
    assert (status, body) == (202, {"status": "unknown_agent", "detail": "agent disabled"})
    assert await bridge.store.outbox_row(ALICE.dynamics_user_id, System.TEAMS) is None


async def test_create_for_a_new_agent_adds_it_in_the_background(
    emu: DataverseEmulator, served: Served, http: aiohttp.ClientSession, bridge: Bridge, telemetry: RecordingTelemetry
) -> None:
    emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id.upper(), "Bob Agent")
    status, body = await post(http, served, seed_bytes("create-agent"))
    assert (status, body) == (202, {"status": "pending_agent", "agent": BOB.dynamics_user_id})
    await served.intake.wait_idle()
    agent = await bridge.store.get_agent(BOB.dynamics_user_id)
    assert agent == Agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent", True)
    state = (await bridge.store.load_states([BOB.dynamics_user_id]))[BOB.dynamics_user_id]
    assert state.dynamics_seen.value == OFFLINE
    assert telemetry.events[(ROUTE, "agent_added")] == 1
    assert await bridge.store.list_docs(PENDING_KIND) == {}
    assert await bridge.store.list_unknown() == []
    (lookup,) = [c for c in emu.calls if c.path.startswith("systemusers(")]
    assert lookup.path == f"systemusers({BOB.dynamics_user_id})" and lookup.status == 200


async def test_update_while_pending_gives_the_latest_presence(
    emu: DataverseEmulator, bridge: Bridge, client: DataverseClient, http: aiohttp.ClientSession
) -> None:
    emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent")
    served = await serve_intake(bridge, client=client, start=False)  # the worker is not running yet
    try:
        assert (await post(http, served, seed_bytes("create-agent")))[0] == 202
        status, body = await post(http, served, update(AVAILABLE, agent=BOB, row_version=7))
        assert (status, body["status"]) == (202, "pending_agent")
        status, _ = await post(http, served, update(BUSY, agent=BOB, row_version=6))  # older: kept out
        assert status == 202
        await served.intake.start()
        await served.intake.wait_idle()
    finally:
        await served.close()
    state = (await bridge.store.load_states([BOB.dynamics_user_id]))[BOB.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (AVAILABLE, 7)


async def test_create_for_a_user_without_entra_id_ends_up_unknown(
    emu: DataverseEmulator, served: Served, http: aiohttp.ClientSession, bridge: Bridge
) -> None:
    emu.add_agent(BOB.dynamics_user_id, None, "Bob Agent")
    status, _ = await post(http, served, seed_bytes("create-agent"))
    assert status == 202
    await served.intake.wait_idle()
    assert await bridge.store.get_agent(BOB.dynamics_user_id) is None
    assert [u["id"] for u in await bridge.store.list_unknown()] == [BOB.dynamics_user_id]
    assert await bridge.store.list_docs(PENDING_KIND) == {}


async def test_create_for_a_user_dataverse_does_not_know_ends_up_unknown(
    served: Served, bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    status, _ = await post(http, served, seed_bytes("create-agent"))
    assert status == 202
    await served.intake.wait_idle()
    assert await bridge.store.get_agent(BOB.dynamics_user_id) is None
    assert [u["id"] for u in await bridge.store.list_unknown()] == [BOB.dynamics_user_id]


@pytest.mark.slow
async def test_create_whose_lookup_fails_is_kept_and_retried(
    emu: DataverseEmulator, served: Served, bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent")
    emu.fail_next(3, 503, path="systemusers(")  # bridge.retry gives up after 3: the note stays
    assert (await post(http, served, seed_bytes("create-agent")))[0] == 202
    await served.intake.wait_idle(timeout=15)
    assert await bridge.store.get_agent(BOB.dynamics_user_id) is not None
    statuses = [c.status for c in emu.calls if c.path.startswith("systemusers(")]
    assert statuses == [503, 503, 503, 200]


async def test_create_of_a_known_agent_records_its_presence(
    served: Served, http: aiohttp.ClientSession, bridge: Bridge, emu: DataverseEmulator
) -> None:
    await bridge.store.upsert_agents([BOB])
    status, body = await post(http, served, seed_bytes("create-agent"))
    assert status == 200 and body["status"] == "recorded"
    state = (await bridge.store.load_states([BOB.dynamics_user_id]))[BOB.dynamics_user_id]
    assert state.dynamics_seen.value == OFFLINE
    assert list(emu.calls) == []


async def test_create_without_a_client_is_unknown_at_once(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    served = await serve_intake(bridge, client=None)
    try:
        status, body = await post(http, served, seed_bytes("create-agent"))
    finally:
        await served.close()
    assert status == 202 and body["status"] == "unknown_agent"
    assert "Dataverse is not configured" in body["detail"]
    assert [u["id"] for u in await bridge.store.list_unknown()] == [BOB.dynamics_user_id]


async def test_a_poison_pending_note_is_handed_off_and_the_notes_after_it_are_settled(
    emu: DataverseEmulator, bridge: Bridge, client: DataverseClient
) -> None:
    """A note that fails for a reason of its own (here a date nobody can read) used to end every round
    before the notes after it: notes are read in key order, so the same note failed first for good."""
    from dataverse.webhook import DataverseIntake

    handed: list[tuple[str, str, bytes, str]] = []

    async def on_poison(route: str, reason: str, body: bytes, detail: str) -> None:
        handed.append((route, reason, body, detail))

    emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent")
    poison_key = "00000000-0000-0000-0000-000000000001"  # sorts before Bob's id
    assert poison_key < BOB.dynamics_user_id
    emu.add_agent(poison_key, "11111111-1111-1111-1111-111111111111", "Broken Note")
    await bridge.records.put_doc(
        PENDING_KIND, poison_key, {"agent_id": poison_key, "presence_id": AVAILABLE, "observed_at": "not a date"}
    )
    await bridge.records.put_doc(
        PENDING_KIND, BOB.dynamics_user_id, {"agent_id": BOB.dynamics_user_id, "presence_id": BUSY}
    )
    intake = DataverseIntake(bridge, webhook_key=KEY, client=client, on_poison=on_poison)
    assert await intake.process_pending() == 1  # Bob settled; before the fix: ValueError, nothing settled
    assert await bridge.records.list_docs(PENDING_KIND) == {}
    ((route, reason, body, detail),) = handed
    assert (route, reason) == ("dataverse_pending_agents", "note_failed")
    assert poison_key.encode() in body and "ValueError" in detail
    state = (await bridge.store.load_states([BOB.dynamics_user_id]))[BOB.dynamics_user_id]
    assert state.dynamics_seen.value == BUSY


async def test_a_pending_note_failing_while_the_store_is_down_stays(
    emu: DataverseEmulator, bridge: Bridge, client: DataverseClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataverse.webhook import DataverseIntake

    handed: list[str] = []

    async def on_poison(route: str, reason: str, body: bytes, detail: str) -> None:
        handed.append(reason)

    emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent")
    await bridge.records.put_doc(
        PENDING_KIND, BOB.dynamics_user_id, {"agent_id": BOB.dynamics_user_id, "presence_id": BUSY}
    )
    intake = DataverseIntake(bridge, webhook_key=KEY, client=client, on_poison=on_poison)

    async def store_down(*_: object, **__: object) -> None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(bridge.records, "get_doc", store_down)
    with pytest.raises(OSError):
        await intake.process_pending()
    monkeypatch.undo()
    assert handed == [] and list(await bridge.records.list_docs(PENDING_KIND)) == [BOB.dynamics_user_id]
