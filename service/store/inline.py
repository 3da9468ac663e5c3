"""SQLite write transactions with their statements run on the event loop thread.

Why: through aiosqlite every statement is about four hops to its worker thread and back (cursor,
execute, fetch, close), each a thread wake-up and an event-loop wake-up. On a busy machine those
wake-ups, not SQLite, were the webhook's cost: one observation (about seven statements) took
several milliseconds while SQLite itself runs such a statement in tens of microseconds
(``bench/webhook_bench.py``). So every write of the store (the engine's transactions, the
outbox's claims and acks, adapter records) runs on one connection, kept open, and goes to a thread
only where SQLite may wait:

- ``BEGIN IMMEDIATE`` is tried inline without waiting (the connection's ``busy_timeout`` is 0):
  when another connection or process holds the write lock, it is tried again on the thread with
  the store's full ``busy_timeout``, and the loop keeps running meanwhile;
- ``COMMIT`` (the fsync of ``synchronous=FULL``, maybe a WAL checkpoint) runs on the thread;
- the statements in between run inline: this connection holds the database's only write lock by
  then, and WAL readers never wait, so none of them waits on anyone.

The transaction is driven with the ``sqlite3`` connection's own statements (``BEGIN``, ``SAVEPOINT``,
``COMMIT``); SQLAlchemy only runs statements on it (``InlineConnection.execute``) and never begins
or ends anything (``BEGIN_MODE`` ``MANUAL``). Beginning and ending a transaction through a pooled
SQLAlchemy connection (checkout, ``begin``, ``commit``, checkin) cost about half a millisecond of
CPU, on the thread and under the GIL, for every group commit (``bench/webhook_bench.py``).

Group commit (``chained``): writers that queue for the write lock while a transaction is open
join it, each inside a SAVEPOINT of its own, and one COMMIT (one fsync) answers them all. Under load
every writer was paying a whole transaction of its own (two thread hops and an fsync) while the
others waited: during a burst of 1,000 routed changes the write lock was held 25 s of 30, and a
webhook waited 130 ms (p50) for it (``bench/scale.py``). Each writer is answered only after the
COMMIT that holds its writes; one whose block raises is rolled back to its savepoint alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from mapping.waiters import reject, resolve
from service.store.calls_thread import CallsThread
from service.store.connect import BEGIN_MODE, SQLITE_BUSY_TIMEOUT_MS


class InlineConnection:
    """The part of ``AsyncConnection`` the statement modules use (``execute``, ``dialect``), over a
    sync connection whose statements never wait (see the module docstring)."""

    def __init__(self, conn: Connection, raw: sqlite3.Connection) -> None:
        self._conn = conn
        self.dialect = conn.dialect
        self.raw = raw
        """The same connection as the ``sqlite3`` module's (``service.store.raw``), in the same
        transaction."""

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        if parameters is None:
            return self._conn.execute(statement)
        return self._conn.execute(statement, parameters)


CHAIN_MAX = 256
"""Writers per group commit at most, so a steady stream of writers still commits regularly."""


@dataclass
class _Chain:
    """One open transaction shared by the writers that joined it, committed once for all."""

    waiting: list[asyncio.Future[None]] = field(default_factory=list)


def _busy(error: sqlite3.OperationalError) -> bool:
    text = str(error)
    return "locked" in text or "busy" in text


class InlineSqlite:
    """Write transactions on ``engine`` (a sync pysqlite engine on the store's file)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread = CallsThread("presence-sync-sqlite")
        self._lock = asyncio.Lock()
        """The process's one SQLite writer: held while a writer's statements run, and by a COMMIT."""
        self._conn: Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._chain: _Chain | None = None
        self._committer: asyncio.Task[None] | None = None
        self._savepoints = 0

    # -------------------------------------------------------------------------- the one connection

    def _open(self) -> None:
        """On the thread: connecting sets WAL mode, which may wait for another process."""
        if self._conn is not None:
            return
        conn = self.engine.connect().execution_options(**{BEGIN_MODE: "MANUAL"})
        raw: sqlite3.Connection = conn.connection.dbapi_connection  # type: ignore[assignment]
        raw.execute("PRAGMA busy_timeout=0")
        self._conn, self._raw = conn, raw

    def _begin_waiting(self) -> None:
        """On the thread: BEGIN IMMEDIATE, waiting up to the store's busy timeout for the lock."""
        assert self._raw is not None
        self._raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        try:
            self._raw.execute("BEGIN IMMEDIATE")
        finally:
            self._raw.execute("PRAGMA busy_timeout=0")

    def _end(self, commit: bool) -> None:
        """COMMIT (or ROLLBACK); a COMMIT that fails leaves nothing open behind it."""
        raw = self._raw
        assert raw is not None
        if not commit:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            return
        try:
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    raw.execute("ROLLBACK")
            raise

    def _end_later(self, begun: asyncio.Future[None]) -> None:
        """A caller cancelled while its BEGIN waited on the thread: roll that transaction back once
        it is open (the thread runs one call at a time, so this runs after the BEGIN)."""
        if not begun.cancelled() and begun.exception() is None:
            self._thread.submit(self._end, False)

    async def _begin(self) -> None:
        if self._raw is None:
            await self._thread.call(self._open)
        assert self._raw is not None
        try:
            self._raw.execute("BEGIN IMMEDIATE")  # busy_timeout 0: answers at once
            return
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
        begun = self._thread.call(self._begin_waiting)
        try:
            await asyncio.shield(begun)
        except asyncio.CancelledError:
            begun.add_done_callback(self._end_later)
            with contextlib.suppress(BaseException):
                await asyncio.shield(begun)
            raise

    # -------------------------------------------------------------------------- writers

    @asynccontextmanager
    async def chained(self) -> AsyncIterator[InlineConnection]:
        """One writer's part of a group commit (see the module docstring). The write lock is held
        while this writer's statements run and released before the COMMIT is awaited, so writers
        queueing meanwhile join the same transaction. Returns once the COMMIT holding
        this writer's statements is durable; raises what the block raised (its statements rolled
        back alone), or the COMMIT's error."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            chain = self._chain
            if chain is None:
                await self._begin()
                chain = self._chain = _Chain()
            assert self._conn is not None and self._raw is not None
            raw = self._raw
            done: asyncio.Future[None] = loop.create_future()
            try:
                # The first writer of a chain needs no SAVEPOINT (two statements fewer for a lone
                # writer): if it fails, nothing else is in the transaction, and the whole chain goes.
                savepoint = None
                if chain.waiting:
                    self._savepoints += 1
                    savepoint = f"w{self._savepoints}"
                    raw.execute(f"SAVEPOINT {savepoint}")
                try:
                    yield InlineConnection(self._conn, raw)
                except BaseException:
                    if savepoint is not None:
                        raw.execute(f"ROLLBACK TO {savepoint}")
                        raw.execute(f"RELEASE {savepoint}")
                    elif self._chain is chain:
                        self._chain = None  # rolled back whole below, before anyone else joins
                        await asyncio.shield(self._commit(chain))
                    raise
                if savepoint is not None:
                    raw.execute(f"RELEASE {savepoint}")
                chain.waiting.append(done)
            finally:
                # Whatever happened here, the writers before this one in the chain need their COMMIT.
                if len(chain.waiting) >= CHAIN_MAX and self._chain is chain:
                    self._chain = None
                    await asyncio.shield(self._commit(chain))
                else:
                    self._schedule_commit()
        await asyncio.shield(done)

    def _schedule_commit(self) -> None:
        """A committer queues for the write lock behind the writers waiting now (they join the
        chain first) and then commits whatever chain is open."""
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_when_free())

    async def _commit_when_free(self) -> None:
        async with self._lock:
            chain, self._chain = self._chain, None
            if chain is not None:
                await self._commit(chain)

    async def _commit(self, chain: _Chain) -> None:
        """COMMIT (rollback when empty) on the thread; every joined writer gets its outcome."""
        error: BaseException | None = None
        try:
            await self._thread.call(self._end, bool(chain.waiting))
        except BaseException as e:  # handed to every writer of the chain
            error = e
        for done in chain.waiting:
            if error is None:
                resolve(done, None)
            else:
                reject(done, error)
        if error is not None and not isinstance(error, Exception):
            raise error

    async def flush(self) -> None:
        """Commits the open chain, if any (at close)."""
        if self._committer is not None and not self._committer.done():
            await asyncio.shield(self._committer)
        await self._commit_when_free()

    def close(self) -> None:
        self._thread.shutdown()
        if self._conn is not None:
            if self._raw is not None and self._raw.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._raw.execute("ROLLBACK")
            self._conn.close()
            self._conn = self._raw = None
        self.engine.dispose()
