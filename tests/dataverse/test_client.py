"""The Web API client (the core's Dynamics 365 port) against the Dataverse emulator: the exact calls,
the typed error each Dataverse failure becomes, delivery through the real OutboxWorker (Retry-After
honoured, dead letters with Dataverse's own words), reads with row versions, paging, and where the
token may go."""

from __future__ import annotations

import email.utils
import socket
import time
from collections.abc import Awaitable
from typing import Any

import pytest
from aiohttp import web

from dataverse.client import READ_BATCH, DataverseClient, check_dataverse_url
from dataverse.registration import register_webhook
from edge.upstream import retry_after_seconds
from emulators.dataverse import AVAILABLE, AWAY, BUSY, DND, LUNCH, OFFLINE, RETIRED, TRAINING, DataverseEmulator
from mapping.errors import ConfigError, PermanentError, RetryableError, Throttled, UpstreamError
from mapping.model import Agent, BasePresence, OutboxStatus, SetPresence, System
from tests.dataverse.conftest import KEY, TOKEN, Served
from tests.support import ALICE, BOB, FakeClock, RecordingWriter, StaticTokens, make_bridge

CAROL = Agent("c0c0c0c0-0000-4000-8000-00000000c001", "0a1b2c3d-0000-4000-8000-000000000003", "Carol User")


def modify_calls(emu: DataverseEmulator) -> list[Any]:
    return [c for c in emu.calls if c.path == "CCaaS_ModifyAgentPresence"]


async def upstream_error(aw: Awaitable[Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as e:
        await aw
    assert TOKEN not in str(e.value) and TOKEN not in repr(e.value)
    return e.value


# ---------------------------------------------------------------------------------------------- apply


async def test_apply_impersonates_the_agent_with_the_documented_body(
    emu: DataverseEmulator, client: DataverseClient, tokens: StaticTokens
) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    await client.apply(ALICE, BUSY)
    (call,) = modify_calls(emu)
    assert (call.method, call.caller, call.status) == ("POST", ALICE.dynamics_user_id, 200)
    assert call.body == {"ApiVersion": "1.0", "AgentId": ALICE.dynamics_user_id, "PresenceId": BUSY}
    assert emu.presence_of(ALICE.dynamics_user_id) == BUSY
    status = emu.agent_status(ALICE.dynamics_user_id)
    assert status is not None and status["msdyn_presencemodifiedby"] == "AGENT"
    assert tokens.scopes == [f"{emu.url}/.default"]


async def test_apply_emits_the_update_webhook_to_a_registered_step(
    emu: DataverseEmulator, client: DataverseClient, served: Served
) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    await client.apply(ALICE, DND)
    assert await emu.wait_emissions() == []  # nothing registered: nothing sent
    await register_webhook(client, url=served.url, key=KEY, dry_run=False, progress=lambda _: None)
    await client.apply(ALICE, BUSY)
    (sent,) = await emu.wait_emissions()
    assert (sent.message, sent.agent_id, sent.url, sent.status, sent.error) == (
        "Update",
        ALICE.dynamics_user_id,
        served.url,
        202,
        None,
    )  # Alice is not in the bridge's directory
    target = sent.body["InputParameters"][0]["value"]
    attrs = {p["key"]: p["value"] for p in target["Attributes"]}
    assert attrs["msdyn_currentpresenceid"]["Id"] == BUSY
    assert attrs["msdyn_presencemodifiedby"] == "AGENT"
    assert attrs["modifiedonbehalfby"]["Id"] != ALICE.dynamics_user_id  # the application user, impersonating


async def test_throttled_with_retry_after(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    emu.fail_next(1, 429, retry_after=7)
    e = await upstream_error(client.apply(ALICE, BUSY))
    assert isinstance(e, Throttled) and e.retry_after == 7.0 and e.status == 429
    assert "Number of requests exceeded the limit of 6000" in e.message
    assert "Alice Agent" in e.message and "waiting 7 s" in e.message


async def test_service_protection_limit_of_the_impersonated_user() -> None:
    emu = DataverseEmulator(token=TOKEN, requests_per_window=2, window_seconds=60)
    await emu.start()
    c = DataverseClient(emu.url, StaticTokens(TOKEN), timeout=2.0)
    try:
        emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
        emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent")
        await c.apply(ALICE, BUSY)
        await c.apply(ALICE, AVAILABLE)
        e = await upstream_error(c.apply(ALICE, DND))
        assert isinstance(e, Throttled) and e.retry_after is not None and 1 <= e.retry_after <= 60
        await c.apply(BOB, BUSY)  # charged against Bob's own quota
    finally:
        await c.close()
        await emu.stop()


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(emu: DataverseEmulator, client: DataverseClient, status: int) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    emu.fail_next(1, status)
    e = await upstream_error(client.apply(ALICE, BUSY))
    assert type(e) is RetryableError and e.status == status
    assert f"Dataverse failed with {status}" in e.message and "0x80040216" in e.message


async def test_503_with_retry_after_is_throttling(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    emu.fail_next(1, 503, retry_after=3)
    e = await upstream_error(client.apply(ALICE, BUSY))
    assert isinstance(e, Throttled) and e.retry_after == 3.0 and e.status == 503


@pytest.mark.slow
async def test_timeout_is_retryable(emu: DataverseEmulator, tokens: StaticTokens) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    emu.latency(2.0)
    c = DataverseClient(emu.url, tokens, timeout=0.2)
    try:
        started = time.monotonic()
        e = await upstream_error(c.apply(ALICE, BUSY))
        assert time.monotonic() - started < 1.5
    finally:
        await c.close()
    assert type(e) is RetryableError
    assert e.message.endswith("Dataverse did not answer within 0.2 s; will retry")


async def test_connection_refused_is_retryable(tokens: StaticTokens) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = DataverseClient(f"http://127.0.0.1:{port}", tokens, timeout=2.0)
    try:
        e = await upstream_error(c.apply(ALICE, BUSY))
    finally:
        await c.close()
    assert type(e) is RetryableError and "cannot reach Dataverse" in e.message


async def test_unknown_presence_is_permanent_with_dataverses_message(
    emu: DataverseEmulator, client: DataverseClient
) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    e = await upstream_error(client.apply(ALICE, RETIRED))  # an inactive presence
    assert isinstance(e, PermanentError) and e.status == 404
    assert f"msdyn_presence With Id = {RETIRED} Does Not Exist (0x80040217)" in e.message
    assert "the agent, presence or row does not exist" in e.message


async def test_not_an_agent_is_405_permanent(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_user(CAROL.dynamics_user_id, CAROL.entra_object_id, "Carol User")
    e = await upstream_error(client.apply(CAROL, BUSY))
    assert isinstance(e, PermanentError) and e.status == 405
    assert f"API not allowed: user {CAROL.dynamics_user_id} is not a contact center agent" in e.message
    assert "Omnichannel Agent role" in e.message


async def test_disabled_user_is_400_permanent(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", disabled=True)
    e = await upstream_error(client.apply(ALICE, BUSY))
    assert isinstance(e, PermanentError) and e.status == 400
    assert "is disabled. Disabled users cannot be impersonated." in e.message


async def test_missing_impersonation_privilege_is_403_with_the_hint(
    emu: DataverseEmulator, client: DataverseClient
) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    emu.impersonation_allowed = False
    e = await upstream_error(client.apply(ALICE, BUSY))
    assert isinstance(e, PermanentError) and e.status == 403
    assert "prvActOnBehalfOfAnotherUser" in e.message and "Act on Behalf of Another User" in e.message


async def test_wrong_token_is_401_and_never_shown(emu: DataverseEmulator) -> None:
    c = DataverseClient(emu.url, StaticTokens("not-the-token-0xdeadbeef"), timeout=2.0)
    try:
        with pytest.raises(PermanentError) as e:
            await c.apply(ALICE, BUSY)
    finally:
        await c.close()
    assert e.value.status == 401 and "application user" in e.value.message
    assert "0xdeadbeef" not in str(e.value)


@pytest.mark.parametrize("status", [400, 404, 405])
async def test_injected_client_errors_are_permanent(
    emu: DataverseEmulator, client: DataverseClient, status: int
) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    emu.fail_next(1, status)
    e = await upstream_error(client.apply(ALICE, BUSY))
    assert isinstance(e, PermanentError) and e.status == status
    assert f"Dataverse answered {status}: " in e.message


# ---------------------------------------------------------------------------------------------- through the outbox


@pytest.fixture
async def outbox_bridge(client: DataverseClient) -> Any:
    clock = FakeClock()
    return make_bridge(clock=clock, writers={System.DYNAMICS: client, System.TEAMS: RecordingWriter(System.TEAMS)})


async def enqueue(bridge: Any, agent: Agent, value: str) -> None:
    async with bridge.store.transaction() as tx:
        await tx.enqueue(SetPresence(agent.dynamics_user_id, System.DYNAMICS, value, "test"), bridge.clock())


async def test_outbox_waits_out_retry_after_then_delivers(emu: DataverseEmulator, outbox_bridge: Any) -> None:
    b = outbox_bridge
    await b.store.upsert_agents([ALICE])
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    emu.fail_next(1, 429, retry_after=5, path="CCaaS_ModifyAgentPresence")
    await enqueue(b, ALICE, BUSY)
    assert await b.outbox.run_once() == 1
    row = await b.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.status is OutboxStatus.PENDING and row.attempts == 1
    assert row.last_error is not None and "429" in row.last_error
    assert row.next_attempt_at is not None and (row.next_attempt_at - b.clock()).total_seconds() >= 5
    b.clock.advance(4)
    assert await b.outbox.run_once() == 0  # Retry-After not over: no call
    assert [c.status for c in modify_calls(emu)] == [429]
    b.clock.advance(1.5)
    assert await b.outbox.run_once() == 1
    row = await b.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.status is OutboxStatus.DELIVERED
    assert [c.status for c in modify_calls(emu)] == [429, 200]
    assert emu.presence_of(ALICE.dynamics_user_id) == BUSY


async def test_outbox_dead_letter_keeps_dataverses_message(emu: DataverseEmulator, outbox_bridge: Any) -> None:
    b = outbox_bridge
    await b.store.upsert_agents([CAROL])
    emu.add_user(CAROL.dynamics_user_id, CAROL.entra_object_id, "Carol User")
    await enqueue(b, CAROL, BUSY)
    assert await b.outbox.run_once() == 1
    row = await b.store.outbox_row(CAROL.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.status is OutboxStatus.DEAD and row.attempts == 1
    assert row.last_error is not None
    assert f"API not allowed: user {CAROL.dynamics_user_id} is not a contact center agent" in row.last_error
    assert len(modify_calls(emu)) == 1  # permanent: no second try


async def test_outbox_retries_a_server_error(emu: DataverseEmulator, outbox_bridge: Any) -> None:
    b = outbox_bridge
    await b.store.upsert_agents([ALICE])
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    emu.fail_next(2, 500, path="CCaaS_ModifyAgentPresence")
    await enqueue(b, ALICE, DND)
    for _ in range(3):
        assert await b.outbox.run_once() == 1
        b.clock.advance(60)
    row = await b.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.status is OutboxStatus.DELIVERED and row.attempts == 2
    assert [c.status for c in modify_calls(emu)] == [500, 500, 200]
    assert emu.presence_of(ALICE.dynamics_user_id) == DND


# ---------------------------------------------------------------------------------------------- reads


async def test_read_returns_versions_and_leaves_out_non_agents(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id.upper(), "Alice Agent", AVAILABLE)
    emu.set_presence(ALICE.dynamics_user_id, TRAINING, "AGENT")
    emu.add_user(CAROL.dynamics_user_id, CAROL.entra_object_id, "Carol User")
    seen = await client.read([Agent(ALICE.dynamics_user_id.upper(), ALICE.entra_object_id), CAROL])
    status = emu.agent_status(ALICE.dynamics_user_id)
    assert status is not None
    (obs,) = seen
    assert (obs.agent_id, obs.system, obs.value, obs.modified_by, obs.source) == (
        ALICE.dynamics_user_id,
        System.DYNAMICS,
        TRAINING,
        "AGENT",
        "reconcile",
    )
    assert obs.version == status["versionnumber"] and isinstance(obs.version, int)
    emu.set_presence(ALICE.dynamics_user_id, BUSY, "SYSTEM")
    (again,) = await client.read([ALICE])
    assert again.version is not None and again.version > obs.version and again.modified_by == "SYSTEM"


async def test_read_batches_the_ids(emu: DataverseEmulator, client: DataverseClient) -> None:
    agents = [Agent(f"00000000-0000-4000-8000-{i:012d}", f"10000000-0000-4000-8000-{i:012d}") for i in range(150)]
    for a in agents:
        emu.add_agent(a.dynamics_user_id, a.entra_object_id, "x", BUSY)
    before = len(emu.calls)
    seen = await client.read(agents)
    assert sorted(o.agent_id for o in seen) == sorted(a.dynamics_user_id for a in agents)
    queries = [c for c in list(emu.calls)[before:] if c.path == "msdyn_agentstatuses"]
    assert len(queries) == -(-150 // READ_BATCH) == 2
    assert all("Microsoft.Dynamics.CRM.In" in c.query for c in queries)


async def test_list_presences_includes_custom_ones_by_base(client: DataverseClient) -> None:
    got = {p.presence_id: p for p in await client.list_presences()}
    assert set(got) == {AVAILABLE, BUSY, DND, AWAY, OFFLINE, TRAINING, LUNCH}  # not the inactive one
    assert got[TRAINING].base is BasePresence.BUSY_DND and got[TRAINING].name == "Training"
    assert got[LUNCH].base is BasePresence.AWAY and got[LUNCH].name == "Lunch"
    assert got[BUSY].base is BasePresence.BUSY


async def test_get_presence(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE, logged_in=True)
    p = await client.get_presence(ALICE)
    assert (p.agent_id, p.agent_name, p.presence_id, p.status_text) == (
        ALICE.dynamics_user_id,
        "Alice Agent",
        AVAILABLE,
        "Available",
    )
    assert p.active_sessions == 1 and p.logged_in_at is not None and "chat" in p.allowed_channels
    emu.set_presence(ALICE.dynamics_user_id, OFFLINE)
    p = await client.get_presence(ALICE)
    assert p.presence_id == OFFLINE and p.logged_in_at is None and p.disabled_channels == ("chat", "voice")


async def test_get_systemuser(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_user(CAROL.dynamics_user_id, CAROL.entra_object_id.upper(), "Carol User", disabled=True)
    user = await client.get_systemuser(CAROL.dynamics_user_id)
    assert user is not None
    assert (user.systemuserid, user.entra_object_id, user.fullname, user.disabled) == (
        CAROL.dynamics_user_id,
        CAROL.entra_object_id,
        "Carol User",
        True,
    )
    assert await client.get_systemuser("deadbeef-0000-4000-8000-000000000000") is None
    emu.add_user(BOB.dynamics_user_id, "00000000-0000-0000-0000-000000000000", "Bob")
    bob = await client.get_systemuser(BOB.dynamics_user_id)
    assert bob is not None and bob.entra_object_id is None


async def test_systemusers_paging_follows_next_links(emu: DataverseEmulator, client: DataverseClient) -> None:
    ids = {f"20000000-0000-4000-8000-{i:012d}" for i in range(25)}
    for uid in ids:
        emu.add_user(uid, uid.replace("2", "3", 1), f"user {uid[-2:]}")
    total = len(emu.tables["systemusers"].rows)
    pages: list[list[str]] = []
    link: str | None = None
    while True:
        users, link = await client.systemusers_page(link, page_size=4)
        pages.append([u.systemuserid for u in users])
        if link is None:
            break
        assert link.startswith(emu.api + "/systemusers?") and "$skiptoken=" in link
    assert [len(p) for p in pages] == [4] * (total // 4) + ([total % 4] if total % 4 else [])
    seen = [uid for page in pages for uid in page]
    assert len(seen) == len(set(seen)) == total and ids <= set(seen)
    pages_via_iter = [page async for page in client.iter_systemusers(page_size=4)]
    assert len(pages_via_iter) == len(pages)


async def test_agent_ids(emu: DataverseEmulator, client: DataverseClient) -> None:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")
    emu.add_agent(BOB.dynamics_user_id, BOB.entra_object_id, "Bob Agent")
    emu.add_user(CAROL.dynamics_user_id, CAROL.entra_object_id, "Carol User")
    assert await client.agent_ids(page_size=1) == {ALICE.dynamics_user_id, BOB.dynamics_user_id}


# ---------------------------------------------------------------------------------------------- where the token goes


async def test_a_next_link_to_another_origin_is_refused_before_any_call(
    client: DataverseClient, tokens: StaticTokens
) -> None:
    e = await upstream_error(client.systemusers_page("https://evil.example/api/data/v9.2/systemusers?$skiptoken=1"))
    assert isinstance(e, PermanentError)
    assert "https://evil.example" in e.message and "refusing to send the token there" in e.message
    assert tokens.scopes == []


async def test_a_foreign_next_link_in_a_page_is_not_followed(stub: Any) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "value": [{"_msdyn_agentid_value": ALICE.dynamics_user_id}],
                "@odata.nextLink": "http://localhost:9/api/data/v9.2/msdyn_agentstatuses?x=1",
            }
        )

    url, seen = await stub(page)
    c = DataverseClient(url, StaticTokens(TOKEN), timeout=2.0)
    try:
        e = await upstream_error(c.agent_ids())
    finally:
        await c.close()
    assert isinstance(e, PermanentError) and "http://localhost:9" in e.message
    assert len(seen) == 1


async def test_a_token_echoed_by_the_server_is_not_in_the_error(stub: Any) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=400, text=f"bad request; you sent {request.headers['Authorization']}")

    url, _ = await stub(echo)
    c = DataverseClient(url, StaticTokens(TOKEN), timeout=2.0)
    try:
        e = await upstream_error(c.apply(ALICE, BUSY))
    finally:
        await c.close()
    assert isinstance(e, PermanentError) and "bad request; you sent Bearer <token>" in e.message


async def test_redirects_are_not_followed(stub: Any) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://localhost:9/steal")

    url, seen = await stub(moved)
    c = DataverseClient(url, StaticTokens(TOKEN), timeout=2.0)
    try:
        e = await upstream_error(c.get_presence(ALICE))
    finally:
        await c.close()
    assert isinstance(e, PermanentError) and e.status == 302 and len(seen) == 1


def test_only_https_or_loopback_http() -> None:
    assert check_dataverse_url("https://contoso.crm.dynamics.com/") == "https://contoso.crm.dynamics.com"
    assert check_dataverse_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert check_dataverse_url("http://[::1]:8080/") == "http://[::1]:8080"
    for bad in ("http://contoso.crm.dynamics.com", "ftp://127.0.0.1", "contoso.crm.dynamics.com"):
        with pytest.raises(ConfigError, match=r"must be https://<org>\.crm\.dynamics\.com"):
            check_dataverse_url(bad)


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"Retry-After": "12"}) == 12.0
    assert retry_after_seconds({"Retry-After": "-3"}) == 0.0
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = retry_after_seconds({"Retry-After": when})
    assert got is not None and 25 <= got <= 31
