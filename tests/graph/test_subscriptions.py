"""The subscription manager against the Graph emulator, notification routes served on a free port:
650-id chunks one per account, renewals, recreation, reauthorization, directory changes, the polling
fallback when accounts run out, conflicts, failures, and leadership."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from emulators.graph import GraphEmulator
from graph_sync.accounts import SubscriberAccounts
from graph_sync.client import DEFAULT_TIMEOUT, SUBSCRIPTION_CREATE_TIMEOUT
from graph_sync.subscriptions import KIND, LEADERSHIP, SubscriptionManager, assign, presence_resource
from mapping.model import PresenceObserved, System
from tests.graph.conftest import (
    APP_TOKEN,
    CLIENT_ID,
    CLIENT_STATE,
    SUBSCRIBER_TOKENS,
    TENANT_ID,
    Rig,
    agents,
    entra,
)
from tests.support import AVAILABLE, BUSY

pytestmark = pytest.mark.slow


async def seed(rig: Rig, count: int = 1400) -> None:
    directory = agents(count)
    await rig.bridge.store.upsert_agents(directory)
    rig.emu.add_users(a.entra_object_id for a in directory)


def subs_by_account(rig: Rig) -> dict[str, frozenset[str]]:
    return {s.account: s.user_ids for s in rig.emu.subscriptions}


async def test_1400_agents_on_3_accounts_make_3_subscriptions(rig: Rig) -> None:
    await seed(rig)
    report = await rig.manager.sync()
    assert (report.created, report.failed, report.uncovered, report.warning) == (3, 0, [], "")
    assert report.covered == 1400
    subs = sorted(rig.emu.subscriptions, key=lambda s: s.account)
    assert [len(s.user_ids) for s in subs] == [650, 650, 100]
    assert len({s.account for s in subs}) == 3
    union = frozenset().union(*(s.user_ids for s in subs))
    assert union == {entra(i) for i in range(1, 1401)}
    first = subs[0]
    assert first.user_ids == {entra(i) for i in range(1, 651)}  # sorted chunks on a fresh start
    assert first.resource == presence_resource(sorted(first.user_ids))
    assert first.client_state == CLIENT_STATE
    assert first.notification_url == rig.notify_url and first.lifecycle_url == rig.lifecycle_url
    assert first.include_resource_data is False
    assert timedelta(minutes=54) < first.expires_at - rig.bridge.clock() <= timedelta(minutes=55)
    # Graph checked both URLs with the validationToken handshake, served by GraphIntake.
    assert len(rig.emu.validations) == 6 and all(v.ok for v in rig.emu.validations)
    docs = await rig.bridge.store.list_docs(KIND)
    assert sorted(docs) == ["static-1", "static-2", "static-3"]
    assert {d["subscription_id"] for d in docs.values()} == {s.id for s in subs}

    calls = len(rig.emu.requests)
    again = await rig.manager.sync()
    assert (again.unchanged, again.created, again.renewed) == (3, 0, 0)
    assert len(rig.emu.requests) == calls  # nothing to do, nothing asked of Graph


async def test_renewal_before_expiry_keeps_the_subscriptions(rig: Rig) -> None:
    await seed(rig)
    await rig.manager.sync()
    before = {s.account: (s.id, s.expires_at) for s in rig.emu.subscriptions}
    rig.bridge.clock.advance(39 * 60)  # type: ignore[attr-defined]
    assert (await rig.manager.sync()).unchanged == 3  # 16 minutes left: not yet
    rig.bridge.clock.advance(2 * 60)  # type: ignore[attr-defined]
    report = await rig.manager.sync()
    assert report.renewed == 3
    assert len(rig.emu.calls("PATCH", "/subscriptions/")) == 3
    after = {s.account: (s.id, s.expires_at) for s in rig.emu.subscriptions}
    assert {a: v[0] for a, v in after.items()} == {a: v[0] for a, v in before.items()}
    assert all(after[a][1] > before[a][1] for a in after)
    rig.bridge.clock.advance(50 * 60)  # type: ignore[attr-defined]  # alive only thanks to the renewal
    assert len(rig.emu.subscriptions) == 3


async def test_subscription_removed_lifecycle_recreates_it(rig: Rig) -> None:
    await seed(rig)
    await rig.manager.sync()
    victim = next(s for s in rig.emu.subscriptions if s.account.startswith("subscriber-2"))
    delivery = await rig.emu.send_lifecycle(victim.id, "subscriptionRemoved")
    assert delivery is not None and delivery.status == 202
    await rig.intake.wait_idle()
    replacement = next(s for s in rig.emu.subscriptions if s.account == victim.account)
    assert replacement.id != victim.id and replacement.user_ids == victim.user_ids
    doc = await rig.bridge.store.get_doc(KIND, "static-2")
    assert doc is not None and doc["subscription_id"] == replacement.id and doc["pending"] is None
    assert len(rig.emu.subscriptions) == 3


async def test_silently_expired_subscription_is_created_again(rig: Rig) -> None:
    await seed(rig, 10)
    await rig.manager.sync()
    (sub,) = rig.emu.subscriptions
    rig.emu.expire_subscription(sub.id)  # no lifecycle event: Graph just forgot it
    rig.bridge.clock.advance(45 * 60)  # type: ignore[attr-defined]
    report = await rig.manager.sync()
    assert report.recreated == 1
    (again,) = rig.emu.subscriptions
    assert again.id != sub.id and again.user_ids == sub.user_ids
    assert [r.status for r in rig.emu.calls("PATCH")] == [404]


async def test_reauthorization_required_renews(rig: Rig) -> None:
    await seed(rig, 10)
    await rig.manager.sync()
    (sub,) = rig.emu.subscriptions
    rig.bridge.clock.advance(60)  # type: ignore[attr-defined]
    await rig.emu.send_lifecycle(sub.id, "reauthorizationRequired")
    await rig.intake.wait_idle()
    (after,) = rig.emu.subscriptions
    assert after.id == sub.id and after.needs_reauthorization is False and after.expires_at > sub.expires_at
    assert len(rig.emu.calls("PATCH")) == 1


async def test_accounts_run_out_and_the_rest_is_polled(rig: Rig) -> None:
    rig.accounts.static_tokens = SUBSCRIBER_TOKENS[:2]
    await seed(rig)
    report = await rig.manager.sync()
    assert report.created == 2 and len(report.uncovered) == 100 and report.covered == 1300
    assert "1400 agents but 2 subscriber account(s) cover at most 1300" in report.warning
    assert "1 more account" in report.warning and "1400 agents" in str(report)
    assert sorted(len(s.user_ids) for s in rig.emu.subscriptions) == [650, 650]
    uncovered = set(report.uncovered)
    covered = frozenset().union(*(s.user_ids for s in rig.emu.subscriptions))
    assert not uncovered & covered and uncovered | covered == {entra(i) for i in range(1, 1401)}

    # A Teams call of a polled agent reaches Dynamics without any notification.
    polled = sorted(uncovered)[0]
    rig.emu.set_user_state(polled, "Busy", "InAMeeting")
    reads = len(rig.emu.calls("POST", "getPresencesByUserId"))
    assert await rig.manager.poll_uncovered() == 100
    assert len(rig.emu.calls("POST", "getPresencesByUserId")) == reads + 1
    agent = await rig.bridge.store.get_agent_by_entra(polled)
    assert agent is not None
    # Measured against the agent's Dynamics presence (rule 2): the bridge reads it first, then polls.
    await rig.bridge.engine.observe(
        PresenceObserved(agent.dynamics_user_id, System.DYNAMICS, AVAILABLE, rig.bridge.clock(), 1, "SYSTEM")
    )
    assert await rig.manager.poll_uncovered() == 100
    row = await rig.bridge.store.outbox_row(agent.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.value == BUSY
    rows = await rig.manager.status()
    assert rows[-1]["account"] == "(polling)" and rows[-1]["ids"] == 100


async def test_losing_an_account_moves_its_agents_to_polling(rig: Rig) -> None:
    await seed(rig)
    await rig.manager.sync()
    rig.accounts.static_tokens = SUBSCRIBER_TOKENS[:2]
    report = await rig.manager.sync()
    assert report.deleted == 1 and report.unchanged == 2 and len(report.uncovered) == 100
    assert len(rig.emu.subscriptions) == 2
    assert sorted(await rig.bridge.store.list_docs(KIND)) == ["static-1", "static-2"]


async def test_directory_changes_touch_only_the_affected_subscription(rig: Rig) -> None:
    await seed(rig)
    await rig.manager.sync()
    before = subs_by_account(rig)
    newcomer = agents(1, start=5000)
    await rig.bridge.store.upsert_agents(newcomer)
    report = await rig.manager.sync()
    assert (report.updated, report.unchanged) == (1, 2)
    after = subs_by_account(rig)
    changed = [a for a in after if after[a] != before[a]]
    assert len(changed) == 1 and after[changed[0]] == before[changed[0]] | {newcomer[0].entra_object_id}
    # An agent disabled in the first chunk: that subscription alone is replaced.
    await rig.bridge.store.set_agent_enabled(agents(1)[0].dynamics_user_id, False)
    report = await rig.manager.sync()
    assert (report.updated, report.unchanged) == (1, 2)
    assert entra(1) not in frozenset().union(*subs_by_account(rig).values())


async def test_an_existing_subscription_of_the_account_is_replaced(rig: Rig, http: aiohttp.ClientSession) -> None:
    """One per account and app: a leftover (record lost, old deployment) answers 409 and is cleared."""
    await seed(rig, 5)
    body = {
        "changeType": "updated",
        "notificationUrl": rig.notify_url,
        "resource": presence_resource([entra(1)]),
        "expirationDateTime": (rig.emu.now() + timedelta(minutes=30)).isoformat(),
        "clientState": "old",
    }
    async with http.post(
        f"{rig.emu.url}/subscriptions", json=body, headers={"Authorization": f"Bearer {SUBSCRIBER_TOKENS[0]}"}
    ) as resp:
        assert resp.status == 201
        leftover = (await resp.json())["id"]
    report = await rig.manager.sync()
    assert report.created == 1 and report.failed == 0
    (sub,) = rig.emu.subscriptions
    assert sub.id != leftover and len(sub.user_ids) == 5 and sub.client_state == CLIENT_STATE


async def test_a_failing_account_is_reported_polled_and_healed(rig: Rig) -> None:
    await seed(rig, 700)
    rig.emu.fail_next(1, status=500, paths="/subscriptions", method="POST")
    report = await rig.manager.sync()
    assert report.failed == 1 and report.created == 1 and len(report.uncovered) == 650
    assert "500" in report.errors[0]
    rows = {r["account"]: r for r in await rig.manager.status()}
    assert rows["static-1"]["health"].startswith("error:") and rows["static-2"]["health"] == "ok"
    healed = await rig.manager.sync()
    assert healed.failed == 0 and healed.uncovered == [] and len(rig.emu.subscriptions) == 2


async def test_only_the_leader_keeps_subscriptions(rig: Rig) -> None:
    await seed(rig, 10)
    assert await rig.bridge.store.try_lead(LEADERSHIP, "another-instance")
    stop = asyncio.Event()
    task = asyncio.create_task(rig.manager.run(stop, interval=0.05))
    await asyncio.sleep(0.3)
    assert rig.emu.subscriptions == []
    stop.set()
    await task
    rig.manager.owner = "another-instance"  # now this instance is the leader
    stop.clear()
    task = asyncio.create_task(rig.manager.run(stop, interval=0.05))
    for _ in range(100):
        if rig.emu.subscriptions:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    assert len(rig.emu.subscriptions) == 1


async def test_rich_subscriptions_carry_the_certificate(rich_rig: Rig) -> None:
    await seed(rich_rig, 3)
    await rich_rig.manager.sync()
    (sub,) = rich_rig.emu.subscriptions
    decryptor = rich_rig.intake.decryptor
    assert decryptor is not None
    assert sub.include_resource_data and sub.certificate_id == decryptor.certificate_id


def test_assignment_is_sticky_and_bounded() -> None:
    ids = [f"id{i:04d}" for i in range(1400)]
    plan, rest = assign(ids, ["a", "b"], {})
    assert [len(plan["a"]), len(plan["b"])] == [650, 650] and rest == ids[1300:]
    grown = sorted([*ids, "id0000x"])  # sorts right after id0000: would shift every later chunk
    plan2, rest2 = assign(grown, ["a", "b"], plan)
    assert plan2["a"] == plan["a"] and plan2["b"] == plan["b"] and "id0000x" in rest2
    plan3, rest3 = assign(ids[1:], ["a", "b", "c"], plan)  # one left, an account added
    assert plan3["a"] == [*plan["a"][1:], "id1300"]  # the freed place is filled, nothing moves
    assert plan3["b"] == plan["b"] and plan3["c"] == ids[1301:] and rest3 == []


async def test_a_non_leader_only_notes_a_lifecycle_event_for_the_leader(rig: Rig) -> None:
    await seed(rig, 10)
    await rig.manager.sync()
    (sub,) = rig.emu.subscriptions
    assert await rig.bridge.store.try_lead(LEADERSHIP, "test-instance")
    rig.manager.owner = "a-follower"
    await rig.emu.send_lifecycle(sub.id, "subscriptionRemoved")
    await rig.intake.wait_idle()
    assert rig.emu.subscriptions == []  # the follower did not touch Graph...
    doc = await rig.bridge.store.get_doc(KIND, "static-1")
    assert doc is not None and doc["pending"] == "subscriptionRemoved"  # ...but the need is on record
    assert (await rig.manager.status())[0]["health"] == "pending subscriptionRemoved"
    rig.manager.owner = "test-instance"
    report = await rig.manager.sync()  # the leader's next round acts on it
    assert report.recreated == 1 and len(rig.emu.subscriptions) == 1


async def test_status_rows_for_the_cli(rig: Rig) -> None:
    await seed(rig, 700)
    await rig.manager.sync()
    rows = await rig.manager.status()
    assert [r["account"] for r in rows] == ["static-1", "static-2", "static-3"]
    assert [r["ids"] for r in rows] == [650, 50, 0]
    assert rows[0]["health"] == "ok" and rows[0]["minutes_left"] == 55.0
    assert rows[2]["subscription"] == "-" and rows[2]["health"] == "no subscription"
    rig.bridge.clock.advance(45 * 60)  # type: ignore[attr-defined]
    assert (await rig.manager.status())[0]["health"] == "renewing"


# ------------------------------------------------------------------ slow validation, lost answers, adoption


def manager_like(rig: Rig, accounts: SubscriberAccounts | None = None, **kw: Any) -> SubscriptionManager:
    """Another manager on the rig's store, accounts and routes (a restarted instance, or one with
    other timeouts)."""
    return SubscriptionManager(
        rig.bridge,
        rig.emu.url,
        accounts or rig.accounts,
        notification_url=rig.notify_url,
        lifecycle_url=rig.lifecycle_url,
        client_state=CLIENT_STATE,
        encryption_cert_pem=None,
        encryption_cert_id=None,
        owner="test-instance",
        reader=rig.teams,
        **kw,
    )


def test_the_creation_timeout_outlasts_two_validations() -> None:
    """Graph validates the notification URL, then the lifecycle URL, allowing each 10 s (as the
    emulator does); creation must wait longer than both, other calls keep the usual timeout."""
    assert SUBSCRIPTION_CREATE_TIMEOUT > 2 * GraphEmulator().validation_timeout == 2 * 10.0
    assert DEFAULT_TIMEOUT <= 10.0 < SUBSCRIPTION_CREATE_TIMEOUT


async def test_the_manager_uses_the_creation_timeout_for_creation_only(rig: Rig) -> None:
    manager = manager_like(rig)
    try:
        assert manager._create_http.timeout.read == SUBSCRIPTION_CREATE_TIMEOUT
        assert manager._http.timeout.read == DEFAULT_TIMEOUT
    finally:
        await manager.close()


async def test_a_creation_slowed_by_graphs_validation_succeeds(rig: Rig) -> None:
    """Scaled down 10:1: Graph takes 0.9 s before each of the two validations (9 s in a tenant), the
    other calls time out after 1 s (10 s), creation after 3 s (the production constant's ratio)."""
    await seed(rig, 5)
    rig.emu.validation_delay(0.9)
    manager = manager_like(rig, timeout=1.0, create_timeout=SUBSCRIPTION_CREATE_TIMEOUT / 10)
    try:
        report = await manager.sync()
    finally:
        await manager.close()
    assert (report.created, report.failed, report.adopted) == (1, 0, 0), str(report)
    (sub,) = rig.emu.subscriptions
    assert len(rig.emu.validations) == 2 and all(v.ok for v in rig.emu.validations)
    assert (await rig.bridge.store.get_doc(KIND, "static-1"))["subscription_id"] == sub.id  # type: ignore[index]


async def test_a_creation_whose_answer_was_lost_is_adopted_not_duplicated(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await seed(rig, 5)
    rig.emu.validation_delay(0.4)  # creation takes 0.8 s; this client gives up after 0.5 s
    manager = manager_like(rig, create_timeout=0.5)
    try:
        lost = await manager.sync()
        assert lost.failed == 1 and "did not answer in time" in lost.errors[0], str(lost)
        await rig.emu.wait_idle()
        (made,) = rig.emu.subscriptions  # Graph finished the creation without its client
        assert (await rig.bridge.store.get_doc(KIND, "static-1") or {}).get("subscription_id") is None
        caplog.set_level(logging.INFO, logger="presence_sync.graph")
        report = await manager.sync()
    finally:
        await manager.close()
    assert (report.adopted, report.created, report.failed, report.uncovered) == (1, 0, 0, []), str(report)
    assert [s.id for s in rig.emu.subscriptions] == [made.id]
    assert len(rig.emu.calls("POST", "/subscriptions")) == 1
    assert rig.emu.calls("DELETE", "/subscriptions/") == []
    rec = await rig.bridge.store.get_doc(KIND, "static-1")
    assert rec is not None and rec["subscription_id"] == made.id and rec["ids"] == [entra(i) for i in range(1, 6)]
    assert rec["expires_at"] == made.expires_at.isoformat() and rec["error"] is None
    (line,) = [r for r in caplog.records if r.getMessage() == "subscription adopted"]
    assert line.fields["subscription"] == made.id and line.fields["account"] == "static-1"  # type: ignore[attr-defined]
    # and the adopted subscription is renewed like a created one
    rig.bridge.clock.advance(41 * 60)  # type: ignore[attr-defined]
    assert (await rig.manager.sync()).renewed == 1


async def test_start_up_adopts_an_unknown_matching_subscription_and_deletes_useless_ones(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    await seed(rig, 5)
    assert (await rig.manager.sync()).created == 1
    (kept,) = rig.emu.subscriptions
    # The store lost its records (a crash before writing one, a restored database) ...
    await rig.bridge.store.delete_doc(KIND, "static-1")
    # ... and account 2 holds one of ours that covers nobody this bridge now serves.
    body = {
        "changeType": "updated",
        "notificationUrl": rig.notify_url,
        "lifecycleNotificationUrl": rig.lifecycle_url,
        "resource": presence_resource([entra(999)]),
        "expirationDateTime": (rig.emu.now() + timedelta(minutes=30)).isoformat(),
        "clientState": CLIENT_STATE,
    }
    async with http.post(
        f"{rig.emu.url}/subscriptions", json=body, headers={"Authorization": f"Bearer {SUBSCRIBER_TOKENS[1]}"}
    ) as resp:
        assert resp.status == 201
        useless = (await resp.json())["id"]
    posts = len(rig.emu.calls("POST", "/subscriptions"))
    restarted = manager_like(rig)
    try:
        report = await restarted.sync()
    finally:
        await restarted.close()
    assert (report.adopted, report.created, report.failed) == (1, 0, 0), str(report)
    assert [s.id for s in rig.emu.subscriptions] == [kept.id]
    assert len(rig.emu.calls("POST", "/subscriptions")) == posts  # nothing created again
    assert [c.path for c in rig.emu.calls("DELETE", "/subscriptions/")] == [f"/v1.0/subscriptions/{useless}"]
    rec = await rig.bridge.store.get_doc(KIND, "static-1")
    assert rec is not None and rec["subscription_id"] == kept.id and len(rec["ids"]) == 5


async def test_an_adopted_match_must_be_exactly_what_we_would_create(rig: Rig) -> None:
    """A subscription for other users, or without our lifecycle URL, is not adopted: it is replaced."""
    await seed(rig, 5)
    assert (await rig.manager.sync()).created == 1
    (first,) = rig.emu.subscriptions
    await rig.bridge.store.delete_doc(KIND, "static-1")
    await rig.bridge.store.upsert_agents(agents(1, start=6))
    rig.emu.add_user(entra(6))
    restarted = manager_like(rig)
    try:
        report = await restarted.sync()
    finally:
        await restarted.close()
    assert (report.adopted, report.created) == (0, 1), str(report)
    (sub,) = rig.emu.subscriptions
    assert sub.id != first.id and len(sub.user_ids) == 6


async def test_listing_follows_next_link(rig: Rig) -> None:
    await seed(rig)
    await rig.manager.sync()
    made = {s.id for s in rig.emu.subscriptions}
    rig.emu.list_page_size = 1
    # With the app's token Graph lists every subscription of the app: three pages here.
    app_accounts = SubscriberAccounts(
        rig.bridge.store, tenant_id=TENANT_ID, client_id=CLIENT_ID, static_tokens=[APP_TOKEN]
    )
    manager = manager_like(rig, accounts=app_accounts)
    try:
        listed = await manager._list("static-1")
    finally:
        await manager.close()
    assert sorted(s.id for s in listed if s.id) == sorted(made) and len(listed) == 3
    assert all(s.client_state is None for s in listed)  # Graph never lists it
    assert len([c for c in rig.emu.calls("GET") if c.path == "/v1.0/subscriptions"]) >= 3


async def test_an_account_that_cannot_be_listed_at_start_up_is_listed_at_the_next_sync(rig: Rig) -> None:
    await seed(rig, 700)
    rig.emu.fail_next(1, status=503, retry_after=None, paths="/subscriptions", method="GET")
    first = await rig.manager.sync()
    assert (first.created, first.failed) == (2, 0), str(first)  # creation lists again before it posts
    gets = len(rig.emu.calls("GET", "/subscriptions"))
    again = await rig.manager.sync()
    assert again.unchanged == 2
    listed = rig.emu.calls("GET", "/subscriptions")[gets:]
    assert [c.account for c in listed] == ["subscriber-1@contoso.example"]  # only the one not yet listed
    assert len(rig.emu.calls("GET", "/subscriptions")) == gets + 1
    assert (await rig.manager.sync()).unchanged == 2 and len(rig.emu.calls("GET", "/subscriptions")) == gets + 1
