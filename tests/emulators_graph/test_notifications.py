"""Change notifications as Graph sends them: basic and rich (decrypted here with ``cryptography``
alone), ``validationTokens`` verified with PyJWT against the served JWKS, batching, the echo of the
bridge's own writes, retries, lifecycle events."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import timedelta
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from emulators.graph import GraphEmulator
from tests.emulators_graph.conftest import (
    ALICE,
    BOB,
    CAROL,
    CLIENT_ID,
    SUB_A,
    SUB_B,
    TENANT_ID,
    Certificate,
    Graph,
    Receiver,
    make_certificate,
)

GRAPH_CHANGE_TRACKING = "0bf30f3b-4a52-48df-9a82-234910c4a086"


def decrypt(content: dict[str, str], certificate: Certificate) -> dict[str, Any]:
    """What a subscriber does, written from Graph's documentation, independent of the emulator."""
    key = certificate.key.decrypt(
        base64.b64decode(content["dataKey"]),
        asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )
    assert len(key) == 32
    data = base64.b64decode(content["data"])
    expected = hmac.new(key, data, hashlib.sha256).digest()
    assert hmac.compare_digest(expected, base64.b64decode(content["dataSignature"])), "dataSignature mismatch"
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    result: dict[str, Any] = json.loads(unpadder.update(padded) + unpadder.finalize())
    return result


async def jwks(emu: GraphEmulator) -> jwt.PyJWKSet:
    async with aiohttp.ClientSession() as session, session.get(emu.jwks_url) as resp:
        assert resp.status == 200
        return jwt.PyJWKSet.from_dict(await resp.json())


def verify(token: str, keys: jwt.PyJWKSet) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["RS256"], audience=CLIENT_ID, issuer=f"https://sts.windows.net/{TENANT_ID}/"
    )
    return claims


async def rich_subscription(
    graph: Graph, receiver: Receiver, certificate: Certificate, ids: list[str] | None = None, token: str = SUB_A
) -> dict[str, Any]:
    status, body = await graph.subscribe(
        receiver,
        ids,
        token=token,
        includeResourceData=True,
        encryptionCertificate=base64.b64encode(certificate.der).decode(),
        encryptionCertificateId="cert-2026",
    )
    assert status == 201, body
    return body


# ------------------------------------------------------------------ basic


async def test_basic_notification_shape(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    (body,) = receiver.bodies()
    assert set(body) == {"value"}  # no validationTokens without resource data
    (item,) = body["value"]
    assert item == {
        "subscriptionId": sub["id"],
        "clientState": "s3cret-state",
        "changeType": "updated",
        "resource": f"communications/presences('{ALICE}')",
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.presence",
            "@odata.id": f"users/{ALICE}/presence",
            "id": ALICE,
        },
        "subscriptionExpirationDateTime": sub["expirationDateTime"],
        "tenantId": TENANT_ID,
    }
    (delivery,) = emu.notifications_sent
    assert delivery.status == 202 and delivery.ok and delivery.latency >= 0
    assert delivery.subscription_id == sub["id"]


async def test_bridge_write_is_notified_back(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    """The echo: the bridge's own setPresence changes what Teams shows, so Graph tells the bridge."""
    await graph.subscribe(receiver)
    await graph.set_presence(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    assert [i["resourceData"]["id"] for i in receiver.items()] == [ALICE]
    await graph.post(f"/users/{ALICE}/presence/clearPresence", {"sessionId": CLIENT_ID})
    await emu.wait_idle()
    assert len(receiver.items()) == 2


async def test_no_notification_when_aggregate_unchanged(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver)
    await graph.set_presence(ALICE, "Away", "Away")  # hidden under her own Available
    await graph.set_presence(ALICE, "Away", "Away")  # keep-alive
    emu.set_user_state(CAROL, "Busy", "InACall")  # not covered by the subscription
    await emu.wait_idle()
    assert receiver.posts == []
    assert emu.notifications_sent == []


async def test_clearing_a_session_over_the_same_own_state_notifies_nothing(
    emu: GraphEmulator, graph: Graph, receiver: Receiver
) -> None:
    """Why the bridge reads Teams after clearing a session Teams showed exactly (rules v2, rule 2): the
    person's own call under the bridge's Busy/InACall session (their own state wins the tie, with the
    same value) shows the same before and after the clear, so Graph sends nothing; their own meeting
    under that session shows as the meeting, and so does the clear."""
    await graph.set_presence(ALICE, "Busy", "InACall")
    emu.set_user_state(ALICE, "Busy", "InACall")
    await graph.subscribe(receiver)
    await graph.post(f"/users/{ALICE}/presence/clearPresence", {"sessionId": CLIENT_ID})
    await emu.wait_idle()
    assert emu.presence_of(ALICE) == ("Busy", "InACall") and receiver.posts == []
    await graph.set_presence(ALICE, "Busy", "InACall")
    emu.set_user_state(ALICE, "Busy", "InAMeeting")  # a tie on availability: the person's own wins
    await emu.wait_idle()
    assert emu.presence_of(ALICE) == ("Busy", "InAMeeting") and len(receiver.items()) == 1


async def test_changes_together_are_batched(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver, [ALICE, BOB, CAROL])
    emu.set_user_state(ALICE, "Busy", "InACall")
    emu.set_user_state(BOB, "Away", "Away")
    emu.set_user_state(CAROL, "DoNotDisturb", "Presenting")
    await emu.wait_idle()
    assert len(receiver.bodies()) == 1
    assert [i["resourceData"]["id"] for i in receiver.items()] == [ALICE, BOB, CAROL]


async def test_each_covering_subscription_is_notified(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, a = await graph.subscribe(receiver, [ALICE, BOB], token=SUB_A)
    _, b = await graph.subscribe(receiver, [BOB], token=SUB_B)
    emu.set_user_state(BOB, "Busy", "InAMeeting")
    emu.set_user_state(ALICE, "Busy", "InAMeeting")
    await emu.wait_idle()
    by_sub: dict[str, list[str]] = {}
    for item in receiver.items():
        by_sub.setdefault(item["subscriptionId"], []).append(item["resourceData"]["id"])
    assert by_sub == {a["id"]: [BOB, ALICE], b["id"]: [BOB]}


async def test_time_driven_changes_are_notified(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver)
    emu.set_user_state(ALICE, "Offline", "Offline")
    await graph.set_presence(ALICE, "Available", "Available", duration="PT15M")
    await emu.wait_idle()
    emu.advance(5 * 60)  # fades
    await emu.wait_idle()
    emu.advance(5 * 60)  # Away
    await emu.wait_idle()
    emu.advance(5 * 60)  # expired: offline
    await emu.wait_idle()
    assert len(receiver.items()) == 5  # Offline, Available, AvailableInactive, Away, Offline


async def test_expired_subscription_stops_notifying(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver, minutes=5)
    emu.advance(5 * 60)
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    assert receiver.posts == []


async def test_deleted_subscription_stops_notifying(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    await graph.delete(f"/subscriptions/{sub['id']}")
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    assert receiver.posts == []


async def test_failed_delivery_is_retried_then_dropped(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver)
    receiver.notify_statuses = [500, 503]
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    assert [(d.attempt, d.status, d.ok) for d in emu.notifications_sent] == [
        (1, 500, False),
        (2, 503, False),
        (3, 202, True),
    ]
    receiver.notify_statuses = [500, 500, 500]
    emu.set_user_state(ALICE, "Available", "Available")
    await emu.wait_idle()
    assert [d.ok for d in emu.notifications_sent[3:]] == [False, False, False]


async def test_slow_endpoint_counts_as_failure(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver)
    emu.notification_timeout = 0.2
    emu.delivery_attempts = 1
    receiver.notify_delay = 0.5
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    (delivery,) = emu.notifications_sent
    assert delivery.status is None and "no answer within" in (delivery.error or "")


async def test_drop_notifications_is_silent(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver)
    emu.drop_notifications(2)
    emu.set_user_state(ALICE, "Busy", "InACall")
    emu.set_user_state(BOB, "Busy", "InACall")
    emu.set_user_state(ALICE, "Away", "Away")
    await emu.wait_idle()
    assert [i["resourceData"]["id"] for i in receiver.items()] == [ALICE]
    assert len(emu.notifications_dropped) == 2
    assert len(emu.subscriptions) == 1  # still "active"


async def test_tamper_notifications(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    await graph.subscribe(receiver)

    def wrong_state(body: dict[str, Any]) -> None:
        body["value"][0]["clientState"] = "forged"

    emu.tamper_notifications(wrong_state)
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    emu.set_user_state(ALICE, "Available", "Available")
    await emu.wait_idle()
    assert [i["clientState"] for i in receiver.items()] == ["forged", "s3cret-state"]


# ------------------------------------------------------------------ rich


async def test_rich_notification_decrypts(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, certificate: Certificate
) -> None:
    sub = await rich_subscription(graph, receiver, certificate)
    await graph.set_presence(ALICE, "DoNotDisturb", "Presenting")
    await emu.wait_idle()
    (body,) = receiver.bodies()
    (item,) = body["value"]
    assert item["subscriptionId"] == sub["id"]
    assert item["resourceData"]["id"] == ALICE
    content = item["encryptedContent"]
    assert set(content) == {
        "data",
        "dataKey",
        "dataSignature",
        "encryptionCertificateId",
        "encryptionCertificateThumbprint",
    }
    assert content["encryptionCertificateId"] == "cert-2026"
    assert content["encryptionCertificateThumbprint"] == certificate.cert.fingerprint(hashes.SHA1()).hex().upper()
    presence = decrypt(content, certificate)
    assert presence["@odata.type"] == "#Microsoft.Graph.presence"
    assert (presence["id"], presence["availability"], presence["activity"]) == (ALICE, "DoNotDisturb", "Presenting")


async def test_each_rich_notification_has_its_own_key(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, certificate: Certificate
) -> None:
    await rich_subscription(graph, receiver, certificate)
    emu.set_user_state(ALICE, "Busy", "InACall")
    emu.set_user_state(BOB, "Busy", "InACall")
    await emu.wait_idle()
    contents = [i["encryptedContent"] for i in receiver.items()]
    assert len(contents) == 2 and contents[0]["dataKey"] != contents[1]["dataKey"]
    assert [decrypt(c, certificate)["id"] for c in contents] == [ALICE, BOB]


async def test_rich_notification_needs_the_right_private_key(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, certificate: Certificate
) -> None:
    await rich_subscription(graph, receiver, certificate)
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    other = make_certificate("someone-else")
    with pytest.raises(ValueError):
        decrypt(receiver.items()[0]["encryptedContent"], other)


async def test_validation_tokens_verify_against_served_jwks(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, certificate: Certificate
) -> None:
    await rich_subscription(graph, receiver, certificate)
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    (body,) = receiver.bodies()
    (token,) = body["validationTokens"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["kid"]
    claims = verify(token, await jwks(emu))
    assert claims["azp"] == GRAPH_CHANGE_TRACKING
    assert claims["aud"] == CLIENT_ID
    assert claims["tid"] == TENANT_ID
    assert claims["nbf"] <= claims["iat"] + 1 and claims["exp"] > claims["iat"]


async def test_validation_tokens_from_another_signer_fail(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, certificate: Certificate
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from emulators.graph_crypto import sign_validation_token

    intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = sign_validation_token(intruder, client_id=CLIENT_ID, tenant_id=TENANT_ID, kid=emu.signing_key.kid)
    with pytest.raises(jwt.InvalidSignatureError):
        verify(forged, await jwks(emu))
    wrong_aud = sign_validation_token(emu.signing_key, client_id="someone-else", tenant_id=TENANT_ID)
    with pytest.raises(jwt.InvalidAudienceError):
        verify(wrong_aud, await jwks(emu))
    expired = sign_validation_token(
        emu.signing_key, client_id=CLIENT_ID, tenant_id=TENANT_ID, now=emu.token_clock() - timedelta(hours=3)
    )
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(expired, await jwks(emu))


async def test_openid_configuration_points_at_keys(emu: GraphEmulator) -> None:
    async with aiohttp.ClientSession() as session, session.get(emu.openid_configuration_url) as resp:
        config = await resp.json()
    assert config["issuer"] == f"https://sts.windows.net/{TENANT_ID}/"
    async with aiohttp.ClientSession() as session, session.get(config["jwks_uri"]) as resp:
        assert (await resp.json())["keys"][0]["kid"] == emu.signing_key.kid


# ------------------------------------------------------------------ lifecycle


async def test_lifecycle_events(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    for event in ("reauthorizationRequired", "missed"):
        delivery = await emu.send_lifecycle(sub["id"], event)
        assert delivery is not None and delivery.ok
    bodies = receiver.bodies("/lifecycle")
    assert [b["value"][0]["lifecycleEvent"] for b in bodies] == ["reauthorizationRequired", "missed"]
    item = bodies[0]["value"][0]
    assert item == {
        "subscriptionId": sub["id"],
        "subscriptionExpirationDateTime": sub["expirationDateTime"],
        "tenantId": TENANT_ID,
        "organizationId": TENANT_ID,
        "clientState": "s3cret-state",
        "lifecycleEvent": "reauthorizationRequired",
        "resource": sub["resource"],
    }
    assert emu.subscription(sub["id"]) is not None
    assert emu.subscriptions[0].needs_reauthorization
    renew = {"expirationDateTime": (emu.now() + timedelta(minutes=50)).isoformat()}
    assert (await graph.patch(f"/subscriptions/{sub['id']}", renew))[0] == 200
    assert not emu.subscriptions[0].needs_reauthorization


async def test_subscription_removed(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver)
    await emu.send_lifecycle(sub["id"], "subscriptionRemoved")
    assert receiver.bodies("/lifecycle")[0]["value"][0]["lifecycleEvent"] == "subscriptionRemoved"
    assert emu.subscriptions == []
    assert (await graph.get(f"/subscriptions/{sub['id']}", token=SUB_A))[0] == 404
    emu.set_user_state(ALICE, "Busy", "InACall")
    await emu.wait_idle()
    assert receiver.bodies() == []
    assert (await graph.subscribe(receiver))[0] == 201  # recreation works


async def test_rich_lifecycle_carries_validation_tokens(
    emu: GraphEmulator, graph: Graph, receiver: Receiver, certificate: Certificate
) -> None:
    sub = await rich_subscription(graph, receiver, certificate)
    await emu.send_lifecycle(sub["id"], "missed")
    (body,) = receiver.bodies("/lifecycle")
    verify(body["validationTokens"][0], await jwks(emu))


async def test_lifecycle_without_url_or_subscription(emu: GraphEmulator, graph: Graph, receiver: Receiver) -> None:
    _, sub = await graph.subscribe(receiver, lifecycle=False)
    assert await emu.send_lifecycle(sub["id"], "missed") is None
    with pytest.raises(ValueError):
        await emu.send_lifecycle(sub["id"], "renewed")
    with pytest.raises(KeyError):
        await emu.send_lifecycle("nope", "missed")
