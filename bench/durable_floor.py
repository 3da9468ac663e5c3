"""The **durable floor**, a baseline for the intake benches (``webhook_bench.py``,
``notifications_bench.py``): an aiohttp handler that does what the raw relay does (read the body,
parse the JSON) plus the one thing an intake that answers only once a change is durable cannot skip
(rule 7): a small row per change upserted and committed before the answer. Requests that arrive
together share one commit, as the store's group commit does:

- SQLite: a file of its own in WAL with ``synchronous=FULL`` (the store's pragmas), the statements
  on the loop thread and ``COMMIT`` handed to a thread the way the store hands it
  (``service.store.calls_thread``);
- PostgreSQL: one transaction per group on one asyncpg connection, in the run's schema.

No key or token check, no context, no directory, no rules, no outbox: what an intake pays beyond this
is its own work. The rows are what ``rows_of`` takes from each parsed body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from mapping.waiters import reject, resolve
from service.store.calls_thread import CallsThread

Rows = list[tuple[str, str]]

GROUP = 16
"""Rows' requests per transaction at most, as the engine's ``BATCH``."""


class DurableFloor:
    """The floor's handler and its group commit: requests queue their rows, one writer takes the
    queued requests (up to ``GROUP``) into one transaction, and each request is answered after the
    commit that holds its rows. ``write`` runs one group; ``rows_of`` reads a parsed body's rows."""

    def __init__(self, write: Callable[[Rows], Awaitable[None]]) -> None:
        self.write = write
        self.queue: list[tuple[Rows, asyncio.Future[None]]] = []
        self.writer: asyncio.Task[None] | None = None

    def handler(self, rows_of: Callable[[Any], Rows], status: int) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            rows = rows_of(json.loads(await request.read()))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.queue.append((rows, done))
            if self.writer is None or self.writer.done():
                self.writer = asyncio.ensure_future(self._drain())
            await done
            return web.json_response({"status": "ok"}, status=status)

        return handle

    async def _drain(self) -> None:
        while self.queue:
            group, self.queue = self.queue[:GROUP], self.queue[GROUP:]
            try:
                await self.write([row for rows, _ in group for row in rows])
            except Exception as e:
                for _, done in group:
                    reject(done, e)
                continue
            for _, done in group:  # a request whose sender went away meanwhile is left alone
                resolve(done, None)


UPSERT = "INSERT INTO floor (id, detail) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET detail = excluded.detail"


@contextlib.asynccontextmanager
async def sqlite_floor(folder: str | Path) -> AsyncIterator[DurableFloor]:
    """The floor on SQLite (see the module docstring)."""
    db = sqlite3.connect(Path(folder) / "floor.db", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS floor (id TEXT PRIMARY KEY, detail TEXT)")
    upsert = UPSERT.replace("$1", "?").replace("$2", "?")
    thread = CallsThread("durable-floor")

    async def write(rows: Rows) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(upsert, rows)
        await thread.call(db.execute, "COMMIT")

    try:
        yield DurableFloor(write)
    finally:
        thread.shutdown()
        db.close()


@contextlib.asynccontextmanager
async def postgres_floor(url: str, schema: str) -> AsyncIterator[DurableFloor]:
    """The floor on PostgreSQL (see the module docstring): a table in ``schema``, dropped with it."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=10)
    await conn.execute(f'CREATE TABLE "{schema}".floor (id text PRIMARY KEY, detail text)')
    await conn.execute(f'SET search_path TO "{schema}"')

    async def write(rows: Rows) -> None:
        async with conn.transaction():
            await conn.executemany(UPSERT, rows)

    try:
        yield DurableFloor(write)
    finally:
        await conn.close()
