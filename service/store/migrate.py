"""Alembic, driven from code: no ``alembic.ini``, no dependence on the working directory.

Every command that opens the store applies pending migrations itself, so it works on a fresh store
(``docs/DESIGN.md``, "Commands"; ``doctor`` alone only reports them). So this runs inside
``open_store``: one transaction, on a sync connection lent by the async engine through ``run_sync``.
Two instances starting together do not race: PostgreSQL serialises them with a transaction-level
advisory lock, SQLite with ``BEGIN IMMEDIATE``.

New revision for developers (after changing ``schema.py``)::

    from alembic import command
    from service.store.migrate import alembic_config
    command.revision(alembic_config(), message="what changed", rev_id="0004")
"""

from __future__ import annotations

import asyncio
import weakref
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mapping.errors import ConfigError
from service.store.connect import BEGIN_MODE, ENV, Target, create_engine, describe_connect_error, parse_url

if TYPE_CHECKING:
    from service.store.sql import SqlStore

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_MIGRATION_LOCK = 0x5053_5359_4E43  # "PSSYNC": advisory lock key serialising concurrent upgrades


def alembic_config(connection: Connection | None = None, applied: list[str] | None = None) -> Config:
    """The alembic.ini equivalent. ``env.py`` takes the connection (and the list it reports applied
    revisions into) from ``config.attributes``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    cfg.attributes["applied"] = applied if applied is not None else []
    return cfg


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships its migrations
        raise RuntimeError(f"no Alembic revisions found in {MIGRATIONS_DIR}")
    return head


def _current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _known(revision: str) -> bool:
    return any(r.revision == revision for r in script_directory().walk_revisions())


def _newer_schema_error(target: Target, current: str) -> ConfigError:
    return ConfigError(
        f"{ENV}: the database at {target.shown} has schema revision {current}, which this version of "
        f"presence-sync does not know (its newest is {head_revision()}); run the newer presence-sync "
        "that migrated it, or use another database"
    )


def _upgrade_sync(conn: Connection) -> tuple[str | None, list[str]]:
    current = _current_revision(conn)
    if current is not None and not _known(current):
        return current, []
    applied: list[str] = []
    command.upgrade(alembic_config(conn, applied), "head")
    return current, applied


async def _writer(conn: AsyncConnection, target: Target) -> AsyncConnection:
    if target.is_sqlite:
        return await conn.execution_options(**{BEGIN_MODE: "IMMEDIATE"})
    return conn


async def check_reachable(engine: AsyncEngine, target: Target) -> None:
    """One round trip, turning any driver failure into the one-line ``ConfigError`` the CLI prints."""
    if target.is_sqlite:
        folder = target.sqlite_folder
        if folder is not None and not folder.is_dir():
            # Said plainly, and before aiosqlite fails to open the file (which also leaves its worker
            # thread finishing after the caller may have closed the loop).
            raise ConfigError(f"{ENV}: cannot connect to {target.shown}: directory {folder} does not exist")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as e:
        raise ConfigError(f"{ENV}: cannot connect to {target.shown}: {describe_connect_error(e)}") from e


_IN_PROCESS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _alembic_lock() -> asyncio.Lock:
    """Alembic keeps the running migration in a module global (``alembic.context``); two migrations
    interleaving in one process (greenlets switching inside ``run_sync``) would run on each other's
    context and hang. One at a time per event loop; the database locks cover other processes."""
    loop = asyncio.get_running_loop()
    lock = _IN_PROCESS.get(loop)
    if lock is None:
        lock = _IN_PROCESS[loop] = asyncio.Lock()
    return lock


async def migrate_engine(engine: AsyncEngine, target: Target) -> list[str]:
    """Applies pending revisions; returns their ids (empty when already at head)."""
    await check_reachable(engine, target)
    try:
        async with _alembic_lock(), engine.connect() as raw:
            conn = await _writer(raw, target)
            async with conn.begin():
                if not target.is_sqlite:
                    if target.schema:
                        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{target.schema}"'))
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                current, applied = await conn.run_sync(_upgrade_sync)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{ENV}: cannot apply migrations to {target.shown}: {describe_connect_error(e)}") from e
    if current is not None and not _known(current):
        raise _newer_schema_error(target, current)
    return applied


async def check_not_newer(engine: AsyncEngine, target: Target) -> None:
    """For ``open_store(migrate=False)``: the code must know the schema it is pointed at."""
    await check_reachable(engine, target)
    async with engine.connect() as conn:
        current = await conn.run_sync(_current_revision)
    if current is not None and not _known(current):
        raise _newer_schema_error(target, current)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current_revision)


async def migration_status(store: SqlStore) -> tuple[str | None, str]:
    """``(current, head)`` revision ids for ``/readyz`` and ``doctor``; current is None on an empty DB."""
    return await current_revision(store.engine), head_revision()


async def upgrade(database_url: str, *, schema: str | None = None) -> list[str]:
    """``presence-sync db upgrade``: applies pending migrations and returns the revisions applied."""
    target = parse_url(database_url, schema)
    engine = create_engine(target)
    try:
        return await migrate_engine(engine, target)
    finally:
        await engine.dispose()


def describe(applied: list[str]) -> str:
    """A line for the CLI: what ``upgrade`` did."""
    return f"applied {', '.join(applied)}" if applied else f"already at {head_revision()}"
