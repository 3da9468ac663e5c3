"""``SqlStore``: the ``mapping.ports.Store`` on SQLAlchemy 2 (async Core), SQLite or PostgreSQL.

``mapping.memory.MemoryStore`` is the reference; ``tests/store`` runs one contract suite on both.
Concurrency model:
- SQLite has one writer. Inside a process, writers queue on one ``asyncio.Lock`` and share group
  commits (``service.store.inline``); a transaction begins with ``BEGIN IMMEDIATE`` (other
  processes, e.g. the CLI beside ``serve``, wait on ``busy_timeout``); reads run on their own
  connections and, thanks to WAL, never block.
- PostgreSQL has many writers, on many instances: ``load_state`` locks the agent's row, ``claim``
  skips rows other claimers hold, and leadership is an advisory lock (``service.store.leader``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, cast

import asyncpg
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mapping.clock import utcnow
from mapping.errors import ConfigError
from mapping.memory import QUARANTINE_MAX_ITEMS
from mapping.model import (
    Agent,
    AgentSyncState,
    BasePresence,
    Delivery,
    OutboxRow,
    OutboxStatus,
    Presence,
    QuarantinedItem,
    System,
)
from service.store import directory_sql, outbox_sql, quarantine_sql, state_sql
from service.store.connect import (
    ENV,
    Target,
    create_engine,
    create_inline_engine,
    describe_connect_error,
    parse_url,
)
from service.store.console_sql import ConsoleSql
from service.store.dialect import upsert
from service.store.inline import InlineSqlite
from service.store.leader import Leadership
from service.store.migrate import (
    check_not_newer,
    current_revision,
    head_revision,
    migrate_engine,
    migration_status,
    upgrade,
)
from service.store.raw import Driver, PgDriver, Sql, SqliteDriver, dumps
from service.store.schema import agents, docs, presences, secrets
from service.store.secrets import SecretBox
from service.store.state_cache import StateCache
from service.store.tx import SqlTransaction

__all__ = ["SqlStore", "migration_status", "open_store", "upgrade"]

_CONNECTION_LOST = (asyncio.CancelledError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
"""What leaves an asyncpg connection unusable or in an unknown state (a cancelled statement too)."""


class SqlStore(ConsoleSql):
    """Build it with ``open_store``; the constructor does no I/O and applies no migrations."""

    def __init__(
        self,
        engine: AsyncEngine,
        target: Target,
        secret_box: SecretBox,
        *,
        quarantine_max_items: int = QUARANTINE_MAX_ITEMS,
    ) -> None:
        self.engine = engine
        self.quarantine_max_items = quarantine_max_items
        self.target = target
        self._box = secret_box
        self._sqlite = target.is_sqlite
        # SQLite: the engine's transactions without aiosqlite's per-statement thread hops (inline.py).
        self._inline = InlineSqlite(create_inline_engine(target)) if self._sqlite else None
        self._leader = Leadership(None if self._sqlite else engine, target.schema or "")
        self._states = StateCache()
        self._closed = False

    @property
    def dialect(self) -> str:
        return self.target.dialect

    # Connections -------------------------------------------------------------------------------
    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: commit on normal exit, rollback on exception.

        SQLite: every write (the engine's, the outbox's claims and acks, adapter records) runs on the
        inline connection (``inline.py``), statements on the loop thread under its write lock,
        only BEGIN and COMMIT on the thread. Through aiosqlite each statement was four thread
        hops with the write lock held, so under load every writer queued behind the hops of the
        others: during a burst of 1,000 routed changes the webhook waited 277 ms (p50) for its turn
        (``bench/scale.py``)."""
        if self._inline is not None:
            async with self._inline.chained() as inline:
                # InlineConnection offers what the statement modules use of an AsyncConnection.
                yield cast(AsyncConnection, inline)
            return
        async with self.engine.connect() as conn, conn.begin():
            yield conn

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        """The engine's transactions, on the drivers' own connections (``service.store.raw``): the
        inline SQLite connection under the store's write lock and group commit, or an asyncpg
        connection from the engine's pool in a transaction of its own."""
        async with self._raw_writing() as db:
            yield SqlTransaction(db, lock_rows=not self._sqlite, states=self._states)

    @asynccontextmanager
    async def _raw_writing(self) -> AsyncIterator[Driver]:
        """One write transaction on the drivers' own connections (``service.store.raw``): commit on
        normal exit, rollback on exception. SQLite: the inline connection under the store's write lock
        and group commit; PostgreSQL: an asyncpg connection from the engine's pool."""
        if self._inline is not None:
            async with self._inline.chained() as inline:
                yield SqliteDriver(inline.raw)
            return
        async with self._pg_begun() as (fairy, raw, tr):
            try:
                yield PgDriver(raw)
            except BaseException as e:
                if isinstance(e, _CONNECTION_LOST):
                    fairy.invalidate()  # mid-statement or gone: the pool must not hand it out again
                else:
                    await tr.rollback()
                raise
            try:
                await tr.commit()
            except _CONNECTION_LOST:
                fairy.invalidate()
                raise

    @asynccontextmanager
    async def _pg_begun(self) -> AsyncIterator[tuple[Any, asyncpg.Connection, Any]]:
        """A pooled asyncpg connection in a transaction just begun (with its SQLAlchemy pool entry, to
        invalidate it, and the transaction). The pool does not ping a connection it hands out
        (``pool_pre_ping``: BEGIN, SELECT and ROLLBACK, three round trips before every transaction):
        a connection that the server dropped (a restart, a failover) fails its BEGIN instead, and
        then the whole pool is replaced and a new connection tried once. The SQLAlchemy paths replace
        the pool on such a failure themselves (a caller sees that one error; the outbox and the
        webhook's spool retry)."""
        for last in (False, True):
            conn = await self.engine.connect()
            try:
                fairy = await conn.get_raw_connection()
                raw: asyncpg.Connection = fairy.driver_connection  # asyncpg under SQLAlchemy's pool
                try:
                    tr = raw.transaction()
                    await tr.start()
                except BaseException as e:
                    # A BEGIN fails only when the connection does (asyncpg words a connection the
                    # server dropped in several ways, InternalClientError among them).
                    fairy.invalidate()
                    if last or not isinstance(e, Exception):
                        raise
                    await self.engine.dispose()  # its siblings are as stale
                    continue
                yield fairy, raw, tr
                return
            finally:
                await conn.close()

    # Directory ---------------------------------------------------------------------------------
    async def get_agent(self, dynamics_user_id: str) -> Agent | None:
        async with self._reading() as conn:
            return await directory_sql.get(conn, dynamics_user_id)

    async def get_agent_by_entra(self, entra_object_id: str) -> Agent | None:
        async with self._reading() as conn:
            return await directory_sql.get_by_entra(conn, entra_object_id)

    async def list_agents(self, *, enabled_only: bool = False) -> list[Agent]:
        query = select(agents)
        if enabled_only:
            query = query.where(agents.c.enabled.is_(True))
        async with self._reading() as conn:
            found = [directory_sql.to_agent(r) for r in (await conn.execute(query)).all()]
        # Sorted in Python: SQL lower() and collations differ between dialects for non-ASCII names.
        return sorted(found, key=lambda a: (a.display_name.lower(), a.dynamics_user_id))

    async def count_agents(self, *, enabled_only: bool = False) -> int:
        query = select(func.count()).select_from(agents)
        if enabled_only:
            query = query.where(agents.c.enabled.is_(True))
        async with self._reading() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def upsert_agents(self, agent_list: Sequence[Agent]) -> dict[str, str]:
        async with self._writing() as conn:
            return await directory_sql.upsert_many(conn, agent_list)

    async def set_agent_enabled(self, dynamics_user_id: str, enabled: bool) -> bool:
        async with self._writing() as conn:
            return await directory_sql.set_enabled(conn, dynamics_user_id, enabled)

    async def list_unknown(self) -> list[dict[str, Any]]:
        async with self._reading() as conn:
            return await directory_sql.list_unknown(conn)

    # Presence catalogue ------------------------------------------------------------------------
    async def replace_presences(self, presence_list: Sequence[Presence]) -> None:
        unique: dict[str, Presence] = {}
        for p in presence_list:  # the same id twice (any case): the last one wins, as in memory
            unique[p.presence_id.lower()] = p
        async with self._writing() as conn:
            await conn.execute(delete(presences))
            if unique:
                await conn.execute(
                    presences.insert(),
                    [
                        {
                            "presence_id": p.presence_id,
                            "name": p.name,
                            "base": int(p.base),
                            "can_user_set": p.can_user_set,
                            "position": i,
                        }
                        for i, p in enumerate(unique.values())
                    ],
                )

    async def list_presences(self) -> list[Presence]:
        async with self._reading() as conn:
            rows = (await conn.execute(select(presences).order_by(presences.c.position))).all()
        return [Presence(r.presence_id, r.name, BasePresence(r.base), bool(r.can_user_set)) for r in rows]

    # Sync state --------------------------------------------------------------------------------
    async def load_states(self, agent_ids: Sequence[str]) -> dict[str, AgentSyncState]:
        async with self._reading() as conn:
            return await state_sql.load_many(conn, agent_ids)

    async def seen_values(self, agent_ids: Sequence[str], system: System) -> dict[str, str | None]:
        async with self._reading() as conn:
            return await state_sql.seen_values(conn, agent_ids, system)

    # Outbox ------------------------------------------------------------------------------------
    async def claim(
        self, systems: Sequence[System], limit: int, lease_seconds: float, owner: str, now: datetime
    ) -> list[Delivery]:
        async with self._raw_writing() as db:
            return await outbox_sql.claim(db, systems, limit, lease_seconds, owner, now)

    async def redrive(self, system: System, now: datetime) -> int:
        async with self._writing() as conn:
            return await outbox_sql.redrive(conn, system, now)

    async def release_leases(self, owner: str, now: datetime) -> int:
        async with self._writing() as conn:
            return await outbox_sql.release_leases(conn, owner, now)

    async def ack(self, delivery: Delivery, now: datetime) -> bool:
        async with self._raw_writing() as db:
            return await outbox_sql.ack(db, delivery, now)

    async def fail(
        self, delivery: Delivery, error: str, next_attempt_at: datetime | None, now: datetime
    ) -> OutboxStatus:
        async with self._raw_writing() as db:
            return await outbox_sql.fail(db, delivery, error, next_attempt_at, now)

    async def list_outbox(self, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxRow]:
        async with self._reading() as conn:
            return await outbox_sql.list_rows(conn, status, limit)

    async def outbox_counts(self) -> dict[str, int]:
        async with self._reading() as conn:
            return await outbox_sql.counts(conn)

    async def retry_dead(self, row_id: int | None, now: datetime) -> int:
        async with self._writing() as conn:
            return await outbox_sql.retry_dead(conn, row_id, now)

    async def outbox_row(self, agent_id: str, system: System) -> OutboxRow | None:
        async with self._reading() as conn:
            return await outbox_sql.row_for(conn, agent_id, system)

    # Documents and secrets ---------------------------------------------------------------------
    async def get_doc(self, kind: str, key: str) -> dict[str, Any] | None:
        async with self._reading() as conn:
            doc = (await conn.execute(select(docs.c.doc).where(docs.c.kind == kind, docs.c.key == key))).scalar()
        return dict(doc) if doc is not None else None

    async def put_doc(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        await self.put_docs(kind, {key: doc})

    async def put_docs(self, kind: str, items: Mapping[str, dict[str, Any]]) -> None:
        """On the drivers' own connections, as the engine's writes: basic Graph notifications note a
        pending read each, and SQLAlchemy's execution cost more than the write."""
        if not items:
            return
        async with self._raw_writing() as db:
            now = db.time(utcnow())
            await db.executemany(_PUT_DOC, [(kind, key, dumps(doc), now) for key, doc in items.items()])

    async def delete_doc(self, kind: str, key: str) -> None:
        async with self._raw_writing() as db:
            await db.execute(_DELETE_DOC, kind, key)

    async def list_docs(self, kind: str) -> dict[str, dict[str, Any]]:
        async with self._reading() as conn:
            rows = (
                await conn.execute(select(docs.c.key, docs.c.doc).where(docs.c.kind == kind).order_by(docs.c.key))
            ).all()
        return {r.key: dict(r.doc) for r in rows}

    async def get_secret(self, name: str) -> bytes | None:
        self._box.require_key()  # say so now, not the first time a secret happens to exist
        async with self._reading() as conn:
            sealed = (await conn.execute(select(secrets.c.ciphertext).where(secrets.c.name == name))).scalar()
        return None if sealed is None else self._box.open(name, bytes(sealed))

    async def put_secret(self, name: str, value: bytes) -> None:
        sealed = self._box.seal(value)  # before touching the database: no key, nothing written
        stmt = upsert(self.dialect, secrets).values(name=name, ciphertext=sealed, updated_at=utcnow())
        async with self._writing() as conn:
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[secrets.c.name],
                    set_={"ciphertext": stmt.excluded.ciphertext, "updated_at": stmt.excluded.updated_at},
                )
            )

    # Quarantine ---------------------------------------------------------------------------------
    async def quarantine(self, route: str, reason: str, body: bytes, detail: str, at: datetime) -> int:
        async with self._writing() as conn:
            return await quarantine_sql.add(conn, route, reason, body, detail, at, max(1, self.quarantine_max_items))

    async def list_quarantined(self, limit: int = 100) -> list[QuarantinedItem]:
        async with self._reading() as conn:
            return await quarantine_sql.newest(conn, limit)

    async def get_quarantined(self, item_id: int) -> QuarantinedItem | None:
        async with self._reading() as conn:
            return await quarantine_sql.get(conn, item_id)

    async def drop_quarantined(self, item_id: int) -> bool:
        async with self._writing() as conn:
            return await quarantine_sql.drop(conn, item_id)

    async def quarantine_count(self) -> int:
        async with self._reading() as conn:
            return await quarantine_sql.count(conn)

    async def quarantine_dropped(self) -> int:
        async with self._reading() as conn:
            return await quarantine_sql.dropped(conn)

    # Operations --------------------------------------------------------------------------------
    async def try_lead(self, name: str, owner: str) -> bool:
        return await self._leader.try_lead(name, owner)

    async def ping(self) -> None:
        try:
            current = await current_revision(self.engine)
        except Exception as e:
            raise ConfigError(f"{ENV}: cannot connect to {self.target.shown}: {describe_connect_error(e)}") from e
        head = head_revision()
        if current != head:
            newer = current is not None and current.isdigit() and head.isdigit() and int(current) > int(head)
            fix = (
                "a newer presence-sync wrote it: install that version here (never downgrade the schema)"
                if newer
                else "run: presence-sync db upgrade"
            )
            raise ConfigError(
                f"{ENV}: the database at {self.target.shown} has schema revision {current or 'none'}, "
                f"this presence-sync needs {head}; {fix}"
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._leader.close()
        if self._inline is not None:
            with contextlib.suppress(Exception):  # a failed last COMMIT was already handed to its writers
                await self._inline.flush()
            await asyncio.to_thread(self._inline.close)
        await self.engine.dispose()


_PUT_DOC = Sql.of(
    "INSERT INTO docs (kind, key, doc, updated_at) VALUES ($1, $2, $3::json, $4) "
    "ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
)
_DELETE_DOC = Sql.of("DELETE FROM docs WHERE kind = $1 AND key = $2")


async def open_store(
    database_url: str,
    *,
    secret_key: str = "",
    migrate: bool = True,
    schema: str | None = None,
    quarantine_max_items: int = QUARANTINE_MAX_ITEMS,
) -> SqlStore:
    """Connects, applies pending migrations (unless ``migrate=False``) and returns the store.

    ``schema`` (PostgreSQL; also ``?schema=NAME`` in the URL) keeps every table in that schema,
    creating it when migrating. ``ConfigError`` (one line, naming PRESENCE_SYNC_DATABASE_URL, no
    password) when the URL is bad, the database cannot be reached, or its schema is newer than the
    code; also when ``secret_key`` is set but malformed. ``quarantine_max_items``: the quarantine's
    bound (``PRESENCE_SYNC_QUARANTINE_MAX_ITEMS``)."""
    target = parse_url(database_url, schema)
    box = SecretBox(secret_key)
    engine = create_engine(target)
    try:
        if migrate:
            await migrate_engine(engine, target)
        else:
            await check_not_newer(engine, target)
    except BaseException:
        await engine.dispose()
        raise
    return SqlStore(engine, target, box, quarantine_max_items=quarantine_max_items)
