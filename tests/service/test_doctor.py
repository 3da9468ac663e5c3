"""``presence-sync doctor`` against the real emulators and the real service on free loopback ports:
a green run, then each failure an admin meets before going live, each with its advice and exit 1.
Every run is bounded (``run`` puts a deadline on it), and doctor's side-effect freedom is checked
on the emulators' request logs."""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dataverse.registration import register_webhook
from emulators.dataverse import DataverseEmulator
from emulators.graph import GraphEmulator
from service.app import create_app
from service.doctor import Check, run_doctor
from service.runtime import Runtime
from service.settings import Settings, load_settings
from service.store.migrate import script_directory
from tests.support import ALICE, AVAILABLE

pytestmark = pytest.mark.slow

TOKEN = "static-test-token"
SUB_TOKEN = "subscriber-test-token"
KEY = "webhook-key-0123456789"
DEADLINE = 30.0
"""No doctor run in these tests may take longer (doctor's own checks are bounded at 5 s each)."""
NAMES = [
    "settings",
    "store",
    "tenant",
    "graph token",
    "dataverse token",
    "bot token",
    "graph presence",
    "dataverse",
    "mapping rules",
    "CCaaS_GetPresence",
    "CCaaS_ModifyAgentPresence",
    "dataverse webhook",
    "graph subscriptions",
    "public url",
    "webhook spool",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    graph: GraphEmulator
    dv: DataverseEmulator
    settings: Settings
    rt: Runtime
    """The serving instance's runtime (doctor opens its own)."""

    async def register(self) -> None:
        await register_webhook(
            self.rt.dataverse,
            url=self.settings.public("/api/dataverse/webhook"),
            key=KEY,
            dry_run=False,
            progress=lambda _: None,
        )

    async def subscribe(self) -> None:
        await self.rt.subscriptions.sync()
        assert self.graph.subscriptions


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    """Graph and Dataverse emulators with one agent (Alice), and the service serving on a free port
    without background workers (so subscriptions exist only when a test creates them)."""
    import os

    for k in list(os.environ):
        if k.startswith("PRESENCE_SYNC_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)  # no stray .env, no presence-sync.db left anywhere else
    graph = GraphEmulator(token=TOKEN, subscriber_tokens={SUB_TOKEN: "subscriber@contoso.example"})
    await graph.start()
    graph.add_user(ALICE.entra_object_id, own=("Available", "Available"))
    dv = DataverseEmulator(token=TOKEN)
    await dv.start()
    dv.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, ALICE.display_name, AVAILABLE)
    port = free_port()
    settings = load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        auth_mode="static",
        static_token=TOKEN,
        static_subscriber_tokens=SUB_TOKEN,
        graph_url=graph.url,
        client_id=graph.client_id,
        graph_client_state="client-state-secret",
        dataverse_url=dv.url,
        dataverse_webhook_key=KEY,
        public_url=f"http://127.0.0.1:{port}",
        port=port,
        reconcile_interval_seconds=0,
    )
    rt = await Runtime.open(settings)
    await rt.store.upsert_agents([ALICE])
    runner = web.AppRunner(create_app(settings, runtime=rt, background=False))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Stack(graph, dv, settings, rt)
    finally:
        await runner.cleanup()
        await rt.close()
        await dv.stop()
        await graph.stop()


async def run(settings: Settings, **kw: Any) -> tuple[int, list[str], float]:
    lines: list[str] = []
    started = time.monotonic()
    async with asyncio.timeout(DEADLINE):
        code = await run_doctor(settings, lines.append, **kw)
    return code, lines, time.monotonic() - started


def by_name(lines: list[str]) -> dict[str, str]:
    """Check name -> its line; and every check line is exactly one known check, in order."""
    found: dict[str, str] = {}
    for line in lines[:-1]:
        m = re.match(r"^(PASS|FAIL|WARN|SKIP)  ([^:]+): ", line)
        assert m, f"not a check line: {line!r}"
        found[m.group(2)] = line
    assert list(found) == NAMES, list(found)
    assert lines[-1].startswith("doctor: "), lines[-1]
    return found


def status(line: str) -> str:
    return line.split(" ", 1)[0]


async def test_green_run_passes_every_check_and_changes_nothing(stack: Stack) -> None:
    await stack.register()
    await stack.subscribe()
    dv_calls, graph_calls = len(stack.dv.calls), len(stack.graph.requests)
    agents_before = await stack.rt.store.list_agents()

    code, lines, _ = await run(stack.settings)

    found = by_name(lines)
    assert code == 0, "\n".join(lines)
    skipped_here = {"tenant", "bot token"}  # static mode, no bot app id: tests/service/test_doctor_entra.py
    not_pass = {n: line for n, line in found.items() if status(line) != "PASS" and n not in skipped_here}
    assert not_pass == {}, "\n".join(lines)
    assert all(status(found[n]) == "SKIP" for n in skipped_here), "\n".join(lines)
    assert "defined in this environment" in found["CCaaS_ModifyAgentPresence"]
    assert "Alice Agent" in found["graph presence"] and "Available/Available" in found["graph presence"]
    assert "Alice Agent" in found["CCaaS_GetPresence"] and ": Available" in found["CCaaS_GetPresence"]
    assert "1 active, 1 agent(s) covered" in found["graph subscriptions"]
    assert TOKEN not in "\n".join(lines) and KEY not in "\n".join(lines), "a secret was printed"
    # Read-only: no write to Dataverse, never the presence-changing API, no Graph write or subscription change.
    doctor_dv = list(stack.dv.calls)[dv_calls:]
    assert doctor_dv and all(c.method == "GET" for c in doctor_dv), doctor_dv
    assert not any("CCaaS_ModifyAgentPresence" == c.path for c in doctor_dv)
    doctor_graph = list(stack.graph.requests)[graph_calls:]
    assert doctor_graph and all(r.method == "GET" for r in doctor_graph), doctor_graph
    assert await stack.rt.store.list_agents() == agents_before


async def test_wrong_graph_token_fails_with_the_setting_to_fix(stack: Stack) -> None:
    await stack.register()
    await stack.subscribe()
    stack.graph.token = "rotated-token"  # the emulator now refuses the app token we send (401)

    code, lines, _ = await run(stack.settings)

    line = by_name(lines)["graph presence"]
    assert code == 1
    assert line.startswith("FAIL") and "401" in line and "set PRESENCE_SYNC_STATIC_TOKEN" in line, line


async def test_missing_graph_permission_says_grant_and_consent(stack: Stack) -> None:
    stack.graph.fail_next(1, 403, paths="/presence")

    code, lines, _ = await run(stack.settings)

    line = by_name(lines)["graph presence"]
    assert code == 1
    assert line.startswith("FAIL") and "Presence.ReadWrite.All" in line and "admin-consent" in line, line


async def test_missing_modify_api_fails_with_how_to_install_it(stack: Stack) -> None:
    await stack.register()
    await stack.subscribe()
    stack.dv.tables["customapis"].rows.clear()  # an environment without Dynamics 365 Contact Center

    code, lines, _ = await run(stack.settings)

    line = by_name(lines)["CCaaS_ModifyAgentPresence"]
    assert code == 1
    assert line.startswith("FAIL") and "not defined in this environment" in line and "install" in line, line


async def test_unreadable_customapis_is_a_warning_not_a_pass(stack: Stack) -> None:
    await stack.register()
    await stack.subscribe()
    stack.dv.fail_next(1, 403, path="customapis")

    code, lines, _ = await run(stack.settings)

    line = by_name(lines)["CCaaS_ModifyAgentPresence"]
    assert code == 0
    assert line.startswith("WARN") and "could not verify" in line, line


async def test_dataverse_down_fails_promptly(stack: Stack) -> None:
    await stack.dv.stop()

    code, lines, seconds = await run(stack.settings)

    found = by_name(lines)
    assert code == 1
    assert found["dataverse"].startswith("FAIL") and "PRESENCE_SYNC_DATAVERSE_URL" in found["dataverse"]
    for name in ("mapping rules", "CCaaS_GetPresence", "CCaaS_ModifyAgentPresence", "dataverse webhook"):
        assert found[name].startswith("SKIP") and "(see above)" in found[name], found[name]
    assert seconds < 10, f"doctor took {seconds:.1f} s with Dataverse down"


async def test_hung_dataverse_is_a_timeout_not_a_hang(stack: Stack) -> None:
    stack.dv.latency(2.0)  # longer than the per-check budget below

    code, lines, seconds = await run(stack.settings, timeout=0.5)

    found = by_name(lines)
    assert code == 1
    assert found["dataverse"].startswith("FAIL") and "no answer within 0.5 s" in found["dataverse"]
    assert "PRESENCE_SYNC_DATAVERSE_URL" in found["dataverse"]
    assert seconds < 6, f"doctor took {seconds:.1f} s"
    stack.dv.latency(0)


async def test_unregistered_webhook_says_to_register_it(stack: Stack) -> None:
    await stack.subscribe()

    code, lines, _ = await run(stack.settings)

    line = by_name(lines)["dataverse webhook"]
    assert code == 1
    assert line.startswith("FAIL") and "create serviceendpoint 'teams-presence-sync'" in line, line
    assert "run `presence-sync dataverse register-webhook`" in line
    assert not stack.dv.endpoints(), "the dry run registered something"


async def test_webhook_pointing_elsewhere_fails(stack: Stack) -> None:
    await stack.subscribe()
    await register_webhook(
        stack.rt.dataverse,
        url="http://127.0.0.1:9/api/dataverse/webhook",
        key=KEY,
        dry_run=False,
        progress=lambda _: None,
    )

    code, lines, _ = await run(stack.settings)

    line = by_name(lines)["dataverse webhook"]
    assert code == 1 and line.startswith("FAIL") and "update serviceendpoint" in line and "url" in line, line


async def test_webhook_without_key_names_the_setting(stack: Stack) -> None:
    await stack.register()
    settings = stack.settings.model_copy(update={"dataverse_webhook_key": ""})

    code, lines, _ = await run(settings)

    line = by_name(lines)["dataverse webhook"]
    assert code == 1 and line.startswith("FAIL") and "PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY" in line, line


async def test_no_subscriptions_fails_with_how_to_create_them(stack: Stack) -> None:
    await stack.register()

    code, lines, _ = await run(stack.settings)

    line = by_name(lines)["graph subscriptions"]
    assert code == 1
    assert line.startswith("FAIL") and "none yet" in line and "graph subscriptions --sync" in line, line


async def test_unreachable_public_url_fails(stack: Stack) -> None:
    await stack.register()
    await stack.subscribe()
    settings = stack.settings.model_copy(update={"public_url": f"http://127.0.0.1:{free_port()}"})

    code, lines, _ = await run(settings)

    found = by_name(lines)
    line = found["public url"]
    assert code == 1
    assert line.startswith("FAIL") and "/healthz" in line and "must be running" in line, line
    assert "PRESENCE_SYNC_PUBLIC_URL" in line
    # The subscriptions and the webhook still deliver to the old URL: both say so.
    assert found["graph subscriptions"].startswith("FAIL") and "delivers to" in found["graph subscriptions"]
    assert found["dataverse webhook"].startswith("FAIL") and "update serviceendpoint" in found["dataverse webhook"]


async def test_without_dataverse_url_its_checks_are_skipped(stack: Stack) -> None:
    await stack.subscribe()
    settings = stack.settings.model_copy(update={"dataverse_url": ""})

    code, lines, _ = await run(settings)

    found = by_name(lines)
    for name in (
        "dataverse token",
        "dataverse",
        "mapping rules",
        "CCaaS_GetPresence",
        "CCaaS_ModifyAgentPresence",
        "dataverse webhook",
    ):
        assert found[name].startswith("SKIP") and "PRESENCE_SYNC_DATAVERSE_URL unset" in found[name], found[name]
    assert code == 0, "\n".join(lines)


async def test_without_public_url_subscriptions_and_webhook_warn(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"public_url": ""})

    code, lines, _ = await run(settings)

    found = by_name(lines)
    assert (
        found["graph subscriptions"].startswith("WARN") and "no subscription can exist" in found["graph subscriptions"]
    )
    assert found["dataverse webhook"].startswith("WARN")
    assert found["public url"].startswith("SKIP")
    assert code == 0, "\n".join(lines)


async def test_pending_migrations_fail_and_are_not_applied(stack: Stack, tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()  # an existing, never migrated store
    settings = stack.settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{db}"})

    code, lines, _ = await run(settings)

    found = by_name(lines)
    assert code == 1
    revisions = [r.revision for r in reversed(list(script_directory().walk_revisions()))]
    pending = f"{len(revisions)} migration(s) pending ({', '.join(revisions)})"
    assert found["store"].startswith("FAIL") and pending in found["store"], found["store"]
    assert "run `presence-sync db upgrade`" in found["store"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [], "doctor migrated the store"
    # The upstream checks still ran; those needing the directory say why they could not.
    assert found["graph token"].startswith("PASS") and found["dataverse"].startswith("PASS")
    assert found["graph presence"].startswith("SKIP") and "store is not usable" in found["graph presence"]


async def test_missing_sqlite_file_is_reported_not_created(stack: Stack, tmp_path: Path) -> None:
    db = tmp_path / "nowhere.db"
    settings = stack.settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{db}"})

    code, lines, _ = await run(settings)

    line = by_name(lines)["store"]
    assert code == 1 and line.startswith("FAIL") and "no database file" in line and "db upgrade" in line, line
    assert not db.exists()


async def test_no_entra_app_says_what_to_set(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"auth_mode": "entra", "static_token": "", "client_id": ""})

    code, lines, _ = await run(settings)

    found = by_name(lines)
    assert code == 1
    line = found["graph token"]
    assert line.startswith("FAIL") and "PRESENCE_SYNC_TENANT_ID" in line and "PRESENCE_SYNC_CLIENT_ID" in line, line
    assert found["graph presence"].startswith("SKIP") and found["dataverse"].startswith("SKIP")


async def test_half_configured_entra_app_is_one_fail_line(stack: Stack) -> None:
    """A client id without a tenant cannot build the credential: the runtime cannot be assembled, and
    doctor says which settings, as one FAIL line, instead of a traceback."""
    settings = stack.settings.model_copy(update={"auth_mode": "entra", "static_token": ""})

    code, lines, _ = await run(settings)

    assert code == 1
    assert lines[2].startswith("FAIL  configuration: ") and "PRESENCE_SYNC_TENANT_ID" in lines[2], lines
    assert lines[-1].startswith("doctor: ") and len(lines) == 4


def test_check_line_format() -> None:
    assert Check("PASS", "store", "fine").line() == "PASS  store: fine"
    assert Check("FAIL", "x", "broken", "do this").line() == "FAIL  x: broken -> do this"
