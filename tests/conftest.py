"""Store fixtures shared by every suite: the three stores, and throw-away PostgreSQL schemas.

PostgreSQL isolation: every ``pg_url`` is the server URL from ``PRESENCE_SYNC_TEST_PG_URL``
(default ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``) plus ``?schema=ps_test_<pid>_<hex>``,
a schema created empty for the test and dropped (CASCADE) after it. ``service.store`` understands the
``schema`` query parameter: it sets the session ``search_path`` (asyncpg ``server_settings``), so
``open_store(pg_url)`` and a service started with ``PRESENCE_SYNC_DATABASE_URL=<pg_url>`` keep all
their tables, Alembic's included, in that schema. Parallel runs never see each other.

PostgreSQL unreachable: its tests are skipped with the reason, except with ``CI=true``, where they
fail, so that a CI run cannot pass while silently testing one dialect only.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from aiohttp import web
from cryptography.fernet import Fernet

from emulators.serving import serve_app
from mapping.memory import MemoryStore
from mapping.ports import Store
from service.store import SqlStore, open_store

PG_URL_ENV = "PRESENCE_SYNC_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
T = TypeVar("T")
SECRET_KEY = Fernet.generate_key().decode()
"""One key per test session: stores opened by tests encrypt secrets with it."""


def pg_server_url() -> str:
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)


def _asyncpg_dsn(url: str) -> str:
    """asyncpg speaks libpq URLs: drop SQLAlchemy's ``+asyncpg`` driver suffix."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


async def _probe(url: str) -> str | None:
    try:
        conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=5)
    except Exception as e:  # any reason at all: say which
        return f"{type(e).__name__}: {e}"
    await conn.close()
    return None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs admin coroutines on a thread of their own: sync fixtures may be set up while the test's
    event loop is running (``getfixturevalue`` from an async fixture), where ``asyncio.run`` cannot."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL server URL (no schema); skips (fails under CI=true) when it cannot be reached."""
    url = pg_server_url()
    problem = _run(_probe(url))
    if problem is not None:
        reason = (
            f"PostgreSQL not reachable at {url} ({problem}); set {PG_URL_ENV} to a server "
            "(tests then create and drop their own schemas)"
        )
        if _in_ci():
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    return url


async def _admin(server: str, *statements: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(server), timeout=10)
    try:
        await conn.execute("SET lock_timeout = '10s'")  # a store a test forgot to close must not hang us
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def make_pg_url(pg_server: str) -> Iterator[Callable[[], Awaitable[str]]]:
    """Factory: ``await make_pg_url()`` creates an empty schema and returns the URL pointing into it;
    every schema made is dropped after the test."""
    created: list[str] = []

    async def make() -> str:
        name = f"ps_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        await _admin(pg_server, f'CREATE SCHEMA "{name}"')
        created.append(name)
        return f"{pg_server}?schema={name}"

    yield make
    if created:
        _run(_admin(pg_server, *(f'DROP SCHEMA IF EXISTS "{name}" CASCADE' for name in created)))


@pytest.fixture
def pg_url(make_pg_url: Callable[[], Awaitable[str]]) -> str:
    """A PostgreSQL URL into a fresh, empty schema of its own (dropped after the test)."""
    return _run(_awaited(make_pg_url()))


async def _awaited(aw: Awaitable[T]) -> T:
    return await aw


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'presence-sync.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest) -> str:
    """A database URL per SQL dialect (fresh file / fresh schema)."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def open_sql() -> AsyncIterator[Callable[..., Awaitable[SqlStore]]]:
    """Factory: ``await open_sql(url, **kw)`` opens a SqlStore (secret key set) closed after the test."""
    opened: list[SqlStore] = []

    async def make(url: str, **kw: object) -> SqlStore:
        kw.setdefault("secret_key", SECRET_KEY)
        store = await open_store(url, **kw)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_store(request: pytest.FixtureRequest, open_sql: Callable[..., Awaitable[SqlStore]]) -> Store:
    """The same contract on the reference in-memory store and both SQL dialects."""
    if request.param == "memory":
        return MemoryStore()
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return await open_sql(url)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def stub() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, list[web.Request]]]]]:
    """A tiny fake upstream: ``await stub(handler)`` serves ``handler`` for every path on a free
    loopback port and returns its base URL and the requests it saw."""
    runners: list[web.AppRunner] = []

    async def make(handler: Handler) -> tuple[str, list[web.Request]]:
        seen: list[web.Request] = []

        async def record(request: web.Request) -> web.StreamResponse:
            seen.append(request)
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        runner, base = await serve_app(app)
        runners.append(runner)
        return base, seen

    yield make
    for r in runners:
        await r.cleanup()
