"""``/api/graph/notifications`` and ``/api/graph/lifecycle`` through a real server on a free port:
the handshake, every bad input, ``validationTokens`` checks, rich and basic notifications from the
Graph emulator into the engine, lifecycle events, and the 503-not-500 rule."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from emulators.graph import encrypt_for_certificate, sign_validation_token
from graph_sync.notifications import PENDING_KIND, ids_from_resource
from mapping.engine import MANY
from mapping.model import Agent, PresenceObserved, System
from tests.graph.conftest import (
    CLIENT_ID,
    CLIENT_STATE,
    TENANT_ID,
    Certificate,
    RecordingTelemetry,
    Rig,
    agents,
    build_rig,
    close_rig,
)
from tests.support import AVAILABLE, BUSY, DND, FakeClock, RecordingWriter

ROUTE = "graph_notifications"
ALICE, BOB = agents(2)


@pytest.fixture
async def seeded(rich_rig: Rig) -> Rig:
    """Two agents the bridge knows in both systems: Available in Dynamics (as the start-up sweep
    would have read), so that what Teams asks has a presence to be measured against (rule 2)."""
    await known_agents(rich_rig, [ALICE, BOB])
    rich_rig.emu.add_users([ALICE.entra_object_id, BOB.entra_object_id])
    return rich_rig


async def known_agents(rig: Rig, agents: list[Agent]) -> None:
    """Agents in the directory whose Dynamics presence the bridge has read (Available, as the start-up
    sweep would find): what Teams asks is measured against it (rule 2)."""
    await rig.bridge.store.upsert_agents(agents)
    for agent in agents:
        await rig.bridge.engine.observe(
            PresenceObserved(
                agent.dynamics_user_id, System.DYNAMICS, AVAILABLE, rig.bridge.clock(), 1, "SYSTEM", "reconcile", True
            )
        )


def token(rig: Rig, **claims: Any) -> str:
    return sign_validation_token(rig.emu.signing_key, client_id=CLIENT_ID, tenant_id=TENANT_ID, extra_claims=claims)


def rich_item(
    rig: Rig,
    cert: Certificate,
    agent: Agent,
    availability: str,
    activity: str,
    *,
    client_state: str = CLIENT_STATE,
    certificate_id: str | None = None,
) -> dict[str, Any]:
    assert rig.intake.decryptor is not None
    uid = agent.entra_object_id
    payload = {
        "@odata.type": "#Microsoft.Graph.presence",
        "id": uid,
        "availability": availability,
        "activity": activity,
    }
    return {
        "subscriptionId": "sub-1",
        "clientState": client_state,
        "changeType": "updated",
        "resource": f"communications/presences('{uid}')",
        "tenantId": TENANT_ID,
        "resourceData": {"@odata.type": "#Microsoft.Graph.presence", "id": uid},
        "encryptedContent": encrypt_for_certificate(
            cert.cert_pem, payload, certificate_id=certificate_id or rig.intake.decryptor.certificate_id
        ),
    }


async def post(http: aiohttp.ClientSession, url: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    if body is not None:
        kw["json"] = body
    async with http.post(url, **kw) as resp:
        text = await resp.text()
        data = await resp.json() if resp.content_type == "application/json" else text
        return resp.status, data


async def dynamics_value(rig: Rig, agent: Agent) -> str | None:
    row = await rig.bridge.store.outbox_row(agent.dynamics_user_id, System.DYNAMICS)
    return row.value if row else None


# ------------------------------------------------------------------ handshake and bad input


@pytest.mark.parametrize("path", ["/api/graph/notifications", "/api/graph/lifecycle"])
async def test_validation_handshake(rig: Rig, http: aiohttp.ClientSession, path: str) -> None:
    token_text = "Validation: Testing client application reachability for subscription Request-Id: 42"
    async with http.post(f"{rig.base}{path}", params={"validationToken": token_text}) as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        assert await resp.text() == token_text


@pytest.mark.parametrize(
    ("data", "headers", "status", "reason", "says"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "malformed", "not JSON"),
        (b"", {"Content-Type": "application/json"}, 400, "malformed", "empty body"),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400, "malformed", "JSON object"),
        (b'{"items": []}', {"Content-Type": "application/json"}, 400, "malformed", "'value'"),
        (b'{"value": [1]}', {"Content-Type": "application/json"}, 400, "malformed", "notification objects"),
        (
            b'{"value": [], "validationTokens": "x"}',
            {"Content-Type": "application/json"},
            400,
            "malformed",
            "validationTokens",
        ),
        (b"<html/>", {"Content-Type": "text/html"}, 415, "unsupported_media_type", "application/json"),
        (b"\xff\xfe{}", {"Content-Type": "application/json"}, 400, "malformed", "not JSON"),
    ],
)
async def test_bad_input_is_a_4xx_with_a_reason(
    rig: Rig, http: aiohttp.ClientSession, data: bytes, headers: dict[str, str], status: int, reason: str, says: str
) -> None:
    for url in (rig.notify_url, rig.lifecycle_url):
        got, body = await post(http, url, data=data, headers=headers)
        assert got == status and says in body["error"]
    assert rig.telemetry.rejections[(ROUTE, reason)] == 1
    assert rig.telemetry.rejections[("graph_lifecycle", reason)] == 1


async def test_oversized_body_is_413(rig: Rig, http: aiohttp.ClientSession) -> None:
    big = b'{"value": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'
    status, body = await post(http, rig.notify_url, data=big, headers={"Content-Type": "application/json"})
    assert status == 413 and "exceeds" in body["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap is enforced while reading
        for _ in range(20):
            yield b"x" * 65536

    status, body = await post(http, rig.notify_url, data=chunks(), headers={"Content-Type": "application/json"})
    assert status == 413
    assert rig.telemetry.rejections[(ROUTE, "too_large")] == 2


# ------------------------------------------------------------------ rich notifications


async def test_rich_notification_from_graph_reaches_dynamics(seeded: Rig) -> None:
    await seeded.manager.sync()
    seeded.emu.set_user_state(ALICE.entra_object_id, "Busy", "InAMeeting")
    await seeded.emu.wait_idle()
    (delivery,) = seeded.emu.notifications_sent
    assert delivery.status == 202 and "encryptedContent" in delivery.body["value"][0]
    assert delivery.body["validationTokens"]
    assert await dynamics_value(seeded, ALICE) == BUSY
    assert seeded.telemetry.events[("graph_notification", "applied")] == 1
    assert any(name == f"ack.{ROUTE}" for name, _ in seeded.telemetry.latencies)


async def test_client_state_mismatch_drops_only_that_item(
    seeded: Rig, certificate: Certificate, http: aiohttp.ClientSession
) -> None:
    body = {
        "value": [
            rich_item(seeded, certificate, ALICE, "Busy", "InACall", client_state="guess"),
            rich_item(seeded, certificate, BOB, "DoNotDisturb", "Presenting"),
        ],
        "validationTokens": [token(seeded)],
    }
    status, answer = await post(http, seeded.notify_url, body)
    assert status == 202 and answer == {"accepted": 1}
    assert await dynamics_value(seeded, ALICE) is None
    assert await dynamics_value(seeded, BOB) == DND
    assert seeded.telemetry.rejections[(ROUTE, "client_state")] == 1


def _wrong_signer(rig: Rig) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return sign_validation_token(other, client_id=CLIENT_ID, tenant_id=TENANT_ID, kid=rig.emu.signing_key.kid)


def _unknown_key(rig: Rig) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return sign_validation_token(other, client_id=CLIENT_ID, tenant_id=TENANT_ID, kid="not-a-published-key")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda rig: [token(rig, exp=int((datetime.now(UTC) - timedelta(minutes=10)).timestamp()))], "expired"),
        (lambda rig: [token(rig, aud="someone-elses-app")], "wrong audience"),
        (lambda rig: [_wrong_signer(rig)], "bad signature"),
        (lambda rig: [_unknown_key(rig)], "unknown key"),
        (
            lambda rig: [
                token(rig, azp="11111111-0000-0000-0000-000000000000", appid="11111111-0000-0000-0000-000000000000")
            ],
            "change tracking",
        ),
        (lambda rig: [token(rig), token(rig, aud="someone-elses-app")], "wrong audience"),
        (lambda rig: ["not.a.jwt"], "not a JWT"),
        (lambda rig: [], "without validationTokens"),
        (lambda rig: None, "without validationTokens"),
    ],
    ids=[
        "expired",
        "wrong-audience",
        "wrong-signer",
        "unknown-key",
        "wrong-azp",
        "one-of-two-bad",
        "garbage",
        "empty",
        "missing",
    ],
)
async def test_bad_validation_tokens_reject_the_whole_batch(
    seeded: Rig, certificate: Certificate, http: aiohttp.ClientSession, make: Any, says: str
) -> None:
    body: dict[str, Any] = {
        "value": [
            rich_item(seeded, certificate, ALICE, "Busy", "InACall"),
            rich_item(seeded, certificate, BOB, "Busy", "InACall"),
        ]
    }
    tokens = make(seeded)
    if tokens is not None:
        body["validationTokens"] = tokens
    status, answer = await post(http, seeded.notify_url, body)
    assert status == 400 and says in answer["error"]
    assert await dynamics_value(seeded, ALICE) is None and await dynamics_value(seeded, BOB) is None
    assert seeded.telemetry.rejections[(ROUTE, "validation_token")] == 1
    # The same batch with a good token goes through: the check above is what refused it.
    body["validationTokens"] = [token(seeded)]
    status, _ = await post(http, seeded.notify_url, body)
    assert status == 202 and await dynamics_value(seeded, ALICE) == BUSY


async def test_undecryptable_content_falls_back_to_a_read(
    seeded: Rig, certificate: Certificate, http: aiohttp.ClientSession
) -> None:
    seeded.emu.set_user_state(ALICE.entra_object_id, "DoNotDisturb", "Presenting")
    item = rich_item(seeded, certificate, ALICE, "Busy", "InACall", certificate_id="old-certificate")
    status, _ = await post(http, seeded.notify_url, {"value": [item], "validationTokens": [token(seeded)]})
    assert status == 202
    assert seeded.telemetry.rejections[(ROUTE, "decryption")] == 1
    await seeded.intake.wait_idle()
    assert await dynamics_value(seeded, ALICE) == DND  # what Graph shows, read instead of trusted
    assert await seeded.bridge.store.list_docs(PENDING_KIND) == {}


async def test_unknown_user_is_counted_not_guessed(
    seeded: Rig, certificate: Certificate, http: aiohttp.ClientSession
) -> None:
    stranger = agents(1, start=77)[0]
    item = rich_item(seeded, certificate, stranger, "Busy", "InACall")
    status, _ = await post(http, seeded.notify_url, {"value": [item], "validationTokens": [token(seeded)]})
    assert status == 202
    unknown = await seeded.bridge.store.list_unknown()
    assert [u["id"] for u in unknown] == [stranger.entra_object_id]
    assert seeded.telemetry.events[("graph_notification", "unknown_agent")] == 1


async def test_past_the_ack_budget_the_rest_is_deferred_to_reads(
    emu: Any,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    certificate: Certificate,
    http: aiohttp.ClientSession,
) -> None:
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer, certificate=certificate, ack_budget=0.0)
    try:
        await rig.intake.stop()  # the pending reads are driven by hand below
        await known_agents(rig, [ALICE, BOB])
        emu.add_users([ALICE.entra_object_id, BOB.entra_object_id], own=("Busy", "InACall"))
        body = {
            "value": [
                rich_item(rig, certificate, ALICE, "Busy", "InACall"),
                rich_item(rig, certificate, BOB, "Busy", "InACall"),
            ],
            "validationTokens": [token(rig)],
        }
        status, answer = await post(http, rig.notify_url, body)
        assert status == 202 and answer == {"accepted": 2}
        (note,) = (await rig.bridge.store.list_docs(PENDING_KIND)).values()  # one durable note per request
        assert note["ids"] == [ALICE.entra_object_id, BOB.entra_object_id]
        assert await rig.intake.read_pending() == 2
        assert await dynamics_value(rig, ALICE) == BUSY and await dynamics_value(rig, BOB) == BUSY
    finally:
        await close_rig(rig, runner)


@pytest.mark.slow
async def test_the_budget_spent_observing_defers_the_rest_to_reads(
    emu: Any,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    certificate: Certificate,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer, certificate=certificate, ack_budget=0.3)
    try:
        await rig.intake.stop()  # the pending reads are driven by hand below
        crowd = agents(MANY + 4, start=100)
        await known_agents(rig, crowd)
        emu.add_users([a.entra_object_id for a in crowd], own=("Busy", "InACall"))
        observe_many = rig.bridge.engine.observe_many
        chunks: list[int] = []

        async def slow_store(events: Any, **kw: Any) -> Any:
            chunks.append(len(events))
            await asyncio.sleep(0.5)  # a slow commit: the budget is spent after the first chunk
            return await observe_many(events, **kw)

        monkeypatch.setattr(rig.bridge.engine, "observe_many", slow_store)
        body = {
            "value": [rich_item(rig, certificate, a, "Busy", "InACall") for a in crowd],
            "validationTokens": [token(rig)],
        }
        status, answer = await post(http, rig.notify_url, body)
        assert status == 202 and answer == {"accepted": len(crowd)}
        assert chunks == [MANY]  # observed in one transaction; the other 4 deferred, not dropped
        (note,) = (await rig.bridge.store.list_docs(PENDING_KIND)).values()
        assert note["ids"] == [a.entra_object_id for a in crowd[MANY:]]
        assert await rig.intake.read_pending() == 4
        assert all([await dynamics_value(rig, a) == BUSY for a in crowd])
    finally:
        await close_rig(rig, runner)


async def test_keys_unavailable_is_503_so_graph_retries(
    emu: Any,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    certificate: Certificate,
    http: aiohttp.ClientSession,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/keys"
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer, certificate=certificate, jwks_url=dead)
    try:
        await known_agents(rig, [ALICE])
        body = {"value": [rich_item(rig, certificate, ALICE, "Busy", "InACall")], "validationTokens": [token(rig)]}
        status, answer = await post(http, rig.notify_url, body)
        assert status == 503 and "validationTokens" in answer["error"]
        assert await dynamics_value(rig, ALICE) is None
    finally:
        await close_rig(rig, runner)


async def test_a_failing_store_is_503_never_500(
    seeded: Rig, certificate: Certificate, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextlib.asynccontextmanager
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database is locked")
        yield

    monkeypatch.setattr(seeded.bridge.store, "transaction", broken)
    body = {"value": [rich_item(seeded, certificate, ALICE, "Busy", "InACall")], "validationTokens": [token(seeded)]}
    status, answer = await post(http, seeded.notify_url, body)
    assert status == 503 and "retry" in answer["error"]
    assert seeded.telemetry.rejections[(ROUTE, "internal")] == 1


# ------------------------------------------------------------------ basic notifications and lifecycle


async def test_basic_notification_is_stored_then_read_in_a_batch(rig: Rig) -> None:
    await known_agents(rig, [ALICE, BOB])
    rig.emu.add_users([ALICE.entra_object_id, BOB.entra_object_id])
    await rig.manager.sync()
    rig.emu.set_user_state(ALICE.entra_object_id, "Busy", "InACall")
    rig.emu.set_user_state(BOB.entra_object_id, "DoNotDisturb", "Presenting")
    await rig.emu.wait_idle()
    (delivery,) = rig.emu.notifications_sent
    assert delivery.status == 202 and "encryptedContent" not in delivery.body["value"][0]
    await rig.intake.wait_idle()
    assert await dynamics_value(rig, ALICE) == BUSY and await dynamics_value(rig, BOB) == DND
    reads = rig.emu.calls("POST", "getPresencesByUserId")
    assert len(reads) == 1 and sorted(reads[0].body["ids"]) == sorted([ALICE.entra_object_id, BOB.entra_object_id])


async def test_missed_lifecycle_reads_the_subscriptions_users(rig: Rig) -> None:
    await known_agents(rig, [ALICE, BOB])
    rig.emu.add_users([ALICE.entra_object_id, BOB.entra_object_id])
    await rig.manager.sync()
    (sub,) = rig.emu.subscriptions
    rig.emu.drop_notifications(1)
    rig.emu.set_user_state(BOB.entra_object_id, "Busy", "InAConferenceCall")  # lost on the way
    await rig.emu.wait_idle()
    assert rig.emu.notifications_sent == [] and await dynamics_value(rig, BOB) is None
    delivery = await rig.emu.send_lifecycle(sub.id, "missed")
    assert delivery is not None and delivery.status == 202
    await rig.intake.wait_idle()
    assert await dynamics_value(rig, BOB) == BUSY


async def test_lifecycle_with_a_wrong_client_state_does_nothing(rig: Rig, http: aiohttp.ClientSession) -> None:
    await known_agents(rig, [ALICE])
    rig.emu.add_users([ALICE.entra_object_id])
    await rig.manager.sync()
    (sub,) = rig.emu.subscriptions
    forged = {"value": [{"subscriptionId": sub.id, "clientState": "guess", "lifecycleEvent": "subscriptionRemoved"}]}
    status, answer = await post(http, rig.lifecycle_url, forged)
    assert status == 202 and answer == {"accepted": 0}
    await rig.intake.wait_idle()
    assert [s.id for s in rig.emu.subscriptions] == [sub.id]
    assert rig.telemetry.rejections[("graph_lifecycle", "client_state")] == 1


def test_ids_from_resource() -> None:
    assert ids_from_resource("/communications/presences?$filter=id in ('A','b')") == ["a", "b"]
    assert ids_from_resource("communications/presences('X1')") == ["x1"]
    assert ids_from_resource("/communications/presences/x2") == ["x2"]
    assert ids_from_resource(None) == []


async def test_pending_reads_survive_failures_and_keep_notes_written_meanwhile(rig: Rig) -> None:
    await known_agents(rig, [ALICE, BOB])
    rig.emu.add_users([ALICE.entra_object_id, BOB.entra_object_id], own=("Busy", "InACall"))
    stranger = agents(1, start=77)[0].entra_object_id
    await rig.intake.stop()  # rounds driven by hand below, no background batcher racing them
    await rig.intake._queue_reads([ALICE.entra_object_id, stranger], "basic")
    rig.emu.fail_next(10, status=503, retry_after=0, paths="getPresencesByUserId")
    rig.teams.retry = rig.teams.retry.__class__(max_attempts=1)
    with pytest.raises(Exception, match="503"):
        await rig.intake.read_pending()
    assert len(await rig.bridge.store.list_docs(PENDING_KIND)) == 1  # nothing lost
    rig.emu.clear_faults()

    real_read = rig.teams.read

    async def read_while_bob_is_notified(batch: Any) -> Any:
        await rig.intake._queue_reads([BOB.entra_object_id], "basic")  # arrives during the read
        return await real_read(batch)

    rig.intake.reader = type("Reader", (), {"read": staticmethod(read_while_bob_is_notified)})()
    assert await rig.intake.read_pending() == 1
    assert await dynamics_value(rig, ALICE) == BUSY and await dynamics_value(rig, BOB) is None
    (left,) = (await rig.bridge.store.list_docs(PENDING_KIND)).values()
    assert left["ids"] == [BOB.entra_object_id]  # read next round, not deleted unread
    assert [u["id"] for u in await rig.bridge.store.list_unknown()] == [stranger]


async def test_without_a_configured_client_state_nothing_is_accepted(
    emu: Any,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    http: aiohttp.ClientSession,
) -> None:
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer)
    try:
        rig.intake.client_state = b""
        await known_agents(rig, [ALICE])
        item = {
            "subscriptionId": "s",
            "clientState": "",
            "changeType": "updated",
            "resourceData": {"id": ALICE.entra_object_id},
        }
        status, answer = await post(http, rig.notify_url, {"value": [item]})
        assert status == 202 and answer == {"accepted": 0}
        assert await rig.bridge.store.list_docs(PENDING_KIND) == {}
    finally:
        await close_rig(rig, runner)


# ------------------------------------------------------------------ poison items: one bad item never stops a queue


class Poisoned(list[tuple[str, str, bytes, str]]):
    """An ``on_poison`` hook that keeps what it was handed."""

    async def __call__(self, route: str, reason: str, body: bytes, detail: str) -> None:
        self.append((route, reason, body, detail))


def basic_item(uid: str, client_state: str = CLIENT_STATE) -> dict[str, Any]:
    return {
        "subscriptionId": "sub-1",
        "clientState": client_state,
        "changeType": "updated",
        "resource": f"communications/presences('{uid}')",
        "resourceData": {"@odata.type": "#Microsoft.Graph.presence", "id": uid},
    }


@pytest.mark.parametrize(
    "poison", ["\ud800", "a\x00b", "x" * 300, 42], ids=["lone-surrogate", "nul", "too-long", "not-a-string"]
)
async def test_a_poison_id_in_the_pending_reads_is_taken_out_and_the_queue_goes_on(
    emu: Any,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    sql_url: str,
    open_sql: Any,
    poison: Any,
) -> None:
    store = await open_sql(sql_url)
    poisoned = Poisoned()
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer, store=store, on_poison=poisoned)
    try:
        await rig.intake.stop()  # rounds driven by hand below
        await known_agents(rig, [ALICE, BOB])
        emu.add_users([ALICE.entra_object_id, BOB.entra_object_id], own=("Busy", "InACall"))
        # A note as an earlier version (which let such ids in) left it: the poison beside a real id.
        old = {"ids": [poison, ALICE.entra_object_id], "why": "notification", "at": clock().isoformat()}
        await store.put_doc(PENDING_KIND, "00000000T000000-left-by-an-earlier-version", old)
        await rig.intake._queue_reads([BOB.entra_object_id], "notification")
        assert await rig.intake.read_pending() == 2
        assert await dynamics_value(rig, ALICE) == BUSY and await dynamics_value(rig, BOB) == BUSY
        assert await store.list_docs(PENDING_KIND) == {}
        ((route, reason, body, detail),) = poisoned
        assert (route, reason) == ("graph_pending_reads", "bad_id")
        assert b"left-by-an-earlier-version" in body and "unusable user id" in detail
        # The rounds after it go on as before.
        emu.set_user_state(ALICE.entra_object_id, "DoNotDisturb", "Presenting")
        await rig.intake._queue_reads([ALICE.entra_object_id], "notification")
        assert await rig.intake.read_pending() == 1
        assert await dynamics_value(rig, ALICE) == DND
    finally:
        await close_rig(rig, runner)


async def test_notifications_naming_an_unusable_id_are_refused_alone_and_later_ones_are_read(
    emu: Any,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    sql_url: str,
    open_sql: Any,
    http: aiohttp.ClientSession,
) -> None:
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer, store=await open_sql(sql_url))
    try:
        await known_agents(rig, [ALICE, BOB])
        emu.add_users([ALICE.entra_object_id, BOB.entra_object_id], own=("Busy", "InACall"))
        poison = "0a1b2c3d-" * 40  # valid JSON, correct clientState, an id no store column holds
        status, answer = await post(
            http, rig.notify_url, {"value": [basic_item(poison), basic_item(ALICE.entra_object_id)]}
        )
        assert status == 202 and answer == {"accepted": 1}
        assert telemetry.rejections[(ROUTE, "malformed_item")] == 1
        await rig.intake.wait_idle()
        assert await dynamics_value(rig, ALICE) == BUSY
        for _ in range(3):  # and every later notification is read as before
            status, _ = await post(http, rig.notify_url, {"value": [basic_item(BOB.entra_object_id)]})
            assert status == 202
        await rig.intake.wait_idle()
        assert await dynamics_value(rig, BOB) == BUSY
        assert await rig.bridge.store.list_docs(PENDING_KIND) == {}
    finally:
        await close_rig(rig, runner)


async def test_one_failing_item_in_a_rich_batch_of_100_does_not_fail_the_other_99(
    rich_rig: Rig, certificate: Certificate, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    crowd = agents(100, start=200)
    await known_agents(rich_rig, crowd)
    rich_rig.emu.add_users([a.entra_object_id for a in crowd], own=("Busy", "InACall"))
    bad = crowd[37]
    real_agent_for = rich_rig.bridge.agent_for

    async def agent_for(system: System, external_id: str) -> Any:
        if external_id == bad.entra_object_id:
            raise ValueError("this one item breaks its lookup")
        return await real_agent_for(system, external_id)

    monkeypatch.setattr(rich_rig.bridge, "agent_for", agent_for)
    body = {
        "value": [rich_item(rich_rig, certificate, a, "Busy", "InACall") for a in crowd],
        "validationTokens": [token(rich_rig)],
    }
    status, answer = await post(http, rich_rig.notify_url, body)
    assert status == 202 and answer == {"accepted": 100}
    assert rich_rig.telemetry.rejections[(ROUTE, "item_failed")] == 1
    await rich_rig.intake.wait_idle()  # the failed item's user is read from Graph instead
    assert [await dynamics_value(rich_rig, a) for a in crowd] == [BUSY] * 100


async def test_one_failing_observation_in_a_chunk_does_not_fail_the_chunk(
    rich_rig: Rig, certificate: Certificate, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await known_agents(rich_rig, [ALICE, BOB])
    rich_rig.emu.add_users([ALICE.entra_object_id, BOB.entra_object_id], own=("Busy", "InACall"))
    engine = rich_rig.bridge.engine
    real_observe, real_many = engine.observe, engine.observe_many
    refused: list[str] = []

    async def observe(event: PresenceObserved, **kw: Any) -> Any:
        if event.agent_id == ALICE.dynamics_user_id and event.source == "notification":
            refused.append(event.agent_id)
        return await real_observe(event, **kw)

    async def observe_many(events: Any, **kw: Any) -> Any:
        if any(e.agent_id == ALICE.dynamics_user_id and e.source == "notification" for e in events):
            raise ValueError("one bad observation fails its transaction")
        return await real_many(events, **kw)

    monkeypatch.setattr(engine, "observe", observe)
    monkeypatch.setattr(engine, "observe_many", observe_many)
    body = {
        "value": [rich_item(rich_rig, certificate, a, "Busy", "InACall") for a in (ALICE, BOB)],
        "validationTokens": [token(rich_rig)],
    }
    status, _ = await post(http, rich_rig.notify_url, body)
    assert status == 202 and refused == [ALICE.dynamics_user_id]
    assert await dynamics_value(rich_rig, BOB) == BUSY
    await rich_rig.intake.wait_idle()  # Alice is read instead, and that observation goes through
    assert await dynamics_value(rich_rig, ALICE) == BUSY


async def test_one_failing_lifecycle_item_is_handed_off_and_the_others_are_applied(
    emu: Any,
    clock: FakeClock,
    telemetry: RecordingTelemetry,
    dynamics_writer: RecordingWriter,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poisoned = Poisoned()
    rig, runner = await build_rig(emu, clock, telemetry, dynamics_writer, on_poison=poisoned)
    try:
        await known_agents(rig, [ALICE, BOB])
        emu.add_users([ALICE.entra_object_id, BOB.entra_object_id])
        await rig.manager.sync()
        (sub,) = emu.subscriptions
        emu.drop_notifications(1)
        emu.set_user_state(BOB.entra_object_id, "Busy", "InAConferenceCall")  # lost on the way
        await emu.wait_idle()
        real_ids_of = rig.manager.ids_of

        async def ids_of(sub_id: str) -> Any:
            if sub_id == "7a000000-0000-4000-8000-0000000000bd":
                raise ValueError("this subscription's record cannot be read")
            return await real_ids_of(sub_id)

        monkeypatch.setattr(rig.manager, "ids_of", ids_of)
        items = [
            {
                "subscriptionId": "7a000000-0000-4000-8000-0000000000bd",
                "clientState": CLIENT_STATE,
                "lifecycleEvent": "missed",
            },
            {"subscriptionId": sub.id, "clientState": CLIENT_STATE, "lifecycleEvent": "missed"},
        ]
        status, answer = await post(http, rig.lifecycle_url, {"value": items})
        assert status == 202 and answer == {"accepted": 1}
        await rig.intake.wait_idle()
        assert await dynamics_value(rig, BOB) == BUSY
        ((route, reason, body, detail),) = poisoned
        assert (route, reason) == ("graph_lifecycle", "item_failed") and b"0000000000bd" in body
        assert "cannot be read" in detail
        # Every item failing is the store's failure, not the items': 503, and Graph delivers again.
        status, _ = await post(http, rig.lifecycle_url, {"value": items[:1]})
        assert status == 503
    finally:
        await close_rig(rig, runner)


async def test_the_default_poison_hook_logs_scrubbed_and_counts(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="presence_sync.poison"):
        await rig.intake.on_poison(
            "graph_pending_reads", "bad_id", b'{"clientState": "' + CLIENT_STATE.encode() + b'"}', "a detail"
        )
    (record,) = [r for r in caplog.records if r.name == "presence_sync.poison"]
    fields = record.__dict__["fields"]
    assert fields["reason"] == "bad_id" and CLIENT_STATE not in fields["body"]
    assert rig.telemetry.rejections[("graph_pending_reads", "poison_item")] == 1


async def test_each_subscription_records_when_it_last_notified_at_most_once_a_minute(rig: Rig) -> None:
    """A subscription can go silent for days while still "active"; the time of its last notification
    (not of the last Teams report, which sweeps also make) is what shows it."""
    from graph_sync.notifications import NOTIFIED_KIND

    await known_agents(rig, [ALICE])
    rig.emu.add_users([ALICE.entra_object_id])
    await rig.manager.sync()
    (sub,) = rig.emu.subscriptions
    records = rig.intake.bridge.records
    assert await records.get_doc(NOTIFIED_KIND, sub.id) is None
    rig.emu.set_user_state(ALICE.entra_object_id, "Busy", "InACall")
    await rig.emu.wait_idle()
    await rig.intake.wait_idle()
    first = await records.get_doc(NOTIFIED_KIND, sub.id)
    assert first is not None and datetime.fromisoformat(first["at"])
    writes: list[str] = []
    put_doc = records.put_doc

    async def counting(kind: str, key: str, doc: dict) -> None:
        if kind == NOTIFIED_KIND:
            writes.append(key)
        await put_doc(kind, key, doc)

    rig.intake.bridge.records.put_doc = counting  # type: ignore[method-assign]
    rig.emu.set_user_state(ALICE.entra_object_id, "Away", "Away")
    await rig.emu.wait_idle()
    await rig.intake.wait_idle()
    assert len(rig.emu.notifications_sent) == 2 and writes == []  # within the minute: not written again
