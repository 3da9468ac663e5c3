"""SQLite sync-engine transactions with their statements run on the event loop thread.

Why: through aiosqlite every statement is about four hops to its worker thread and back (cursor,
execute, fetch, close), each a thread wake-up and an event-loop wake-up. On a busy machine those
wake-ups, not SQLite, were the webhook's cost: one observation (about seven statements) took
several milliseconds while SQLite itself runs such a statement in tens of microseconds
(``bench/webhook_bench.py``). So the sync engine's transactions (``SqlStore.transaction``, the
engine's hot path) go to the thread only where SQLite may wait:

- ``BEGIN IMMEDIATE`` (another connection or process may hold the write lock: it waits up to
  ``busy_timeout``) and ``COMMIT`` (the fsync of ``synchronous=FULL``, maybe a WAL checkpoint) run on
  one dedicated thread;
- the statements in between run inline on the loop thread: this connection holds the database's
  only write lock by then, and WAL readers never wait, so none of them waits on anyone.

Every write of the store comes through here (reads stay on the async engine), under this module's
one write lock, so this process never has two write transactions open at once; SQLite's own
locking orders it against other processes as before.

Group commit (``chained``): writers that queue for the write lock while a transaction is open
join it, each inside a SAVEPOINT of its own, and one COMMIT (one fsync) answers them all. Under load
every writer was paying a whole transaction of its own (two thread hops and an fsync) while the
others waited: during a burst of 1,000 routed changes the write lock was held 25 s of 30, and a
webhook waited 130 ms (p50) for it (``bench/scale.py``). Each writer is answered only after the
COMMIT that holds its writes; one whose block raises is rolled back to its savepoint alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from service.store.connect import BEGIN_MODE


class InlineConnection:
    """The part of ``AsyncConnection`` the statement modules use (``execute``, ``dialect``), over a
    sync connection whose statements never wait (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.dialect = conn.dialect
        self.raw: sqlite3.Connection = conn.connection.dbapi_connection  # type: ignore[assignment]
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

    conn: Connection
    tx: Any
    waiting: list[asyncio.Future[None]] = field(default_factory=list)


class InlineSqlite:
    """Write transactions on ``engine`` (a sync pysqlite engine on the store's file)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="presence-sync-sqlite")
        self._lock = asyncio.Lock()
        """The process's one SQLite writer: held while a writer's statements run, and by a COMMIT."""
        self._chain: _Chain | None = None
        self._committer: asyncio.Task[None] | None = None

    def _begin(self) -> tuple[Connection, Any]:
        conn = self.engine.connect().execution_options(**{BEGIN_MODE: "IMMEDIATE"})
        try:
            return conn, conn.begin()
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _end(conn: Connection, tx: Any, commit: bool) -> None:
        try:
            if commit:
                tx.commit()
            else:
                tx.rollback()
        finally:
            conn.close()

    def _end_later(self, begun: asyncio.Future[tuple[Connection, Any]]) -> None:
        """A caller cancelled while its BEGIN ran: roll that transaction back once it is open."""
        if not begun.cancelled() and begun.exception() is None:
            conn, tx = begun.result()
            self._thread.submit(self._end, conn, tx, False)

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
                begun = loop.run_in_executor(self._thread, self._begin)
                try:
                    conn, tx = await asyncio.shield(begun)
                except asyncio.CancelledError:
                    begun.add_done_callback(self._end_later)
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(begun)
                    raise
                chain = self._chain = _Chain(conn, tx)
            done: asyncio.Future[None] = loop.create_future()
            try:
                # The first writer of a chain needs no SAVEPOINT (two statements fewer for a lone
                # writer): if it fails, nothing else is in the transaction, and the whole chain goes.
                savepoint = chain.conn.begin_nested() if chain.waiting else None
                try:
                    yield InlineConnection(chain.conn)
                except BaseException:
                    if savepoint is not None:
                        savepoint.rollback()
                    elif self._chain is chain:
                        self._chain = None  # rolled back whole below, before anyone else joins
                        await asyncio.shield(self._commit(chain))
                    raise
                if savepoint is not None:
                    savepoint.commit()
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
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        try:
            await loop.run_in_executor(self._thread, self._end, chain.conn, chain.tx, bool(chain.waiting))
        except BaseException as e:  # handed to every writer of the chain
            error = e
        for done in chain.waiting:
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                done.cancel()
            else:
                done.set_exception(error)
        if error is not None and not isinstance(error, Exception):
            raise error

    async def flush(self) -> None:
        """Commits the open chain, if any (at close)."""
        if self._committer is not None and not self._committer.done():
            await asyncio.shield(self._committer)
        await self._commit_when_free()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.engine.dispose()
