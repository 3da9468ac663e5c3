"""From a ``PRESENCE_SYNC_DATABASE_URL`` to a configured async engine, and errors an admin can act on.

- URLs: ``sqlite+aiosqlite:///FILE.db`` or ``postgresql+asyncpg://USER@HOST:PORT/DB``; the plain
  ``sqlite://`` and ``postgresql://`` spellings are accepted too (as in ``service.settings``).
- PostgreSQL schema: ``?schema=NAME`` in the URL (or ``open_store(..., schema=NAME)``) puts every
  table, the Alembic version table included, in that schema by setting the session ``search_path``
  through asyncpg's ``server_settings``. Several deployments, or test runs, can share one database.
- SQLite: WAL (readers never block the writer), ``busy_timeout`` (another process writing makes us
  wait instead of failing), foreign keys on, and transactions begun by SQLAlchemy rather than by the
  ``sqlite3`` module, so that writers can say ``BEGIN IMMEDIATE`` (see ``BEGIN_MODE``).
"""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mapping.errors import ConfigError

ENV = "PRESENCE_SYNC_DATABASE_URL"

BEGIN_MODE = "presence_sync_sqlite_begin"
"""Execution option read by the SQLite ``begin`` hook: ``IMMEDIATE`` for write transactions, which
take the write lock up front (waiting up to ``busy_timeout``), so that a transaction that reads and
then writes can never fail half-way with SQLITE_BUSY because another writer got in between;
``MANUAL`` for a connection whose transactions are begun and ended with the driver's own statements
(``service.store.inline``), so that SQLAlchemy begins nothing on it."""

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 10.0

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Target:
    """A parsed database URL. ``shown`` is safe to print: it never contains the password."""

    url: URL
    schema: str | None

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def sqlite_folder(self) -> Path | None:
        """The directory the SQLite file goes in (None for ``:memory:`` and ``file:`` URIs)."""
        name = self.url.database or ""
        if not self.is_sqlite or name in ("", ":memory:") or name.startswith("file:"):
            return None
        return Path(name).expanduser().resolve().parent

    @property
    def shown(self) -> str:
        # ``URL.set(password=None)`` means "leave it": drop it through the tuple instead.
        text = self.url._replace(password=None).render_as_string(hide_password=False)
        return f"{text}?schema={self.schema}" if self.schema else text


def parse_url(database_url: str, schema: str | None = None) -> Target:
    """Parses and checks the URL; ``ConfigError`` naming ``PRESENCE_SYNC_DATABASE_URL`` when bad."""
    raw = database_url.strip()
    for plain in ("postgresql://", "postgres://"):
        if raw.startswith(plain):
            raw = "postgresql+asyncpg://" + raw[len(plain) :]
    if raw.startswith("sqlite://"):
        raw = "sqlite+aiosqlite://" + raw[len("sqlite://") :]
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(
            f"{ENV}: cannot parse {_without_password(raw)!r}; expected sqlite+aiosqlite:///FILE.db or "
            "postgresql+asyncpg://USER@HOST:PORT/DB"
        ) from None
    query = dict(url.query)
    from_query = query.pop("schema", None)
    url = url.set(query=query)
    chosen = schema or (from_query if isinstance(from_query, str) else None)
    target = Target(url, chosen)
    if url.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ConfigError(
            f"{ENV}: unsupported database {url.drivername!r} in {target.shown}; expected "
            "sqlite+aiosqlite:///FILE.db or postgresql+asyncpg://USER@HOST:PORT/DB"
        )
    if target.is_sqlite and not url.database:
        raise ConfigError(f"{ENV}: {target.shown} names no database file; expected sqlite+aiosqlite:///FILE.db")
    if target.is_sqlite and (url.database == ":memory:" or "mode=memory" in str(url)):
        # One shared connection: concurrent reads and writes would run inside each other's transactions.
        raise ConfigError(
            f"{ENV}: an in-memory SQLite database is not supported; use a file such as "
            "sqlite+aiosqlite:///presence-sync.db"
        )
    if chosen is not None:
        if target.is_sqlite:
            raise ConfigError(f"{ENV}: schema= is for PostgreSQL only (got it in {target.shown})")
        if not _SCHEMA_NAME.match(chosen):
            raise ConfigError(f"{ENV}: schema {chosen!r} is not a plain identifier (letters, digits, _)")
    return target


def _without_password(raw: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1@", raw)


def create_engine(target: Target) -> AsyncEngine:
    """An engine with the dialect's session settings applied on every new connection."""
    if target.is_sqlite:
        engine = create_async_engine(target.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _sqlite_hooks(engine.sync_engine)
        return engine
    settings = {"application_name": "presence-sync", "TimeZone": "UTC"}
    if target.schema:
        settings["search_path"] = target.schema
    return create_async_engine(
        target.url,
        pool_pre_ping=False,
        connect_args={"server_settings": settings, "timeout": PG_CONNECT_TIMEOUT_S},
    )


def create_inline_engine(target: Target) -> Engine:
    """SQLite: a sync engine on the same file with the same session settings, for the write
    transactions of ``service.store.inline`` (used from its thread and the loop's, one at a time)."""
    engine = create_sync_engine(
        target.url.set(drivername="sqlite+pysqlite"),
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )
    _sqlite_hooks(engine)
    return engine


def _set_wal(cursor: Any) -> None:
    """``journal_mode=WAL``. SQLite answers "database is locked" at once, without waiting out
    ``busy_timeout``, when another connection holds a transaction while this one would switch the
    mode (a fresh file, another instance migrating it): so it is tried again within the same budget.
    Runs on aiosqlite's connection thread, so the sleep blocks no event loop."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The sqlite3 module's own transaction handling would BEGIN (DEFERRED) behind our back.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _set_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")  # the outbox promise is durability: fsync each commit
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(BEGIN_MODE, "DEFERRED")
        if mode != "MANUAL":  # MANUAL: the caller drives the transaction itself (service.store.inline)
            conn.exec_driver_sql(f"BEGIN {mode}")


def describe_connect_error(exc: BaseException) -> str:
    """A short, password-free reason from the bottom of a driver's exception chain."""
    root = exc
    seen: set[int] = set()
    while id(root) not in seen:
        seen.add(id(root))
        nxt = getattr(root, "orig", None) or root.__cause__
        if nxt is None or not isinstance(nxt, BaseException):
            break
        root = nxt
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, socket.gaierror):
        return "unknown host"
    if isinstance(root, TimeoutError):
        return "timed out"
    text = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    return text
