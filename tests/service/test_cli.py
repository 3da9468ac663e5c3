"""The console script as an admin meets it: subprocesses, exit codes, one-line errors, fresh stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ALICE, BOB

pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_SYNC_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=base, cwd=cwd, timeout=120
    )


@pytest.fixture
def db(tmp_path) -> dict[str, str]:
    return {"PRESENCE_SYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"}


def test_usage_error_is_one_line_exit_2(tmp_path):
    r = run_cli("agents", "frobnicate", cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "invalid choice" in r.stderr


def test_bad_database_url_is_one_line_exit_2(tmp_path):
    r = run_cli("agents", "list", env={"PRESENCE_SYNC_DATABASE_URL": "mysql://root@localhost/x"}, cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "PRESENCE_SYNC_DATABASE_URL" in r.stderr


def test_unreachable_postgres_is_one_line_exit_2(tmp_path):
    r = run_cli(
        "outbox",
        "list",
        env={"PRESENCE_SYNC_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/x"},
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "PRESENCE_SYNC_DATABASE_URL" in r.stderr


def test_fresh_store_commands_work(tmp_path, db):
    r = run_cli("outbox", "list", env=db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pending=0" in r.stdout
    r = run_cli("db", "upgrade", env=db, cwd=tmp_path)
    assert r.returncode == 0 and "current" in r.stdout


def test_import_then_list(tmp_path, db):
    f = tmp_path / "agents.csv"
    f.write_text(
        "dynamics_user_id,entra_object_id,display_name\n"
        f"{ALICE.dynamics_user_id},{ALICE.entra_object_id},{ALICE.display_name}\n"
        f'{BOB.dynamics_user_id.upper()},{BOB.entra_object_id},"Agent, Bob"\n'
    )
    r = run_cli("agents", "import", str(f), env=db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 added" in r.stdout
    r = run_cli("agents", "import", str(f), env=db, cwd=tmp_path)
    assert "2 unchanged" in r.stdout
    r = run_cli("agents", "list", env=db, cwd=tmp_path)
    assert ALICE.dynamics_user_id in r.stdout and BOB.dynamics_user_id in r.stdout and "2 agent(s)" in r.stdout


def test_malformed_csv_names_lines_and_writes_nothing(tmp_path, db):
    f = tmp_path / "agents.csv"
    f.write_text(
        "dynamics_user_id,entra_object_id,display_name\n"
        f"{ALICE.dynamics_user_id},{ALICE.entra_object_id},Alice\n"
        "not-a-guid,also-not,Carol\n"
        f"{BOB.dynamics_user_id},{ALICE.entra_object_id},Bob\n"
    )
    r = run_cli("agents", "import", str(f), env=db, cwd=tmp_path)
    assert r.returncode == 2
    assert f"{f}:3:" in r.stderr and "not a GUID" in r.stderr
    assert f"{f}:4:" in r.stderr and "already on line 2" in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("nothing was imported")
    r = run_cli("agents", "list", env=db, cwd=tmp_path)
    assert "0 agent(s)" in r.stdout


def test_wrong_header_and_missing_file(tmp_path, db):
    f = tmp_path / "agents.csv"
    f.write_text("id,aad\n1,2\n")
    r = run_cli("agents", "import", str(f), env=db, cwd=tmp_path)
    assert r.returncode == 2 and f"{f}:1: header" in r.stderr
    r = run_cli("agents", "import", str(tmp_path / "nope.csv"), env=db, cwd=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_unknown_presence_in_mapping_file_stops_with_file_named(tmp_path, db):
    rules = tmp_path / "rules.toml"
    rules.write_text('[teams_to_dynamics]\n"Busy/InACall" = "Lunch"\n')
    env = db | {
        "PRESENCE_SYNC_MAPPING_FILE": str(rules),
        "PRESENCE_SYNC_AUTH_MODE": "static",
        "PRESENCE_SYNC_STATIC_TOKEN": "t",
        "PRESENCE_SYNC_GRAPH_URL": "http://127.0.0.1:9/v1.0",
    }
    r = run_cli("reconcile", env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert str(rules) in r.stderr and "Lunch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_v1_conflict_section_stops_start_up_with_one_line_saying_why(tmp_path, db):
    rules = tmp_path / "rules.toml"
    rules.write_text('[conflict]\nwinner = "dynamics"\nwindow_seconds = 2.0\n')
    env = db | {"PRESENCE_SYNC_MAPPING_FILE": str(rules)}
    r = run_cli("serve", env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and str(rules) in line
    assert "[conflict] section was removed in sync rules version 2" in line and "delete the section" in line


def test_outbox_retry_needs_an_id(tmp_path, db):
    r = run_cli("outbox", "retry", env=db, cwd=tmp_path)
    assert r.returncode == 2 and "--all-dead" in r.stderr
    r = run_cli("outbox", "retry", "42", env=db, cwd=tmp_path)
    assert r.returncode == 2 and "not a dead letter" in r.stderr


def test_doctor_with_nothing_configured_says_what_to_set_and_exits_1(tmp_path: Path) -> None:
    done = run_cli("doctor", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("FAIL  graph token:") and "PRESENCE_SYNC_TENANT_ID" in line for line in lines)
    assert any(line.startswith("SKIP  dataverse:") and "PRESENCE_SYNC_DATAVERSE_URL" in line for line in lines)
    assert lines[-1].startswith("doctor:") and "not ready" in lines[-1]
    assert not (tmp_path / "presence-sync.db").exists(), "doctor must not create or migrate a store"


def test_dataverse_commands_without_dataverse_url_say_what_to_set(tmp_path: Path) -> None:
    done = run_cli("agents", "discover", cwd=tmp_path)
    assert done.returncode == 2 and "needs PRESENCE_SYNC_DATAVERSE_URL" in done.stderr
    done = run_cli("dataverse", "register-webhook", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "needs PRESENCE_SYNC_PUBLIC_URL" in done.stderr


def test_the_bot_defaults_to_a_single_tenant_registration_in_the_apps_tenant(tmp_path):
    """New Azure Bots cannot be multi-tenant: SingleTenant is the default, and BOT_TENANT_ID falls
    back to TENANT_ID; with neither, one line says what to set."""
    from service.settings import load_settings

    s = load_settings(_env_file=None, tenant_id="AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE")
    assert (s.bot_app_type, s.bot_tenant) == ("SingleTenant", "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE")
    assert load_settings(_env_file=None, tenant_id="t", bot_tenant_id="b").bot_tenant == "b"
    env = {"PRESENCE_SYNC_BOT_APP_ID": "00000000-1111-2222-3333-444444444444", "PRESENCE_SYNC_BOT_APP_PASSWORD": "pw"}
    r = run_cli("doctor", cwd=tmp_path, env=env)
    assert "PRESENCE_SYNC_BOT_APP_TYPE=SingleTenant needs the bot's tenant" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_unknown_ids_are_listed_with_any_configured_secret_masked(tmp_path, db):
    """Ids in ``agents list --unknown`` come from callers; one holding a secret must not print it."""
    import asyncio
    from datetime import UTC, datetime

    from mapping.model import System
    from service.store.sql import open_store

    secret = "webhook-key-7f3a9c2e51"

    async def seed() -> None:
        store = await open_store(db["PRESENCE_SYNC_DATABASE_URL"])
        try:
            async with store.transaction() as tx:
                await tx.record_unknown(System.DYNAMICS, f"x{secret}y", datetime.now(UTC))
        finally:
            await store.close()

    asyncio.run(seed())
    r = run_cli("agents", "list", "--unknown", env={**db, "PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY": secret}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 unknown id(s)" in r.stdout and secret not in r.stdout
