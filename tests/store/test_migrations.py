"""Migrations: applied from code on a fresh database, idempotent, safe when instances start together,
and describing exactly the tables ``service/store/schema.py`` declares."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Callable

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from mapping.model import OutboxStatus
from service.store import SqlStore, migration_status, upgrade
from service.store.migrate import alembic_config, describe, head_revision
from service.store.schema import metadata
from tests.support import AVAILABLE, BUSY

pytestmark = pytest.mark.slow

OpenSql = Callable[..., Awaitable[SqlStore]]


async def test_upgrade_is_applied_once_then_a_no_op(sql_url: str, open_sql: OpenSql) -> None:
    assert await upgrade(sql_url) == ["0001", "0002", "0003", "0004", "0005"]
    assert await upgrade(sql_url) == []
    assert describe([]) == f"already at {head_revision()}"
    store = await open_sql(sql_url, migrate=False)
    assert await migration_status(store) == (head_revision(), head_revision())
    await store.ping()


async def test_open_store_migrates_a_fresh_database(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)
    assert await migration_status(store) == ("0005", "0005")
    assert await upgrade(sql_url) == []


async def test_fresh_database_reports_no_revision(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url, migrate=False)
    assert await migration_status(store) == (None, head_revision())


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata))


async def test_migrated_database_matches_the_metadata(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)
    async with store.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
        names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert names == set(metadata.tables) | {"alembic_version"}


async def test_downgrade_to_base_and_up_again(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)

    def down(conn: Connection) -> None:
        command.downgrade(alembic_config(conn), "base")

    async with store.engine.begin() as conn:
        await conn.run_sync(down)
    async with store.engine.connect() as conn:
        assert await conn.run_sync(lambda c: inspect(c).get_table_names()) == ["alembic_version"]
    assert await upgrade(sql_url) == ["0001", "0002", "0003", "0004", "0005"]


async def test_stores_opened_together_in_one_process_migrate_once(
    sql_url: str, sqlite_url: str, open_sql: OpenSql
) -> None:
    """Also two different databases at once: Alembic's global context must not be shared."""
    other = sqlite_url.replace("presence-sync.db", "other.db")
    results = await asyncio.wait_for(asyncio.gather(*(upgrade(url) for url in (sql_url, other) * 3)), 30)
    assert sorted(results) == [
        [],
        [],
        [],
        [],
        ["0001", "0002", "0003", "0004", "0005"],
        ["0001", "0002", "0003", "0004", "0005"],
    ]


# Each process imports first, then waits for a common start time, so that the migrations really collide.
_UPGRADE = (
    "import asyncio, json, sys, time; from service.store import upgrade; "
    "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
    "print(json.dumps(asyncio.run(upgrade(sys.argv[1]))))"
)


async def test_instances_starting_together_migrate_once(sql_url: str) -> None:
    """Separate processes, as several instances starting at once: the database serialises them
    (PostgreSQL advisory lock, SQLite BEGIN IMMEDIATE)."""
    start = str(time.time() + 1.5)
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", _UPGRADE, sql_url, start, stdout=PIPE, stderr=PIPE)
        for _ in range(4)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err.decode()[-500:] for _, err in outputs]
    assert sorted(json.loads(out) for out, _ in outputs) == [[], [], [], ["0001", "0002", "0003", "0004", "0005"]]


async def test_v1_state_is_converted_and_nothing_else_is_lost(sql_url: str, open_sql: OpenSql) -> None:
    """Sync rules v2 (0003): a v1 state with an active override becomes P = the agent's own presence
    from before the override, Q = the person's own Teams state (not the bridge's session), and the
    writes whose echo was expected are still expected; the directory and the outbox (its dead letter
    included) are untouched; a state without sides is dropped for the sweep to rebuild."""
    store = await open_sql(sql_url, migrate=False)

    def to_0002(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), "0002")

    async with store.engine.begin() as conn:
        await conn.run_sync(to_0002)
        t0 = "2026-11-30 09:00:00.000000"
        await conn.exec_driver_sql(
            "INSERT INTO agents (dynamics_user_id, entra_object_id, display_name, enabled, created_at, updated_at)"
            f" VALUES ('alice', 'e-alice', 'Alice', true, '{t0}', '{t0}')"
        )
        await conn.exec_driver_sql(
            "INSERT INTO agent_state (agent_id, saved, restore_value, override_value, updated_at) VALUES"
            f" ('alice', true, '{AVAILABLE}', '{BUSY}', '{t0}'), ('ghost', true, NULL, NULL, '{t0}')"
        )
        await conn.exec_driver_sql(
            "INSERT INTO sync_state (agent_id, system, observed_value, observed_version, observed_at, written_value,"
            " written_at, write_seen, changed_at, delivered_value, delivered_at, recent_writes) VALUES"
            f" ('alice', 'dynamics', '{BUSY}', 7, '{t0}', '{BUSY}', '{t0}', true, NULL, '{BUSY}', '{t0}',"
            f' \'[["{BUSY}", "2026-11-30T09:00:00+00:00"]]\'),'
            f" ('alice', 'teams', 'Busy/InAMeeting', NULL, '{t0}', 'Available/Available', '{t0}', true, NULL,"
            f" 'Available/Available', '{t0}', '[]')"
        )
        await conn.exec_driver_sql(
            "INSERT INTO outbox (agent_id, system, value, reason, status, generation, delivered_generation,"
            " attempts, next_attempt_at, lease_owner, lease_token, lease_until, last_error, created_at,"
            " updated_at) VALUES ('alice', 'teams', 'Busy/InACall', 'x', 'dead', 3, 0, 8, NULL, NULL, NULL, NULL,"
            f" 'gone', '{t0}', '{t0}')"
        )
    assert await upgrade(sql_url) == ["0003", "0004", "0005"]
    store = await open_sql(sql_url)
    states = await store.load_states(["alice", "ghost"])
    assert list(states) == ["alice"]
    alice = states["alice"]
    assert (alice.own_dynamics, alice.own_teams) == (AVAILABLE, "Busy/InAMeeting")
    assert alice.dynamics_seen.value == BUSY and alice.dynamics_seen.version == 7
    assert [w.value for w in alice.dynamics_unconfirmed] == [BUSY]
    assert (alice.session_written, alice.session_delivered) == ("Available/Available", "Available/Available")
    assert [a.dynamics_user_id for a in await store.list_agents()] == ["alice"]
    [dead] = await store.list_outbox(OutboxStatus.DEAD)
    assert (dead.agent_id, dead.value, dead.last_error) == ("alice", "Busy/InACall", "gone")
