"""Migrations: applied from code on a fresh database, idempotent, safe when instances start together,
and describing exactly the tables ``service/store/schema.py`` declares."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Callable

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from service.store import SqlStore, migration_status, upgrade
from service.store.migrate import alembic_config, describe, head_revision
from service.store.schema import metadata

OpenSql = Callable[..., Awaitable[SqlStore]]


async def test_upgrade_is_applied_once_then_a_no_op(sql_url: str, open_sql: OpenSql) -> None:
    assert await upgrade(sql_url) == ["0001", "0002"]
    assert await upgrade(sql_url) == []
    assert describe([]) == f"already at {head_revision()}"
    store = await open_sql(sql_url, migrate=False)
    assert await migration_status(store) == (head_revision(), head_revision())
    await store.ping()


async def test_open_store_migrates_a_fresh_database(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)
    assert await migration_status(store) == ("0002", "0002")
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
    assert await upgrade(sql_url) == ["0001", "0002"]


async def test_stores_opened_together_in_one_process_migrate_once(
    sql_url: str, sqlite_url: str, open_sql: OpenSql
) -> None:
    """Also two different databases at once: Alembic's global context must not be shared."""
    other = sqlite_url.replace("presence-sync.db", "other.db")
    results = await asyncio.wait_for(asyncio.gather(*(upgrade(url) for url in (sql_url, other) * 3)), 30)
    assert sorted(results) == [[], [], [], [], ["0001", "0002"], ["0001", "0002"]]


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
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", _UPGRADE, sql_url, start,
                                                  stdout=PIPE, stderr=PIPE) for _ in range(4)]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err.decode()[-500:] for _, err in outputs]
    assert sorted(json.loads(out) for out, _ in outputs) == [[], [], [], ["0001", "0002"]]
