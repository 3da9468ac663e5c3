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

Everything else (the outbox workers' statements, reads) stays on the async engine. Both engines'
writers go through ``SqlStore``'s one write lock, so this process never has two write transactions
open at once; SQLite's own locking orders it against other processes as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Connection, Engine

from service.store.connect import BEGIN_MODE


class InlineConnection:
    """The part of ``AsyncConnection`` the statement modules use (``execute``, ``dialect``), over a
    sync connection whose statements never wait (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.dialect = conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        if parameters is None:
            return self._conn.execute(statement)
        return self._conn.execute(statement, parameters)


class InlineSqlite:
    """Write transactions on ``engine`` (a sync pysqlite engine on the store's file)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="presence-sync-sqlite")

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
    async def transaction(self) -> AsyncIterator[InlineConnection]:
        """Commit on normal exit, rollback on exception; the caller holds the store's write lock."""
        loop = asyncio.get_running_loop()
        begun = loop.run_in_executor(self._thread, self._begin)
        try:
            conn, tx = await asyncio.shield(begun)
        except asyncio.CancelledError:
            # The BEGIN goes on in the thread and may yet get the lock: roll it back before the
            # caller lets go of the store's write lock, or the next writer's BEGIN (queued behind it
            # on the same thread, on another connection) would wait on it until busy_timeout.
            begun.add_done_callback(self._end_later)  # if this wait is cancelled too
            with contextlib.suppress(BaseException):
                await asyncio.shield(begun)
            raise
        try:
            yield InlineConnection(conn)
        except BaseException:
            # Shielded: a cancelled caller must not leave the write lock held by an open transaction.
            await asyncio.shield(loop.run_in_executor(self._thread, self._end, conn, tx, False))
            raise
        await asyncio.shield(loop.run_in_executor(self._thread, self._end, conn, tx, True))

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.engine.dispose()
