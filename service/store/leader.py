"""Leadership for work only one instance may do (subscription upkeep, reconciliation).

PostgreSQL: a session advisory lock taken on one connection the store keeps open outside the pool's
rotation. The lock lives exactly as long as that session: if the process dies or the connection
drops, PostgreSQL releases it and another instance takes over at its next ``try_lead``. The key is
hashed from the schema and the name, so deployments sharing a database in different schemas do not
elect each other's leaders.

Within one store, the first owner of a name keeps it (as ``MemoryStore``); advisory locks are
re-entrant per session, so that bookkeeping is ours. SQLite (one process by design) has no lock to
take: the in-process bookkeeping is all there is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger("presence_sync.store")


def lock_key(namespace: str, name: str) -> int:
    """A stable signed 64-bit key (``pg_try_advisory_lock(bigint)``); Python's ``hash`` is salted."""
    digest = hashlib.sha256(f"presence-sync\0{namespace}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    def __init__(self, engine: AsyncEngine | None, namespace: str) -> None:
        self._engine = engine  # None: no cross-process lock (SQLite)
        self._namespace = namespace
        self._conn: AsyncConnection | None = None
        self._held: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def try_lead(self, name: str, owner: str) -> bool:
        async with self._lock:
            holder = self._held.get(name)
            if holder is not None and holder != owner:
                return False
            if self._engine is None:
                self._held[name] = owner
                return True
            for attempt in (1, 2):
                try:
                    return await self._acquire(name, owner, held=holder is not None)
                except Exception as e:
                    # The session is gone, and with it every lock it held: start again from nothing.
                    await self._drop()
                    holder = None
                    if attempt == 2:
                        log.warning("leadership check failed", extra={"fields": {"name": name, "error": str(e)}})
            return False

    async def _acquire(self, name: str, owner: str, *, held: bool) -> bool:
        if self._conn is None:
            assert self._engine is not None
            conn = await self._engine.connect()
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if held:
            await self._conn.execute(text("SELECT 1"))  # the session is alive, so the lock still is
            return True
        key = lock_key(self._namespace, name)
        got = bool((await self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar_one())
        if got:
            self._held[name] = owner
        return got

    async def _drop(self) -> None:
        self._held.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.invalidate()  # never hand a session holding locks back to the pool
            except Exception:
                log.debug("closing the leadership connection failed", exc_info=True)

    async def close(self) -> None:
        """Releases every leadership now rather than when the connection happens to close."""
        async with self._lock:
            if self._conn is not None:
                try:
                    await self._conn.execute(text("SELECT pg_advisory_unlock_all()"))
                except Exception:
                    log.debug("releasing advisory locks failed", exc_info=True)
            await self._drop()
