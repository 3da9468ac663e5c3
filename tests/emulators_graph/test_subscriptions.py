"""Presence subscriptions: the validation handshake before 201, the limits Graph enforces (delegated
accounts only, one per account, 650 ids, 60 minutes), renewal, deletion and expiry."""

from __future__ import annotations

import asyncio
import base64
import socket
from datetime import timedelta

import pytest

from emulators.graph import MAX_IDS, GraphEmulator
from tests.emulators_graph.conftest import (
    ALICE,
    APP_TOKEN,
    BOB,
    CAROL,
    CLIENT_ID,
    SUB_A,
    SUB_B,
    Certificate,
    Graph,
    Receiver,
)


def ids(n: int) -> list[str]:
    return [f"00000000-0000-4000-8000-{i:012d}" for i in range(n)]


# ------------------------------------------------------------------ handshake


async def test_create_after_validation_handshake(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    status, body = await graph.subscribe(receiver)
    assert status == 201, body
    # both URLs were validated, each with a POST, an empty body and an URL-decoded token to echo
    assert [path for path, *_ in receiver.validation_requests] == ["/notify", "/lifecycle"]
    for _, token, raw, _ctype in receiver.validation_requests:
        assert token.startswith("Validation: Testing client application reachability")
        assert raw == b""
    assert all(v.ok and v.status == 200 for v in emu.validations)
    assert body["resource"].startswith("/communications/presences?$filter=id in (")
    assert body["changeType"] == "updated"
    assert body["clientState"] == "s3cret-state"
    assert body["applicationId"] == CLIENT_ID
    assert body["notificationUrl"] == receiver.url("/notify")
    assert body["lifecycleNotificationUrl"] == receiver.url("/lifecycle")
    assert body["includeResourceData"] is False
    assert body["expirationDateTime"].endswith("Z")
    (info,) = emu.subscriptions
    assert info.id == body["id"]
    assert info.account == "subscriber-a@contoso.example"
    assert info.user_ids == {ALICE, BOB}
    assert info.notification_url == receiver.url("/notify")


@pytest.mark.parametrize(
    ("status", "name"), [(403, "Forbidden"), (404, "NotFound"), (500, "InternalServerError"), (202, "Accepted")]
)
async def test_failing_endpoint_gets_no_subscription(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, status: int, name: str
) -> None:
    receiver.validation = "status"
    receiver.validation_status = status
    code, body = await graph.subscribe(receiver)
    assert code == 400
    assert body["error"]["code"] == "ValidationError"
    assert f"HTTP status code is '{name}'" in body["error"]["message"]
    assert "must respond with 200 OK to validation request" in body["error"]["message"]
    assert emu.subscriptions == []
    assert (await graph.get("/subscriptions", token=SUB_A))[1]["value"] == []


@pytest.mark.parametrize(("mode", "fragment"), [("wrong-body", "exactly match"), ("wrong-type", "text/plain")])
async def test_wrong_validation_answer(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, mode: str, fragment: str
) -> None:
    receiver.validation = mode
    status, body = await graph.subscribe(receiver)
    assert status == 400
    assert fragment in body["error"]["message"]
    assert emu.subscriptions == []


async def test_validation_times_out(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    emu.validation_timeout = 0.3
    receiver.validation = "slow"
    receiver.slow_seconds = 1.0
    status, body = await graph.subscribe(receiver)
    assert status == 400
    assert body["error"]["message"] == "Subscription validation request timed out."
    assert emu.subscriptions == []


async def test_unreachable_endpoint(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = graph.subscription_body(receiver, lifecycle=False, notificationUrl=f"http://127.0.0.1:{port}/x")
    status, answer = await graph.post("/subscriptions", body, token=SUB_A)
    assert status == 400
    assert answer["error"]["code"] == "ValidationError"
    assert emu.subscriptions == []


async def test_lifecycle_url_must_validate_too(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    body = graph.subscription_body(receiver, lifecycleNotificationUrl=f"{emu.base_url}/nowhere")
    status, answer = await graph.post("/subscriptions", body, token=SUB_A)
    assert status == 400 and answer["error"]["code"] == "ValidationError"
    assert emu.subscriptions == []


async def test_notification_url_keeps_its_query(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    status, _ = await graph.subscribe(receiver, lifecycle=False, notificationUrl=receiver.url("/notify?code=k1"))
    assert status == 201
    assert receiver.validation_requests[0][0] == "/notify"


async def test_https_required_except_loopback(graph: Graph, receiver: Receiver) -> None:
    status, body = await graph.subscribe(receiver, lifecycle=False, notificationUrl="http://example.com/notify")
    assert status == 400 and "https" in body["error"]["message"]
    assert receiver.validation_requests == []


# ------------------------------------------------------------------ who may subscribe, to what


async def test_app_token_cannot_subscribe_to_presence(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    status, body = await graph.subscribe(receiver, token=APP_TOKEN)
    assert status == 403
    assert body["error"]["code"] == "ExtensionError"
    assert "Status Code: Forbidden" in body["error"]["message"]
    assert "delegated" in body["error"]["message"]
    assert receiver.validation_requests == []


async def test_650_ids_and_no_more(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    status, body = await graph.subscribe(receiver, ids(MAX_IDS + 1))
    assert status == 400
    assert "650" in body["error"]["message"]
    assert receiver.validation_requests == []
    status, body = await graph.subscribe(receiver, ids(MAX_IDS))
    assert status == 201, body
    assert len(emu.subscriptions[0].user_ids) == MAX_IDS


@pytest.mark.parametrize(
    "resource",
    [
        f"/communications/presences/{ALICE}",
        f"communications/presences/{ALICE}",
        f"/communications/presences?$filter=id in ('{ALICE}')",
        f"/communications/presences?$filter=id%20in%20(%27{ALICE}%27)",
        f"/communications/presences?$filter=id+in+(%27{ALICE}%27)",
        f'/communications/presences?$filter=id in ("{ALICE.upper()}")',
    ],
)
async def test_resource_forms(emu: GraphEmulator, graph: Graph, receiver: Receiver, resource: str) -> None:
    status, body = await graph.subscribe(receiver, resource=resource)
    assert status == 201, body
    assert emu.subscriptions[0].user_ids == {ALICE}


@pytest.mark.parametrize(
    "resource",
    [
        "/users",
        "/communications/presences",
        "/communications/presences?$filter=id in ()",
        "/communications/presences?$filter=id in (abc)",
        "",
    ],
)
async def test_bad_resources(graph: Graph, receiver: Receiver, resource: str) -> None:
    status, _ = await graph.subscribe(receiver, resource=resource)
    assert status == 400


async def test_change_type_must_be_updated(graph: Graph, receiver: Receiver) -> None:
    status, body = await graph.subscribe(receiver, changeType="created,updated")
    assert status == 400 and "updated" in body["error"]["message"]


@pytest.mark.parametrize("minutes", [61, 24 * 60, -1])
async def test_expiration_at_most_60_minutes_ahead(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, minutes: int
) -> None:
    status, body = await graph.subscribe(receiver, minutes=minutes)
    assert status == 400
    if minutes > 0:
        assert body["error"]["message"] == "Subscription expiration can only be 60 minutes in the future."
    assert emu.subscriptions == []


async def test_expiration_exactly_60_minutes_is_fine(graph: Graph, receiver: Receiver) -> None:
    assert (await graph.subscribe(receiver, minutes=60))[0] == 201


async def test_client_state_at_most_128_characters(graph: Graph, receiver: Receiver) -> None:
    assert (await graph.subscribe(receiver, clientState="x" * 129))[0] == 400


async def test_rich_needs_certificate_and_id(graph: Graph, receiver: Receiver, certificate: Certificate) -> None:
    cert_b64 = base64.b64encode(certificate.der).decode()
    assert (await graph.subscribe(receiver, includeResourceData=True))[0] == 400
    assert (await graph.subscribe(receiver, includeResourceData=True, encryptionCertificate=cert_b64))[0] == 400
    assert (
        await graph.subscribe(
            receiver, includeResourceData=True, encryptionCertificateId="c1", encryptionCertificate="bm90IGEgY2VydA=="
        )
    )[0] == 400
    status, body = await graph.subscribe(
        receiver, includeResourceData=True, encryptionCertificate=cert_b64, encryptionCertificateId="c1"
    )
    assert status == 201, body
    assert body["includeResourceData"] is True
    assert body["encryptionCertificateId"] == "c1"


# ------------------------------------------------------------------ one per account


async def test_one_subscription_per_account(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    status, first = await graph.subscribe(receiver, [ALICE])
    assert status == 201
    validations = len(receiver.validation_requests)
    status, body = await graph.subscribe(receiver, [BOB])
    assert status == 409
    assert body["error"]["code"] == "ExtensionError"
    assert "Status Code: Conflict" in body["error"]["message"]
    assert "already exists" in body["error"]["message"]
    assert len(receiver.validation_requests) == validations  # refused before any handshake
    # another account may subscribe
    status, _ = await graph.subscribe(receiver, [BOB], token=SUB_B)
    assert status == 201
    # once the first is deleted, its account may subscribe again
    assert (await graph.delete(f"/subscriptions/{first['id']}"))[0] == 204
    assert (await graph.subscribe(receiver, [CAROL]))[0] == 201
    assert {s.account for s in emu.subscriptions} == {"subscriber-a@contoso.example", "subscriber-b@contoso.example"}


async def test_concurrent_creates_by_one_account(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    """Both pass the first check while their handshakes run; only one may win."""
    receiver.validation = "slow"
    receiver.slow_seconds = 0.2
    results = await asyncio.gather(graph.subscribe(receiver, [ALICE]), graph.subscribe(receiver, [BOB]))
    assert sorted(status for status, _ in results) == [201, 409]
    assert len(emu.subscriptions) == 1


async def test_expired_subscription_frees_the_account(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, first = await graph.subscribe(receiver)
    emu.advance(46 * 60)
    assert emu.subscriptions == []
    assert (await graph.get(f"/subscriptions/{first['id']}", token=SUB_A))[0] == 404
    assert (await graph.subscribe(receiver))[0] == 201


# ------------------------------------------------------------------ read, renew, delete


async def test_list_is_per_account_and_app_sees_all(graph: Graph, receiver: Receiver) -> None:
    _, a = await graph.subscribe(receiver, [ALICE], token=SUB_A)
    _, b = await graph.subscribe(receiver, [BOB], token=SUB_B)
    assert [s["id"] for s in (await graph.get("/subscriptions", token=SUB_A))[1]["value"]] == [a["id"]]
    assert [s["id"] for s in (await graph.get("/subscriptions", token=SUB_B))[1]["value"]] == [b["id"]]
    assert {s["id"] for s in (await graph.get("/subscriptions", token=APP_TOKEN))[1]["value"]} == {a["id"], b["id"]}
    # another account cannot see or touch it
    assert (await graph.get(f"/subscriptions/{a['id']}", token=SUB_B))[0] == 404
    assert (await graph.delete(f"/subscriptions/{a['id']}", token=SUB_B))[0] == 404
    status, body = await graph.get(f"/subscriptions/{a['id']}", token=SUB_A)
    assert status == 200 and body["id"] == a["id"]


async def test_patch_renews(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver, minutes=10)
    emu.advance(9 * 60)
    new_expiry = emu.now() + timedelta(minutes=55)
    status, body = await graph.patch(f"/subscriptions/{sub['id']}", {"expirationDateTime": new_expiry.isoformat()})
    assert status == 200, body
    assert emu.subscriptions[0].expires_at == new_expiry
    emu.advance(30 * 60)  # past the original expiry, before the renewed one
    assert [s.id for s in emu.subscriptions] == [sub["id"]]


async def test_patch_limits(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    too_far = (emu.now() + timedelta(minutes=61)).isoformat()
    status, body = await graph.patch(f"/subscriptions/{sub['id']}", {"expirationDateTime": too_far})
    assert status == 400 and "60 minutes" in body["error"]["message"]
    assert (await graph.patch(f"/subscriptions/{sub['id']}", {}))[0] == 400
    assert (await graph.patch(f"/subscriptions/{sub['id']}", {"expirationDateTime": "soon"}))[0] == 400


async def test_patch_expired_or_unknown_is_404(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver, minutes=5)
    emu.advance(5 * 60)
    renew = {"expirationDateTime": (emu.now() + timedelta(minutes=30)).isoformat()}
    status, body = await graph.patch(f"/subscriptions/{sub['id']}", renew)
    assert status == 404
    assert body["error"]["code"] == "ResourceNotFound"
    assert (await graph.patch("/subscriptions/not-a-subscription", renew))[0] == 404


async def test_delete(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    assert (await graph.delete(f"/subscriptions/{sub['id']}"))[0] == 204
    assert emu.subscriptions == []
    assert (await graph.delete(f"/subscriptions/{sub['id']}"))[0] == 404
    assert (await graph.get(f"/subscriptions/{sub['id']}", token=SUB_A))[0] == 404


async def test_expire_subscription_control(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    emu.expire_subscription(sub["id"])
    assert emu.subscription(sub["id"]) is None
    assert (await graph.get(f"/subscriptions/{sub['id']}", token=SUB_A))[0] == 404
    with pytest.raises(KeyError):
        emu.expire_subscription(sub["id"])


async def test_reauthorize_endpoint(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    await emu.send_lifecycle(sub["id"], "reauthorizationRequired")
    assert emu.subscriptions[0].needs_reauthorization
    status, _ = await graph.post(f"/subscriptions/{sub['id']}/reauthorize", {}, token=SUB_A)
    assert status == 204
    assert not emu.subscriptions[0].needs_reauthorization


async def test_added_subscriber_account(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    assert (await graph.subscribe(receiver, token="token-c"))[0] == 401
    emu.add_subscriber("token-c", "subscriber-c@contoso.example")
    assert (await graph.subscribe(receiver, token="token-c"))[0] == 201


# ------------------------------------------------------------------ slow validation, listing


async def test_slow_validation_delays_each_validation_and_the_creation_outlives_its_client(
    emu: GraphEmulator, graph: Graph, receiver: Receiver
) -> None:
    """Graph validates both URLs before answering; a client that gives up meanwhile does not stop
    the creation: the subscription exists afterwards, unknown to its client, and a new create is 409."""
    emu.validation_delay(0.3)
    body = graph.subscription_body(receiver)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.4):  # past the first validation, before the second
            await graph.subscribe(receiver)
    assert emu.subscriptions == []  # still validating the lifecycle URL
    await emu.wait_idle(timeout=5)
    assert [path for path, *_ in receiver.validation_requests] == ["/notify", "/lifecycle"]
    (info,) = emu.subscriptions
    assert info.account == "subscriber-a@contoso.example" and info.user_ids == {ALICE, BOB}
    emu.validation_delay(0)
    status, err = await graph.post("/subscriptions", body, token=SUB_A)
    assert status == 409, err


async def test_listing_as_a_subscriber_shows_only_that_accounts_subscriptions(
    emu: GraphEmulator, graph: Graph, receiver: Receiver
) -> None:
    assert (await graph.subscribe(receiver, [ALICE], token=SUB_A))[0] == 201
    assert (await graph.subscribe(receiver, [BOB], token=SUB_B))[0] == 201
    status, page = await graph.get("/subscriptions", token=SUB_A)
    assert status == 200
    (only,) = page["value"]
    assert only["resource"] == "/communications/presences?$filter=id in ('" + ALICE + "')"
    assert only["clientState"] is None  # Graph does not return clientState when listing
    assert only["notificationUrl"] == receiver.url("/notify") and "@odata.nextLink" not in page
    # The app's own token lists every subscription the app made.
    status, page = await graph.get("/subscriptions", token=APP_TOKEN)
    assert status == 200 and len(page["value"]) == 2


async def test_listing_is_paged_with_next_link(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    emu.add_subscriber("token-c", "subscriber-c@contoso.example")
    for token, uid in ((SUB_A, ALICE), (SUB_B, BOB), ("token-c", CAROL)):
        assert (await graph.subscribe(receiver, [uid], token=token))[0] == 201
    emu.list_page_size = 2
    seen: list[str] = []
    pages = 0
    url: str | None = "/subscriptions"
    while url is not None:
        status, page = await graph.get(url, token=APP_TOKEN)
        assert status == 200, page
        pages += 1
        seen.extend(s["id"] for s in page["value"])
        url = page.get("@odata.nextLink")
        assert url is None or url.startswith(emu.url + "/subscriptions?$skiptoken=")
    assert pages == 2 and sorted(seen) == sorted(s.id for s in emu.subscriptions) and len(set(seen)) == 3
    status, err = await graph.get("/subscriptions?$skiptoken=not-a-token", token=APP_TOKEN)
    assert status == 400, err
