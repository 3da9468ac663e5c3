"""The Teams port's own HTTP (``GraphHttp.send_json``), where the SDK used to do the work: what an
answer other than 2xx becomes (type, status, ``Retry-After``, Graph's words, nothing secret), that
nothing is followed or retried inside a call, how the user id goes into the path, and that the
token, the limiter and ``doctor``'s read go where they went before.

Graph's own failures come from the emulator; what the emulator cannot say (an upstream that echoes
the request's credentials, a gateway's HTML page, a redirect, a claims challenge) from a stub
served here on loopback."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from emulators.graph import GraphEmulator
from graph_sync.client import make_http_client
from graph_sync.teams import TeamsPresenceClient
from mapping.errors import PermanentError, RetryableError, Throttled, UpstreamError
from mapping.memory import MemoryStore
from mapping.model import CLEAR, Agent
from mapping.ratelimit import GRAPH_PRESENCE, UpstreamLimiter
from tests.graph.conftest import APP_TOKEN, CLIENT_ID, agents, entra
from tests.support import StaticTokens

ALICE = Agent("97c90b02-4e38-ef11-a315-000d3a5a54dc", entra(1), "Alice Agent")
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoLm1pY3Jvc29mdC5jb20ifQ.c2lnbmF0dXJlLXBhcnQ"
"""A token shaped as Entra's are, so that an echo of it is recognisable wherever it lands."""


@pytest.fixture
async def teams(emu: GraphEmulator) -> AsyncIterator[TeamsPresenceClient]:
    emu.add_user(ALICE.entra_object_id)
    client = TeamsPresenceClient(emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore())
    client.retry = client.retry.__class__(max_attempts=1)
    yield client
    await client.close()


@asynccontextmanager
async def on(base: str, token: str = JWT) -> AsyncIterator[TeamsPresenceClient]:
    """A client of the stub at ``base`` that tries once, closed afterwards."""
    client = TeamsPresenceClient(f"{base}/v1.0", StaticTokens(token), session_id=CLIENT_ID, store=MemoryStore())
    client.retry = client.retry.__class__(max_attempts=1)
    try:
        yield client
    finally:
        await client.close()


async def failure(aw: Awaitable[Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as e:
        await aw
    return e.value


# ------------------------------------------------------------------ Graph's failures (emulator)


async def test_429_without_retry_after_is_throttled_with_no_wait_given(
    teams: TeamsPresenceClient, emu: GraphEmulator
) -> None:
    emu.fail_next(1, status=429, retry_after=None, paths="clearPresence")
    e = await failure(teams.apply(ALICE, CLEAR))
    assert isinstance(e, Throttled)
    assert (e.status, e.retry_after) == (429, None)
    assert "clearPresence for Alice Agent" in e.message and "TooManyRequests: Injected failure (429)." in e.message


async def test_429_on_a_read_is_throttled_with_its_retry_after(teams: TeamsPresenceClient, emu: GraphEmulator) -> None:
    emu.fail_next(1, status=429, retry_after=12, paths="getPresencesByUserId")
    e = await failure(teams.read([ALICE]))
    assert isinstance(e, Throttled) and e.retry_after == 12
    assert "getPresencesByUserId for 1 users" in e.message


async def test_503_without_retry_after_is_retryable_not_throttled(
    teams: TeamsPresenceClient, emu: GraphEmulator
) -> None:
    emu.fail_next(1, status=503, retry_after=None, paths="setPresence")
    e = await failure(teams.apply(ALICE, "Busy/InACall"))
    assert type(e) is RetryableError
    assert e.status == 503 and "Graph failed with 503" in e.message and "will retry" in e.message


async def test_401_is_retryable_and_says_what_to_check(emu: GraphEmulator) -> None:
    emu.add_user(ALICE.entra_object_id)
    client = TeamsPresenceClient(emu.url, StaticTokens("not-the-app-token"), session_id=CLIENT_ID, store=MemoryStore())
    try:
        e = await failure(client.apply(ALICE, "Away/Away"))
    finally:
        await client.close()
    assert type(e) is RetryableError and e.status == 401
    assert "Graph refused the token (401: InvalidAuthenticationToken:" in e.message
    assert "check the app registration" in e.message


async def test_a_failed_token_is_raised_as_the_provider_typed_it_and_nothing_is_sent(emu: GraphEmulator) -> None:
    class Refused:
        async def token(self, scope: str) -> str:
            raise PermanentError("Entra refused the client secret (AADSTS7000215); set a valid secret")

    emu.add_user(ALICE.entra_object_id)
    client = TeamsPresenceClient(emu.url, Refused(), session_id=CLIENT_ID, store=MemoryStore())
    try:
        e = await failure(client.apply(ALICE, "Away/Away"))
    finally:
        await client.close()
    assert type(e) is PermanentError and e.message.startswith("Entra refused the client secret")
    assert emu.calls("POST", "setPresence") == []


# ------------------------------------------------------------------ what only a stub can say


async def test_an_echoed_token_is_redacted_in_the_error_the_health_note_and_the_logs(
    stub: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def echo(request: web.Request) -> web.Response:
        said = f"Denied for {request.headers['Authorization']} (token={JWT}); body {await request.text()}"
        return web.json_response({"error": {"code": "Forbidden", "message": said}}, status=403)

    base, _ = await stub(echo)
    caplog.set_level(logging.DEBUG)
    async with on(base) as client:
        write = await failure(client.apply(ALICE, "Busy/InACall"))
        read = await failure(client.read([ALICE]))
        check = await client.check_read(ALICE)
        health = await client.health()
    assert type(write) is PermanentError and write.status == 403
    assert (
        "Presence.ReadWrite.All (application)" in write.message and "Forbidden: Denied for Bearer ***" in write.message
    )
    assert type(read) is PermanentError and "Presence.Read.All (application)" in read.message
    assert check.error is not None and check.error.status == 403
    for text in (write.message, str(write), read.message, check.error.message, json.dumps(health), caplog.text):
        assert JWT not in text
        assert JWT.split(".")[0] not in text


async def test_a_gateway_page_is_quoted_briefly_and_retried(stub: Any) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>" + "x" * 5000 + "</body></html>"

    async def gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text=page, content_type="text/html")

    base, _ = await stub(gateway)
    async with on(base) as client:
        e = await failure(client.apply(ALICE, "Away/Away"))
    assert type(e) is RetryableError and e.status == 502
    assert "Graph failed with 502: Bad Gateway: <html><head><title>502 Bad Gateway</title>" in e.message
    assert len(e.message) < 400


async def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(stub: Any) -> None:
    async def elsewhere(request: web.Request) -> web.Response:
        return web.Response(status=200)

    other, followed = await stub(elsewhere)

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"{other}/v1.0{request.path.removeprefix('/v1.0')}"})

    base, seen = await stub(moved)
    async with on(base) as client:
        write = await failure(client.apply(ALICE, "Away/Away"))
        read = await failure(client.read([ALICE]))
    assert followed == []
    assert len(seen) == 2
    assert type(write) is PermanentError and write.status == 307 and "Graph answered 307" in write.message
    assert type(read) is PermanentError and read.status == 307


async def test_a_claims_challenge_is_one_call_not_a_second_one(stub: Any) -> None:
    async def challenge(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"code": "InvalidAuthenticationToken", "message": "Continuous access evaluation"}},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="", error="insufficient_claims", claims="eyJhY2Nlc3MiOnt9fQ=="'},
        )

    base, seen = await stub(challenge)
    async with on(base) as client:
        e = await failure(client.apply(ALICE, "Away/Away"))
    assert type(e) is RetryableError and e.status == 401
    assert len(seen) == 1  # the outbox retries (DESIGN rule 7), not the writer


async def test_an_unreadable_read_answer_is_retryable(stub: Any) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(status=200, text="{not json", content_type="application/json")

    base, _ = await stub(garbage)
    async with on(base) as client:
        e = await failure(client.read([ALICE]))
    assert type(e) is RetryableError and "getPresencesByUserId for 1 users: unexpected JSONDecodeError" in e.message


async def test_the_user_id_is_one_encoded_path_segment_and_the_request_is_graphs(stub: Any) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(status=200)

    base, seen = await stub(ok)
    odd = Agent("97c90b02-0000-4000-8000-000000000009", "odd/id@x y", "Odd Agent")
    async with on(base) as client:
        await client.apply(odd, "DoNotDisturb/Presenting")
    (request,) = seen
    assert request.method == "POST"
    assert request.raw_path == "/v1.0/users/odd%2Fid%40x%20y/presence/setPresence"
    assert request.headers["Authorization"] == f"Bearer {JWT}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"


# ------------------------------------------------------------------ limiter, doctor, sharing


async def test_reads_take_a_limiter_slot_per_call_and_writes_none(emu: GraphEmulator) -> None:
    class Counting(UpstreamLimiter):
        slots = 0

        @asynccontextmanager
        async def slot(self, key: str = "") -> AsyncIterator[None]:
            self.slots += 1
            async with super().slot(key):
                yield

    directory = agents(1400)
    emu.add_users(a.entra_object_id for a in directory)
    limiter = Counting(GRAPH_PRESENCE)
    client = TeamsPresenceClient(
        emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore(), limiter=limiter
    )
    try:
        await client.apply(directory[0], "Busy/InACall")
        assert limiter.slots == 0  # writes: the outbox holds the slot
        assert len(await client.read(directory)) == 1400
    finally:
        await client.close()
    assert limiter.slots == 3


async def test_doctors_read_says_what_teams_shows_and_the_refused_write(
    teams: TeamsPresenceClient, emu: GraphEmulator
) -> None:
    emu.set_user_state(ALICE.entra_object_id, "Busy", "InAMeeting")
    check = await teams.check_read(ALICE)
    assert (check.shown, check.error, check.refused_write) == ("Busy/InAMeeting", None, None)
    assert emu.calls("GET", f"/users/{ALICE.entra_object_id}/presence")
    emu.fail_next(1, status=403, paths="setPresence")
    await failure(teams.apply(ALICE, "Away/Away"))
    check = await teams.check_read(ALICE)
    assert check.refused_write is not None and "Presence.ReadWrite.All" in check.refused_write.error
    ghost = Agent("a7f9a9ed-b311-ef11-9f89-000d3a544b4c", entra(999), "Ghost Agent")
    missing = await teams.check_read(ghost)
    assert missing.shown is None and missing.error is not None and missing.error.status == 404
    assert "reading the Teams presence of Ghost Agent" in missing.error.message


async def test_a_shared_client_outlives_the_presence_client(emu: GraphEmulator) -> None:
    emu.add_user(ALICE.entra_object_id)
    shared = make_http_client(emu.url)
    try:
        first = TeamsPresenceClient(
            emu.url, StaticTokens(APP_TOKEN), session_id=CLIENT_ID, store=MemoryStore(), http=shared
        )
        await first.apply(ALICE, "Busy/InACall")
        await first.close()  # not its client to close
        second = TeamsPresenceClient(
            emu.url, StaticTokens(APP_TOKEN), session_id="other-app", store=MemoryStore(), http=shared
        )
        await second.apply(ALICE, "Away/Away")
    finally:
        await shared.aclose()
    assert len(emu.calls("POST", "setPresence")) == 2
    closed = await failure(second.apply(ALICE, "Away/Away"))
    assert type(closed) is RetryableError and emu.calls("POST", "setPresence")[2:] == []
