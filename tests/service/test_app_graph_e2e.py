"""The real service (create_app, SQLite store, background workers) on a free port, against the Graph
emulator: health/readiness/metrics, the subscription handshake, Dynamics -> Teams through the outbox,
and a Teams call -> a Dynamics command queued, with no echo bounced back."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import timedelta

import aiohttp
import pytest
from aiohttp import web

from emulators.graph import GraphEmulator
from mapping.model import PresenceObserved, System
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings, load_settings
from tests.support import ALICE, AVAILABLE, BOB, BUSY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


def service_settings(tmp_path, monkeypatch, graph: GraphEmulator, port: int, **extra: object) -> Settings:
    """The service's settings against the Graph emulator, on an SQLite store, with nothing taken from
    the developer's own ``PRESENCE_SYNC_*`` environment."""
    for k in list(__import__("os").environ):
        if k.startswith("PRESENCE_SYNC_"):
            monkeypatch.delenv(k)
    return load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        auth_mode="static",
        static_token="graph-token",
        graph_url=graph.url,
        client_id=graph.client_id,
        port=port,
        reconcile_interval_seconds=0,
        **extra,
    )


@pytest.fixture
async def stack(tmp_path, monkeypatch):
    graph = GraphEmulator(token="graph-token", subscriber_tokens={"sub-token": "subscriber@contoso.example"})
    await graph.start()
    for a in (ALICE, BOB):
        graph.add_user(a.entra_object_id, own=("Available", "Available"))
    port = free_port()
    settings = service_settings(
        tmp_path,
        monkeypatch,
        graph,
        port,
        static_subscriber_tokens="sub-token",
        graph_client_state="client-state-secret",
        public_url=f"http://127.0.0.1:{port}",
    )
    rt = await Runtime.open(settings)
    await rt.store.upsert_agents([ALICE, BOB])
    runner = web.AppRunner(create_app(settings, runtime=rt))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
        yield graph, rt, http
    await runner.cleanup()
    await rt.close()
    await graph.stop()


async def test_health_ready_metrics(stack):
    _, _, http = stack
    r = await http.get("/healthz")
    assert r.status == 200 and (await r.json())["status"] == "ok"
    r = await http.get("/readyz")
    body = await r.json()
    assert r.status == 200, body
    assert body["agents"] == 2
    r = await http.get("/metrics")
    text = await r.text()
    assert r.status == 200 and "presence_sync_outbox_rows" in text and "presence_sync_dead_letters" in text


async def test_validation_handshake_and_bad_input(stack):
    _, _, http = stack
    r = await http.post("/api/graph/notifications", params={"validationToken": "abc 123"})
    assert r.status == 200 and await r.text() == "abc 123" and r.content_type == "text/plain"
    r = await http.post("/api/graph/notifications", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and "error" in await r.json()


@pytest.mark.slow
async def test_dynamics_change_reaches_teams_and_teams_call_queues_dynamics(stack):
    graph, rt, _ = stack
    report = await rt.subscriptions.sync()
    assert graph.subscriptions, report
    now = rt.bridge.clock()
    await rt.bridge.engine.observe(
        PresenceObserved(ALICE.dynamics_user_id, System.DYNAMICS, BUSY, now, 2, "SYSTEM", "test")
    )
    ok = await until(lambda: _shows(graph, ALICE, ("Busy", "InACall")))
    assert ok, [(r.status, r.attempts, r.last_error) for r in await rt.store.list_outbox()]
    # Our own session change is notified back by Graph: it must not become a Dynamics command.
    await graph.wait_idle()
    await asyncio.sleep(0.3)
    row = await rt.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is None

    # Bob joins a Teams call: the notification makes Dynamics Busy (queued: no Dataverse adapter here).
    await rt.bridge.engine.observe(
        PresenceObserved(
            BOB.dynamics_user_id, System.DYNAMICS, AVAILABLE, now - timedelta(minutes=1), 2, "AGENT", "test"
        )
    )  # a minute before the call: outside the 2 s conflict window
    assert await until(lambda: _shows(graph, BOB, ("Available", "Available")))
    await graph.wait_idle()
    graph.set_user_state(BOB.entra_object_id, "Busy", "InACall")

    async def queued() -> bool:
        r = await rt.store.outbox_row(BOB.dynamics_user_id, System.DYNAMICS)
        return r is not None and r.value == BUSY

    assert await until(queued), "a Teams call did not queue Dynamics Busy"


async def _shows(graph, agent, pair) -> bool:
    return tuple(graph.presence_of(agent.entra_object_id)) == pair


async def test_reconcile_repairs_a_lost_notification(stack):
    """Subscriptions can go silent: the sweep reads Teams and repairs what the notification would have."""
    graph, rt, _ = stack
    await rt.subscriptions.sync()
    await rt.bridge.engine.observe(
        PresenceObserved(
            ALICE.dynamics_user_id,
            System.DYNAMICS,
            AVAILABLE,
            rt.bridge.clock() - timedelta(minutes=5),
            2,
            "AGENT",
            "t",
        )
    )
    assert await until(lambda: _shows(graph, ALICE, ("Available", "Available")))
    await graph.wait_idle()
    graph.drop_notifications(10)
    graph.set_user_state(ALICE.entra_object_id, "Busy", "InAMeeting")
    await graph.wait_idle()
    assert await rt.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS) is None  # the change was lost
    summary = await rt.reconcile()
    assert (summary.checked, summary.repaired, summary.failed) == (2, 1, 0), summary
    row = await rt.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
    assert row is not None and row.value == BUSY
    again = await rt.reconcile()
    assert (again.repaired, again.in_sync) == (0, 2)


@pytest.mark.slow
async def test_bot_command_through_the_service_changes_dynamics_and_teams(stack):
    """An agent types `dnd` to the bot served by the real app: Dynamics DND is queued (the Dataverse
    adapter lands with issue 4), Teams shows DoNotDisturb, and the reply reaches the connector."""
    from emulators.connector import BotConnectorEmulator, teams_message
    from tests.support import DND

    graph, rt, http = stack
    async with BotConnectorEmulator() as connector:
        activity = teams_message(
            service_url=connector.url,
            aad_object_id=ALICE.entra_object_id,
            text="please set me to do not disturb",
            mention_bot=True,
        )
        r = await http.post("/api/messages", json=activity)
        assert r.status in (200, 201, 202), await r.text()
        reply = await connector.wait_for(lambda a: a.type == "message", timeout=15)
        assert reply.text
        row = await rt.store.outbox_row(ALICE.dynamics_user_id, System.DYNAMICS)
        assert row is not None and row.value == DND
        assert await until(lambda: _shows(graph, ALICE, ("DoNotDisturb", "Presenting")))
        r = await http.post("/api/messages", data=b"{broken", headers={"Content-Type": "application/json"})
        assert r.status == 400


async def test_junk_paths_add_no_metric_series_and_a_key_in_a_path_is_never_a_label(stack):
    """Metric labels are route templates: a caller-chosen path (even one carrying the webhook key)
    never becomes a series, however many junk paths are tried."""
    _, _, http = stack
    await http.get("/junk/first")  # the one series junk may add: (unmatched, http_404)
    before = await (await http.get("/metrics")).text()
    for i in range(200):
        r = await http.get(f"/junk/{i}/x")
        assert r.status == 404 and "error" in await r.json()
    r = await http.post("/api/dataverse/webhook/the-secret-webhook-key-123", json={})
    assert r.status == 404
    text = await (await http.get("/metrics")).text()
    assert "the-secret-webhook-key-123" not in text and "/junk/" not in text

    def rejected_series(metrics: str) -> set[str]:
        return {
            line.rsplit(" ", 1)[0] for line in metrics.splitlines() if line.startswith("presence_sync_rejected_total{")
        }

    assert rejected_series(text) == rejected_series(before)  # counts went up, no series was added


@pytest.mark.parametrize(
    "path", ["/api/graph/notifications", "/api/graph/lifecycle", "/api/messages", "/api/dataverse/webhook"]
)
async def test_deeply_nested_json_is_bad_input_on_every_route(stack, path):
    _, _, http = stack
    body = b"[" * 100_000 + b"]" * 100_000
    r = await http.post(path, data=body, headers={"Content-Type": "application/json"})
    # refused, never a 5xx; the Dataverse webhook (loopback, no key set) keeps it: quarantined, 202
    expected = (202,) if path == "/api/dataverse/webhook" else (400, 401)
    assert r.status in expected, (r.status, await r.text())


@pytest.mark.parametrize(
    "body",
    [
        b'{"value": [{"clientState": "\\ud800", "subscriptionId": "s", "resource": "x"}]}',
        b'{"value": [{"clientState": "client-state-secret", "subscriptionId": "s",'
        b' "resource": "communications/presences(\'\\udfff\')", "resourceData": {"id": "\\udfff"}}]}',
    ],
)
async def test_a_lone_surrogate_is_bad_input_and_later_notifications_still_work(stack, body):
    _, _, http = stack
    r = await http.post("/api/graph/notifications", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400, await r.text()
    r = await http.post("/api/graph/notifications", json={"value": []})
    assert r.status == 202


async def test_a_restarted_service_takes_back_the_rows_it_was_delivering(tmp_path, monkeypatch):
    """kill -9 during delivery: the row stays in flight under the dead process's 30 s lease. The
    service started again with the same owner (``serve``: host and port) delivers it at once."""
    from mapping.model import SetPresence

    graph = GraphEmulator(token="graph-token")
    await graph.start()
    graph.add_user(ALICE.entra_object_id, own=("Available", "Available"))
    port = free_port()
    settings = service_settings(tmp_path, monkeypatch, graph, port)
    owner = f"test-host:{port}"
    first = await Runtime.open(settings, owner=owner)
    await first.store.upsert_agents([ALICE])
    async with first.store.transaction() as tx:
        await tx.enqueue(SetPresence(ALICE.dynamics_user_id, System.TEAMS, "Busy/InACall"), first.bridge.clock())
    [_in_flight] = await first.store.claim([System.TEAMS], 10, 30.0, owner, first.bridge.clock())
    await first.close()  # the process dies with the attempt in flight (nothing acked)

    rt = await Runtime.open(settings, owner=owner)
    runner = web.AppRunner(create_app(settings, runtime=rt))
    await runner.setup()
    try:

        async def delivered() -> bool:
            row = await rt.store.outbox_row(ALICE.dynamics_user_id, System.TEAMS)
            return row is not None and row.status.value == "delivered"

        assert await until(delivered, timeout=10.0), "not delivered: the lease was waited out"
        assert graph.calls("POST", "setPresence")
    finally:
        await runner.cleanup()
        await rt.close()
        await graph.stop()
